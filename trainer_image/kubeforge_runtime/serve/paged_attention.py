"""The CPU path's native ops, built at first use: a fused paged-attention kernel, the layer's
elementwise ops and a GEMM over packed weights.

Gather-then-SDPA (the portable path in ``runner.py``) copies every decoding sequence's keys
and values out of the block pool on every layer of every step, then reads the copy again:
on the CPU that copy, not the arithmetic, is what decode attention costs. This kernel
(``csrc/paged_attention.c``) reads keys and values in place through the block tables, one
pass per sequence and query head, causal within a chunk of new tokens, so it serves decode
tokens and prefill chunks alike. The same library holds RMSNorm (with the residual add) and
RoPE with the KV write (``csrc/layer_ops.c``), and the projections' GEMM over weights packed
once (``csrc/gemm.c``); ``runner.py`` says why each.

The sources are compiled with the host's C compiler (``$CC``, else ``cc``), each with its own
flags (``-O3 -march=native``; the kernel with ``-ffast-math``, the layer ops without
fused multiply-adds), into ``$KUBEFORGE_KERNEL_CACHE`` (default
``~/.cache/kubeforge/kernels``), keyed by the sources, the flags and the CPU's feature flags,
in well under a second. Images carry no compiler: their build stage runs ``python -m
kubeforge_runtime.serve.kernel_build --prebuild DIR`` (x86-64-v3 and -v2 builds) and sets
``KUBEFORGE_KERNEL_PREBUILT=DIR``; the best build this CPU can run is used. The library is
loaded with ctypes, which releases the GIL for each call: with more than one torch thread the
kernel's sequences and the GEMM's weight panels are split across that many threads. fp32 on
the CPU only; a CUDA engine, other dtypes, ``KUBEFORGE_PAGED_KERNEL=0`` or a host without a
compiler use the torch path, and the reason is logged once.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from kubeforge_runtime.intmath import cdiv
from kubeforge_runtime.serve.kernel_build import KernelUnavailable, build, find_prebuilt

log = logging.getLogger(__name__)

#: The widest query-head group per kv head the kernel takes (``MAX_GROUP`` in the C source).
MAX_GROUP = 16
ENV_DISABLE = "KUBEFORGE_PAGED_KERNEL"


class PagedAttentionKernel:
    """``kernel(q, k_cache, v_cache, block_tables, q_start, ctx_len, out)``; see ``__call__``."""

    def __init__(self, lib_path: Path) -> None:
        self._lib = ctypes.CDLL(str(lib_path))
        fn = self._lib.kf_paged_attention
        p, i = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, p, p, p, i, p, p, p, i, i, p, i, i, i, i, i, i, i, ctypes.c_float, p]
        fn.restype = ctypes.c_int
        self._fn = fn
        f, n = ctypes.c_float, None
        self._rms_norm = self._lib.kf_rms_norm
        self._rms_norm.argtypes = [p, p, p, f, i, i, p]
        self._rms_norm.restype = n
        self._rope_kv_write = self._lib.kf_rope_kv_write
        self._rope_kv_write.argtypes = [p, i, i, i, i, p, p, p, p, p, i, p, p]
        self._rope_kv_write.restype = n
        self._gemm = self._lib.kf_gemm_packed
        self._gemm.argtypes = [p, i, i, i, p, i, p, i, i, i]
        self._gemm.restype = n
        #: columns per packed panel of a ``pack_weight`` result
        self.panel = int(self._lib.kf_gemm_panel())
        self._scratch = threading.local()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._pool_lock = threading.Lock()

    def _scratch_for(self, n: int) -> torch.Tensor:
        buf: torch.Tensor | None = getattr(self._scratch, "buf", None)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 4096), dtype=torch.float32)
            self._scratch.buf = buf
        return buf

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 q_start: torch.Tensor, q_len: torch.Tensor, ctx_len: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Attention of ``q`` (T, H, E) over the paged cache into ``out`` (T, H, E) (rows of
        no sequence are left as they are).

        ``k_cache``/``v_cache``: (blocks, block_size, K, E) views in any strides with a
        contiguous last dim; ``block_tables`` (S, max_blocks), ``q_start``, ``q_len`` and
        ``ctx_len`` (S,) int64 on the CPU: sequence s owns query rows q_start[s] onwards,
        q_len[s] of them, and has ctx_len[s] tokens in the cache, its new ones included (they
        attend causally)."""
        return self.bind(block_tables, q_start, q_len, ctx_len)(q, k_cache, v_cache, out)

    def bind(self, block_tables: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor,
             ctx_len: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """A step's sequences prepared once for all its layers: ``bind(tables, q_start, q_len,
        ctx_len)(q, k_cache, v_cache, out)`` computes ``kernel(q, k_cache, v_cache, tables,
        q_start, q_len, ctx_len, out)``."""
        block_tables, q_start, q_len, ctx_len = (x.to(torch.int64).contiguous()
                                                 for x in (block_tables, q_start, q_len, ctx_len))
        s = ctx_len.shape[0]
        longest = int(ctx_len.max()) if s else 0
        seqs = (block_tables.data_ptr(), block_tables.shape[1], q_start.data_ptr(), q_len.data_ptr(),
                ctx_len.data_ptr())
        threads = torch.get_num_threads()
        parts = [(0, s)] if threads <= 1 or s < 2 else _split_by_work((q_len * ctx_len).tolist(), threads)
        keep = (block_tables, q_start, q_len, ctx_len)  # the pointers above stay valid while bound

        def call(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                 _keep: tuple[torch.Tensor, ...] = keep) -> torch.Tensor:
            t, h, e = q.shape
            _, bs, kh, _ = k_cache.shape
            if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
                raise ValueError("k_cache and v_cache need the same strides and a contiguous head dim")
            if k_cache.dtype != torch.float32 or v_cache.dtype != torch.float32:
                raise ValueError("k_cache and v_cache must be float32")
            for name, x in (("q", q), ("out", out)):
                if not x.is_contiguous() or x.dtype != torch.float32:
                    raise ValueError(f"{name} must be a contiguous float32 tensor")
            sb, sj, sh, _ = k_cache.stride()
            head = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), *seqs)
            tail = (out.data_ptr(), h, kh, e, bs, sb, sj, sh, e ** -0.5)

            def run(begin: int, end: int) -> None:
                scratch = self._scratch_for(h * longest)
                if self._fn(*head, begin, end, *tail, scratch.data_ptr()) != 0:
                    raise ValueError(f"unsupported head grouping: {h} query heads over {kh} kv heads "
                                     f"(at most {MAX_GROUP} per kv head, {MAX_GROUP * MAX_GROUP} in all)")

            if len(parts) == 1:
                run(*parts[0])
            else:
                self._in_threads(run, parts)
            return out

        return call

    # -- the layer's elementwise ops (csrc/layer_ops.c); arguments are checked by the runner,
    # which owns every tensor passed: contiguous float32 on the CPU, shapes as documented

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """``out = rms_norm(x) * weight`` over rows of (T, D); with ``residual``, ``x += residual``
        first, in place."""
        t, d = x.shape
        self._rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), eps,
                       t, d, out.data_ptr())
        return out

    def rope_kv_write(self, qkv: torch.Tensor, heads: tuple[int, int, int], positions: torch.Tensor,
                      cos: torch.Tensor, sin_signed: torch.Tensor, slots: torch.Tensor, kv_layer: torch.Tensor,
                      q_out: torch.Tensor, k_out: torch.Tensor | None = None) -> None:
        """RoPE on the q and k heads of ``qkv`` (T, (H + 2K) * E) into ``q_out`` (T, H, E)
        (and ``k_out`` (T, K, E)), and each token's key and value into its slot of
        ``kv_layer`` (blocks, 2, K, block_size, E)."""
        h, k, e = heads
        self._rope_kv_write(qkv.data_ptr(), qkv.shape[0], h, k, e, positions.data_ptr(), cos.data_ptr(),
                            sin_signed.data_ptr(), slots.data_ptr(), kv_layer.data_ptr(), kv_layer.shape[3],
                            q_out.data_ptr(), None if k_out is None else k_out.data_ptr())

    def pack_weight(self, w_t: torch.Tensor) -> torch.Tensor:
        """An (in, out) weight packed for ``gemm``: panels of ``panel`` columns, each an (in,
        panel) row-major block, the last padded with zero columns."""
        k, n = w_t.shape
        padded = cdiv(n, self.panel) * self.panel
        wp = w_t.new_zeros((k, padded))
        wp[:, :n] = w_t
        return wp.view(k, padded // self.panel, self.panel).transpose(0, 1).contiguous()

    def gemm(self, a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
        """``a`` (M, K) contiguous float32 times the packed (K, n) weight; with more than one
        torch thread the panels are split across that many threads."""
        a = a.contiguous()
        m, k = a.shape
        panels = packed.shape[0]
        if a.dtype != torch.float32 or packed.dtype != torch.float32 or packed.shape[1] != k \
                or not 0 < n <= panels * self.panel:
            raise ValueError(f"gemm: ({m}, {k}) {a.dtype} times a packed {tuple(packed.shape)} {packed.dtype} weight "
                             f"of {n} columns")
        out = a.new_empty((m, n))
        args = (a.data_ptr(), k, m, k, packed.data_ptr(), n, out.data_ptr(), n)
        threads = torch.get_num_threads()
        if threads <= 1 or panels < 2 * threads:
            self._gemm(*args, 0, panels)
            return out
        bounds = [panels * i // threads for i in range(threads + 1)]
        self._in_threads(lambda b, e: self._gemm(*args, b, e), list(zip(bounds, bounds[1:], strict=False)))
        return out

    def _in_threads(self, fn: Callable[[int, int], None], ranges: list[tuple[int, int]]) -> None:
        """``fn(begin, end)`` for each range, on the kernel's threads (ctypes releases the GIL);
        every range has finished when it returns or raises."""
        with self._pool_lock:
            if self._pool is None or self._pool_size < len(ranges):
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool_size = len(ranges)
                self._pool = concurrent.futures.ThreadPoolExecutor(self._pool_size,
                                                                   thread_name_prefix="kubeforge-cpu-ops")
            pool = self._pool
        futures = [pool.submit(fn, b, e) for b, e in ranges if e > b]
        concurrent.futures.wait(futures)
        for f in futures:
            f.result()


def _split_by_work(work: list[int], parts: int) -> list[tuple[int, int]]:
    """Consecutive ranges of sequences with about equal work (query tokens x context), so one
    long prefill chunk does not sit alone."""
    out: list[tuple[int, int]] = []
    total, begin, acc = sum(work), 0, 0
    for idx, w in enumerate(work):
        acc += w
        if acc >= total * (len(out) + 1) / parts and idx + 1 < len(work):
            out.append((begin, idx + 1))
            begin = idx + 1
    out.append((begin, len(work)))
    return out


_LOADED: PagedAttentionKernel | None = None
_REASON: str | None = None
_LOCK = threading.Lock()


def load_kernel() -> PagedAttentionKernel | None:
    """The kernel, or None (with the reason logged once) when it cannot be used here."""
    global _LOADED, _REASON
    with _LOCK:
        if _LOADED is not None or _REASON is not None:
            return _LOADED
        if os.environ.get(ENV_DISABLE, "1") in ("0", "false", "no"):
            _REASON = f"{ENV_DISABLE}=0"
        else:
            try:
                try:
                    lib = build()
                except KernelUnavailable as e:
                    prebuilt = find_prebuilt()
                    if prebuilt is None:
                        raise
                    log.info("paged-attention kernel: %s; using the prebuilt %s", e, prebuilt)
                    lib = prebuilt
                _LOADED = PagedAttentionKernel(lib)
            except (KernelUnavailable, OSError, subprocess.SubprocessError) as e:
                _REASON = str(e)
        if _LOADED is None:
            log.warning("paged-attention kernel not used (%s): attention gathers blocks and runs SDPA", _REASON)
        return _LOADED
