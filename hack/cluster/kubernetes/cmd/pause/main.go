// Command pause is the pod sandbox's process: it holds the pod's namespaces and reaps
// nothing but its own signals, like the upstream pause image (which is C; this is the same
// program as a static Go binary, so the image is built here from one file).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
}
