"""Hugging Face Llama layout: ``config.json`` + ``model.safetensors`` (+ generation defaults).

Our parameter names are Hugging Face's without the ``model.`` prefix (``lm_head`` has none),
so the mapping is mechanical in both directions.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kubeforge_runtime.model.llama import Llama, LlamaConfig

_CONFIG_KEYS = {f.name for f in dataclasses.fields(LlamaConfig)}


def to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_name(name: str) -> str:
    return name.removeprefix("model.")


def hf_config(cfg: LlamaConfig, bos_token_id: int, eos_token_id: int) -> dict[str, Any]:
    out: dict[str, Any] = dataclasses.asdict(cfg)
    out.update(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
        attention_bias=False, mlp_bias=False, head_dim=cfg.head_dim, torch_dtype="float32",
        bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
    return out


def save_hf(model: Llama, directory: str | Path, *, bos_token_id: int, eos_token_id: int,
            state_dict: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Write config.json, model.safetensors and generation_config.json; returns the files.

    ``state_dict`` lets a caller pass full (unsharded) tensors gathered from FSDP.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {to_hf_name(k): v.detach().to("cpu").contiguous() for k, v in sd.items()}
    if model.cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(hf_config(model.cfg, bos_token_id, eos_token_id), indent=2))
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "do_sample": False, "max_new_tokens": 256},
        indent=2))
    return [d / "model.safetensors", d / "config.json", d / "generation_config.json"]


def load_config(directory: str | Path) -> LlamaConfig:
    raw = json.loads((Path(directory) / "config.json").read_text())
    if raw.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json model_type must be 'llama', got {raw.get('model_type')!r}")
    # transformers >= 5 keeps rope_theta (and any scaling) under rope_parameters; 4.x at the top
    rope = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"config.json rope_type {kind!r} is not supported: only unscaled rotary embeddings "
                         "(rope_type 'default') are implemented")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if raw.get(key, ok) != ok:
            raise ValueError(f"config.json {key} must be {ok!r} for this Llama implementation, got {raw[key]!r}")
    fields = {k: v for k, v in raw.items() if k in _CONFIG_KEYS}
    if "rope_theta" in rope:
        fields["rope_theta"] = float(rope["rope_theta"])
    cfg = LlamaConfig(**fields)
    if raw.get("head_dim") not in (None, cfg.head_dim):
        raise ValueError(f"config.json head_dim must be hidden_size / num_attention_heads = {cfg.head_dim}, "
                         f"got {raw['head_dim']}")
    return cfg


def eos_token_ids(directory: str | Path) -> frozenset[int]:
    """The model's end-of-sequence ids: ``eos_token_id`` (an id or a list) of
    ``generation_config.json`` and ``config.json``."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = Path(directory) / name
        if path.exists():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return frozenset(int(i) for i in ids)


def load_hf(directory: str | Path, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32) -> Llama:
    """Load a Llama model from a Hugging Face layout directory (single or sharded safetensors)."""
    d = Path(directory)
    cfg = load_config(d)
    model = Llama(cfg)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {d}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update({from_hf_name(k): v for k, v in load_file(str(f)).items()})
    if cfg.tie_word_embeddings:
        sd.setdefault("lm_head.weight", sd["embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not match config: missing={missing} unexpected={unexpected}")
    return model.to(device=device, dtype=dtype).eval()
