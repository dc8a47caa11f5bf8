"""Flywheel: the loop's second half. A cycle turns the newest curated Dataset version into a
fine-tuned candidate, gates it on an offline evaluation, exposes it through shadow and canary
steps on the InferenceService, and promotes it or rolls it back."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kubeforge.api.common import (
    ApiModel,
    ComputeResources,
    Kind,
    LocalObjectReference,
    Rule,
    StatusBase,
    dns_label_name_rules,
)
from kubeforge.api.trainingjob import TrainingJobSpec
from kubeforge.store.evaluation import METRICS

STAGES = ("Idle", "Curating", "Training", "Evaluating", "Shadow", "Canary", "AwaitingPromotion", "Promoting",
          "RollingBack")
Stage = Literal["Idle", "Curating", "Training", "Evaluating", "Shadow", "Canary", "AwaitingPromotion", "Promoting",
                "RollingBack"]
Outcome = Literal["Promoted", "RolledBack", "Rejected", "Failed"]


class FlywheelTrigger(ApiModel):
    """When a cycle starts (whichever first; never while one runs). With none set, only on
    demand: annotate the Flywheel with kubeforge.dev/run-cycle=<any new value>."""

    new_records: int | None = Field(default=None, ge=1, description=(
        "Start once the Dataset's source has this many request records more than when the last cycle started, "
        "or before the first cycle than when the Flywheel first saw the Dataset (its status.sourceRecords)."))
    on_drift: bool = Field(default=False, description=(
        "Start when the InferenceService's DriftDetected condition turns True after the last cycle started."))
    every_seconds: int | None = Field(default=None, ge=300, description=(
        "Start this long after the last cycle started (or, for the first, after the Flywheel was created)."))


class FlywheelTraining(ApiModel):
    """The candidate's TrainingJob, <flywheel>-c<cycle>. The operator sets data.datasetRef to
    the cycle's Dataset version and initFrom to the TrainingJob whose export is served, and
    clears ttlSecondsAfterFinished (a promoted candidate's export is served from its job)."""

    template: TrainingJobSpec = Field(description=(
        "The TrainingJob spec of every candidate. Its checkpointPolicyRef must name S3 storage: the candidate's "
        "export, and the cycle's evaluation report, are written there."))
    max_retained_jobs: int = Field(default=3, ge=1, le=100, description=(
        "Finished candidate jobs kept (the served one and the running one are always kept)."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("!has(self.template.data) && !has(self.template.initFrom)",
             "template.data and template.initFrom must not be set: each cycle sets them (the Dataset version, the "
             "served export)", field_path=".template", reason="FieldValueForbidden"),
        Rule("!has(self.template.trainer.config) || ((!has(self.template.trainer.config.data) || "
             "!has(self.template.trainer.config.data.paths)) && (!has(self.template.trainer.config.model) || "
             "!has(self.template.trainer.config.model.init_from)))",
             "template.trainer.config.data.paths and template.trainer.config.model.init_from must not be set: each "
             "cycle trains on its Dataset version, from the served export", field_path=".template.trainer.config",
             reason="FieldValueForbidden"),
    )


class GateRuleSpec(ApiModel):
    """What one metric must show, as a gain of the candidate over the served model in the
    metric's own units (perplexity: the drop counts as the gain; preference: over 0.5)."""

    min_gain: float | None = Field(default=None, description="The candidate must gain at least this much.")
    max_regression: float | None = Field(default=None, ge=0, description="The candidate must not lose more than this.")

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("has(self.minGain) || has(self.maxRegression)", "a gate rule must set minGain, maxRegression or both",
             reason="FieldValueRequired"),
    )


_METRICS_CEL = "[" + ", ".join(f"'{m}'" for m in METRICS) + "]"


class FlywheelEvaluation(ApiModel):
    """The offline evaluation of a candidate (python -m kubeforge_runtime.evaluate) against the
    served model, on the cycle's Dataset eval split and the golden set; the candidate goes on to
    shadow only when every gate rule holds."""

    golden_uri: str | None = Field(default=None, pattern=r"^s3://[a-z0-9][a-z0-9.\-]*[a-z0-9]/.+\.(jsonl|json|tar)$",
                                   description=(
        "A fixed set of {prompt or messages, reference} records (.jsonl or .tar) in the training "
        "CheckpointPolicy's store, read with its credentials."))
    gate: dict[str, GateRuleSpec] = Field(default_factory=dict, description=(
        "Per metric (eval.mean_logprob, eval.perplexity, eval.exact_match, eval.overlap, the same with golden., "
        "and preference), what the candidate must show. A metric the report lacks fails its rule."))
    max_records: int = Field(default=1000, ge=1, description="Records per suite scored.")
    short_answer_words: int = Field(default=16, ge=1, description=(
        "A reference of at most this many words is a short answer (exact match and overlap)."))
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Greedy answer length cap.")
    batch_size: int = Field(default=8, ge=1, le=256, description="Records per forward pass.")
    tie_margin: float = Field(default=0.0, ge=0, le=1, description="Overlaps closer than this tie (preference).")
    image: str | None = Field(default=None, min_length=1, description="Evaluation image; unset: the workload image.")
    resources: ComputeResources = Field(default_factory=ComputeResources, description="CPU and memory of the pod.")
    deadline_seconds: int = Field(default=3600, ge=60, description="The evaluation pod is killed after this long.")

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(f"!has(self.gate) || self.gate.all(k, k in {_METRICS_CEL})",
             "gate keys must be evaluation metrics: " + ", ".join(METRICS), field_path=".gate", reason="FieldValueInvalid"),
    )


