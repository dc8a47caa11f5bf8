"""The children of a TrainingJob as plain manifests: pure functions of the typed spec, the
owner and the referenced CheckpointPolicy, tested without a cluster.

Children (names are deterministic, so creating what exists is a harmless 409):

- ConfigMap ``<job>-config``: the trainer config YAML;
- headless Service ``<job>`` (publishNotReadyAddresses) giving every pod of the job a stable
  DNS name ``<pod hostname>.<job>.<namespace>.svc``;
- Pod ``<job>-rdzv``: the rendezvous store (``python -m kubeforge_runtime.rendezvous``), a
  TCPStore server off the GPU nodes. Every torchrun agent is a c10d *client* of it
  (``--rdzv-conf=is_host=false``), so losing any one GPU node, worker 0's included, loses
  no rendezvous state: the surviving agents re-rendezvous and restart from the checkpoint;
- Pods ``<job>-worker-<i>`` for i < maxReplicas, each running elastic torchrun through the
  trainer's launcher (which keeps the contract's exit codes).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import yaml

from kubeforge.api import CheckpointPolicySpec, TrainingJobSpec
from kubeforge.api.common import API_VERSION
from kubeforge.api.contract import (
    CHECKPOINT_MOUNT_DIR,
    CONFIG_FILE_NAME,
    CONFIG_MOUNT_DIR,
    ENV_CHECKPOINT_POLICY,
    ENV_CHECKPOINT_URI,
    ENV_CONFIG_FILE,
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ENV_METRICS_PORT,
    ENV_S3_ENDPOINT,
    ENV_S3_REGION,
    RENDEZVOUS_PORT,
    TRAINER_METRICS_PORT,
)
from kubeforge.settings import workload_image

JOB_LABEL = "kubeforge.dev/job-name"
INDEX_LABEL = "kubeforge.dev/replica-index"
ROLE_LABEL = "kubeforge.dev/role"
ATTEMPT_LABEL = "kubeforge.dev/attempt"
ROLE_WORKER = "worker"
ROLE_RENDEZVOUS = "rendezvous"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
#: The toleration the NVIDIA GPU Operator's nodes need (taint nvidia.com/gpu:NoSchedule).
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
#: Seconds between torchrun's SIGKILL of the workers and the kubelet's SIGKILL of the pod.
SHUTDOWN_MARGIN_S = 15
#: Hostnames are DNS labels: the longest suffix is "-worker-4095".
MAX_JOB_NAME = 63 - len("-worker-4095")
#: Environment of every worker. Measured by the trainer's engineer on torch 2.15: scale-up
#: (an agent joining a running job) hangs unless agents stop sharing the rendezvous store
#: with the worker processes.
TORCH_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONUNBUFFERED": "1"}


@dataclasses.dataclass(frozen=True)
class Owner:
    """The TrainingJob the children belong to."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": "TrainingJob", "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


def worker_name(job: str, index: int) -> str:
    return f"{job}-worker-{index}"


def rendezvous_name(job: str) -> str:
    return f"{job}-rdzv"


def config_map_name(job: str) -> str:
    return f"{job}-config"


def rendezvous_endpoint(owner: Owner) -> str:
    """The c10d endpoint: the store pod's stable DNS name under the headless Service."""
    return f"{rendezvous_name(owner.name)}.{owner.name}.{owner.namespace}.svc:{RENDEZVOUS_PORT}"


def checkpoint_uri(policy: CheckpointPolicySpec) -> str:
    """The store root the workers write to (the CheckpointPolicy controller reads the same)."""
    from kubeforge.controllers.checkpointpolicy import storage_uri

    return storage_uri(policy, CHECKPOINT_MOUNT_DIR)


def trainer_config(spec: TrainingJobSpec) -> dict[str, Any]:
    """The trainer config as mounted: the user's, with ``export.enabled`` from spec.export."""
    config: dict[str, Any] = json.loads(json.dumps(spec.trainer.config))
    export: dict[str, Any] = config["export"] if isinstance(config.get("export"), dict) else {}
    config["export"] = {**export, "enabled": spec.export.enabled}
    return config


