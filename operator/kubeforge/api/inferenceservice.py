"""InferenceService: the vLLM-style server for an S3 model or a TrainingJob's export."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kubeforge.api.common import Kind, ApiModel, ComputeResources, EnvVar, LocalObjectReference, Rule, StatusBase, Toleration

DEFAULT_SERVER_IMAGE = "ghcr.io/kubeforge/trainer:0.1.0"


class ModelSource(ApiModel):
    """The model to serve: exactly one of uri or trainingJobRef."""

    uri: str | None = Field(default=None, pattern=r"^(s3://[^/]+/.*|pvc://[^/]+/.*)$", description=(
        "s3://bucket/prefix of a Hugging Face Llama layout, or pvc://<claim>/<path>."))
    training_job_ref: LocalObjectReference | None = Field(default=None, description=(
        "Serve the committed export of this TrainingJob; waits until it exists."))
    update_policy: Literal["FollowLatest", "Pinned"] = Field(default="FollowLatest", description=(
        "FollowLatest rolls out a newer export of the referenced job; Pinned keeps the one first served."))
    credentials_secret_ref: LocalObjectReference | None = Field(default=None, description=(
        "Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for s3:// models (envFrom)."))
    s3_endpoint: str | None = Field(default=None, pattern=r"^https?://", description="S3-compatible endpoint URL.")

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
    """HorizontalPodAutoscaler settings; cooldowns become the HPA's stabilization windows."""

    min_replicas: int = Field(default=1, ge=1, description="Fewest replicas.")
    max_replicas: int = Field(ge=1, description="Most replicas.")
    metric: Literal["WaitingRequests", "RunningRequests", "CPU"] = Field(default="WaitingRequests", description=(
        "Scaling signal: vllm:num_requests_waiting or vllm:num_requests_running per pod (Pods metric), "
        "or CPU utilization."))
    target: int = Field(default=2, ge=1, description="Target average per pod (requests), or CPU percent.")
    scale_up_cooldown_seconds: int = Field(default=0, ge=0, le=3600, description="Scale-up stabilization window.")
    scale_down_cooldown_seconds: int = Field(default=300, ge=0, le=3600, description="Scale-down stabilization window.")
    scale_up_policies: list[RatePolicy] = Field(default_factory=list, description="Scale-up rate limits.")
    scale_down_policies: list[RatePolicy] = Field(default_factory=list, description="Scale-down rate limits.")

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("self.minReplicas <= self.maxReplicas", "minReplicas must be less than or equal to maxReplicas",
             field_path=".minReplicas", reason="FieldValueInvalid"),
    )


class Engine(ApiModel):
    """Serving engine settings, passed as command-line flags."""

    max_num_seqs: int = Field(default=64, ge=1, description="Most sequences in a batch.")
    max_model_len: int | None = Field(default=None, ge=16, description="Context limit; defaults to the model's.")
    block_size: int = Field(default=16, ge=1, le=256, description="Tokens per KV cache block.")
    kv_cache_memory_fraction: float = Field(default=0.9, gt=0, le=1, description="Accelerator memory for the KV cache.")
    shutdown_timeout_seconds: int = Field(default=30, ge=0, le=3600, description="How long in-flight requests may drain.")
    enable_prefix_caching: bool = Field(default=True, description="Share KV blocks of common prompt prefixes.")


class InferenceServiceSpec(ApiModel):
    """The model and how it is served and scaled."""

    model: ModelSource = Field(description="The model to serve.")
    replicas: int = Field(default=1, ge=0, description="Replicas; the HPA or `kubectl scale` sets this via /scale.")
    image: str = Field(default=DEFAULT_SERVER_IMAGE, min_length=1, description="Server image.")
    gpus: int = Field(default=1, ge=0, le=64, description="nvidia.com/gpu per replica.")
    gpu_product: str | None = Field(default=None, description="Required nvidia.com/gpu.product label value.")
    resources: ComputeResources = Field(default_factory=ComputeResources, description="CPU and memory per replica.")
    engine: Engine = Field(default_factory=Engine, description="Serving engine settings.")
    autoscaling: Autoscaling | None = Field(default=None, description="Scale on load; absent means fixed replicas.")
    api_key_secret_ref: LocalObjectReference | None = Field(default=None, description=(
        "Secret whose key `api-key` clients must send as a Bearer token."))
    env: list[EnvVar] = Field(default_factory=list, description="Extra environment variables.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Extra tolerations.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra node selector labels.")


class ServedModel(ApiModel):
    """What is being served."""

    uri: str | None = Field(default=None, description="Model URI the pods load.")
    revision: str | None = Field(default=None, description="Export revision (commit marker time or step).")


class InferenceServiceStatus(StatusBase):
    """Observed state of the service."""

    url: str | None = Field(default=None, description="Cluster-local base URL of the OpenAI-compatible API.")
    replicas: int | None = Field(default=None, description="Replicas of the serving Deployment.")
    ready_replicas: int | None = Field(default=None, description="Replicas ready to serve.")
    selector: str | None = Field(default=None, description="Label selector of the pods (for the scale subresource).")
    model: ServedModel | None = Field(default=None, description="The model being served.")


class InferenceService(Kind):
    """An OpenAI-compatible, continuously batching model server with a paged KV cache,
    scaled by an HPA with cooldowns.

    The operator creates a Deployment, a Service, a PodDisruptionBudget and (with
    spec.autoscaling) a HorizontalPodAutoscaler that targets this object's scale subresource."""

    kind: ClassVar[str] = "InferenceService"
    plural: ClassVar[str] = "inferenceservices"
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
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )
