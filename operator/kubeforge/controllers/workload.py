"""Manifest pieces every workload the operator makes shares (worker, rendezvous, server and
store inspector pods): owner references, GPU scheduling, restricted security contexts,
resources, the image. Pure: plain values in, plain dicts out."""

from __future__ import annotations

import dataclasses
from typing import Any

from kubeforge.api.common import API_VERSION
from kubeforge.api.contract import ENV_S3_FORCE_PATH_STYLE, ENV_S3_REGION

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
#: The toleration the NVIDIA GPU Operator's nodes need (taint nvidia.com/gpu:NoSchedule).
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
#: The non-root user of our images (restricted PodSecurity needs one).
RUN_AS_USER = 1000
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubeforge"}


@dataclasses.dataclass(frozen=True)
class Owner:
    """The resource the children belong to."""

    name: str
    namespace: str
    uid: str
    kind: str = ""

    def reference(self, block_owner_deletion: bool = True) -> dict[str, Any]:
        ref: dict[str, Any] = {"apiVersion": API_VERSION, "kind": self.kind, "name": self.name, "uid": self.uid,
                               "controller": True}
        if block_owner_deletion:
            ref["blockOwnerDeletion"] = True
        return ref


def workload_image(requested: str | None, default: str) -> str:
    """The image a pod runs: the resource's own, else the operator's setting."""
    return requested or default


def container_security(read_only_root: bool = False) -> dict[str, Any]:
    """What PodSecurity ``restricted`` asks of every container."""
    out: dict[str, Any] = {"allowPrivilegeEscalation": False}
    if read_only_root:
        out["readOnlyRootFilesystem"] = True
    return {**out, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def resources(cpu: str | None, memory: str | None, gpus: int = 0) -> dict[str, Any]:
    """Requests (cpu, memory) equal to the limits, plus the GPUs as a limit."""
    amounts = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
    limits: dict[str, str] = dict(amounts)
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    out: dict[str, Any] = {}
    if amounts:
        out["requests"] = amounts
    if limits:
        out["limits"] = limits
    return out


def gpu_tolerations(gpus: int) -> list[dict[str, Any]]:
    return [dict(GPU_TOLERATION)] if gpus else []


def off_gpu_placement() -> dict[str, Any]:
    """Pod spec fields of a CPU-only pod the operator runs (the rendezvous store, a curation):
    kept off GPU nodes where there are others (preferred affinity), and allowed onto them (the
    GPU taint tolerated) on a cluster of GPU nodes only (a DGX pod, the local cluster's real
    nodes)."""
    off_gpu = {"weight": 100, "preference": {"matchExpressions": [
        {"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}]}}
    return {"tolerations": [dict(GPU_TOLERATION)],
            "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [off_gpu]}}}


def gpu_product_affinity(product: str | None) -> dict[str, Any] | None:
    """Only nodes of this GPU product (the GPU Operator's label), or None."""
    if not product:
        return None
    term = {"matchExpressions": [{"key": GPU_PRODUCT_LABEL, "operator": "In", "values": [product]}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


#: Where a step pod's scratch space (an emptyDir) is mounted: files before upload, not the image's layer.
STEP_SCRATCH_DIR = "/tmp"


def s3_env(region: str | None, force_path_style: bool) -> list[dict[str, Any]]:
    """The S3 settings a step pod's store client reads from its environment (besides the Secret's keys)."""
    env = [{"name": ENV_S3_REGION, "value": region}] if region else []
    if not force_path_style:
        env.append({"name": ENV_S3_FORCE_PATH_STYLE, "value": "false"})
    return env


def step_pod(metadata: dict[str, Any], container: dict[str, Any], secret: str, env: list[dict[str, Any]],
             deadline_s: int) -> dict[str, Any]:
    """A one-shot CPU pod of the operator's (a curation, an evaluation): restricted PodSecurity,
    no ServiceAccount token, never restarted, killed after ``deadline_s``; store credentials only
    through ``envFrom`` of ``secret``; ``FallbackToLogsOnError``, so the module's reason for
    exiting is in the pod's status, where the controller reads it."""
    c = {**container, "envFrom": [{"secretRef": {"name": secret}}], "securityContext": container_security(),
         "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "FallbackToLogsOnError",
         "volumeMounts": [{"name": "scratch", "mountPath": STEP_SCRATCH_DIR}]}
    if env:
        c["env"] = env
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
        "spec": {"restartPolicy": "Never", "activeDeadlineSeconds": deadline_s, "automountServiceAccountToken": False,
                 "enableServiceLinks": False, "securityContext": pod_security(), "containers": [c],
                 "volumes": [{"name": "scratch", "emptyDir": {}}],
                 # CPU only: off GPU nodes where there are others, onto them where there are not
                 # (a step left Pending on a GPU-only cluster would never run)
                 **off_gpu_placement()},
    }
