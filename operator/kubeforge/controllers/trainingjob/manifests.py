"""The children of a TrainingJob as plain manifests (``build_*``): pure functions of the typed
spec, the owner, the referenced CheckpointPolicy and the default image, tested without a
cluster.

Children (names are deterministic, so creating what exists is a harmless 409):

- ConfigMap ``<job>-config``: the trainer config YAML (with spec.data.datasetRef, its
  ``data.paths`` and ``data.format`` name the resolved Dataset version's train split);
- headless Service ``<job>`` (publishNotReadyAddresses) giving every pod of the job a stable
  DNS name ``<pod hostname>.<job>.<namespace>.svc``;
- Pod ``<job>-rdzv``: the rendezvous store (``python -m kubeforge_runtime.rendezvous``), a
  TCPStore server off the GPU nodes. Every torchrun agent is a c10d *client* of it
  (``--rdzv-conf=is_host=false``), so losing any one GPU node, worker 0's included, loses
  no rendezvous state: the surviving agents re-rendezvous and restart from the checkpoint;
- Pods ``<job>-worker-<i>`` for i < maxReplicas, each running elastic torchrun through the
  trainer's launcher (which keeps the contract's exit codes);
- NetworkPolicy ``<job>-network`` (unless the operator's setting turns them off): only the
  job's own pods reach its rendezvous store and its workers (the TCPStore has no
  authentication; NCCL and gloo use ports of their own choosing), and the scrape sources reach
  the metrics port.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import yaml

from kubeforge.api import CheckpointPolicySpec, TrainingJobSpec
from kubeforge.api.contract import (
    CHECKPOINT_MOUNT_DIR,
    CHECKPOINT_STAGING_DIR,
    CONFIG_FILE_NAME,
    CONFIG_MOUNT_DIR,
    DEFAULT_WORKLOAD_IMAGE,
    ENV_CHECKPOINT_POLICY,
    ENV_CHECKPOINT_STAGING_DIR,
    ENV_CHECKPOINT_URI,
    ENV_CONFIG_FILE,
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ENV_JOB_RUN,
    ENV_METRICS_PORT,
    ENV_RESUME_FROM,
    ENV_S3_ENDPOINT,
    ENV_S3_FORCE_PATH_STYLE,
    ENV_S3_REGION,
    RENDEZVOUS_PORT,
    TRAINER_METRICS_PORT,
)
from kubeforge.api.trainingjob import MAX_NAME, TrainingJob
from kubeforge.controllers import workload
from kubeforge.controllers.workload import (
    container_security,
    gpu_product_affinity,
    gpu_tolerations,
    off_gpu_placement,
    pod_security,
    workload_image,
)
from kubeforge.store.flywheel import TRAIN_SPLIT
from kubeforge.store.policy import storage_uri

JOB_LABEL = "kubeforge.dev/job-name"
INDEX_LABEL = "kubeforge.dev/replica-index"
ROLE_LABEL = "kubeforge.dev/role"
ATTEMPT_LABEL = "kubeforge.dev/attempt"
ROLE_WORKER = "worker"
ROLE_RENDEZVOUS = "rendezvous"
#: Seconds between torchrun's SIGKILL of the workers and the kubelet's SIGKILL of the pod.
SHUTDOWN_MARGIN_S = 15
#: Hostnames are DNS labels: the longest suffix is "-worker-4095" (admission checks it too).
MAX_JOB_NAME = MAX_NAME
#: Environment of every worker. Measured by the trainer's engineer on torch 2.15: scale-up
#: (an agent joining a running job) hangs unless agents stop sharing the rendezvous store
#: with the worker processes.
TORCH_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONUNBUFFERED": "1"}


@dataclasses.dataclass(frozen=True)
class Owner(workload.Owner):
    """The TrainingJob the children belong to."""

    kind: str = TrainingJob.kind


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
    return storage_uri(policy, CHECKPOINT_MOUNT_DIR)


#: The trainer's data format of a Dataset version's splits (prompt + target records, loss on the target).
SFT_FORMAT = "sft"


def trainer_config(spec: TrainingJobSpec, dataset_uri: str | None = None, init_uri: str | None = None,
                   ) -> dict[str, Any]:
    """The trainer config as mounted: the user's, with ``export.enabled`` from spec.export and,
    with ``dataset_uri`` (status.dataset.uri: the Dataset version spec.data.datasetRef resolved
    to), ``data.paths`` = its train split and ``data.format`` = sft; the user's other data
    settings (seq_len, shuffle...) stay. With ``init_uri`` (status.initFrom.uri: spec.initFrom's
    export), ``model.init_from`` = it."""
    config: dict[str, Any] = json.loads(json.dumps(spec.trainer.config))
    export: dict[str, Any] = config["export"] if isinstance(config.get("export"), dict) else {}
    config["export"] = {**export, "enabled": spec.export.enabled}
    if dataset_uri is not None:
        data: dict[str, Any] = config["data"] if isinstance(config.get("data"), dict) else {}
        config["data"] = {**data, "paths": [f"{dataset_uri.rstrip('/')}/{TRAIN_SPLIT}"], "format": SFT_FORMAT}
    if init_uri is not None:
        model: dict[str, Any] = config["model"] if isinstance(config.get("model"), dict) else {}
        config["model"] = {**model, "init_from": init_uri}
    return config


def _meta(owner: Owner, name: str, role: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    labels = {JOB_LABEL: owner.name, ROLE_LABEL: role, "app.kubernetes.io/managed-by": "kubeforge",
              **(extra or {})}
    return {"name": name, "namespace": owner.namespace, "labels": labels, "ownerReferences": [owner.reference()]}


def network_policy_name(job: str) -> str:
    return f"{job}-network"


def build_network_policy(owner: Owner, scrape_from: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """Ingress to every pod of the job (workers and rendezvous store) only from pods of the same
    job in the same namespace, on any port; the metrics port also from ``scrape_from``
    (Prometheus). Egress stays open: workers reach DNS, the store and their data."""
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": {"matchLabels": {JOB_LABEL: owner.name}}}]}]
    if scrape_from:
        ingress.append({"from": [dict(peer) for peer in scrape_from],
                        "ports": [{"port": TRAINER_METRICS_PORT, "protocol": "TCP"}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(owner, network_policy_name(owner.name), "network-policy"),
            "spec": {"podSelector": {"matchLabels": {JOB_LABEL: owner.name}}, "policyTypes": ["Ingress"],
                     "ingress": ingress}}


def refused_volumes(spec: TrainingJobSpec, allow_host_path: bool) -> str | None:
    """Why the job's volumes may not run (a hostPath the operator does not allow, a volume whose
    source the API server dropped), or None.
    Admission refuses these already where the chart's policy is installed; this is the
    second line, for CRDs applied without it and objects stored before it."""
    sourceless = [f"spec.pod.volumes[{i}] ({v.name})" for i, v in enumerate(spec.pod.volumes) if not v.source()]
    sourceless += [f"spec.pod.volumes[{i}].projected.sources[{j}] ({v.name})" for i, v in enumerate(spec.pod.volumes)
                   if v.projected for j, src in enumerate(v.projected.sources) if not src.dump()]
    if sourceless:
        # what admission refuses now, stored before it: the API server drops an unknown source
        # (nfs, a projected serviceAccountToken) when it reads the object back
        return (f"{', '.join(sourceless)}: no volume source this operator accepts is left (nfs, iscsi, a projected "
                "serviceAccountToken and other sources are refused; mount them through a PersistentVolumeClaim)")
    if allow_host_path:
        return None
    bad = [f"spec.pod.volumes[{i}].hostPath ({v.name})" for i, v in enumerate(spec.pod.volumes) if v.host_path]
    if not bad:
        return None
    return (f"{', '.join(bad)}: hostPath volumes must not be used: they give the pod the node's filesystem "
            "(allowed only when the operator sets security.allowHostPathVolumes)")


def build_config_map(owner: Owner, spec: TrainingJobSpec, dataset_uri: str | None = None,
                     init_uri: str | None = None) -> dict[str, Any]:
    """The trainer config file (``trainer_config``)."""
    config = trainer_config(spec, dataset_uri, init_uri)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(owner, config_map_name(owner.name), "config"),
            "data": {CONFIG_FILE_NAME: yaml.safe_dump(config, sort_keys=True)}}


def build_headless_service(owner: Owner) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(owner, owner.name, "service"),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {JOB_LABEL: owner.name},
                     "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT},
                               {"name": "metrics", "port": TRAINER_METRICS_PORT}]}}


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


def resume_from_env(spec: TrainingJobSpec, job: str, resume_run: str | None) -> str | None:
    """``KUBEFORGE_RESUME_FROM`` of ``spec.resumeFrom`` (None without one); ``resume_run``: the
    named job's run when that object exists and is not this one."""
    r = spec.resume_from
    if r is None:
        return None
    return json.dumps({"trainingJob": r.training_job or job, "run": resume_run, "step": r.step}, sort_keys=True)


