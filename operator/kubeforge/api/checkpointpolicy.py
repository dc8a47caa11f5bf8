"""CheckpointPolicy: how often a TrainingJob checkpoints, where to, and what is kept."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from kubeforge.api.common import ApiModel, Kind, LocalObjectReference, Rule, StatusBase


class Schedule(ApiModel):
    """When checkpoints are written. A step or time interval is required; the two combine
    (whichever comes first)."""

    every_steps: int | None = Field(default=None, ge=1, description="Save every N optimizer steps.")
    every_seconds: int | None = Field(default=None, ge=10, description="Save when T seconds passed since the last save.")
    on_preemption: bool = Field(default=True, description="Save when the worker gets SIGTERM (preemption, drain).")
    at_end: bool = Field(default=True, description="Save after the last step.")
    async_save: bool = Field(default=True, description=(
        "Write in the background: training is blocked only while state is staged to host memory."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("has(self.everySteps) || has(self.everySeconds)",
             "everySteps or everySeconds must be set", reason="FieldValueRequired"),
    )


class Retention(ApiModel):
    """What the operator keeps on the store. The newest committed checkpoint is always kept,
    and so is the one a running job restores from."""

    keep_last: int = Field(default=3, ge=1, le=1000, description="Keep the K newest committed checkpoints.")
    keep_every: int | None = Field(default=None, ge=1, description=(
        "Also keep every checkpoint whose step is a multiple of M (milestones)."))
    incomplete_grace_seconds: int = Field(default=3600, ge=60, description=(
        "Delete checkpoints without a commit marker once they are this old."))


class S3Storage(ApiModel):
    """An S3 or S3-compatible bucket. Credentials come from a Secret, never from this spec."""

    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.\-]*[a-z0-9]$",
                        description="Bucket name.")
    prefix: str = Field(default="kubeforge", description="Key prefix under which jobs' checkpoints live.")
    endpoint: str | None = Field(default=None, pattern=r"^https?://", description=(
        "Endpoint URL for S3-compatible servers (MinIO, Ceph); empty means AWS."))
    region: str = Field(default="us-east-1", description="Region name.")
    force_path_style: bool = Field(default=True, description="Path-style addressing (needed by most S3-compatible servers).")
    credentials_secret_ref: LocalObjectReference = Field(description=(
        "Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, passed to workers through envFrom."))
    staging_size_limit: str = Field(default="64Gi", pattern=r"^[0-9]+([KMGTPE]i?)?$", description=(
        "Size limit of each worker's emptyDir where a checkpoint is staged before upload (and a restore "
        "downloaded): at least one rank's shard of a checkpoint, twice that with asyncSave. Past it the "
        "kubelet evicts the pod, instead of the staging filling the node's disk unseen."))


class VolumeStorage(ApiModel):
    """A PersistentVolumeClaim mounted into every worker (ReadWriteMany for multi-node jobs)."""

    claim_name: str = Field(min_length=1, description="Name of the PersistentVolumeClaim.")
    path: str = Field(default="/", pattern=r"^/", description="Directory inside the volume.")


class Storage(ApiModel):
    """Where checkpoints go: exactly one of s3 or volume."""

    s3: S3Storage | None = Field(default=None, description="Store checkpoints in an S3 bucket.")
    volume: VolumeStorage | None = Field(default=None, description="Store checkpoints on a mounted volume.")

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("has(self.s3) != has(self.volume)", "exactly one of s3 or volume must be set", reason="FieldValueInvalid"),
    )


class CheckpointPolicySpec(ApiModel):
    """How often to checkpoint, where, and what to keep."""

    schedule: Schedule = Field(description="When checkpoints are written.")
    retention: Retention = Field(default_factory=Retention, description="What is kept on the store.")
    storage: Storage = Field(description="Where checkpoints are written.")


class JobCheckpoints(ApiModel):
    """What the store holds for one TrainingJob using this policy."""

    name: str = Field(description="TrainingJob name.")
    run: str | None = Field(default=None, description=(
        "The job's run (its status.run): where under <store>/<namespace>/ its checkpoints and export are, "
        "<name>/runs/<uid>. Absent for a job that started before runs were keyed by uid (its run is <name>)."))
    committed: int = Field(default=0, description="Number of committed checkpoints.")
    bytes: int = Field(default=0, description="Total bytes of committed checkpoints.")
    newest_step: int | None = Field(default=None, description=(
        "Step of the newest committed checkpoint a restore has not failed on (what the job resumes from)."))
    newest_time: str | None = Field(default=None, description="When that checkpoint was written.")
    newest_uri: str | None = Field(default=None, description=(
        "Where that checkpoint is, as the workers see the store (s3://... or file:///mnt/...)."))
    unloadable: int | None = Field(default=None, description=(
        "Committed checkpoints a restore could not load (recorded in <job>/unloadable.json); retention "
        "neither counts nor deletes them. Absent when none."))
    export_uri: str | None = Field(default=None, description="The job's committed export, once there is one.")
    export_time: str | None = Field(default=None, description="When the export was committed (its revision).")


class CheckpointPolicyStatus(StatusBase):
    """Observed state: storage reachability and, per job, what is stored."""

    jobs: list[JobCheckpoints] = Field(default_factory=list, description=(
        "Per TrainingJob using this policy. Read by the operator for S3; for a volume, reported by the "
        "inspector pod that mounts the claim on every retention pass (condition Inspected)."))


class CheckpointPolicy(Kind):
    """How often a TrainingJob checkpoints, to which S3 bucket or volume, and what is kept.

    Referenced by TrainingJobs through spec.checkpointPolicyRef. The operator validates the
    storage (Secret present, bucket reachable) and enforces retention on the store."""

    kind: ClassVar[str] = "CheckpointPolicy"
    plural: ClassVar[str] = "checkpointpolicies"
    short_names: ClassVar[tuple[str, ...]] = ("ckptpol",)
    spec_model: ClassVar[type[ApiModel]] = CheckpointPolicySpec
    status_model: ClassVar[type[ApiModel]] = CheckpointPolicyStatus
    printer_columns: ClassVar[tuple[dict[str, str], ...]] = (
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Every-Steps", "type": "integer", "jsonPath": ".spec.schedule.everySteps"},
        {"name": "Keep", "type": "integer", "jsonPath": ".spec.retention.keepLast"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )
