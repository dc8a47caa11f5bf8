"""The model's shape and its presets, without torch.

Both sides import this: the trainer builds ``Llama`` from a ``LlamaConfig``, and the operator
renders the trainer config's admission schema (``model.preset``, ``model.overrides``) from
the same fields and table, so the API server and the trainer agree on what a model is.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The model's shape; field names are those of Hugging Face's ``config.json``."""

    vocab_size: int = 259
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_params(self, include_embedding: bool = True) -> int:
        d, f, e = self.hidden_size, self.intermediate_size, self.head_dim
        kv = self.num_key_value_heads * e
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
        n = self.num_hidden_layers * per_layer + d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return n + (emb if include_embedding else (0 if self.tie_word_embeddings else self.vocab_size * d))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the PaLM appendix B estimate."""
        n = self.num_params(include_embedding=False)
        attn = 12 * self.num_hidden_layers * self.hidden_size * seq_len
        return 6.0 * n + attn


PRESETS: dict[str, dict[str, Any]] = {
    # a training step well under a second on 2 CPU cores
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=1024),
    # about 100M parameters with the byte vocabulary (used by the checkpoint benchmark)
    "100m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, max_position_embeddings=1024),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0),
}


def preset(name: str, **overrides: Any) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})
