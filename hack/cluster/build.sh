#!/usr/bin/env bash
# Builds the local control plane's binaries from their Go modules into a cache outside the
# repo, one folder per part and version: $KUBEFORGE_CACHE/bin/<part>-<version>/.
# A part whose folder is complete is not rebuilt, so a second run costs nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=SCRIPTDIR/versions.env
source "$here/versions.env"
cache=${KUBEFORGE_CACHE:-$HOME/.cache/kubeforge}
export CGO_ENABLED=0 GOFLAGS="-mod=mod -trimpath" GOTOOLCHAIN=local
# Go's build and module caches of our own, dropped after a build (the binaries are what is
# cached; together the caches are ~10 GB, which CI's disk does not spare). Set
# KUBEFORGE_KEEP_GO_CACHE=1 to keep them while changing versions.env.
export GOCACHE="$cache/go/build" GOMODCACHE="$cache/go/mod"
built=0

k8s_ldflags() {
  local v=$KUBERNETES_VERSION minor
  minor=$(echo "$v" | cut -d. -f2)
  local f="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  echo "$f"
}

build_part() { # $1 part, $2 version, $3 ldflags, then pairs of "binary=package"
  build_part_in "$1" "$@"
}

build_part_in() { # $1 wrapper module folder, then as build_part
  local dir=$1 part=$2 ver=$3 ldflags=$4; shift 4
  local out="$cache/bin/$part-$ver"
  if [ -f "$out/.complete" ]; then return 0; fi
  local t0=$SECONDS
  echo ">> building $part $ver into $out" >&2
  mkdir -p "$out"
  (cd "$here/$dir" && for spec in "$@"; do
      go build -ldflags "$ldflags" -o "$out/${spec%%=*}" "${spec#*=}"
    done)
  touch "$out/.complete"
  built=1
  echo ">> built $part $ver in $((SECONDS - t0))s" >&2
}

# prometheus-operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule...) generated from its
# Go API types by controller-gen, both Go modules of the wrapper hack/cluster/prometheus-operator.
build_prometheus_operator_crds() {
  local out="$cache/bin/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION"
  if [ -f "$out/.complete" ]; then return 0; fi
  local gen="$cache/bin/controller-gen-$CONTROLLER_TOOLS_VERSION/controller-gen"
  if [ ! -x "$gen" ]; then
    mkdir -p "$(dirname "$gen")"
    (cd "$here/prometheus-operator" && go build -ldflags "-s -w" -o "$gen" sigs.k8s.io/controller-tools/cmd/controller-gen)
  fi
  mkdir -p "$out"
  (cd "$here/prometheus-operator" && "$gen" crd:crdVersions=v1,maxDescLen=0 \
      paths=github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1 output:crd:dir="$out")
  touch "$out/.complete"
  built=1
}

# Kubeflow's training operator v1 and its PyTorchJob CRD (from the module's manifests), for
# bench/operator_scale.py's comparison; not in the default parts.
build_kubeflow() {
  local out="$cache/bin/kubeflow-$KUBEFLOW_TRAINING_OPERATOR_VERSION"
  if [ -f "$out/.complete" ]; then return 0; fi
  local t0=$SECONDS src
  echo ">> building kubeflow $KUBEFLOW_TRAINING_OPERATOR_VERSION into $out" >&2
  mkdir -p "$out"
  (cd "$here/kubeflow" && go build -ldflags "-s -w" -o "$out/training-operator" \
      github.com/kubeflow/training-operator/cmd/training-operator.v1)
  src=$(cd "$here/kubeflow" && go list -m -f '{{.Dir}}' github.com/kubeflow/training-operator)
  install -m 0644 "$src/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" "$out/"
  touch "$out/.complete"
  built=1
  echo ">> built kubeflow in $((SECONDS - t0))s" >&2
}

parts=${*:-kubernetes etcd kwok helm minio kind prometheus-operator-crds node containerd coredns kube-router}
for p in $parts; do
  case $p in
    kubernetes) build_part kubernetes "$KUBERNETES_VERSION" "$(k8s_ldflags)" \
        kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
        kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
        kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
        kubectl=k8s.io/kubernetes/cmd/kubectl ;;
    # the real nodes' kubelet and kube-proxy, and our two small programs in the same wrapper
    # module (cmd/): the fake-GPU device plugin and the pod sandbox's pause
    node) build_part_in kubernetes node "$KUBERNETES_VERSION" "$(k8s_ldflags)" \
        kubelet=k8s.io/kubernetes/cmd/kubelet kube-proxy=k8s.io/kubernetes/cmd/kube-proxy \
        fake-gpu-plugin=./cmd/fake-gpu-plugin pause=./cmd/pause ;;
    containerd) GOFLAGS="$GOFLAGS -tags=no_btrfs,no_devmapper,no_zfs" build_part containerd "$CONTAINERD_VERSION" \
        "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
        containerd=github.com/containerd/containerd/v2/cmd/containerd \
        containerd-shim-runc-v2=github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
        ctr=github.com/containerd/containerd/v2/cmd/ctr ;;
    coredns) build_part coredns "$COREDNS_VERSION" "-s -w" coredns=github.com/coredns/coredns ;;
    # the real nodes' NetworkPolicy enforcer (run in firewall-only mode by nodes.py)
    kube-router) build_part kube-router "$KUBE_ROUTER_VERSION" \
        "-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION" \
        kube-router=github.com/cloudnativelabs/kube-router/v2/cmd/kube-router ;;
    etcd) build_part etcd "$ETCD_VERSION" "-s -w" etcd=go.etcd.io/etcd/server/v3 ;;
    kwok) build_part kwok "$KWOK_VERSION" "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" kwok=sigs.k8s.io/kwok/cmd/kwok ;;
    # stamped with its Kubernetes version, as helm's Makefile does: unstamped it claims v1.20
    # and refuses every chart with a kubeVersion (ours: >=1.30) unless given --kube-version
    helm) kube=${HELM_KUBE_VERSION#v}; kube_major=${kube%%.*}; kube_minor=${kube#*.}; kube_minor=${kube_minor%%.*}
      build_part helm "$HELM_VERSION-kube$HELM_KUBE_VERSION" "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$kube_major -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kube_minor \
-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$kube_major -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kube_minor" \
        helm=helm.sh/helm/v3/cmd/helm ;;
    minio) build_part minio "$MINIO_VERSION" "-s -w" minio=github.com/minio/minio ;;
    kind) build_part kind "$KIND_VERSION" "-s -w" kind=sigs.k8s.io/kind ;;
    prometheus-operator-crds) build_prometheus_operator_crds ;;
    kubeflow) build_kubeflow ;;
    *) echo "unknown part: $p" >&2; exit 2 ;;
  esac
done

if [ "$built" = 1 ] && [ "${KUBEFORGE_KEEP_GO_CACHE:-0}" != 1 ] && [ -d "$cache/go" ]; then
  echo ">> dropping Go's build and module caches ($(du -sh "$cache/go" | cut -f1)); the binaries stay in $cache/bin" >&2
  go clean -cache -modcache
  rm -rf "$cache/go"
fi
