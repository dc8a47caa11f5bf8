"""The operator → worker pod contract, in one place.

Both sides import this module: the operator builds pod specs from it, the trainer and the
server read their inputs by these names and exit with these codes. It imports neither torch
nor kopf. Change a name here and both sides follow; never spell one of these strings
elsewhere.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes of the trainer (``python -m kubeforge_runtime.train``).

    The operator classifies a worker's termination by these codes:
    SUCCESS ends the job when worker 0 returns it; PREEMPTED is an infrastructure
    failure (replace the pod, never count against the budget); CONFIG_ERROR fails the job at
    once and is never retried; anything else is a retryable application failure.
    """

    SUCCESS = 0
    #: SIGTERM was received (preemption, node drain): the step finished, a checkpoint was
    #: requested, and the process left cleanly.
    PREEMPTED = 75
    #: The configuration is invalid (unknown key, impossible value). Retrying cannot help.
    CONFIG_ERROR = 78
    #: ``spec.resumeFrom`` names no committed checkpoint, or one that cannot be loaded, and the
    #: run has none of its own. Retrying cannot help; the job fails (reason ResumeSourceInvalid).
    RESUME_SOURCE_INVALID = 79


#: Environment variables the operator sets on worker pods.
ENV_CONFIG_FILE = "KUBEFORGE_CONFIG"  # path of the trainer config YAML (mounted ConfigMap)
ENV_CHECKPOINT_URI = "KUBEFORGE_CHECKPOINT_URI"  # store root: s3://bucket/prefix or file:///path
ENV_CHECKPOINT_POLICY = "KUBEFORGE_CHECKPOINT_POLICY"  # JSON of CheckpointPolicy.spec.schedule/retention
ENV_JOB_NAMESPACE = "KUBEFORGE_JOB_NAMESPACE"
ENV_JOB_NAME = "KUBEFORGE_JOB_NAME"
#: The job's run: its store key ``<job>/runs/<uid>`` (``kubeforge.store.layout``), or ``<job>`` for
#: a job that started before runs were keyed by uid. Unset: ``<job>`` (pods of an older operator).
ENV_JOB_RUN = "KUBEFORGE_JOB_RUN"
#: JSON ``{"trainingJob": name, "run": key or null, "step": n or null}`` of ``spec.resumeFrom``: where
#: a run without a checkpoint of its own starts from (``run`` null: the newest earlier run of that
#: name the trainer finds in the store).
ENV_RESUME_FROM = "KUBEFORGE_RESUME_FROM"
#: Set by the launcher for torchrun's workers: a worker that fails for a reason retrying cannot
#: fix writes ``{"code": n, "message": ...}`` there, and the launcher exits with that code.
ENV_FATAL_FILE = "KUBEFORGE_FATAL_FILE"
ENV_METRICS_PORT = "KUBEFORGE_METRICS_PORT"
#: On serving pods of a TrainingJob's export: the export revision (its commit marker's time) the
#: pod must serve; the server refuses any other, so a Pinned service never serves a newer model.
ENV_MODEL_REVISION = "KUBEFORGE_MODEL_REVISION"
#: S3 settings; credentials come only from a Secret via envFrom (AWS_ACCESS_KEY_ID,
#: AWS_SECRET_ACCESS_KEY), never from the custom resource.
ENV_S3_ENDPOINT = "AWS_ENDPOINT_URL"
ENV_S3_REGION = "AWS_REGION"
ENV_S3_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
ENV_S3_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
#: "false" for virtual-hosted-style addressing (a CheckpointPolicy's ``forcePathStyle: false``);
#: unset or anything else: path style, which most S3-compatible servers need.
ENV_S3_FORCE_PATH_STYLE = "KUBEFORGE_S3_FORCE_PATH_STYLE"
#: Local disk for S3 checkpoint staging and restore downloads: the worker's sized emptyDir
#: (``storage.s3.stagingSizeLimit``), not the container's writable layer.
ENV_CHECKPOINT_STAGING_DIR = "KUBEFORGE_CHECKPOINT_STAGING_DIR"
#: Where the operator mounts that emptyDir in worker pods.
CHECKPOINT_STAGING_DIR = "/var/lib/kubeforge/staging"


def s3_force_path_style(value: str | None) -> bool:
    """How a pod reads ``ENV_S3_FORCE_PATH_STYLE``."""
    return (value or "").strip().lower() != "false"

#: The workload image (trainer and server) when a resource names none; the operator's
#: ``KUBEFORGE_WORKLOAD_IMAGE`` (Helm value ``workloadImage``) overrides it.
DEFAULT_WORKLOAD_IMAGE = "ghcr.io/kubeforge/trainer:0.1.0"
ENV_WORKLOAD_IMAGE = "KUBEFORGE_WORKLOAD_IMAGE"
#: The image of a volume CheckpointPolicy's store inspector pod (the chart: the operator's own).
ENV_INSPECTOR_IMAGE = "KUBEFORGE_INSPECTOR_IMAGE"

#: Where the operator mounts the trainer config inside worker pods.
CONFIG_MOUNT_DIR = "/etc/kubeforge"
CONFIG_FILE_NAME = "trainer.yaml"
#: Default ports.
TRAINER_METRICS_PORT = 9400
SERVING_PORT = 8000

#: Where the operator mounts a CheckpointPolicy's volume (PVC) in worker pods; the store
#: root is file://<CHECKPOINT_MOUNT_DIR>/<policy path>.
CHECKPOINT_MOUNT_DIR = "/mnt/checkpoints"
#: Port of the TrainingJob's rendezvous store (``python -m kubeforge_runtime.rendezvous``),
#: the c10d endpoint every worker's torchrun agent connects to as a client.
RENDEZVOUS_PORT = 29400