def _env(owner: Owner, spec: TrainingJobSpec, policy: CheckpointPolicySpec | None, run: str | None,
         resume_run: str | None) -> list[dict[str, Any]]:
    env: dict[str, str] = {
        ENV_CONFIG_FILE: f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}",
        ENV_JOB_NAMESPACE: owner.namespace,
        ENV_JOB_NAME: owner.name,
        ENV_JOB_RUN: run or owner.name,
        ENV_METRICS_PORT: str(TRAINER_METRICS_PORT),
        **TORCH_ENV,
    }
    if policy is not None:
        env[ENV_CHECKPOINT_URI] = checkpoint_uri(policy)
        resume = resume_from_env(spec, owner.name, resume_run)
        if resume is not None:
            env[ENV_RESUME_FROM] = resume
        env[ENV_CHECKPOINT_POLICY] = json.dumps(
            policy.model_dump(by_alias=True, exclude_none=True, mode="json", include={"schedule", "retention"}),
            sort_keys=True)
        if policy.storage.s3:
            env[ENV_CHECKPOINT_STAGING_DIR] = CHECKPOINT_STAGING_DIR
            if policy.storage.s3.endpoint:
                env[ENV_S3_ENDPOINT] = policy.storage.s3.endpoint
            env[ENV_S3_REGION] = policy.storage.s3.region
            env[ENV_S3_FORCE_PATH_STYLE] = "true" if policy.storage.s3.force_path_style else "false"
    return [{"name": k, "value": v} for k, v in env.items()] + [e.dump() for e in spec.pod.env]


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
    if policy is not None and policy.storage.s3:
        volumes.append({"name": "checkpoint-staging", "emptyDir": {"sizeLimit": policy.storage.s3.staging_size_limit}})
        mounts.append({"name": "checkpoint-staging", "mountPath": CHECKPOINT_STAGING_DIR})
    if policy is not None and policy.storage.volume:
        volumes.append({"name": "checkpoints",
                        "persistentVolumeClaim": {"claimName": policy.storage.volume.claim_name}})
        mounts.append({"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT_DIR})
    volumes += [v.dump() for v in spec.pod.volumes]
    mounts += [m.dump() for m in spec.pod.volume_mounts]
    return volumes, mounts


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


def build_worker_pod(owner: Owner, spec: TrainingJobSpec, policy: CheckpointPolicySpec | None, index: int,
                     attempt: int, default_image: str = DEFAULT_WORKLOAD_IMAGE, *, run: str | None = None,
                     resume_run: str | None = None) -> dict[str, Any]:
    """Worker ``index`` of the job; ``attempt`` labels which replacement this is;
    ``default_image`` runs when the job names none (the operator's setting); ``run`` is the
    job's status.run (None: the legacy run, named like the job), ``resume_run`` the run of
    the job spec.resumeFrom names when that object exists."""
    volumes, mounts = _volumes(owner, spec, policy)
    container: dict[str, Any] = {
        "name": "trainer",
        "image": workload_image(spec.trainer.image, default_image),
        "imagePullPolicy": spec.trainer.image_pull_policy,
        "command": worker_command(owner, spec),
        "env": _env(owner, spec, policy, run, resume_run),
        "ports": [{"name": "metrics", "containerPort": TRAINER_METRICS_PORT}],
        "resources": workload.resources(spec.workers.resources.cpu, spec.workers.resources.memory,
                                        spec.workers.gpus_per_worker),
        "volumeMounts": mounts,
        "securityContext": container_security(),
        # the trainer's configuration error reaches the job's status through this
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if policy is not None and policy.storage.s3:
        container["envFrom"] = [{"secretRef": {"name": policy.storage.s3.credentials_secret_ref.name}}]
    tolerations = gpu_tolerations(spec.workers.gpus_per_worker)
    tolerations += node_failure_tolerations(spec.failure_policy.node_failure_grace_seconds)
    tolerations += [t.dump() for t in spec.pod.tolerations]
    pod_spec: dict[str, Any] = {
        "hostname": worker_name(owner.name, index),
        "subdomain": owner.name,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": spec.workers.termination_grace_seconds,
        "enableServiceLinks": False,
        # the trainer never calls the Kubernetes API: a spec.pod.serviceAccountName gives its
        # image pull secrets and workload identity, never an API token
        "automountServiceAccountToken": False,
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": volumes,
        "tolerations": tolerations,
        **_pod_extras(spec),
    }
    affinity = gpu_product_affinity(spec.workers.gpu_product)
    if affinity:
        pod_spec["affinity"] = affinity
    meta = _meta(owner, worker_name(owner.name, index), ROLE_WORKER,
                 {INDEX_LABEL: str(index), ATTEMPT_LABEL: str(attempt)})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def build_rendezvous_pod(owner: Owner, spec: TrainingJobSpec,
                         default_image: str = DEFAULT_WORKLOAD_IMAGE) -> dict[str, Any]:
    """The rendezvous store: small, CPU only, kept off GPU nodes where it can be
    (``off_gpu_placement``)."""
    placement = off_gpu_placement()
    container = {
        "name": "rendezvous",
        "image": workload_image(spec.trainer.image, default_image),
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
        "automountServiceAccountToken": False,
        "securityContext": pod_security(),
        "containers": [container],
        "tolerations": [*placement["tolerations"],
                        *node_failure_tolerations(spec.failure_policy.node_failure_grace_seconds)],
        "affinity": placement["affinity"],
    }
    for key, value in (("priorityClassName", spec.pod.priority_class_name),
                       ("serviceAccountName", spec.pod.service_account_name)):
        if value:
            pod_spec[key] = value
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _meta(owner, rendezvous_name(owner.name), ROLE_RENDEZVOUS),
            "spec": pod_spec}
