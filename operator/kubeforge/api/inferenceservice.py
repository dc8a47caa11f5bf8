"""InferenceService: the vLLM-style server for an S3 model or a TrainingJob's export."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kubeforge.api.common import (
    ApiModel,
    ComputeResources,
    EnvVar,
    Kind,
    LocalObjectReference,
    NetworkPeer,
    Redaction,
    Rule,
    StatusBase,
    StoreRef,
    Toleration,
    dns_label_name_rules,
)


class ModelSource(ApiModel):
    """The model to serve: exactly one of uri or trainingJobRef."""

    uri: str | None = Field(default=None, pattern=r"^(s3://[^/]+/.*|pvc://[^/]+/.*)$", description=(
        "s3://bucket/prefix of a Hugging Face Llama layout, or pvc://<claim>/<path> (the claim is mounted "
        "read-only)."))
    training_job_ref: LocalObjectReference | None = Field(default=None, description=(
        "Serve the committed export of this TrainingJob (found through its CheckpointPolicy's S3 storage); "
        "ModelReady stays False with reason WaitingForTrainingJob until the export's commit marker exists."))
    update_policy: Literal["FollowLatest", "Pinned"] = Field(default="FollowLatest", description=(
        "With trainingJobRef: FollowLatest rolls the pods (no dropped requests) when a newer export is "
        "committed; Pinned keeps the revision first served, and servers refuse any other export (new pods of a "
        "Pinned service cannot start once the job exported again: copy the export and serve it by uri)."))
    credentials_secret_ref: LocalObjectReference | None = Field(default=None, description=(
        "Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for s3:// models (envFrom). With trainingJobRef "
        "the CheckpointPolicy's Secret is used when this is empty."))
    s3_endpoint: str | None = Field(default=None, pattern=r"^https?://", description=(
        "S3-compatible endpoint URL; with trainingJobRef the CheckpointPolicy's endpoint is used when empty."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("has(self.uri) != has(self.trainingJobRef)", "exactly one of uri or trainingJobRef must be set",
             reason="FieldValueInvalid"),
    )


class RatePolicy(ApiModel):
    """An HPA scaling policy: at most `value` pods (or percent) per `periodSeconds`."""

    type: Literal["Pods", "Percent"] = Field(description="Pods or Percent.")
    value: int = Field(ge=1, description="Amount of change allowed per period.")
    period_seconds: int = Field(ge=1, le=1800, description="Length of the period.")


class Autoscaling(ApiModel):
    """HorizontalPodAutoscaler settings; cooldowns become the HPA's stabilization windows and
    the policies its rate limits, exactly as given."""

    min_replicas: int = Field(default=1, ge=1, description="Fewest replicas.")
    max_replicas: int = Field(ge=1, description="Most replicas.")
    metric: Literal["WaitingRequests", "RunningRequests", "CPU"] = Field(default="WaitingRequests", description=(
        "Scaling signal: vllm:num_requests_waiting or vllm:num_requests_running per pod (a Pods metric from "
        "the custom metrics API, e.g. prometheus-adapter), or CPU utilization (needs resources.cpu)."))
    target: int = Field(default=2, ge=1, description="Target average per pod (requests), or CPU percent.")
    scale_up_cooldown_seconds: int = Field(default=0, ge=0, le=3600, description="Scale-up stabilization window.")
    scale_down_cooldown_seconds: int = Field(default=300, ge=0, le=3600, description="Scale-down stabilization window.")
    scale_up_policies: list[RatePolicy] = Field(default_factory=list, description=(
        "Scale-up rate limits; empty keeps the HPA's defaults."))
    scale_down_policies: list[RatePolicy] = Field(default_factory=list, description=(
        "Scale-down rate limits; empty keeps the HPA's defaults."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("self.minReplicas <= self.maxReplicas", "minReplicas must be less than or equal to maxReplicas",
             field_path=".minReplicas", reason="FieldValueInvalid"),
    )


class Engine(ApiModel):
    """Serving engine settings, passed as command-line flags."""

    max_num_seqs: int = Field(default=64, ge=1, description="Most sequences in a batch.")
    max_num_batched_tokens: int = Field(default=512, ge=16, description="Tokens computed per step (prefill + decode).")
    max_model_len: int | None = Field(default=None, ge=16, description="Context limit; defaults to the model's.")
    max_queue_length: int = Field(default=256, ge=1, description="Waiting requests before the server answers 429.")
    block_size: int = Field(default=16, ge=1, le=256, description="Tokens per KV cache block.")
    kv_cache_memory_fraction: float | None = Field(default=None, gt=0, le=1, description=(
        "Fraction of accelerator (or container) memory for weights and the KV cache; the engine's default "
        "when neither this nor numBlocks is set."))
    num_blocks: int | None = Field(default=None, ge=1, description="KV cache size as a block count.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description=(
        "Weights and KV dtype; auto is bfloat16 on a GPU, float32 on the CPU."))
    shutdown_timeout_seconds: int = Field(default=30, ge=0, le=3600, description=(
        "How long in-flight requests may drain after SIGTERM; the pod's grace period covers it."))
    enable_prefix_caching: bool = Field(default=True, description="Share KV blocks of common prompt prefixes.")

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("!has(self.kvCacheMemoryFraction) || !has(self.numBlocks)",
             "kvCacheMemoryFraction and numBlocks must not both be set", reason="FieldValueInvalid"),
    )


class Lifecycle(ApiModel):
    """Start-up and shut-down timing of the serving pods."""

    startup_timeout_seconds: int = Field(default=1800, ge=10, le=86400, description=(
        "How long a pod may take to download, load and warm the model before it is restarted "
        "(the startupProbe's budget); large models need tens of minutes."))
    pre_stop_sleep_seconds: int = Field(default=10, ge=0, le=300, description=(
        "Pause before SIGTERM so endpoints and load balancers stop sending traffic first."))


class DisruptionBudget(ApiModel):
    """The PodDisruptionBudget of the serving pods."""

    max_unavailable: int = Field(default=1, ge=0, description=(
        "Pods that voluntary disruptions (node drains) may take down at once."))


class ServingNetwork(ApiModel):
    """Who may reach the servers. The operator makes a NetworkPolicy `<name>-server` (unless its
    setting turns them off) letting only these clients, and the operator's scrape sources
    (Prometheus), connect to the server port; the API and /metrics share that port."""

    allowed_clients: list[NetworkPeer] = Field(default_factory=list, max_length=64, description=(
        "Clients that may connect to the server port; empty: every pod of this namespace. Listing any replaces "
        "that default (add {podSelector: {}} to keep the namespace)."))


class DriftSettings(ApiModel):
    """Drift of the live prompts against the served export's training data, as the Population
    Stability Index per feature (prompt length, token frequency)."""

    window_prompts: int = Field(default=500, ge=50, le=1000000, description=(
        "Each server profiles its most recent prompts: between windowPrompts and twice that many."))
    min_prompts: int = Field(default=200, ge=1, description=(
        "Fewest live prompts (all replicas) before PSI is computed and DriftDetected decided."))
    minor_threshold: float = Field(default=0.1, gt=0, description="PSI from which drift is reported as minor.")
    major_threshold: float = Field(default=0.25, gt=0, description="PSI above which DriftDetected is True.")

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("self.minorThreshold <= self.majorThreshold", "minorThreshold must not exceed majorThreshold",
             field_path=".minorThreshold", reason="FieldValueInvalid"),
    )


class Logging(ApiModel):
    """Capture of served traffic and user feedback for the data flywheel (docs/flywheel.md).

    Sampled requests are written, redacted, as WebDataset shards under
    <store>/<namespace>/<name>/capture/; POST /v1/feedback records ratings and corrections next to
    them. Capture never blocks a request: when the store is slow or down, records are dropped
    and counted (kubeforge:capture_dropped_total)."""

    sample_rate: float = Field(default=1.0, ge=0, le=1, description="Share of requests captured (0 to 1).")
    store: StoreRef = Field(description="Where captured records go.")
    redact: Redaction = Field(default_factory=Redaction, description="PII redaction before writing.")
    max_record_bytes: int = Field(default=65536, ge=1024, le=8388608, description=(
        "A record's largest size; longer prompts and completions are cut (the record says truncated)."))
    shard_seconds: int = Field(default=60, ge=5, le=3600, description=(
        "A shard is committed after this long (or 1000 records), so records reach the store within it."))
    feedback_ttl_seconds: int = Field(default=604800, ge=60, le=31536000, description=(
        "How long a completion id accepts feedback; older ids answer 404."))
    drift: DriftSettings = Field(default_factory=DriftSettings, description="Prompt drift detection.")


class CanaryRevision(ApiModel):
    """A second revision (the candidate) answering a share of the requests. A request with a
    session key (header routing.sessionHeader, or the OpenAI `user` field) stays on its
    revision; the rest are split exactly (after n requests the canary has had floor(n x p))."""

    model: ModelSource = Field(description="The candidate's model.")
    traffic_percent: float = Field(ge=0, le=100, description="Share of requests the canary answers (0 to 100).")
    replicas: int = Field(default=1, ge=1, le=64, description="Replicas of the canary (fixed; the HPA scales the stable revision).")


class ShadowRevision(ApiModel):
    """A revision that receives a copy of a share of the generation requests; its answers are
    compared with the primary's (kubeforge:shadow_agreement) and never returned, and it is never
    waited for: a slow or failed shadow does not affect clients. Its traffic is not captured."""

    model: ModelSource = Field(description="The shadowed model.")
    sample_percent: float = Field(ge=0, le=100, description="Share of generation requests copied to it (0 to 100).")
    replicas: int = Field(default=1, ge=1, le=64, description="Replicas of the shadow.")


class Routing(ApiModel):
    """The router (`<name>-router`) that fronts the revisions while a canary or a shadow is set."""

    replicas: int = Field(default=2, ge=1, le=16, description=(
        "Router replicas; each splits exactly, so the aggregate is exact too."))
    session_header: str = Field(default="x-session-id", pattern=r"^[A-Za-z0-9-]{1,64}$", description=(
        "Request header whose value keeps a session on one revision."))


class InferenceServiceSpec(ApiModel):
    """The model and how it is served and scaled."""

    model: ModelSource = Field(description="The model to serve.")
    replicas: int = Field(default=1, ge=0, description=(
        "Replicas; the HPA or `kubectl scale` sets this through the scale subresource, and the Deployment "
        "follows it."))
    image: str | None = Field(default=None, min_length=1, description=(
        "Server image. Unset: the operator's workload image (Helm value `workloadImage`, default "
        "ghcr.io/kubeforge/trainer:<version>)."))
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy of the server container.")
    gpus: int = Field(default=1, ge=0, le=64, description="nvidia.com/gpu per replica.")
    gpu_product: str | None = Field(default=None, description="Required nvidia.com/gpu.product label value.")
    resources: ComputeResources = Field(default_factory=ComputeResources, description="CPU and memory per replica.")
    model_cache_size: str | None = Field(default=None, pattern=r"^[0-9]+([KMGT]i)?$", description=(
        "Size limit of the emptyDir the model is downloaded into; unset means no limit."))
    engine: Engine = Field(default_factory=Engine, description="Serving engine settings.")
    lifecycle: Lifecycle = Field(default_factory=Lifecycle, description="Start-up and shut-down timing.")
    disruption_budget: DisruptionBudget = Field(default_factory=DisruptionBudget, description=(
        "PodDisruptionBudget settings."))
    autoscaling: Autoscaling | None = Field(default=None, description=(
        "Scale on load with an HPA; absent means fixed replicas (and no HPA)."))
    api_key_secret_ref: LocalObjectReference | None = Field(default=None, description=(
        "Secret whose key `api-key` clients must send as a Bearer token."))
    env: list[EnvVar] = Field(default_factory=list, max_length=256, description="Extra environment variables.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Extra tolerations.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra node selector labels.")
    service_account_name: str | None = Field(default=None, description=(
        "ServiceAccount of the serving pods; its API token is never mounted (the server calls no Kubernetes API)."))
    network: ServingNetwork = Field(default_factory=ServingNetwork, description="Who may reach the servers.")
    logging: Logging | None = Field(default=None, description=(
        "Capture sampled traffic and feedback for training (the data flywheel); absent: nothing is captured "
        "and /v1/feedback answers 501."))
    canary: CanaryRevision | None = Field(default=None, description=(
        "A candidate revision answering a share of the requests, behind a router; absent: the stable "
        "revision answers everything."))
    shadow: ShadowRevision | None = Field(default=None, description=(
        "A revision receiving copies of a share of the requests, behind a router; its answers are never returned."))
    routing: Routing = Field(default_factory=Routing, description="The router, while canary or shadow is set.")

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("!has(self.gpuProduct) || self.gpus > 0", "gpuProduct must not be set when gpus is 0",
             field_path=".gpuProduct", reason="FieldValueInvalid"),
        Rule("!has(self.autoscaling) || self.autoscaling.metric != 'CPU' || has(self.resources.cpu)",
             "resources.cpu must be set when autoscaling.metric is CPU", field_path=".autoscaling.metric",
             reason="FieldValueRequired"),
    )


class ServedModel(ApiModel):
    """What is being served."""

    uri: str | None = Field(default=None, description="Model URI the pods load.")
    revision: str | None = Field(default=None, description=(
        "Export revision (the commit marker's time) of a TrainingJob export; empty for a plain URI."))
    step: int | None = Field(default=None, description="Training step of the export, when known.")


class DriftStatus(ApiModel):
    """The latest drift reading."""

    psi: dict[str, float] = Field(default_factory=dict, description="PSI per feature: prompt_length, token_frequency.")
    level: Literal["stable", "minor", "major"] | None = Field(default=None, description="The worst feature's level.")
    prompts: int = Field(default=0, description="Live prompts the reading is over (all replicas).")
    baseline: str | None = Field(default=None, description="The baseline profile compared against.")
    time: str | None = Field(default=None, description="When it was computed.")


class CaptureStatus(ApiModel):
    """Where captured traffic goes."""

    uri: str | None = Field(default=None, description="The capture directory (shards, feedback, profiles).")
    sample_rate: float | None = Field(default=None, description="The sample rate in effect.")


class RevisionStatus(ApiModel):
    """One extra revision: what it serves, its share and its pods."""

    model: ServedModel | None = Field(default=None, description="The model it serves (once resolved).")
    percent: float | None = Field(default=None, description="Its traffic (canary) or sample (shadow) percent.")
    replicas: int | None = Field(default=None, description="Its pods.")
    ready_replicas: int | None = Field(default=None, description="Its ready pods.")
    message: str | None = Field(default=None, description="Why it does not serve yet, when it does not.")


class TrafficStatus(ApiModel):
    """Who answers the Service: the stable pods directly, or the router in front of the revisions."""

    routed: bool = Field(default=False, description="The Service sends requests to the router.")
    draining: list[str] = Field(default_factory=list, description=(
        "Removed revisions (canary, shadow) kept until no router pod can send them a request."))
    router_ready_replicas: int | None = Field(default=None, description="Ready router pods.")
    canary: RevisionStatus | None = Field(default=None, description="The canary, with spec.canary.")
    shadow: RevisionStatus | None = Field(default=None, description="The shadow, with spec.shadow.")


class InferenceServiceStatus(StatusBase):
    """Observed state of the service. Conditions: Ready (serving the wanted model),
    ModelReady (the model source resolved), Available (at least one replica ready); with
    spec.logging also CaptureReady (the capture store resolved) and DriftDetected (live prompts'
    PSI against the export's training data above logging.drift.majorThreshold)."""

    url: str | None = Field(default=None, description=(
        "Cluster-local base URL of the server; the OpenAI-compatible API is under /v1."))
    replicas: int | None = Field(default=None, description="Pods of the serving Deployment.")
    ready_replicas: int | None = Field(default=None, description="Replicas ready to serve.")
    selector: str | None = Field(default=None, description="Label selector of the pods (for the scale subresource).")
    model: ServedModel | None = Field(default=None, description="The model being served.")
    capture: CaptureStatus | None = Field(default=None, description="Traffic capture, with spec.logging.")
    drift: DriftStatus | None = Field(default=None, description="Prompt drift, with spec.logging.")
    traffic: TrafficStatus | None = Field(default=None, description="The traffic split, with spec.canary or spec.shadow.")


#: The children are named "<name>-server", and a Service name is a DNS label (63 characters).
MAX_NAME = 63 - len("-server")


class InferenceService(Kind):
    """An OpenAI-compatible, continuously batching model server with a paged KV cache,
    scaled by an HPA with cooldowns.

    The operator creates a Deployment, a Service, a PodDisruptionBudget and (with
    spec.autoscaling) a HorizontalPodAutoscaler that targets this object's scale subresource."""

    kind: ClassVar[str] = "InferenceService"
    plural: ClassVar[str] = "inferenceservices"
    name_rules: ClassVar[tuple[Rule, ...]] = dns_label_name_rules(
        "InferenceService", MAX_NAME, "it names the Service <name>-server that clients call")
    short_names: ClassVar[tuple[str, ...]] = ("infsvc",)
    spec_model: ClassVar[type[ApiModel]] = InferenceServiceSpec
    status_model: ClassVar[type[ApiModel]] = InferenceServiceStatus
    scale: ClassVar[dict[str, str]] = {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    printer_columns: ClassVar[tuple[dict[str, str], ...]] = (
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
        {"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Model", "type": "string", "jsonPath": ".status.model.uri"},
        {"name": "Canary", "type": "number", "jsonPath": ".status.traffic.canary.percent"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )
