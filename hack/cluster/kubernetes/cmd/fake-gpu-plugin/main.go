// Command fake-gpu-plugin advertises N fake `nvidia.com/gpu` devices to one kubelet through
// the device-plugin API, so that pods asking for GPUs schedule onto a real node and run on
// its CPU. It reuses the kubelet's own device-plugin stub (the one the kubelet's e2e tests
// use); upstream's sample-device-plugin hard-codes `example.com/resource`.
//
// Allocate hands each container NVIDIA_VISIBLE_DEVICES (what the NVIDIA runtime would read)
// and nothing else: no device node is mounted, so CUDA finds no GPU and the workloads take
// their CPU paths.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	plugin "k8s.io/kubernetes/pkg/kubelet/cm/devicemanager/plugin/v1beta1"
)

func main() {
	count := flag.Int("count", 4, "fake GPUs to advertise")
	resource := flag.String("resource", "nvidia.com/gpu", "extended resource name")
	dir := flag.String("plugin-dir", pluginapi.DevicePluginPath, "the kubelet's device-plugin socket folder")
	flag.Parse()
	logger := klog.Background()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	devs := make([]*pluginapi.Device, *count)
	for i := range devs {
		devs[i] = &pluginapi.Device{ID: fmt.Sprintf("fake-gpu-%d", i), Health: pluginapi.Healthy}
	}
	socket := filepath.Join(*dir, fmt.Sprintf("fake-gpu-%d.sock", os.Getpid()))
	kubelet := filepath.Join(*dir, "kubelet.sock")
	dp := plugin.NewDevicePluginStub(logger, devs, socket, *resource, false, false)
	dp.SetAllocFunc(func(r *pluginapi.AllocateRequest, _ map[string]*pluginapi.Device) (*pluginapi.AllocateResponse, error) {
		var out pluginapi.AllocateResponse
		for _, c := range r.ContainerRequests {
			out.ContainerResponses = append(out.ContainerResponses, &pluginapi.ContainerAllocateResponse{
				Envs: map[string]string{"NVIDIA_VISIBLE_DEVICES": strings.Join(c.DevicesIds, ",")},
			})
		}
		return &out, nil
	})
	// the kubelet clears its plugin folder when it starts: begin once its socket is there, and
	// serve and register again until it takes us
	for ctx.Err() == nil {
		if _, err := os.Stat(kubelet); err == nil {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if err := dp.Start(ctx); err != nil {
		logger.Error(err, "start")
		os.Exit(1)
	}
	for ctx.Err() == nil {
		err := dp.Register(ctx, kubelet, *resource, *dir)
		if err == nil {
			logger.Info("registered", "resource", *resource, "count", *count)
			break
		}
		logger.Error(err, "register; serving again and retrying")
		time.Sleep(time.Second)
		if err := dp.Restart(ctx); err != nil {
			logger.Error(err, "restart")
		}
	}
	// a kubelet restart re-creates its socket: the stub's watch serves and registers again
	go dp.Watch(ctx, kubelet, *resource, *dir)
	<-ctx.Done()
	_ = dp.Stop(logger)
}