class ShadowStep(ApiModel):
    """The candidate answers a copy of a share of requests; its answers are discarded."""

    sample_percent: float = Field(default=100, gt=0, le=100, description="Share of generation requests copied.")
    min_seconds: int = Field(default=300, ge=0, description="Shortest time in shadow.")
    min_requests: int = Field(default=20, ge=0, description="Fewest mirrored requests answered before it ends.")


class CanaryStep(ApiModel):
    """One canary step: the candidate answers this share until both minimums are met and the
    guard rails held."""

    traffic_percent: float = Field(gt=0, le=100, description="Share of requests the candidate answers.")
    min_seconds: int = Field(default=300, ge=0, description="Shortest time at this step.")
    min_requests: int = Field(default=20, ge=0, description="Fewest requests the candidate answered at this step.")


class GuardRails(ApiModel):
    """What the candidate must not be worse at than the stable revision, measured by the
    router (kubeforge:router_requests, kubeforge:router_request_duration_seconds; in shadow
    kubeforge:shadow_requests and its duration) over the step so far. A breach at any step
    rolls back at once."""

    max_error_rate_increase: float = Field(default=0.02, ge=0, le=1, description=(
        "The candidate's share of failed requests (5xx; in shadow: errors and timeouts) may exceed the stable "
        "revision's by at most this (absolute)."))
    max_p95_latency_ratio: float = Field(default=1.5, ge=1, description=(
        "The candidate's p95 request time may be at most this times the stable revision's."))
    min_requests: int = Field(default=10, ge=1, description=(
        "Candidate requests at the step before the rules are judged; the latency rule also needs as many of the "
        "stable revision (at a 100 % canary it is not judged)."))
    warmup_seconds: int = Field(default=15, ge=0, le=600, description=(
        "A step counts from this long after the candidate's revision first has a ready pod: the routers reach a "
        "new revision a moment after it is Ready (Service endpoints, NetworkPolicy sets), and those first "
        "requests do not judge it."))