def _meta(owner: Owner, name: str, role: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    labels = {JOB_LABEL: owner.name, ROLE_LABEL: role, "app.kubernetes.io/managed-by": "kubeforge",
              **(extra or {})}
    return {"name": name, "namespace": owner.namespace, "labels": labels, "ownerReferences": [owner.reference()]}


def config_map(owner: Owner, spec: TrainingJobSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(owner, config_map_name(owner.name), "config"),
            "data": {CONFIG_FILE_NAME: yaml.safe_dump(trainer_config(spec), sort_keys=True)}}


def headless_service(owner: Owner) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(owner, owner.name, "service"),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {JOB_LABEL: owner.name},
                     "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT},
                               {"name": "metrics", "port": TRAINER_METRICS_PORT}]}}


def container_security() -> dict[str, Any]:
    """What PodSecurity ``restricted`` asks of every container."""
    return {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"}}


def node_failure_tolerations(seconds: int) -> list[dict[str, Any]]:
    """Kubernetes' own taint eviction agrees with the operator's node-failure grace."""
    return [{"key": f"node.kubernetes.io/{t}", "operator": "Exists", "effect": "NoExecute",
             "tolerationSeconds": seconds} for t in ("not-ready", "unreachable")]


def torchrun_args(owner: Owner, spec: TrainingJobSpec) -> list[str]:
    w = spec.workers
    return [f"--nnodes={w.min_replicas}:{w.max_replicas}", f"--nproc-per-node={max(1, w.gpus_per_worker)}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous_endpoint(owner)}", f"--rdzv-id={owner.uid}",
            "--rdzv-conf=is_host=false", f"--max-restarts={w.max_agent_restarts}",
            # workers get SIGKILL from torchrun this long after SIGTERM: keep it inside the pod's grace
            f"--shutdown-timeout={w.termination_grace_seconds - SHUTDOWN_MARGIN_S}"]


def worker_command(owner: Owner, spec: TrainingJobSpec) -> list[str]:
    """``python -m kubeforge_runtime.train.launch <torchrun args> -m kubeforge_runtime.train``.

    The launcher validates the config before torchrun starts (a bad config exits 78 with no
    rendezvous) and maps SIGTERM to the preempted code; torchrun alone turns both into 1."""
    return ["python", "-m", "kubeforge_runtime.train.launch", *torchrun_args(owner, spec),
            "-m", "kubeforge_runtime.train", "--config", f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}"]


def _env(owner: Owner, spec: TrainingJobSpec, policy: CheckpointPolicySpec | None) -> list[dict[str, Any]]:
    env: dict[str, str] = {
        ENV_CONFIG_FILE: f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}",
        ENV_JOB_NAMESPACE: owner.namespace,
        ENV_JOB_NAME: owner.name,
        ENV_METRICS_PORT: str(TRAINER_METRICS_PORT),
        **TORCH_ENV,
    }
    if policy is not None:
        env[ENV_CHECKPOINT_URI] = checkpoint_uri(policy)
        env[ENV_CHECKPOINT_POLICY] = json.dumps(
            policy.model_dump(by_alias=True, exclude_none=True, mode="json", include={"schedule", "retention"}),
            sort_keys=True)
        if policy.storage.s3:
            if policy.storage.s3.endpoint:
                env[ENV_S3_ENDPOINT] = policy.storage.s3.endpoint
            env[ENV_S3_REGION] = policy.storage.s3.region
    out: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in env.items()]
    out.append({"name": "KUBEFORGE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    out += [e.dump() for e in spec.pod.env]
    return out


def _volumes(owner: Owner, spec: TrainingJobSpec,
             policy: CheckpointPolicySpec | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "trainer-config", "configMap": {"name": config_map_name(owner.name)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.workers.shm_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "trainer-config", "mountPath": CONFIG_MOUNT_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if policy is not None and policy.storage.volume:
        volumes.append({"name": "checkpoints",
                        "persistentVolumeClaim": {"claimName": policy.storage.volume.claim_name}})
        mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT_DIR})
    volumes += [v.dump() for v in spec.pod.volumes]
    mounts += [m.dump() for m in spec.pod.volume_mounts]
    return volumes, mounts


def _resources(spec: TrainingJobSpec) -> dict[str, Any]:
    r = spec.workers.resources
    amounts: dict[str, str] = {}
    if r.cpu:
        amounts["cpu"] = r.cpu
    if r.memory:
        amounts["memory"] = r.memory
    limits = dict(amounts)
    if spec.workers.gpus_per_worker:
        limits[GPU_RESOURCE] = str(spec.workers.gpus_per_worker)
    return {"requests": amounts, "limits": limits} if amounts else {"limits": limits}


def _affinity(spec: TrainingJobSpec) -> dict[str, Any] | None:
    if not spec.workers.gpu_product:
        return None
    term = {"matchExpressions": [{"key": GPU_PRODUCT_LABEL, "operator": "In", "values": [spec.workers.gpu_product]}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def _pod_extras(spec: TrainingJobSpec) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    if spec.pod.node_selector:
        extras["nodeSelector"] = dict(spec.pod.node_selector)
    for key, value in (("priorityClassName", spec.pod.priority_class_name),
                       ("schedulerName", spec.pod.scheduler_name),
                       ("serviceAccountName", spec.pod.service_account_name)):
        if value:
            extras[key] = value
    return extras


def worker_pod(owner: Owner, spec: TrainingJobSpec, policy: CheckpointPolicySpec | None, index: int,
               attempt: int) -> dict[str, Any]:
    """Worker ``index`` of the job; ``attempt`` labels which replacement this is."""
    volumes, mounts = _volumes(owner, spec, policy)
    container: dict[str, Any] = {
        "name": "trainer",
        "image": workload_image(spec.trainer.image),
        "imagePullPolicy": spec.trainer.image_pull_policy,
        "command": worker_command(owner, spec),
        "env": _env(owner, spec, policy),
        "ports": [{"name": "metrics", "containerPort": TRAINER_METRICS_PORT}],
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "securityContext": container_security(),
        # the trainer's configuration error reaches the job's status through this
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if policy is not None and policy.storage.s3:
        container["envFrom"] = [{"secretRef": {"name": policy.storage.s3.credentials_secret_ref.name}}]
    tolerations = [GPU_TOLERATION] if spec.workers.gpus_per_worker else []
    tolerations += node_failure_tolerations(spec.failure_policy.node_failure_grace_seconds)
    tolerations += [t.dump() for t in spec.pod.tolerations]
    pod_spec: dict[str, Any] = {
        "hostname": worker_name(owner.name, index),
        "subdomain": owner.name,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": spec.workers.termination_grace_seconds,
        "enableServiceLinks": False,
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": volumes,
        "tolerations": tolerations,
        **_pod_extras(spec),
    }
    affinity = _affinity(spec)
    if affinity:
        pod_spec["affinity"] = affinity
    meta = _meta(owner, worker_name(owner.name, index), ROLE_WORKER,
                 {INDEX_LABEL: str(index), ATTEMPT_LABEL: str(attempt)})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def rendezvous_pod(owner: Owner, spec: TrainingJobSpec) -> dict[str, Any]:
    """The rendezvous store: small, CPU only, kept off GPU nodes where it can be (preferred
    affinity), and allowed onto them (the GPU taint tolerated) where there is nothing else."""
    off_gpu = {"weight": 100, "preference": {"matchExpressions": [
        {"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}]}}
    container = {
        "name": "rendezvous",
        "image": workload_image(spec.trainer.image),
        "imagePullPolicy": spec.trainer.image_pull_policy,
        "command": ["python", "-m", "kubeforge_runtime.rendezvous", "--port", str(RENDEZVOUS_PORT)],
        "ports": [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}],
        "readinessProbe": {"tcpSocket": {"port": RENDEZVOUS_PORT}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": container_security(),
    }
    pod_spec: dict[str, Any] = {
        "hostname": rendezvous_name(owner.name),
        "subdomain": owner.name,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 5,
        "enableServiceLinks": False,
        "securityContext": pod_security(),
        "containers": [container],
        # off GPU nodes where there are others, but a cluster of GPU nodes only (a DGX pod,
        # the local cluster's real nodes) must still be able to run it
        "tolerations": [GPU_TOLERATION, *node_failure_tolerations(spec.failure_policy.node_failure_grace_seconds)],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [off_gpu]}},
    }
    for key, value in (("priorityClassName", spec.pod.priority_class_name),
                       ("serviceAccountName", spec.pod.service_account_name)):
        if value:
            pod_spec[key] = value
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _meta(owner, rendezvous_name(owner.name), ROLE_RENDEZVOUS),
            "spec": pod_spec}
