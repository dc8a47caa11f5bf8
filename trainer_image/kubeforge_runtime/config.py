"""The trainer's configuration: one YAML file describes a run, validated before any process
group starts.

Every section is a small pydantic model with ``extra="forbid"``, so a misspelt key fails at
once with its dotted path instead of being ignored for a week of GPU time. The module is
torch-free: the operator renders these models, and each section's ``cel_rules`` (the CEL form
of its cross-field validators), into the TrainingJob CRD's ``spec.trainer.config``, so the API
server refuses a bad config at ``kubectl apply``; the checks here stay as the second line. Checks that need
the machine (world size, memory) live in ``check_runtime`` and run before the process group
is created too. Any failure raises ``ConfigError``; the entry point turns it into
``ExitCode.CONFIG_ERROR``, which the operator never retries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from kubeforge.api.common import Rule
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator, model_validator

from kubeforge_runtime.model.shape import PRESETS, LlamaConfig, preset


class ConfigError(ValueError):
    """The configuration cannot work; retrying will not help."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    #: the cross-field validators in CEL, for admission (rendered into the CRD by crdgen)
    cel_rules: ClassVar[tuple[Rule, ...]] = ()


def _cel(path: str, default: str) -> str:
    """CEL for ``self.<path>``, or ``default`` where the document leaves it out: the API server
    does not fill in the trainer's defaults, so every rule reads them from the models."""
    parts = path.split(".")
    present = " && ".join(f"has(self.{'.'.join(parts[:i + 1])})" for i in range(len(parts)))
    return f"({present} ? self.{path} : {default})"


def _cel_field(model: type[BaseModel], path: str, prefix: str = "") -> str:
    """``_cel`` with the default of ``model``'s field at ``path`` (a dotted path of sections)."""
    node: Any = model
    for name in path.split("."):
        info = node.model_fields[name]
        node = info.annotation
    return _cel(prefix + path, json.dumps(info.get_default(call_default_factory=True)))


def _cel_shape(field: str, model: str = "") -> str:
    """The effective ``LlamaConfig`` field in CEL: the override, else the preset's value."""
    table = ", ".join(f"'{name}': {json.dumps(getattr(preset(name), field))}" for name in sorted(PRESETS))
    return _cel(f"{model}overrides.{field}", f"{{{table}}}[{_cel(f'{model}preset', json.dumps(DEFAULT_PRESET))}]")


DEFAULT_PRESET = "tiny"
_PRESET_NAMES: list[JsonValue] = [*sorted(PRESETS)]


class ModelOverrides(_Section):
    """LlamaConfig fields replacing the preset's, by their Hugging Face names; unset keeps the preset's."""

    vocab_size: int | None = Field(None, ge=1, description="tokens in the vocabulary; unset: the tokenizer's")
    hidden_size: int | None = Field(None, ge=1, description="width of the residual stream")
    intermediate_size: int | None = Field(None, ge=1, description="MLP width")
    num_hidden_layers: int | None = Field(None, ge=1, description="decoder blocks")
    num_attention_heads: int | None = Field(None, ge=1, description="query heads: must divide hidden_size")
    num_key_value_heads: int | None = Field(None, ge=1, description="grouped-query attention: must divide the heads")
    max_position_embeddings: int | None = Field(None, ge=1, description="longest sequence the model takes")
    rms_norm_eps: float | None = Field(None, gt=0, description="epsilon of RMSNorm")
    rope_theta: float | None = Field(None, gt=0, description="base of the rotary position embedding")
    tie_word_embeddings: bool | None = Field(None, description="the output head shares the embedding matrix")
    initializer_range: float | None = Field(None, gt=0, description="std of the initial weights")

    def given(self) -> dict[str, Any]:
        """The fields set, as ``LlamaConfig`` keyword arguments."""
        return self.model_dump(exclude_none=True)


class ModelConfig(_Section):
    """Which model to train."""

    preset: str = Field(DEFAULT_PRESET, description=f"shape preset, one of {sorted(PRESETS)}",
                        json_schema_extra={"enum": _PRESET_NAMES})
    overrides: ModelOverrides = Field(default_factory=ModelOverrides)  # type: ignore[arg-type]
    init_from: str | None = Field(None, description="a Hugging Face Llama directory to start from (fine-tuning)")
    activation_checkpointing: bool = Field(False, description="recompute each decoder block in backward")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {sorted(PRESETS)}")
        return v

    @model_validator(mode="after")
    def _valid_shape(self) -> ModelConfig:
        try:
            self.llama()
        except (TypeError, ValueError) as e:
            raise ValueError(f"overrides: {e}") from None
        return self

    def llama(self, vocab_size: int | None = None) -> LlamaConfig:
        given = self.overrides.given()
        if vocab_size is not None and "vocab_size" not in given:
            given["vocab_size"] = vocab_size
        return preset(self.preset, **given)


class DataConfig(_Section):
    """Where the text comes from and how it becomes training sequences."""

    paths: list[str] = Field(default_factory=lambda: ["builtin:corpus"], min_length=1,
                             description="files, folders, globs or s3://bucket/prefix; builtin:corpus is the bundled text")
    format: Literal["auto", "text", "jsonl", "tar", "sft"] = Field(
        "auto", description="auto decides by file suffix; sft: prompt/target records (a Dataset version, .tar or "
                            ".jsonl), one padded sample each, loss on the target only")
    text_field: str = Field("text", description="JSON field holding the text (jsonl and tar .json members; not sft)")
    seq_len: int = Field(128, ge=8, description="tokens per training sequence")
    shuffle: bool = Field(True, description="shuffle file order per epoch, from (seed, epoch)")
    prefetch: int = Field(4, ge=1, le=64, description="steps of batches prepared ahead by a background thread")


class TrainConfig(_Section):
    """The optimisation run."""

    steps: int = Field(100, ge=1, description="optimizer steps in total")
    global_batch: int = Field(8, ge=1, description="sequences per optimizer step, whatever the world size")
    micro_batch: int = Field(2, ge=1, description="sequences per forward pass on one rank")
    seed: int = Field(0, ge=0, description="seeds the initial weights and the data order")
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; null disables clipping")

    @model_validator(mode="after")
    def _batch_divisible(self) -> TrainConfig:
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch ({self.global_batch}) must be divisible by micro_batch "
                             f"({self.micro_batch})")
        return self


class OptimizerConfig(_Section):
    """AdamW."""

    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW's two moment decay rates, each in [0, 1)")
    eps: float = Field(1e-8, gt=0, description="AdamW's epsilon")
    weight_decay: float = Field(0.1, ge=0, description="applied to matrices only, not norms")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class ScheduleConfig(_Section):
    """Learning-rate schedule: linear warmup, then cosine decay or warmup-stable-decay."""

    kind: Literal["cosine", "wsd", "constant"] = Field("cosine", description="the shape after warmup")
    warmup_steps: int = Field(10, ge=0, description="linear warmup from 0; must not exceed train.steps when set")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of the steps spent decaying")


class ParallelismConfig(_Section):
    """How the model is spread over the data-parallel ranks."""

    sharding: Literal["full", "grad_op", "hybrid", "ddp"] = Field(
        "full", description="full: FSDP2 ZeRO-3-like; grad_op: parameters stay gathered after forward "
                            "(ZeRO-2-like); hybrid: shard within a group, replicate across groups; ddp: replicate")
    shard_group_size: int | None = Field(None, ge=1, description="hybrid: ranks per shard group "
                                                                 "(default: ranks per node)")
    mixed_precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    cpu_offload: bool = Field(False, description="keep sharded parameters and optimizer state in host memory")
    collective_timeout_s: float = Field(120.0, gt=0, description="a hung peer fails the step after this long")


class MetricsConfig(_Section):
    """Observability on rank 0."""

    port: int | None = Field(None, ge=0, le=65535, description="Prometheus port; null: $KUBEFORGE_METRICS_PORT "
                                                               "or 9400; 0 disables")
    log_every: int = Field(10, ge=1, description="one structured log line every N steps")
    peak_flops: float | None = Field(None, gt=0, description="per-device peak FLOP/s for MFU; null: from the table")


class ExportConfig(_Section):
    """The final model in Hugging Face layout."""

    enabled: bool = Field(True, description="write the export when training finishes")
    path: str | None = Field(None, description="local folder; null: the checkpoint store's export location")


class TrainerConfig(_Section):
    """One training run."""

    model: ModelConfig = Field(default_factory=ModelConfig)  # type: ignore[arg-type]
    tokenizer: str | None = Field(None, description="folder with tokenizer.json; null: the byte tokenizer")
    data: DataConfig = Field(default_factory=DataConfig)  # type: ignore[arg-type]
    train: TrainConfig = Field(default_factory=TrainConfig)  # type: ignore[arg-type]
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)  # type: ignore[arg-type]
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)  # type: ignore[arg-type]
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig)  # type: ignore[arg-type]
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)  # type: ignore[arg-type]
    export: ExportConfig = Field(default_factory=ExportConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainerConfig:
        max_pos = self.model.llama().max_position_embeddings
        if self.data.seq_len > max_pos:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) must not exceed the model's "
                             f"max_position_embeddings ({max_pos})")
        # only when set explicitly: the default warmup must not make a short run invalid
        if "warmup_steps" in self.schedule.model_fields_set and self.schedule.warmup_steps > self.train.steps:
            raise ValueError(f"schedule.warmup_steps ({self.schedule.warmup_steps}) must not exceed "
                             f"train.steps ({self.train.steps})")
        return self

