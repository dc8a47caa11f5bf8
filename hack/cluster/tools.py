"""Where the Go-built tools live: read hack/cluster/versions.env and the cache root.

Used by the local control plane, the tests and the benchmarks; `hack/cluster/build.sh` builds
what is missing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def disk_report() -> str:
    """Free space on the cache's disk and what each part of the cache takes, largest first (a
    test run needs tens of GB: the workload image in podman and in each real node)."""
    import shutil

    root = cache_root()
    free = shutil.disk_usage(root if root.exists() else Path.home()).free
    du = subprocess.run(["du", "-B1", "--max-depth=1", str(root)], capture_output=True, text=True)
    sizes = []
    for line in du.stdout.splitlines():
        n, _, path = line.partition("\t")
        if n.isdigit() and Path(path) != root:
            sizes.append((int(n), Path(path).name))
    parts = ", ".join(f"{name} {n / 2**30:.1f} GiB" for n, name in sorted(sizes, reverse=True) if n >= 2**27)
    return f"{free / 2**30:.1f} GiB free; the cache {root}: {parts or 'small'}"


def versions() -> dict[str, str]:
    out = {}
    for line in (HERE / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def cache_root() -> Path:
    return Path(os.environ.get("KUBEFORGE_CACHE", Path.home() / ".cache" / "kubeforge"))


_PART_OF = {
    "kube-apiserver": "kubernetes", "kube-controller-manager": "kubernetes", "kube-scheduler": "kubernetes",
    "kubectl": "kubernetes", "etcd": "etcd", "kwok": "kwok", "helm": "helm", "minio": "minio", "kind": "kind",
    "kubelet": "node", "kube-proxy": "node", "fake-gpu-plugin": "node", "pause": "node",
    "containerd": "containerd", "containerd-shim-runc-v2": "containerd", "ctr": "containerd", "coredns": "coredns",
    "kube-router": "kube-router",
}
#: Parts built from another part's wrapper module, at that part's version, and parts whose
#: version variable is not <PART>_VERSION.
_VERSION_OF = {"node": "KUBERNETES_VERSION", "kube-router": "KUBE_ROUTER_VERSION"}


def binary(name: str, build: bool = True) -> Path:
    """Path of a tool binary; builds its part first when missing and ``build`` is set."""
    part = _PART_OF[name]
    v = versions()
    version = v[_VERSION_OF.get(part, f"{part.upper()}_VERSION")]
    if part == "helm":  # build.sh stamps helm with a Kubernetes version: another build, another folder
        version += f"-kube{v['HELM_KUBE_VERSION']}"
    path = cache_root() / "bin" / f"{part}-{version}" / name
    if not (path.parent / ".complete").exists():
        if not build:
            raise FileNotFoundError(f"{name} is not built yet: run hack/cluster/build.sh {part}")
        subprocess.run([str(HERE / "build.sh"), part], check=True)
    return path


def prometheus_operator_crds(build: bool = True) -> Path:
    """Folder of prometheus-operator's CRD manifests (ServiceMonitor, PodMonitor,
    PrometheusRule...), generated from its Go API types; generated first when missing and ``build``."""
    version = versions()["PROMETHEUS_OPERATOR_VERSION"]
    path = cache_root() / "bin" / f"prometheus-operator-crds-{version}"
    if not (path / ".complete").exists():
        if not build:
            raise FileNotFoundError("run hack/cluster/build.sh prometheus-operator-crds")
        subprocess.run([str(HERE / "build.sh"), "prometheus-operator-crds"], check=True)
    return path


def kubeflow_training_operator(build: bool = True) -> Path:
    """Folder holding Kubeflow's training operator v1 (``training-operator``) and its
    PyTorchJob CRD (``kubeflow.org_pytorchjobs.yaml``), for bench/operator_scale.py; built first
    when missing and ``build``."""
    version = versions()["KUBEFLOW_TRAINING_OPERATOR_VERSION"]
    path = cache_root() / "bin" / f"kubeflow-{version}"
    if not (path / ".complete").exists():
        if not build:
            raise FileNotFoundError("run hack/cluster/build.sh kubeflow")
        subprocess.run([str(HERE / "build.sh"), "kubeflow"], check=True)
    return path
