"""The model forward pass over the paged KV cache.

One step runs every scheduled sequence at once as a flat list of tokens (prefill chunks and
single decode tokens side by side): embeddings, projections and MLPs see one (T, D) matrix,
whatever mix of requests it came from. Only attention is per sequence, because each reads its
own history through its block table:

- decode tokens (one new token each) are batched: the runner gathers the blocks of every
  decoding sequence into a padded (B, C) batch and masks the padding (sequences are grouped
  by length so the padding stays small);
- prefill chunks run one sequence at a time with a causal mask offset by the tokens the
  sequence already has in the cache (a prefix-cache hit or an earlier chunk).

New keys and values are written to their slots before attention reads, so a chunk attends to
itself and to its past through the same gather. Gather-then-SDPA is the portable way to do
paged attention in plain torch; it is correct on the GPU as well, only slower than a fused
paged kernel.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kubeforge_runtime.model.llama import DecoderLayer, Llama, rope_cos_sin
from kubeforge_runtime.serve.kv_cache import KVCacheTensors


@dataclasses.dataclass
class PrefillChunk:
    """One sequence's new tokens in this step, when there is more than one."""

    token_start: int  # offset in the flat token list
    num_tokens: int
    context_len: int  # tokens in the cache after this step, this chunk included
    block_table: torch.Tensor  # (ceil(context_len / block_size),) the blocks holding them


@dataclasses.dataclass
class DecodeGroup:
    """Decoding sequences of similar length, attended to as one padded batch.

    Grouping by length bounds the padding: one batch padded to the longest of 16 sequences
    would gather and attend over up to twice the keys that exist.
    """

    token_idx: torch.Tensor  # (Bd,) flat index of each decode token
    block_table: torch.Tensor  # (Bd, NB) blocks of each sequence, padded with block 0
    context_lens: torch.Tensor  # (Bd,)

    def to(self, device: torch.device) -> DecodeGroup:
        return DecodeGroup(self.token_idx.to(device, non_blocking=True),
                           self.block_table.to(device, non_blocking=True),
                           self.context_lens.to(device, non_blocking=True))


@dataclasses.dataclass
class StepBatch:
    """A step's inputs, built on the host by the engine and moved to the device once."""

    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    slot_mapping: torch.Tensor  # (T,) where each new token's k/v is written
    decodes: list[DecodeGroup]
    prefills: list[PrefillChunk]
    logits_idx: torch.Tensor  # (S,) flat indices whose next-token logits are wanted


class PagedRunner:
    """Owns the KV tensors and runs ``Llama``'s modules over them (weights are shared with
    the trainer's model class, not copied)."""

    def __init__(self, model: Llama, num_blocks: int, block_size: int, max_model_len: int) -> None:
        self.model = model
        cfg = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size = block_size
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.kv = KVCacheTensors(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                                 cfg.head_dim, self.dtype, self.device)
        cos, sin = rope_cos_sin(torch.arange(max_model_len, device=self.device), cfg.head_dim, cfg.rope_theta)
        self.cos_table, self.sin_table = cos, sin

    def to_device(self, b: StepBatch) -> StepBatch:
        if self.device.type == "cpu":
            return b
        d = self.device
        return StepBatch(
            b.input_ids.to(d, non_blocking=True), b.positions.to(d, non_blocking=True),
            b.slot_mapping.to(d, non_blocking=True), [g.to(d) for g in b.decodes],
            [dataclasses.replace(p, block_table=p.block_table.to(d, non_blocking=True)) for p in b.prefills],
            b.logits_idx.to(d, non_blocking=True))

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Logits (S, V) at ``batch.logits_idx``; writes the step's keys and values."""
        b = self.to_device(batch)
        m = self.model
        bs, nkv, e = self.block_size, self.num_kv_heads, self.head_dim
        t = b.input_ids.shape[0]
        cos, sin = self.cos_table[b.positions], self.sin_table[b.positions]
        x_TD = m.embed_tokens(b.input_ids)
        # additive masks, built once per step rather than once per layer: (Bd, 1, 1, C)
        dec_masks = []
        for g in b.decodes:
            c = g.block_table.shape[1] * bs
            keep = torch.arange(c, device=self.device)[None, :] < g.context_lens[:, None]
            dec_masks.append(torch.zeros(keep.shape, dtype=self.dtype, device=self.device)
                             .masked_fill_(~keep, float("-inf"))[:, None, None, :])
        pre_masks: list[torch.Tensor | None] = []
        for p in b.prefills:
            if p.context_len == p.num_tokens:
                pre_masks.append(None)  # a whole prompt: plain causal
            else:
                qpos = torch.arange(p.num_tokens, device=self.device)[:, None] + (p.context_len - p.num_tokens)
                pre_masks.append(torch.arange(p.context_len, device=self.device)[None, :] <= qpos)
        layers: list[DecoderLayer] = list(m.layers)  # type: ignore[arg-type]
        for layer_idx, layer in enumerate(layers):
            # flat (slots, K, E) for writing tokens; (blocks, bs, K, E) for gathering whole blocks,
            # which index_select copies as contiguous runs (per-slot indexing is several times slower)
            k_cache, v_cache = self.kv.k[layer_idx], self.kv.v[layer_idx]
            k_blocks, v_blocks = k_cache.view(-1, bs, nkv, e), v_cache.view(-1, bs, nkv, e)
            h = layer.input_layernorm(x_TD)
            q, k, v = layer.self_attn.qkv(h[None], cos, sin)  # (1,H,T,E), (1,K,T,E), (1,K,T,E)
            q_THE = q[0].transpose(0, 1)
            k_cache[b.slot_mapping] = k[0].transpose(0, 1)
            v_cache[b.slot_mapping] = v[0].transpose(0, 1)
            y_THE = torch.empty_like(q_THE)
            for g, mask in zip(b.decodes, dec_masks, strict=True):
                bd, nb = g.block_table.shape
                flat_bt = g.block_table.flatten()
                # the query heads sharing a kv head become that head's query rows: (Bd,K,G,E)
                # against (Bd,K,C,E), no expansion of keys and values for GQA
                qd = q_THE[g.token_idx].view(bd, nkv, -1, e)
                kd = k_blocks.index_select(0, flat_bt).view(bd, nb * bs, nkv, e).transpose(1, 2)
                vd = v_blocks.index_select(0, flat_bt).view(bd, nb * bs, nkv, e).transpose(1, 2)
                yd = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
                y_THE[g.token_idx] = yd.reshape(bd, -1, e)
            for p, pmask in zip(b.prefills, pre_masks, strict=True):
                s0, n = p.token_start, p.num_tokens
                qp = q[:, :, s0:s0 + n]  # (1,H,n,E)
                if pmask is None:
                    # the whole context is this chunk: its keys and values need no gather
                    yp = F.scaled_dot_product_attention(qp, k[:, :, s0:s0 + n], v[:, :, s0:s0 + n], is_causal=True,
                                                        enable_gqa=True)
                else:
                    kp = k_blocks.index_select(0, p.block_table).flatten(0, 1)[:p.context_len].transpose(0, 1)[None]
                    vp = v_blocks.index_select(0, p.block_table).flatten(0, 1)[:p.context_len].transpose(0, 1)[None]
                    yp = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=pmask, enable_gqa=True)
                y_THE[s0:s0 + n] = yp[0].transpose(0, 1)
            x_TD = x_TD + layer.self_attn.o_proj(y_THE.reshape(t, -1))
            x_TD = x_TD + layer.mlp(layer.post_attention_layernorm(x_TD))
        logits: torch.Tensor = m.lm_head(m.norm(x_TD[b.logits_idx]))
        return logits