# Admission: the CEL form of the cross-field validators above, checked by the API server on
# `spec.trainer.config` (crdgen renders them; tests/cluster/test_admission.py runs the same bad
# configs through both). Each reads a default where the document leaves a key out.
ModelConfig.cel_rules = (
    Rule(f"{_cel_shape('hidden_size')} % {_cel_shape('num_attention_heads')} == 0",
         "model.overrides: hidden_size must be divisible by num_attention_heads (the preset's value where "
         "not overridden)", field_path=".overrides", reason="FieldValueInvalid"),
    Rule(f"{_cel_shape('num_attention_heads')} % {_cel_shape('num_key_value_heads')} == 0",
         "model.overrides: num_attention_heads must be divisible by num_key_value_heads (the preset's value "
         "where not overridden)", field_path=".overrides", reason="FieldValueInvalid"),
)
TrainConfig.cel_rules = (
    Rule(f"{_cel_field(TrainConfig, 'global_batch')} % {_cel_field(TrainConfig, 'micro_batch')} == 0",
         "train.global_batch must be divisible by train.micro_batch", field_path=".global_batch",
         reason="FieldValueInvalid"),
)
OptimizerConfig.cel_rules = (
    Rule("!has(self.betas) || self.betas.all(b, b >= 0.0 && b < 1.0)", "optimizer.betas must each be in [0, 1)",
         field_path=".betas", reason="FieldValueInvalid"),
)
TrainerConfig.cel_rules = (
    Rule(f"{_cel_field(TrainerConfig, 'data.seq_len')} <= {_cel_shape('max_position_embeddings', 'model.')}",
         "data.seq_len must not exceed the model's max_position_embeddings (the preset's value where not "
         "overridden)", field_path=".data", reason="FieldValueInvalid"),
    Rule(f"!has(self.schedule) || !has(self.schedule.warmup_steps) || "
         f"self.schedule.warmup_steps <= {_cel_field(TrainerConfig, 'train.steps')}",
         "schedule.warmup_steps must not exceed train.steps", field_path=".schedule", reason="FieldValueInvalid"),
)


def _format_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}" if key else msg)
    return "invalid trainer config: " + "; ".join(lines)


def parse_config(raw: Any) -> TrainerConfig:
    """Validate a decoded YAML/JSON document; ``ConfigError`` names each offending key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid trainer config: the document must be a mapping, got {type(raw).__name__}")
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def load_config(path: str | Path) -> TrainerConfig:
    """Read and validate the YAML file at ``path``."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read trainer config {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"trainer config {p} is not valid YAML: {e}") from None
    return parse_config(raw)


#: Bytes per parameter held by training in fp32 with AdamW: weights, gradients, two moments.
TRAIN_BYTES_PER_PARAM = 16


def available_memory_bytes() -> int:
    """Memory the kernel says can still be allocated (MemAvailable), or physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_runtime(cfg: TrainerConfig, *, world_size: int, local_world_size: int, on_gpu: bool,
                  vocab_size: int, memory_bytes: int | None = None) -> None:
    """Checks that need the machine, run before the process group starts.

    On the CPU all local ranks share the host's memory, so a model whose sharded training
    state cannot fit there fails now with a configuration error rather than minutes later
    with the kernel's OOM killer (which the operator would see as a retryable failure).
    """
    llama = cfg.model.llama(vocab_size)
    if vocab_size > llama.vocab_size:
        raise ConfigError(f"model.overrides.vocab_size ({llama.vocab_size}) must be at least the "
                          f"tokenizer's vocabulary ({vocab_size})")
    if cfg.parallelism.sharding == "hybrid" and cfg.parallelism.shard_group_size:
        if world_size % cfg.parallelism.shard_group_size:
            raise ConfigError(f"parallelism.shard_group_size ({cfg.parallelism.shard_group_size}) must "
                              f"divide the world size ({world_size})")
    if on_gpu:
        return
    shards = 1 if cfg.parallelism.sharding == "ddp" else world_size
    per_rank = llama.num_params() * TRAIN_BYTES_PER_PARAM / shards
    # activations: a generous bound of the residual stream per layer and the logits
    tokens = cfg.train.micro_batch * cfg.data.seq_len
    per_rank += 4 * tokens * (llama.hidden_size * 16 * llama.num_hidden_layers + 3 * llama.vocab_size)
    need = per_rank * local_world_size
    have = available_memory_bytes() if memory_bytes is None else memory_bytes
    if need > have:
        raise ConfigError(
            f"model: preset {cfg.model.preset!r} ({llama.num_params() / 1e9:.2f}B parameters) needs about "
            f"{need / 2**30:.1f} GiB to train on {local_world_size} local CPU rank(s), "
            f"but {have / 2**30:.1f} GiB is available; use a smaller model or more ranks")