class FlywheelRollout(ApiModel):
    """How a candidate that passed the gate meets traffic."""

    shadow: ShadowStep | None = Field(default_factory=ShadowStep, description="Shadow first; null skips it.")
    canary_steps: list[CanaryStep] = Field(
        default_factory=lambda: [CanaryStep(traffic_percent=10), CanaryStep(traffic_percent=50)],
        max_length=16, description="Canary steps, in order: distinct shares, the last the largest.")
    guard_rails: GuardRails = Field(default_factory=GuardRails, description="Per step, against the stable revision.")
    auto_promote: bool = Field(default=True, description=(
        "Promote after the last step. False waits in AwaitingPromotion (the last step's share stays) until the "
        "Flywheel is annotated kubeforge.dev/promote=<cycle>."))
    candidate_ready_seconds: int = Field(default=900, ge=30, description=(
        "A candidate revision without a ready pod this long (from the step's start, or since it last had one: its "
        "export does not load, its pod is gone), or router counters that cannot be read this long, roll back."))
    max_step_seconds: int = Field(default=3600, ge=60, description=(
        "A step that has not had its minRequests this long rolls back: too little traffic to judge the candidate."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("self.canarySteps.all(s, self.canarySteps.exists_one(t, t.trafficPercent == s.trafficPercent)) && "
             "(size(self.canarySteps) < 2 || self.canarySteps.all(s, s.trafficPercent <= "
             "self.canarySteps[size(self.canarySteps) - 1].trafficPercent))",
             "canarySteps must have distinct shares, the last the largest", field_path=".canarySteps",
             reason="FieldValueInvalid"),
        Rule("has(self.shadow) || size(self.canarySteps) > 0",
             "a rollout must have a shadow or at least one canary step", reason="FieldValueRequired"),
    )


class FlywheelSpec(ApiModel):
    """The served model, the data it learns from, and how a cycle runs."""

    inference_service_ref: LocalObjectReference = Field(description=(
        "The InferenceService whose model is improved; its spec.model must name a TrainingJob (trainingJobRef): "
        "the candidate fine-tunes from that export."))
    dataset_ref: LocalObjectReference = Field(description="The Dataset the candidates train on.")
    trigger: FlywheelTrigger = Field(default_factory=FlywheelTrigger, description="When a cycle starts.")
    training: FlywheelTraining = Field(description="The candidate's TrainingJob.")
    evaluation: FlywheelEvaluation = Field(default_factory=FlywheelEvaluation, description="The offline gate.")
    rollout: FlywheelRollout = Field(default_factory=FlywheelRollout, description="Shadow, canary, promotion.")
    suspend: bool = Field(default=False, description=(
        "Start no cycle; a cycle in shadow or canary is rolled back (no traffic stays on a candidate nobody "
        "watches); one curating, training or evaluating goes on and waits before shadow."))


class CycleRecord(ApiModel):
    """One cycle, as it went."""

    cycle: int = Field(description="Cycle number, from 1.")
    trigger: str | None = Field(default=None, description="What started it.")
    start_time: str | None = Field(default=None, description="When it started.")
    completion_time: str | None = Field(default=None, description="When it ended.")
    dataset_version: int | None = Field(default=None, description="The Dataset version it trained on.")
    training_job: str | None = Field(default=None, description="The candidate's TrainingJob.")
    candidate_uri: str | None = Field(default=None, description="The candidate's export.")
    scores: dict[str, float] = Field(default_factory=dict, description="The candidate's evaluation metrics.")
    baseline_scores: dict[str, float] = Field(default_factory=dict, description="The served model's, same suites.")
    gate_passed: bool | None = Field(default=None, description="Whether every gate rule held.")
    stage_reached: str | None = Field(default=None, description="The furthest stage, e.g. Canary 50%.")
    outcome: Outcome | None = Field(default=None, description="How it ended.")
    reason: str | None = Field(default=None, description="Why it ended so.")


class StepProgress(ApiModel):
    """The rollout step running now."""

    index: int = Field(description="0 for shadow (when set), then the canary steps in order.")
    name: str = Field(description="shadow, or canary-<percent>.")
    percent: float = Field(description="Its sample (shadow) or traffic (canary) percent.")
    start_time: str = Field(description="When the step started.")
    candidate_requests: int | None = Field(default=None, description="Candidate requests counted at this step.")
    candidate_error_rate: float | None = Field(default=None, description="Candidate's failed share at this step.")
    stable_error_rate: float | None = Field(default=None, description="Stable revision's failed share.")
    candidate_p95_seconds: float | None = Field(default=None, description="Candidate's p95 request time.")
    stable_p95_seconds: float | None = Field(default=None, description="Stable revision's p95 request time.")
    ready_since: str | None = Field(default=None, description="When the candidate's revision first had a ready pod at this step.")
    last_ready_time: str | None = Field(default=None, description="When the candidate's revision last had a ready pod.")
    baseline_taken: bool = Field(default=False, description="Whether the router counters were read since the step began.")
    last_read_time: str | None = Field(default=None, description="When the router counters were last read.")
    router_seen: dict[str, str] = Field(default_factory=dict, description=(
        "When each router pod (by uid) was first seen at this step."))
    baseline: dict[str, dict[str, float]] = Field(default_factory=dict, description=(
        "Per router pod uid, its counters (series → value) when it began to count, guardRails.warmupSeconds after "
        "it was first seen: the step counts from them."))


class FlywheelStatus(StatusBase):
    """Observed state. Conditions: Ready (the references resolve and the loop can run), Cycling
    (a cycle runs), CandidateServing (a candidate takes traffic or mirrored traffic)."""

    stage: Stage | None = Field(default=None, description="Where the current cycle is (Idle between cycles).")
    stage_start_time: str | None = Field(default=None, description="When the stage began.")
    cycle: int | None = Field(default=None, description="The current (or last) cycle.")
    cycles: list[CycleRecord] = Field(default_factory=list, description="The last cycles, oldest first.")
    step: StepProgress | None = Field(default=None, description="The rollout step in progress.")
    stable_training_job: str | None = Field(default=None, description="The TrainingJob whose export is served.")
    last_trigger_time: str | None = Field(default=None, description="When the last cycle started.")
    last_source_records: int | None = Field(default=None, description=(
        "The Dataset's status.sourceRecords when the last cycle started, or when the Flywheel first saw it "
        "(trigger.newRecords counts from it)."))
    last_run_request: str | None = Field(default=None, description="The kubeforge.dev/run-cycle value acted on.")
    curation_request: str | None = Field(default=None, description=(
        "The kubeforge.dev/curate value this cycle put on the Dataset, while it curates."))
    curation_base_version: int | None = Field(default=None, description=(
        "The Dataset's newest version when this cycle asked it to curate."))
    message: str | None = Field(default=None, description="Latest human-readable summary.")


#: Children: the candidate job <name>-c<cycle> (a TrainingJob name: at most 51 characters, and
#: cycles up to 10 digits) and the evaluation pod <name>-eval-c<cycle>.
MAX_NAME = 51 - len("-c0000000000")


class Flywheel(Kind):
    """Retrain from served traffic and feedback, gate on evaluation, roll out through shadow and
    canary, promote or roll back: one cycle at a time, every stage in status, Events and metrics."""

    kind: ClassVar[str] = "Flywheel"
    plural: ClassVar[str] = "flywheels"
    name_rules: ClassVar[tuple[Rule, ...]] = dns_label_name_rules(
        "Flywheel", MAX_NAME, "it names the candidate TrainingJobs <name>-c<cycle>")
    short_names: ClassVar[tuple[str, ...]] = ("kffw",)
    spec_model: ClassVar[type[ApiModel]] = FlywheelSpec
    status_model: ClassVar[type[ApiModel]] = FlywheelStatus
    printer_columns: ClassVar[tuple[dict[str, str], ...]] = (
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
        {"name": "Cycle", "type": "integer", "jsonPath": ".status.cycle"},
        {"name": "Stable", "type": "string", "jsonPath": ".status.stableTrainingJob"},
        {"name": "Last", "type": "string", "jsonPath": ".status.cycles[-1:].outcome"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )
