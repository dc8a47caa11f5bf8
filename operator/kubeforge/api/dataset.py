"""Dataset: served traffic and feedback curated into versioned training data (the flywheel's data half)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kubeforge.api.common import (
    ApiModel,
    ComputeResources,
    Kind,
    LocalObjectReference,
    Redaction,
    Rule,
    StatusBase,
    StoreRef,
    dns_label_name_rules,
)


class DatasetSource(ApiModel):
    """What is curated: exactly one of an InferenceService's capture, or a capture prefix in a store."""

    inference_service_ref: LocalObjectReference | None = Field(default=None, description=(
        "Curate what this InferenceService captures (its spec.logging store, under <namespace>/<name>/capture)."))
    store: StoreRef | None = Field(default=None, description="A store holding a capture directory (with prefix).")
    prefix: str | None = Field(default=None, min_length=1, pattern=r"^[^/].*[^/]$|^[^/]$", description=(
        "With store: the capture directory relative to the store root, e.g. default/chat/capture."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("has(self.inferenceServiceRef) != has(self.store)", "exactly one of inferenceServiceRef or store "
             "must be set", reason="FieldValueInvalid"),
        Rule("has(self.store) == has(self.prefix)", "prefix must be set with store, and only with store",
             field_path=".prefix", reason="FieldValueInvalid"),
    )


class FeedbackCuration(ApiModel):
    """Which records are kept by their feedback. A rating is scored 0..1: -1 is 0, +1 is 1, and
    r of 2..5 is (r-1)/4; 1 belongs to both scales and is read as +1, so a 1..5 client sends -1
    for its worst. A record's latest feedback decides; its latest correction becomes the
    training target."""

    min_score: float = Field(default=0.5, ge=0, le=1, description="Keep rated records scored at least this.")
    require_feedback: bool = Field(default=False, description="Drop records that have no feedback at all.")


class DedupCuration(ApiModel):
    """Duplicate removal: exact (by hash of prompt and target; the earliest kept), then near
    duplicates: MinHash + LSH (datasketch) on word shingles proposes candidates, each checked on
    the exact Jaccard of the shingle sets; of a group, a corrected record is kept before an
    uncorrected one, then the higher score, then the earliest."""

    exact: bool = Field(default=True, description="Remove exact duplicates.")
    near_duplicates: bool = Field(default=True, description="Remove near duplicates (MinHash + LSH).")
    near_duplicate_threshold: float = Field(default=0.8, gt=0, le=1, description=(
        "Jaccard similarity of the shingle sets from which two records are near duplicates."))
    shingle_words: int = Field(default=5, ge=1, le=32, description="Words per shingle.")
    num_perm: int = Field(default=128, ge=16, le=1024, description="MinHash permutations.")


class FilterCuration(ApiModel):
    """Length and quality filters (docs/flywheel.md says what each measures)."""

    min_prompt_chars: int = Field(default=1, ge=0, description="Shortest prompt kept.")
    max_prompt_chars: int = Field(default=16000, ge=1, description="Longest prompt kept.")
    min_target_chars: int = Field(default=1, ge=0, description="Shortest target kept.")
    max_target_chars: int = Field(default=16000, ge=1, description="Longest target kept.")
    min_alpha_ratio: float = Field(default=0.3, ge=0, le=1, description=(
        "Fewest letters per non-space character of the target."))
    max_repeat_ratio: float = Field(default=0.5, gt=0, le=1, description=(
        "Largest share of the target's word 3-grams taken by its most repeated one."))
    scripts: list[str] = Field(default_factory=lambda: ["Latin"], max_length=16, description=(
        "Unicode scripts the target's letters must mostly be in; empty keeps every script."))
    drop_finish_reasons: list[Literal["stop", "length", "abort"]] = Field(default_factory=list, description=(
        "Drop records whose completion ended for one of these reasons (e.g. length: cut off)."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("self.minPromptChars <= self.maxPromptChars", "minPromptChars must not exceed maxPromptChars",
             field_path=".minPromptChars", reason="FieldValueInvalid"),
        Rule("self.minTargetChars <= self.maxTargetChars", "minTargetChars must not exceed maxTargetChars",
             field_path=".minTargetChars", reason="FieldValueInvalid"),
    )


class SplitCuration(ApiModel):
    """The train/eval split, decided per record by a hash of its completion id: a record never
    moves between splits across versions."""

    eval_percent: float = Field(default=10, ge=0, le=50, description="Share of records in the eval split.")


class Curation(ApiModel):
    """How captured records become training data (python -m kubeforge_runtime.curate)."""

    feedback: FeedbackCuration = Field(default_factory=FeedbackCuration, description="Keep by feedback.")
    dedup: DedupCuration = Field(default_factory=DedupCuration, description="Exact and near-duplicate removal.")
    filters: FilterCuration = Field(default_factory=FilterCuration, description="Length and quality filters.")
    redact: Redaction = Field(default_factory=Redaction, description="PII redaction, again (capture may have had it off).")
    split: SplitCuration = Field(default_factory=SplitCuration, description="Train/eval split.")


class DatasetSchedule(ApiModel):
    """When a new version is curated. The conditions combine (whichever first); with neither,
    only on demand: annotate the Dataset with kubeforge.dev/curate=<any new value>."""

    every_new_records: int | None = Field(default=None, ge=1, description=(
        "Curate once this many request records were committed since the newest version."))
    every_seconds: int | None = Field(default=None, ge=60, description=(
        "Curate this long after the newest version, when there are new request or feedback records."))


class DatasetRetention(ApiModel):
    """How long data lives: old versions, and captured shards already curated."""

    keep_versions: int = Field(default=5, ge=1, le=1000, description=(
        "Committed versions kept; older ones are deleted (a TrainingJob recorded the URI it trains on: keep "
        "enough versions for the jobs that may still restart)."))
    capture_max_age_days: int | None = Field(default=None, ge=1, le=3650, description=(
        "Delete captured shards (requests and feedback) older than this once a version has curated them; "
        "unset keeps them."))


class DatasetSpec(ApiModel):
    """What to curate, how, and when."""

    source: DatasetSource = Field(description="The captured traffic to curate.")
    curation: Curation = Field(default_factory=Curation, description="Curation settings.")
    schedule: DatasetSchedule = Field(default_factory=DatasetSchedule, description="When to curate.")
    retention: DatasetRetention = Field(default_factory=DatasetRetention, description="What is kept.")
    image: str | None = Field(default=None, min_length=1, description=(
        "Curation image; unset: the operator's workload image."))
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy of the curation pod.")
    resources: ComputeResources = Field(default_factory=ComputeResources, description="CPU and memory of the curation pod.")
    suspend: bool = Field(default=False, description="Start no curation (a running one finishes).")


class SplitCounts(ApiModel):
    """Records per split."""

    train: int = Field(default=0, description="Training records.")
    eval: int = Field(default=0, description="Evaluation records.")


class DatasetVersion(ApiModel):
    """One committed version."""

    version: int = Field(description="Version number, from 1.")
    uri: str = Field(description="Where it is (train.tar, eval.tar, manifest.json).")
    time: str | None = Field(default=None, description="When it was committed.")
    records: SplitCounts = Field(default_factory=SplitCounts, description="Records per split.")
    dedup_ratio: float | None = Field(default=None, description="Share of records the dedup steps removed.")
    window_start: str | None = Field(default=None, description="Time of the oldest record curated.")
    window_end: str | None = Field(default=None, description="Time of the newest record curated.")
    content_sha256: str | None = Field(default=None, description="Content hash of the splits.")


class CurationRun(ApiModel):
    """The curation pod running now."""

    version: int = Field(description="The version it writes.")
    pod: str = Field(description="The pod's name.")
    start_time: str | None = Field(default=None, description="When it was created.")


class DatasetStatus(StatusBase):
    """Observed state. Conditions: Ready (a committed version exists), Curating (a curation pod
    runs), SourceEmpty (the source has no committed record)."""

    versions: list[DatasetVersion] = Field(default_factory=list, description="Committed versions kept, oldest first.")
    newest_version: int | None = Field(default=None, description="The newest committed version.")
    newest_uri: str | None = Field(default=None, description="Where the newest version is: what datasetRef resolves to.")
    records: SplitCounts | None = Field(default=None, description="Records per split of the newest version.")
    dedup_ratio: float | None = Field(default=None, description="Dedup ratio of the newest version.")
    source_uri: str | None = Field(default=None, description="The capture directory read.")
    source_records: int | None = Field(default=None, description="Committed request records in the source.")
    pending_records: int | None = Field(default=None, description="Request records committed since the newest version.")
    pending_feedback: int | None = Field(default=None, description=(
        "Feedback records committed since the newest version (they start one on schedule.everySeconds)."))
    curating: CurationRun | None = Field(default=None, description="The curation running now.")
    last_curation_request: str | None = Field(default=None, description=(
        "The kubeforge.dev/curate annotation value last acted on."))
    message: str | None = Field(default=None, description="Latest human-readable summary.")


#: The curation pod is <name>-curate-v<version> (up to 10 digits) and carries the name as a label.
MAX_NAME = 63 - len("-curate-v0000000000")


class Dataset(Kind):
    """Captured traffic and feedback curated into versioned, deduplicated training data.

    The operator runs a curation pod (python -m kubeforge_runtime.curate) per version when the
    schedule says so; each version's URI, counts and dedup ratio are in status, and a
    TrainingJob trains on one through spec.data.datasetRef."""

    kind: ClassVar[str] = "Dataset"
    plural: ClassVar[str] = "datasets"
    name_rules: ClassVar[tuple[Rule, ...]] = dns_label_name_rules(
        "Dataset", MAX_NAME, "it names the curation pods <name>-curate-v<version>")
    short_names: ClassVar[tuple[str, ...]] = ("kfds",)
    spec_model: ClassVar[type[ApiModel]] = DatasetSpec
    status_model: ClassVar[type[ApiModel]] = DatasetStatus
    printer_columns: ClassVar[tuple[dict[str, str], ...]] = (
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Version", "type": "integer", "jsonPath": ".status.newestVersion"},
        {"name": "Train", "type": "integer", "jsonPath": ".status.records.train"},
        {"name": "Eval", "type": "integer", "jsonPath": ".status.records.eval"},
        {"name": "Dedup", "type": "number", "jsonPath": ".status.dedupRatio"},
        {"name": "Pending", "type": "integer", "jsonPath": ".status.pendingRecords"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )
