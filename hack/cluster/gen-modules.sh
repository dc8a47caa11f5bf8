#!/usr/bin/env bash
# Regenerates the wrapper Go modules in hack/cluster/<part>/ from versions.env.
# Run it after changing a version; commit the resulting go.mod/go.sum.
#
# Why wrappers: k8s.io/kubernetes and etcd's server module use replace directives, so
# `go install pkg@version` refuses them. A wrapper module requires the real module and
# turns each local `replace k8s.io/x => ./staging/...` into the published v0.X.Y module.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=SCRIPTDIR/versions.env
source "$here/versions.env"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local

staging_replaces() { # $1 = module@version; prints replace lines for its ./staging modules
  local gomod ver=$2
  gomod=$(go mod download -json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  awk -v v="$ver" '/=> \.\/staging\// { for (i=1;i<=NF;i++) if ($i ~ /^k8s\.io\//) { print "replace " $i " => " $i " " v; break } }' "$gomod" | sort -u
}

new_module() { # $1 = dir name; our own code in it (kubernetes/cmd/) stays
  mkdir -p "$here/$1"; cd "$here/$1"; rm -f go.mod go.sum
  go mod init "kubeforge.dev/hack/cluster/$1" >/dev/null 2>&1
  go mod edit -go=1.24
}

gen_kubernetes() {
  new_module kubernetes
  local staging="v0.${KUBERNETES_VERSION#v1.}"
  staging_replaces "k8s.io/kubernetes@$KUBERNETES_VERSION" "$staging" >> go.mod
  go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$KUBERNETES_VERSION" \
    "k8s.io/kubernetes/cmd/kube-controller-manager@$KUBERNETES_VERSION" \
    "k8s.io/kubernetes/cmd/kube-scheduler@$KUBERNETES_VERSION" \
    "k8s.io/kubernetes/cmd/kubectl@$KUBERNETES_VERSION" \
    "k8s.io/kubernetes/cmd/kubelet@$KUBERNETES_VERSION" "k8s.io/kubernetes/cmd/kube-proxy@$KUBERNETES_VERSION"
  go mod tidy  # the device plugin and pause in cmd/
}

gen_etcd() {
  new_module etcd
  local gomod
  gomod=$(go mod download -json "go.etcd.io/etcd/server/v3@$ETCD_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  # the server module replaces its sibling modules by path; pin each to the same release
  awk -v v="$ETCD_VERSION" '/=> \.\.\// { for (i=1;i<=NF;i++) if ($i ~ /^go\.etcd\.io\//) { print "replace " $i " => " $i " " v; break } }' "$gomod" | sort -u >> go.mod
  go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
}

gen_plain() { # $1 dir, $2 tool package, $3 version
  new_module "$1"
  go get -tool "$2@$3"
}

gen_prometheus_operator() { # controller-gen and the API types it turns into CRDs
  new_module prometheus-operator
  go get -tool "sigs.k8s.io/controller-tools/cmd/controller-gen@$CONTROLLER_TOOLS_VERSION"
  go get "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring@$PROMETHEUS_OPERATOR_VERSION"
}

gen_kubeflow() { # the training operator v1 (PyTorchJob), for bench/operator_scale.py's comparison
  new_module kubeflow
  local gomod
  gomod=$(go mod download -json "github.com/kubeflow/training-operator@$KUBEFLOW_TRAINING_OPERATOR_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  # replace directives of a required module are ignored: copy any it has, as for kubernetes
  awk '/^replace / && !/=> \.\.?\// { print }' "$gomod" | sort -u >> go.mod
  go get -tool "github.com/kubeflow/training-operator/cmd/training-operator.v1@$KUBEFLOW_TRAINING_OPERATOR_VERSION"
}

gen_containerd() {
  new_module containerd
  go get -tool "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION"
}

parts=${*:-kubernetes etcd kwok helm minio kind prometheus-operator containerd coredns kube-router}
for p in $parts; do
  case $p in
    kubernetes) gen_kubernetes ;;
    etcd) gen_etcd ;;
    kwok) gen_plain kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION" ;;
    helm) gen_plain helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" ;;
    minio) gen_plain minio github.com/minio/minio "$MINIO_VERSION" ;;
    kind) gen_plain kind sigs.k8s.io/kind "$KIND_VERSION" ;;
    containerd) gen_containerd ;;
    coredns) gen_plain coredns github.com/coredns/coredns "$COREDNS_VERSION" ;;
    kube-router) gen_plain kube-router github.com/cloudnativelabs/kube-router/v2/cmd/kube-router "$KUBE_ROUTER_VERSION" ;;
    prometheus-operator) gen_prometheus_operator ;;
    kubeflow) gen_kubeflow ;;
    *) echo "unknown part: $p" >&2; exit 2 ;;
  esac
  echo "generated hack/cluster/$p"
done
