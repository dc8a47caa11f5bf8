"""A Llama-style decoder, defined once for training and serving.

Module and parameter names follow Hugging Face's ``LlamaForCausalLM`` so that a state dict
maps onto the Hugging Face layout by adding the ``model.`` prefix (see ``hf.py``); nothing is
renamed by hand. Shapes carry suffixes: B batch, T time, D hidden, H query heads, K kv heads,
E head dim, V vocabulary, F MLP width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# the shape lives in a torch-free module (the operator renders the trainer config's schema from it)
from kubeforge_runtime.model.shape import PRESETS, LlamaConfig, preset

__all__ = ["PRESETS", "Attention", "DecoderLayer", "Llama", "LlamaConfig", "MLP", "RMSNorm", "apply_rope",
           "preset", "rope_cos_sin"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 like the reference, whatever the activation dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions_T: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions, shape (T, E), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_T.device, dtype=torch.float32) / head_dim))
    freqs = positions_T.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Hugging Face's convention, not the interleaved one of Meta's code)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * e, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * e, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * e, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * e, cfg.hidden_size, bias=False)

    def qkv(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Projected, rotated q (B,H,T,E) and k, v (B,K,T,E). The serving engine calls this
        and does its own attention over the paged KV cache."""
        b, t, _ = x_BTD.shape
        e = self.cfg.head_dim
        q = self.q_proj(x_BTD).view(b, t, -1, e).transpose(1, 2)
        k = self.k_proj(x_BTD).view(b, t, -1, e).transpose(1, 2)
        v = self.v_proj(x_BTD).view(b, t, -1, e).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x_BTD, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        b, _, t, _ = y.shape
        out: torch.Tensor = self.o_proj(y.transpose(1, 2).reshape(b, t, -1))
        return out


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class Llama(nn.Module):
    """Token ids (B, T) → logits (B, T, V)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        #: Recompute each decoder block in backward instead of keeping its activations. A flag
        #: here rather than a wrapper module, so parameter names (and with them checkpoints and
        #: the Hugging Face export) are the same either way.
        self.activation_checkpointing = False
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self, seed: int) -> None:
        """Deterministic initialisation from a seed, independent of the global RNG."""
        gen = torch.Generator().manual_seed(seed)
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    # residual projections scaled down with depth (GPT-2 / nanoGPT habit)
                    s = std / math.sqrt(2 * self.cfg.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    def forward(self, tokens_BT: torch.Tensor, positions_T: torch.Tensor | None = None) -> torch.Tensor:
        t = tokens_BT.shape[1]
        if positions_T is None:
            positions_T = torch.arange(t, device=tokens_BT.device)
        cos, sin = rope_cos_sin(positions_T, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed_tokens(tokens_BT)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits: torch.Tensor = self.lm_head(self.norm(x))
        return logits
