"""TrainingJob: elastic torchrun across N..M GPU nodes running the in-image trainer."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from kubeforge.api.common import (
    DNS_1035_LABEL,
    ApiModel,
    ComputeResources,
    EnvVar,
    Kind,
    LocalObjectReference,
    Rule,
    StatusBase,
    Toleration,
    Volume,
    VolumeMount,
    dns_label_name_rules,
)


class Workers(ApiModel):
    """How many worker pods (nodes) and GPUs each; torchrun runs --nnodes=min:max."""

    min_replicas: int = Field(default=1, ge=1, le=4096, description="Fewest workers the job runs with.")
    max_replicas: int = Field(default=1, ge=1, le=4096, description="Most workers; pods for all are created.")
    gpus_per_worker: int = Field(default=8, ge=0, le=64, description=(
        "nvidia.com/gpu per worker pod; torchrun starts one process per GPU (one process when 0)."))
    gpu_product: str | None = Field(default=None, description=(
        "Require nodes whose nvidia.com/gpu.product label has this value, e.g. NVIDIA-H100-80GB-HBM3."))
    resources: ComputeResources = Field(default_factory=ComputeResources, description="CPU and memory per worker.")
    shm_size: str = Field(default="16Gi", pattern=r"^[0-9]+([KMGT]i)?$", description="Size of the memory-backed /dev/shm.")
    max_agent_restarts: int = Field(default=3, ge=0, le=100, description=(
        "torchrun --max-restarts: in-pod worker-group restarts before the pod fails."))
    termination_grace_seconds: int = Field(default=300, ge=30, le=3600, description=(
        "terminationGracePeriodSeconds of the workers: time to finish the step and write the "
        "preemption checkpoint after SIGTERM."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("self.minReplicas <= self.maxReplicas", "minReplicas must be less than or equal to maxReplicas",
             field_path=".minReplicas", reason="FieldValueInvalid"),
    )


class FailurePolicy(ApiModel):
    """How failures are counted and handled. Infrastructure failures (node loss, eviction,
    preemption) never count against maxRestarts."""

    max_restarts: int = Field(default=3, ge=0, le=1000, description="Application failures tolerated before the job fails.")
    restart_policy: Literal["ReplaceFailed", "RestartGroup"] = Field(default="ReplaceFailed", description=(
        "ReplaceFailed recreates only the failed worker; RestartGroup recreates every worker."))
    node_failure_grace_seconds: int = Field(default=30, ge=0, le=3600, description=(
        "How long a worker's node may be NotReady/Unknown before the worker is force-deleted and replaced."))
    insufficient_capacity_timeout_seconds: int = Field(default=300, ge=0, description=(
        "How long fewer than minReplicas may run before the job reports InsufficientCapacity."))
    disruption_window_seconds: int = Field(default=300, ge=0, le=86400, description=(
        "Worker failures within this long after an infrastructure disruption of the same job (node "
        "lost, worker evicted or preempted, rendezvous store lost) are counted as infrastructure: "
        "the surviving peers fail with rendezvous or collective errors caused by the loss."))


class Trainer(ApiModel):
    """What the workers run: the image and the trainer config (model, data, optimizer, parallelism)."""

    image: str | None = Field(default=None, min_length=1, description=(
        "Trainer image. Unset: the operator's workload image (Helm value `workloadImage`, default "
        "ghcr.io/kubeforge/trainer:<version>)."))
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy of the worker container.")
    config: dict[str, Any] = Field(default_factory=dict, description=(
        "The trainer config (the YAML of `python -m kubeforge_runtime.train --config`), mounted as a "
        "ConfigMap file. Its schema and rules are the trainer's own (kubeforge_runtime/config.py): the API "
        "server rejects a wrong type, a value out of range or an inconsistent combination at admission, and "
        "kubectl's strict field validation rejects an unknown key. The trainer validates it again before "
        "training and exits with the configuration-error code, which fails the job at once."))


class PodOverrides(ApiModel):
    """Additions to the worker pods, without forking the pod template."""

    env: list[EnvVar] = Field(default_factory=list, max_length=256, description="Extra environment variables.")
    volumes: list[Volume] = Field(default_factory=list, max_length=64, description="Extra volumes.")
    volume_mounts: list[VolumeMount] = Field(default_factory=list, description="Extra mounts in the worker container.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra node selector labels.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Extra tolerations.")
    priority_class_name: str | None = Field(default=None, description="PriorityClass of the worker pods.")
    scheduler_name: str | None = Field(default=None, description="Scheduler (e.g. a gang scheduler) of the worker pods.")
    service_account_name: str | None = Field(default=None, description=(
        "ServiceAccount of the worker and rendezvous pods, for its image pull secrets and workload identity; "
        "its API token is never mounted (the trainer calls no Kubernetes API)."))


class Export(ApiModel):
    """The final model export (Hugging Face Llama layout) that InferenceServices serve."""

    enabled: bool = Field(default=True, description="Write the export when training finishes; Succeeded waits for it.")


class ResumeFrom(ApiModel):
    """Start this job's run from another run's checkpoint instead of from step 0.

    Every TrainingJob object has a run of its own in the store (<job>/runs/<uid>): a job created
    again under an old name starts fresh unless it says so here. Used only while the run has no
    committed checkpoint of its own; from its first commit on, restarts resume from its own."""

    training_job: str | None = Field(default=None, min_length=1, max_length=63, pattern=DNS_1035_LABEL, description=(
        "Resume from the run of this TrainingJob: the existing object of that name, or when there is none "
        "(or it is this one) the newest run a deleted object of that name left in the same store. "
        "A TrainingJob name: a DNS-1035 label (lowercase letters, digits and '-', starting with a letter; "
        "no '/' or '.'). Unset: this job's own name, i.e. the run of its deleted predecessor."))
    step: int | None = Field(default=None, ge=0, description=(
        "Resume from this committed step. Unset: the newest loadable one. The job fails with reason "
        "ResumeSourceInvalid when the step is not committed there or cannot be loaded."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("has(self.trainingJob) || has(self.step)", "resumeFrom must set trainingJob, step, or both",
             reason="FieldValueRequired"),
    )


class DatasetRef(ApiModel):
    """A version of a Dataset (the flywheel's curated traffic) to train on."""

    name: str = Field(min_length=1, max_length=253, description="The Dataset, in this namespace.")
    version: int | None = Field(default=None, ge=1, description=(
        "A committed version; unset: the newest when the job starts (then kept for the job's life)."))


class InitFrom(ApiModel):
    """The weights a job starts from (fine-tuning), by reference."""

    training_job_ref: LocalObjectReference = Field(description=(
        "Start from the committed export of this TrainingJob (e.g. the one an InferenceService serves). The "
        "operator resolves it to the export's URI, records it in status.initFrom and sets "
        "trainer.config.model.init_from; the trainer downloads and verifies it against its commit marker. The "
        "job waits (reason WaitingForInitFrom) until the export is committed."))


class TrainingData(ApiModel):
    """Training data named by reference, resolved by the operator."""

    dataset_ref: DatasetRef | None = Field(default=None, description=(
        "Train on this Dataset version's train split (SFT records: loss on the targets only). The operator "
        "resolves it to the version's URI, records it in status.dataset and sets trainer.config.data.paths "
        "and format (sft); the job waits (reason WaitingForDataset) until the version is committed. The job's "
        "CheckpointPolicy credentials must be able to read it."))


_PARALLELISM = "self.trainer.config.parallelism"
_HYBRID = (f"has(self.trainer.config) && has({_PARALLELISM}) && has({_PARALLELISM}.sharding) && "
           f"{_PARALLELISM}.sharding == 'hybrid' && has({_PARALLELISM}.shard_group_size)")
_SHARD_GROUP = f"{_PARALLELISM}.shard_group_size"
_PROCS = "(self.workers.gpusPerWorker > 0 ? self.workers.gpusPerWorker : 1)"  # torchrun --nproc-per-node


class TrainingJobSpec(ApiModel):
    """What to train, on how many GPU nodes, and how to survive failures."""

    workers: Workers = Field(default_factory=Workers, description="Worker count range and shape.")
    trainer: Trainer = Field(default_factory=Trainer, description="Image and trainer config.")
    checkpoint_policy_ref: LocalObjectReference | None = Field(default=None, description=(
        "The CheckpointPolicy to use; without one the job does not checkpoint and restarts from step 0."))
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy, description="Failure budget and handling.")
    export: Export = Field(default_factory=Export, description="Final model export.")
    pod: PodOverrides = Field(default_factory=PodOverrides, description="Additions to the worker pods.")
    suspend: bool = Field(default=False, description="Delete the workers and keep status and checkpoints; resume on false.")
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Fail the job once it ran this long.")
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, description=(
        "Delete the TrainingJob this long after it succeeded or failed."))
    resume_from: ResumeFrom | None = Field(default=None, description=(
        "Start from a checkpoint of another run (a deleted job's, or another job's) rather than step 0."))
    init_from: InitFrom | None = Field(default=None, description=(
        "Start from another job's export instead of random weights (fine-tuning)."))
    data: TrainingData | None = Field(default=None, description=(
        "Training data by reference (a Dataset version); trainer.config.data holds the rest of the data settings."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("!has(self.data) || !has(self.data.datasetRef) || !has(self.trainer.config) || "
             "!has(self.trainer.config.data) || !has(self.trainer.config.data.paths)",
             "trainer.config.data.paths must not be set with data.datasetRef: the operator sets it to the "
             "dataset version's URI", field_path=".data.datasetRef", reason="FieldValueForbidden"),
        Rule("!has(self.initFrom) || !has(self.trainer.config) || !has(self.trainer.config.model) || "
             "!has(self.trainer.config.model.init_from)",
             "trainer.config.model.init_from must not be set with initFrom: the operator sets it to the export's URI",
             field_path=".initFrom", reason="FieldValueForbidden"),
        Rule("!has(self.resumeFrom) || has(self.checkpointPolicyRef)",
             "resumeFrom must come with a checkpointPolicyRef: the runs it resumes are in that policy's store",
             field_path=".resumeFrom", reason="FieldValueRequired"),
        # the trainer's own check against the world size, where admission can know it: every size
        # from min to max replicas × processes per worker; two consecutive sizes n·p and (n+1)·p
        # share only the divisors of p, so an elastic job's shard group must divide p
        Rule(f"!({_HYBRID}) || (self.workers.minReplicas == self.workers.maxReplicas ? "
             f"(self.workers.minReplicas * {_PROCS}) % {_SHARD_GROUP} == 0 : {_PROCS} % {_SHARD_GROUP} == 0)",
             "trainer.config.parallelism.shard_group_size must divide the world size at every worker count the "
             "job can run at (workers × processes per worker; with minReplicas < maxReplicas it must divide "
             "gpusPerWorker)", field_path=".trainer.config.parallelism.shard_group_size", reason="FieldValueInvalid"),
    )


class WorkerCounts(ApiModel):
    """Worker pods by state."""

    desired: int = Field(default=0, description="Worker pods the job wants (maxReplicas).")
    active: int = Field(default=0, description="Worker pods that exist and have not finished.")
    ready: int = Field(default=0, description="Worker pods running and ready.")
    failed: int = Field(default=0, description="Worker pods that failed and await replacement.")


class Restarts(ApiModel):
    """Restarts so far; stored here so they never reset."""

    application: int = Field(default=0, description="Application failures (count against maxRestarts).")
    infrastructure: int = Field(default=0, description="Infrastructure replacements (node loss, eviction, preemption).")


class WorkerPodRecord(ApiModel):
    """The worker pod the operator created for one replica index. Restarts are counted by
    attempt, so a restart of the operator at any moment never counts one twice."""

    index: int = Field(ge=0, description="Replica index (the pod is <job>-worker-<index>).")
    attempt: int = Field(default=0, ge=0, description=(
        "Attempt of this index; the pod carries it as a label and older attempts are deleted uncounted."))
    uid: str | None = Field(default=None, description="UID of the pod of this attempt, once created.")


class CheckpointRef(ApiModel):
    """The newest committed checkpoint on the store."""

    step: int = Field(description="Training step.")
    uri: str = Field(description="Where it is.")
    time: str | None = Field(default=None, description="When it was committed.")


Phase = Literal["Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]


class ResolvedDataset(ApiModel):
    """The Dataset version a job trains on, as resolved when it started."""

    name: str = Field(description="The Dataset.")
    version: int = Field(description="Its version.")
    uri: str = Field(description="Where the version is.")


class ResolvedInit(ApiModel):
    """The export a job starts from, as resolved when it started."""

    training_job: str = Field(description="The TrainingJob whose export it is.")
    uri: str = Field(description="Where the export is.")
    revision: str | None = Field(default=None, description="The export's revision (its commit marker's time).")


class TrainingJobStatus(StatusBase):
    """Observed state of the job."""

    phase: Phase | None = Field(default=None, description="Summary for humans; conditions are the API.")
    workers: WorkerCounts | None = Field(default=None, description="Worker pods by state.")
    restarts: Restarts | None = Field(default=None, description="Restart counters.")
    start_time: str | None = Field(default=None, description="When the job first ran.")
    completion_time: str | None = Field(default=None, description="When the job succeeded or failed.")
    last_checkpoint: CheckpointRef | None = Field(default=None, description="Newest committed checkpoint.")
    export_uri: str | None = Field(default=None, description="Where the committed export is.")
    run: str | None = Field(default=None, description=(
        "This object's run, where under <store>/<namespace>/ its checkpoints and export are: <name>/runs/<uid>, "
        "or <name> for a job that started before runs were keyed by uid. Decided once, before the first worker."))
    init_from: ResolvedInit | None = Field(default=None, description=(
        "The export spec.initFrom resolved to, kept for the job's life."))
    dataset: ResolvedDataset | None = Field(default=None, description=(
        "The Dataset version spec.data.datasetRef resolved to, kept for the job's life."))
    message: str | None = Field(default=None, description="Latest human-readable summary.")
    worker_pods: list[WorkerPodRecord] = Field(default_factory=list, description=(
        "The current attempt of every worker index, by which restarts are counted exactly once."))
    last_disruption_time: str | None = Field(default=None, description=(
        "When the job last lost a worker or its rendezvous store to infrastructure."))
    application_failure_times: list[str] = Field(default_factory=list, description=(
        "When the most recent application failures happened: one that an infrastructure disruption "
        "noticed later explains (a node whose heartbeats had already stopped) is recounted as infrastructure."))


#: Worker hostnames are DNS labels (63 characters) and the longest suffix is "-worker-4095".
MAX_NAME = 63 - len("-worker-4095")


class TrainingJob(Kind):
    """Elastic, fault-tolerant training across N..M GPU nodes with the in-image FSDP trainer.

    The operator creates one headless Service and one Pod per worker running elastic
    torchrun, replaces workers lost to node failure or preemption, and resumes from the last
    committed checkpoint."""

    kind: ClassVar[str] = "TrainingJob"
    plural: ClassVar[str] = "trainingjobs"
    name_rules: ClassVar[tuple[Rule, ...]] = dns_label_name_rules(
        "TrainingJob", MAX_NAME, "it names the job's headless Service, and its workers' hostnames <name>-worker-<i>")
    short_names: ClassVar[tuple[str, ...]] = ("tjob",)
    spec_model: ClassVar[type[ApiModel]] = TrainingJobSpec
    status_model: ClassVar[type[ApiModel]] = TrainingJobStatus
    printer_columns: ClassVar[tuple[dict[str, str], ...]] = (
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Workers", "type": "integer", "jsonPath": ".status.workers.ready"},
        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts.application"},
        {"name": "Checkpoint", "type": "integer", "jsonPath": ".status.lastCheckpoint.step"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )
