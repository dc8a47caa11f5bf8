"""The model forward pass over the paged KV cache.

One step runs every scheduled sequence at once as a flat list of tokens, decode tokens first
(one per decoding sequence), then prefill chunks: embeddings, projections and MLPs see one
(T, D) matrix, whatever mix of requests it came from. Only attention is per sequence, because
each reads its own history through its block table:

- decode tokens are batched: the runner gathers the blocks of every decoding sequence into a
  padded (K, Bd, C, E) batch and masks the padding (sequences are grouped by length so the
  padding stays small). The pool is block-major, (blocks, 2, K, block_size, E) per layer, so
  the gather reads each block as one long run; it writes the head-major batch that
  ``baddbmm``/``bmm`` multiply with directly, in (K, Bd) batch order: keys and values are
  copied once, and only the (small) queries and outputs are permuted;
- prefill chunks run one sequence at a time with a causal mask offset by the tokens the
  sequence already has in the cache (a prefix-cache hit or an earlier chunk).

New keys and values are written to their slots before attention reads, so a chunk attends to
itself and to its past through the same gather. Gather-then-attend is the portable way to do
paged attention in plain torch; it is correct on the GPU as well, only slower than a fused
paged kernel.

On the CPU in fp32 (``attention_backend`` "auto" or "kernel") the step takes another path,
``_forward_cpu``: decode tokens and short chunks with a past go to the fused kernel of
``paged_attention.py``, which reads the pool in place (the engine hands it their block tables
as ``KernelSeqs``); whole prompts and long chunks keep SDPA. Between the matmuls, RMSNorm
with its residual add and RoPE with the KV write are one native call each
(``csrc/layer_ops.c``) instead of a dozen small torch ops, and on steps of few tokens (decode)
the projections multiply by packed copies of the weights with a native GEMM (``_pack``,
``csrc/gemm.c``; MKL re-packs its weight operand on every call).
On the CPU a decode step is bound by memory traffic (weights and every running sequence's
keys and values, more than the last-level cache holds), which is what the layout choices
here are about.

The runner multiplies by fused, transposed weights: q/k/v as one (D, (H + 2K) * E) matrix,
gate/up as one (D, 2F), o and down transposed alone. Fewer, larger matmuls cost less fixed
overhead on small batches, and an (in, out) weight is a plain row-major GEMM operand, which
streams from memory faster than the transposed operand ``F.linear`` hands to BLAS. The fused
matrices are not copies: the model's parameters are re-pointed to be (transposed) slices of
them, so parameter names, shapes, the state dict and ``load_state_dict`` (which copies in
place) see and update the same memory. Anything that replaces a parameter tensor
(``load_state_dict(assign=True)``) is noticed at the next step and the fusion is redone; the
CPU path's packed copies are re-made then too, and whenever a weight's version counter moves
(in-place torch ops such as ``load_state_dict``). A write that bypasses the counter
(``p.data.copy_``, a NumPy view) is not seen: call ``refresh_weights`` after it. Moving the
model to another dtype or device is refused at the next step (the KV pool and the kernel
were made for the first): build a new engine.
"""


from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from kubeforge_runtime.model.llama import DecoderLayer, Llama, RMSNorm, rope_cos_sin
from kubeforge_runtime.serve.kv_cache import KVCacheTensors
from kubeforge_runtime.serve.paged_attention import MAX_GROUP, PagedAttentionKernel, load_kernel

log = logging.getLogger(__name__)

#: Attention backends: "kernel" (the fused CPU paged-attention kernel, fp32), "torch" (gather
#: then batched matmuls / SDPA, any device and dtype), "auto" (the kernel where it applies).
ATTENTION_BACKENDS = ("auto", "kernel", "torch")
#: Prefill chunks with a past up to this many tokens go to the kernel; longer ones (a long
#: chunk over a long context: square attention) are faster as gather + SDPA.
KERNEL_MAX_CHUNK = 32


@dataclasses.dataclass
class PrefillChunk:
    """One sequence's new tokens in this step, when there is more than one."""

    token_start: int  # offset in the flat token list
    num_tokens: int
    context_len: int  # tokens in the cache after this step, this chunk included
    block_table: torch.Tensor  # (ceil(context_len / block_size),) the blocks holding them


@dataclasses.dataclass
class DecodeGroup:
    """Decoding sequences of similar length, attended to as one padded batch; their tokens
    are consecutive in the flat token list.

    Grouping by length bounds the padding: one batch padded to the longest of 16 sequences
    would gather and attend over up to twice the keys that exist.
    """

    token_start: int  # flat index of the group's first token
    block_table: torch.Tensor  # (Bd, NB) blocks of each sequence, padded with block 0
    context_lens: torch.Tensor  # (Bd,)

    def to(self, device: torch.device) -> DecodeGroup:
        return DecodeGroup(self.token_start, self.block_table.to(device, non_blocking=True),
                           self.context_lens.to(device, non_blocking=True))


@dataclasses.dataclass
class KernelSeqs:
    """The sequences the fused CPU kernel attends for in a step, as it takes them: every decode
    token and the short chunks with a past (``kernel_takes``)."""

    block_tables: torch.Tensor  # (S, max blocks), padded with block 0
    q_start: torch.Tensor  # (S,) flat index of the sequence's first token in this step
    q_len: torch.Tensor  # (S,) its tokens in this step
    ctx_len: torch.Tensor  # (S,) its tokens in the cache after this step


def kernel_takes(num_tokens: int, context_len: int) -> bool:
    """Whether the fused kernel attends for a sequence's tokens in a step: a decode token, or a
    short chunk with a past (a whole prompt needs no gather: SDPA over its own keys)."""
    return num_tokens == 1 or (context_len != num_tokens and num_tokens <= KERNEL_MAX_CHUNK)


@dataclasses.dataclass
class StepBatch:
    """A step's inputs, built on the host by the engine and moved to the device once.

    With the fused kernel (``PagedRunner.kernel``) the sequences it takes are in ``kernel``
    only; ``decodes`` is empty and ``prefills`` holds the chunks left for SDPA. Without it,
    every decode token is in ``decodes`` and every chunk in ``prefills``."""

    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    slot_mapping: torch.Tensor  # (T,) where each new token's k/v is written
    decodes: list[DecodeGroup]  # their tokens first in the flat list
    prefills: list[PrefillChunk]
    logits_idx: torch.Tensor  # (S,) flat indices whose next-token logits are wanted
    kernel: KernelSeqs | None = None


@dataclasses.dataclass
class _FusedLayer:
    """One decoder layer's weights as the runner multiplies with them: transposed, (in, out)."""

    input_norm: RMSNorm
    qkv_t: torch.Tensor  # (D, H*E + 2*K*E): q_proj, k_proj, v_proj columns
    o_t: torch.Tensor  # (H*E, D)
    post_norm: RMSNorm
    gate_up_t: torch.Tensor  # (D, 2F): gate_proj, up_proj columns
    down_t: torch.Tensor  # (F, D)
    #: the weight parameters as fused (the seven linears', then the two norms'), the
    #: ``_parameters`` dicts of their modules and the linears' data pointers: a parameter
    #: replaced (or re-pointed through ``.data``) since is noticed by ``stale``
    weights: tuple[torch.Tensor, ...]
    owners: tuple[dict[str, nn.Parameter | None], ...]
    ptrs: tuple[int, ...]
    #: packed copies of qkv, o, gate_up, down for the native GEMM (CPU, fp32; see
    #: ``PagedRunner._pack``) and the linears' version counters when packed, to notice an
    #: update in place
    packed: tuple[torch.Tensor, ...] | None = None
    versions: tuple[int, ...] = ()

    def stale(self) -> bool:
        return (any(d["weight"] is not w for d, w in zip(self.owners, self.weights, strict=True))
                or tuple(w.data_ptr() for w in self.weights[:_LINEARS]) != self.ptrs)

    def linear_versions(self) -> tuple[int, ...]:
        return tuple(w._version for w in self.weights[:_LINEARS])

    @property
    def input_norm_weight(self) -> torch.Tensor:
        return self.weights[_LINEARS]

    @property
    def post_norm_weight(self) -> torch.Tensor:
        return self.weights[_LINEARS + 1]


#: the linears of a decoder layer (q, k, v, o, gate, up, down), first in ``_FusedLayer.weights``
_LINEARS = 7


def _fuse_transposed(linears: list[nn.Linear]) -> torch.Tensor:
    """One contiguous (in features, sum of out features) matrix whose column blocks,
    transposed, are the linears' weights.

    If the weights already are such views of one storage (a runner built earlier on the same
    model fused them), that storage is reused, so every runner sees later updates.
    """
    ws = [lin.weight for lin in linears]
    cols = sum(w.shape[0] for w in ws)
    first = ws[0]
    starts = [0]
    for w in ws[:-1]:
        starts.append(starts[-1] + w.shape[0])
    elem = first.element_size()
    fused_already = all(
        w.stride() == (1, cols) and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and w.data_ptr() == first.data_ptr() + start * elem for w, start in zip(ws, starts, strict=True))
    if fused_already:
        return torch.as_strided(first.detach(), (first.shape[1], cols), (cols, 1), first.storage_offset())
    fused_t = torch.cat([w.detach().t() for w in ws], dim=1).contiguous()
    for lin, w, start in zip(linears, ws, starts, strict=True):
        lin.weight = nn.Parameter(fused_t[:, start:start + w.shape[0]].t(), requires_grad=w.requires_grad)
    return fused_t


def _fuse_layer(layer: DecoderLayer) -> _FusedLayer:
    a, m = layer.self_attn, layer.mlp
    linears = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
    qkv_t = _fuse_transposed([a.q_proj, a.k_proj, a.v_proj])
    o_t = _fuse_transposed([a.o_proj])
    gate_up_t = _fuse_transposed([m.gate_proj, m.up_proj])
    down_t = _fuse_transposed([m.down_proj])
    modules = (*linears, layer.input_layernorm, layer.post_attention_layernorm)
    return _FusedLayer(layer.input_layernorm, qkv_t, o_t, layer.post_attention_layernorm, gate_up_t, down_t,
                       tuple(mod.weight for mod in modules), tuple(mod._parameters for mod in modules),
                       tuple(lin.weight.data_ptr() for lin in linears))


def _rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``RMSNorm.forward`` without the module call; on fp32 activations the fused
    ``F.rms_norm``, which computes the same products in the same order in one kernel."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    out: torch.Tensor = norm(x)
    return out


class PagedRunner:
    """Owns the KV tensors and runs ``Llama``'s weights over them (shared with the trainer's
    model class, not copied)."""

    def __init__(self, model: Llama, num_blocks: int, block_size: int, max_model_len: int,
                 attention_backend: str = "auto") -> None:
        self.model = model
        cfg = model.cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size = block_size
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.kv = KVCacheTensors(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                                 cfg.head_dim, self.dtype, self.device)
        #: each layer's (blocks, 2, K, bs, E) pool seen as keys and values (blocks, bs, K, E),
        #: the kernel's view
        self._kernel_kv = [(kv[:, 0].transpose(1, 2), kv[:, 1].transpose(1, 2)) for kv in self.kv.kv]
        cos, sin = rope_cos_sin(torch.arange(max_model_len, device=self.device), cfg.head_dim, cfg.rope_theta)
        # rotate-half RoPE as x * cos + swap_halves(x) * sin_signed: the same products and sum
        # as Hugging Face's x * cos + cat(-x2, x1) * sin, without the negation
        half = cfg.head_dim // 2
        self.cos_table, self.sin_signed_table = cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self._gather_buf = torch.empty(0, dtype=self.dtype, device=self.device)
        self.kernel = self._choose_kernel(attention_backend)
        #: the CPU path multiplies few rows by packed copies of the weights (``_pack``)
        self.prepack = self.kernel is not None
        self.layers = self._fuse()

    def _choose_kernel(self, backend: str) -> PagedAttentionKernel | None:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, not {backend!r}")
        if backend == "torch":
            return None
        why = None
        if self.device.type != "cpu":
            why = f"the engine runs on {self.device.type}"
        elif self.dtype != torch.float32:
            why = f"the model is {self.dtype}, the kernel takes float32"
        elif self.num_heads // self.num_kv_heads > MAX_GROUP or self.num_heads > MAX_GROUP * MAX_GROUP:
            why = (f"{self.num_heads} query heads over {self.num_kv_heads} kv heads, the kernel takes at most "
                   f"{MAX_GROUP} per kv head and {MAX_GROUP * MAX_GROUP} in all")
        kernel = load_kernel() if why is None else None
        if kernel is None and backend == "kernel":
            raise ValueError(f"attention_backend=kernel: the paged-attention kernel cannot be used ({why or 'see the log'})")
        if why is not None and backend == "auto":
            log.info("attention: gather + matmul (%s)", why)
        return kernel

    def _fuse(self) -> list[_FusedLayer]:
        p = next(self.model.parameters())
        if (p.device, p.dtype) != (self.device, self.dtype):
            raise ValueError(f"the model's parameters are now {p.dtype} on {p.device}; the engine was built for "
                             f"{self.dtype} on {self.device} (its KV pool and kernels): build a new engine")
        # also when called from forward: the model's new parameters must stay normal tensors
        # (an inference tensor has no version counter, and no autograd outside the engine)
        with torch.inference_mode(False), torch.no_grad():
            layers = [_fuse_layer(layer) for layer in self.model.layers]  # type: ignore[arg-type]
        return [self._pack(f) for f in layers] if self.prepack else layers

    def _pack(self, f: _FusedLayer) -> _FusedLayer:
        """The layer with packed copies of its projection weights for the native GEMM
        (``csrc/gemm.c``): a decode step's matmul has few rows and its weight does not stay in
        cache from one step to the next, and BLAS re-packs an unpacked weight operand on every
        call, which there costs about as much as the multiply (oneDNN's prepacked linear
        avoids that but spends ~13 µs setting up each call)."""
        assert self.kernel is not None
        versions = f.linear_versions()  # before packing: a write during it is seen at the next step
        with torch.inference_mode(False), torch.no_grad():
            packed = tuple(self.kernel.pack_weight(w) for w in (f.qkv_t, f.o_t, f.gate_up_t, f.down_t))
        return dataclasses.replace(f, packed=packed, versions=versions)

    def refresh_weights(self) -> None:
        """Re-fuse and re-pack now: after writing weights in a way that bypasses their version
        counters (``p.data.copy_``), which ``_fused_layers`` cannot see."""
        self.layers = self._fuse()

    #: steps of at most this many tokens multiply by the packed weights; larger ones (prefill)
    #: by ``torch.mm``, whose blocking is better there
    packed_max_rows = 32

    def _fused_layers(self) -> list[_FusedLayer]:
        """The fused weights, re-fused when a parameter was replaced and re-packed when one
        was changed in place (``load_state_dict`` copies into them)."""
        if any(f.stale() for f in self.layers):
            self.layers = self._fuse()
        elif self.prepack and any(f.linear_versions() != f.versions for f in self.layers):
            self.layers = [self._pack(f) for f in self.layers]
        return self.layers

    def _gather(self, kv_blocks: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """The keys and values of ``block_ids``, head-major: (2, K, n * block_size, E).

        The pool is block-major, so each block is one long run in memory (memory bandwidth
        rewards long runs: a head-major pool, whose runs are one head's few KB, gathers at
        two thirds of the speed); the gather writes the head-major layout attention
        multiplies with. Into a reused buffer: a fresh allocation of this size would come from
        the OS each time (a page fault on every first touch), and each gather is consumed
        before the next one.
        """
        n = block_ids.shape[0]
        _, two, nkv, bs, e = kv_blocks.shape
        size = n * two * nkv * bs * e
        if self._gather_buf.numel() < size:
            self._gather_buf = kv_blocks.new_empty(size)
        out = self._gather_buf[:size].view(two, nkv, n, bs, e)
        torch.index_select(kv_blocks.permute(1, 2, 0, 3, 4), 2, block_ids, out=out)
        return out.view(two, nkv, n * bs, e)

    def to_device(self, b: StepBatch) -> StepBatch:
        if self.device.type == "cpu":
            return b
        d = self.device
        return StepBatch(
            b.input_ids.to(d, non_blocking=True), b.positions.to(d, non_blocking=True),
            b.slot_mapping.to(d, non_blocking=True), [g.to(d) for g in b.decodes],
            [dataclasses.replace(p, block_table=p.block_table.to(d, non_blocking=True)) for p in b.prefills],
            b.logits_idx.to(d, non_blocking=True))

    def _prefill_masks(self, prefills: list[PrefillChunk]) -> list[torch.Tensor | None]:
        """Per chunk: None for a whole prompt (plain causal), else the boolean (n, context)
        mask of a chunk over its past and itself."""
        masks: list[torch.Tensor | None] = []
        for p in prefills:
            if p.context_len == p.num_tokens:
                masks.append(None)
            else:
                qpos = torch.arange(p.num_tokens, device=self.device)[:, None] + (p.context_len - p.num_tokens)
                masks.append(torch.arange(p.context_len, device=self.device)[None, :] <= qpos)
        return masks

    def _attend_prefills(self, kv_blocks: torch.Tensor, q_THE: torch.Tensor, k_TKE: torch.Tensor,
                         v_TKE: torch.Tensor, prefills: list[PrefillChunk], masks: list[torch.Tensor | None],
                         y_THE: torch.Tensor) -> None:
        """SDPA for each chunk, one sequence at a time, into its rows of ``y_THE``."""
        for p, pmask in zip(prefills, masks, strict=True):
            s0, n = p.token_start, p.num_tokens
            qp = q_THE[s0:s0 + n].transpose(0, 1)[None]  # (1, H, n, E)
            if pmask is None:
                # the whole context is this chunk: its keys and values need no gather
                yp = F.scaled_dot_product_attention(qp, k_TKE[s0:s0 + n].transpose(0, 1)[None],
                                                    v_TKE[s0:s0 + n].transpose(0, 1)[None], is_causal=True,
                                                    enable_gqa=True)
            else:
                kv_p = self._gather(kv_blocks, p.block_table)[:, :, :p.context_len]
                yp = F.scaled_dot_product_attention(qp, kv_p[0][None], kv_p[1][None], attn_mask=pmask,
                                                    enable_gqa=True)
            y_THE[s0:s0 + n] = yp[0].transpose(0, 1)

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Logits (S, V) at ``batch.logits_idx``; writes the step's keys and values."""
        if self.kernel is not None:
            return self._forward_cpu(batch, self.kernel)
        b = self.to_device(batch)
        m = self.model
        bs, nh, nkv, e = self.block_size, self.num_heads, self.num_kv_heads, self.head_dim
        g_per_kv = nh // nkv
        half = e // 2
        scale = 1.0 / math.sqrt(e)
        t = b.input_ids.shape[0]
        # (T, 1, E): broadcast over the q and k heads rotated together
        cos = self.cos_table[b.positions][:, None]
        sin = self.sin_signed_table[b.positions][:, None]
        x_TD = m.embed_tokens(b.input_ids)
        # the rows of the (blocks * 2 * K * bs, E) view where each new token's key and value
        # for each kv head go, in (T, 2, K) order
        kv_rows = (((b.slot_mapping // bs)[:, None, None] * 2 + torch.arange(2, device=self.device)[:, None]) * nkv
                   + torch.arange(nkv, device=self.device)) * bs + (b.slot_mapping % bs)[:, None, None]
        kv_rows = kv_rows.flatten()
        # additive masks, built once per step rather than once per layer: (K*Bd, 1, C), the
        # batch order of the decode attention below
        dec_masks = []
        for g in b.decodes:
            c = g.block_table.shape[1] * bs
            keep = torch.arange(c, device=self.device)[None, :] < g.context_lens[:, None]
            mask = torch.zeros(keep.shape, dtype=self.dtype, device=self.device).masked_fill_(~keep, float("-inf"))
            dec_masks.append(mask[:, None, :].repeat(nkv, 1, 1))
        pre_masks = self._prefill_masks(b.prefills)
        for layer_idx, layer in enumerate(self._fused_layers()):
            kv_blocks = self.kv.kv[layer_idx]  # (blocks, 2, K, bs, E)
            h = _rms_norm(layer.input_norm, x_TD)
            qkv = h @ layer.qkv_t  # (T, (H + 2K) * E)
            qk = qkv[:, :(nh + nkv) * e].view(t, nh + nkv, e)
            # (T, H + K, E), computed in fp32 (the tables' dtype) like ``apply_rope``
            qk = (qk * cos + torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * sin).to(x_TD.dtype)
            q_THE, k_TKE = qk[:, :nh], qk[:, nh:]
            v_TKE = qkv[:, (nh + nkv) * e:].view(t, nkv, e)
            kv_blocks.view(-1, e).index_copy_(0, kv_rows, torch.stack((k_TKE, v_TKE), dim=1).view(-1, e))
            y_THE = torch.empty((t, nh, e), dtype=x_TD.dtype, device=x_TD.device)
            for g, mask in zip(b.decodes, dec_masks, strict=True):
                bd, nb = g.block_table.shape
                c = nb * bs
                s0 = g.token_start
                kv_d = self._gather(kv_blocks, g.block_table.flatten()).view(2, nkv * bd, c, e)
                # the query heads sharing a kv head become that head's query rows, in
                # (K, Bd) batch order like the gathered keys: no expansion of keys for GQA
                qd = q_THE[s0:s0 + bd].reshape(bd, nkv, g_per_kv, e).transpose(0, 1).reshape(nkv * bd, g_per_kv, e)
                scores = torch.baddbmm(mask, qd, kv_d[0].transpose(1, 2), alpha=scale)  # (K*Bd, G, C)
                # softmax in fp32 whatever the activations (SDPA does the same)
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(kv_d.dtype)
                yd = torch.bmm(probs, kv_d[1])
                y_THE[s0:s0 + bd] = yd.view(nkv, bd, g_per_kv, e).transpose(0, 1).reshape(bd, nh, e)
            self._attend_prefills(kv_blocks, q_THE, k_TKE, v_TKE, b.prefills, pre_masks, y_THE)
            x_TD = x_TD + y_THE.view(t, -1) @ layer.o_t
            gate_up = _rms_norm(layer.post_norm, x_TD) @ layer.gate_up_t
            f = gate_up.shape[1] // 2
            x_TD = x_TD + (F.silu(gate_up[:, :f]) * gate_up[:, f:]) @ layer.down_t
        logits: torch.Tensor = m.lm_head(m.norm(x_TD[b.logits_idx]))
        return logits

    def _forward_cpu(self, b: StepBatch, ops: PagedAttentionKernel) -> torch.Tensor:
        """``forward`` on the CPU in fp32 with the native ops: per layer four matmuls (the
        native GEMM over packed weights on steps of few tokens, else ``torch.mm``), RMSNorm
        with the residual add before it and RoPE with the KV write (one native call each
        instead of a dozen small torch ops), and attention by the fused kernel for decode
        tokens and short chunks with a past (whole prompts and long chunks: SDPA). The torch
        path's arithmetic, with sums taken in other orders in RMSNorm, the projections and
        the kernel."""
        m = self.model
        nh, nkv, e = self.num_heads, self.num_kv_heads, self.head_dim
        t = b.input_ids.shape[0]
        layers = self._fused_layers()
        assert not b.decodes, "with the kernel, decode tokens come in StepBatch.kernel"
        k = b.kernel
        attend = ops.bind(k.block_tables, k.q_start, k.q_len, k.ctx_len) if k is not None else None
        prefills = b.prefills
        pre_masks = self._prefill_masks(prefills)
        x_TD = m.embed_tokens(b.input_ids)
        h_TD = torch.empty_like(x_TD)
        q_THE = x_TD.new_empty((t, nh, e))
        y_THE = x_TD.new_empty((t, nh, e))
        # whole prompts read their rotated keys from here rather than from the pool
        k_TKE = x_TD.new_empty((t, nkv, e)) if prefills else None

        def proj(x: torch.Tensor, w_t: torch.Tensor, w_packed: torch.Tensor | None) -> torch.Tensor:
            return ops.gemm(x, w_packed, w_t.shape[1]) if w_packed is not None else x @ w_t

        ops.rms_norm(x_TD, layers[0].input_norm_weight, layers[0].input_norm.eps, h_TD)
        for layer_idx, layer in enumerate(layers):
            kv_blocks = self.kv.kv[layer_idx]  # (blocks, 2, K, bs, E)
            packed = layer.packed if layer.packed is not None and t <= self.packed_max_rows else (None,) * 4
            qkv = proj(h_TD, layer.qkv_t, packed[0])
            ops.rope_kv_write(qkv, (nh, nkv, e), b.positions, self.cos_table, self.sin_signed_table,
                              b.slot_mapping, kv_blocks, q_THE, k_TKE)
            if attend is not None:
                attend(q_THE, *self._kernel_kv[layer_idx], y_THE)
            if prefills:
                assert k_TKE is not None
                v_TKE = qkv[:, (nh + nkv) * e:].view(t, nkv, e)
                self._attend_prefills(kv_blocks, q_THE, k_TKE, v_TKE, prefills, pre_masks, y_THE)
            delta_TD = proj(y_THE.view(t, -1), layer.o_t, packed[1])
            ops.rms_norm(x_TD, layer.post_norm_weight, layer.post_norm.eps, h_TD, residual=delta_TD)
            gate_up = proj(h_TD, layer.gate_up_t, packed[2])
            f = gate_up.shape[1] // 2
            delta_TD = proj(F.silu(gate_up[:, :f]).mul_(gate_up[:, f:]), layer.down_t, packed[3])
            if layer_idx + 1 < len(layers):
                nxt = layers[layer_idx + 1]
                ops.rms_norm(x_TD, nxt.input_norm_weight, nxt.input_norm.eps, h_TD, residual=delta_TD)
            else:
                x_TD.add_(delta_TD)
        rows = x_TD[b.logits_idx]
        logits: torch.Tensor = m.lm_head(ops.rms_norm(rows, m.norm.weight, m.norm.eps, torch.empty_like(rows)))
        return logits
