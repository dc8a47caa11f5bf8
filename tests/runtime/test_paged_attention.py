"""The CPU paged-attention kernel (built with the host's compiler) against plain torch
attention over the same paged cache: decode tokens and prefill chunks mixed, grouped-query
heads, head sizes with and without a specialised path, both cache layouts, several threads;
the layer's native elementwise ops (RMSNorm, RoPE with the KV write) against the torch ops
they replace; and the fallback when it cannot be built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kubeforge_runtime.serve.kernel_build import build, prebuild
from kubeforge_runtime.serve.paged_attention import PagedAttentionKernel, load_kernel

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(300)]


def reference_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor,
                              ctx_len: torch.Tensor) -> torch.Tensor:
    """The same attention in plain torch, one sequence at a time."""
    t, h, e = q.shape
    bs, kh = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)
    for s in range(ctx_len.shape[0]):
        a, c = int(q_start[s]), int(ctx_len[s])
        b = a + int(q_len[s])
        blocks = block_tables[s, :(c + bs - 1) // bs]
        k = k_cache[blocks].reshape(-1, kh, e)[:c].transpose(0, 1)  # (K, C, E)
        v = v_cache[blocks].reshape(-1, kh, e)[:c].transpose(0, 1)
        qs = q[a:b].transpose(0, 1)  # (H, n, E)
        pos = torch.arange(c - (b - a), c)[:, None]
        mask = torch.arange(c)[None, :] <= pos
        y = torch.nn.functional.scaled_dot_product_attention(qs, k, v, attn_mask=mask, enable_gqa=True)
        out[a:b] = y.transpose(0, 1)
    return out


@pytest.fixture(scope="module")
def kernel() -> PagedAttentionKernel:
    k = load_kernel()
    assert k is not None, "the kernel must build on this machine (a C compiler is part of the dev setup)"
    return k


def _case(heads: int, kv_heads: int, e: int, new_tokens: list[int], seed: int = 0, bs: int = 16,
          head_major: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n_blocks = 1024
    ctx = torch.tensor([n + int(torch.randint(0, 200, (1,), generator=g)) for n in new_tokens])
    max_blocks = int((ctx.max() + bs - 1) // bs)
    tables = torch.randperm(n_blocks, generator=g)[:len(new_tokens) * max_blocks].view(len(new_tokens), max_blocks)
    # rows of sequences in another order than the sequences, with a gap (rows the kernel leaves)
    q_len = torch.tensor(new_tokens)
    order = torch.randperm(len(new_tokens), generator=g)
    q_start = torch.empty_like(q_len)
    row = 3
    for s_ in order.tolist():
        q_start[s_] = row
        row += int(q_len[s_])
    q = torch.randn(row, heads, e, generator=g)
    if head_major:  # (K, blocks, bs, E) storage seen as (blocks, bs, K, E)
        k = torch.randn(kv_heads, n_blocks, bs, e, generator=g).permute(1, 2, 0, 3)
        v = torch.randn(kv_heads, n_blocks, bs, e, generator=g).permute(1, 2, 0, 3)
    else:
        k = torch.randn(n_blocks, bs, kv_heads, e, generator=g)
        v = torch.randn(n_blocks, bs, kv_heads, e, generator=g)
    return q, k, v, tables.contiguous(), q_start, q_len, ctx


@pytest.mark.parametrize(("heads", "kv_heads", "e"), [(8, 4, 32), (4, 4, 64), (8, 1, 128), (6, 2, 48), (32, 2, 16)])
@pytest.mark.parametrize("head_major", [False, True])
def test_kernel_equals_torch_attention(kernel: PagedAttentionKernel, heads: int, kv_heads: int, e: int,
                                       head_major: bool) -> None:
    new_tokens = [1] * 9 + [5, 64, 1, 130]  # decodes and prefill chunks with and without a past
    q, k, v, tables, q_start, q_len, ctx = _case(heads, kv_heads, e, new_tokens, head_major=head_major)
    want = reference_paged_attention(q, k, v, tables, q_start, q_len, ctx)
    got = kernel(q, k, v, tables, q_start, q_len, ctx, torch.zeros_like(q))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_threads_split_the_sequences_and_agree(kernel: PagedAttentionKernel) -> None:
    q, k, v, tables, q_start, q_len, ctx = _case(8, 4, 32, [1] * 20 + [200, 3])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(q, k, v, tables, q_start, q_len, ctx, torch.zeros_like(q))
        torch.set_num_threads(3)
        three = kernel(q, k, v, tables, q_start, q_len, ctx, torch.zeros_like(q))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, three)


def test_bad_inputs_are_refused_by_name(kernel: PagedAttentionKernel) -> None:
    q, k, v, tables, q_start, q_len, ctx = _case(8, 4, 32, [1, 1])
    with pytest.raises(ValueError, match="q must be a contiguous float32"):
        kernel(q.double(), k, v, tables, q_start, q_len, ctx, torch.zeros_like(q))
    with pytest.raises(ValueError, match="same strides"):
        other_layout = v.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)  # same shape, head-major
        kernel(q, k, other_layout, tables, q_start, q_len, ctx, torch.zeros_like(q))
    q17, k17, v17, t17, qs17, ql17, c17 = _case(34, 2, 32, [1])
    with pytest.raises(ValueError, match="at most 16 per kv head"):
        kernel(q17, k17, v17, t17, qs17, ql17, c17, torch.empty_like(q17))
    with pytest.raises(ValueError, match="must be float32"):
        kernel(q, k.double(), v.double(), tables, q_start, q_len, ctx, torch.zeros_like(q))
    # int32 tables are widened, not read as int64
    torch.testing.assert_close(kernel(q, k, v, tables.int(), q_start.int(), q_len.int(), ctx.int(), torch.zeros_like(q)),
                               kernel(q, k, v, tables, q_start, q_len, ctx, torch.zeros_like(q)))
    packed = kernel.pack_weight(torch.randn(32, 20))
    with pytest.raises(ValueError, match="gemm"):
        kernel.gemm(torch.randn(3, 31), packed, 20)  # inner dimensions differ
    with pytest.raises(ValueError, match="gemm"):
        kernel.gemm(torch.randn(3, 32).double(), packed, 20)


@pytest.mark.parametrize("rows,dim", [(1, 256), (16, 256), (37, 100), (512, 4096)])
def test_rms_norm_with_the_residual_add_matches_torch(kernel: PagedAttentionKernel, rows: int, dim: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x, delta = (torch.randn(rows, dim, generator=g) * 3 for _ in range(2))
    w = torch.randn(dim, generator=g)
    want_x = x + delta
    want = F.rms_norm(want_x, (dim,), w, 1e-5)
    out = torch.full_like(x, float("nan"))
    kernel.rms_norm(x, w, 1e-5, out, residual=delta)
    assert torch.equal(x, want_x), "the residual add is the same single rounding as torch's"
    # the sum of squares is added in another order than torch's reduction: a few ulps
    torch.testing.assert_close(out, want, rtol=2e-6, atol=1e-6)
    again = torch.empty_like(out)
    kernel.rms_norm(x.clone(), w, 1e-5, again)
    assert torch.equal(again, out), "without a residual, x is normalised as it is"


@pytest.mark.parametrize("with_k_out", [True, False])
def test_rope_and_the_kv_write_equal_the_torch_ops_bit_for_bit(kernel: PagedAttentionKernel, with_k_out: bool) -> None:
    from kubeforge_runtime.model.llama import rope_cos_sin

    h, kh, e, bs, t = 8, 2, 64, 16, 21
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(t, (h + 2 * kh) * e, generator=g)
    positions = torch.randint(0, 300, (t,), generator=g)
    slots = torch.randperm(40 * bs, generator=g)[:t]
    cos, sin = rope_cos_sin(torch.arange(512), e, 10000.0)
    sin_signed = torch.cat((-sin[:, :e // 2], sin[:, e // 2:]), dim=-1)
    pool = torch.zeros(40, 2, kh, bs, e)
    q_out = torch.empty(t, h, e)
    k_out = torch.empty(t, kh, e) if with_k_out else None
    kernel.rope_kv_write(qkv, (h, kh, e), positions, cos, sin_signed, slots, pool, q_out, k_out)
    # the torch path's ops (runner.forward without the kernel)
    qk = qkv[:, :(h + kh) * e].view(t, h + kh, e)
    c, s_ = cos[positions][:, None], sin_signed[positions][:, None]
    qk = qk * c + torch.cat((qk[..., e // 2:], qk[..., :e // 2]), dim=-1) * s_
    assert torch.equal(q_out, qk[:, :h])
    keys = pool[:, 0].permute(0, 2, 1, 3).reshape(-1, kh, e)[slots]  # (T, K, E) by slot
    values = pool[:, 1].permute(0, 2, 1, 3).reshape(-1, kh, e)[slots]
    assert torch.equal(keys, qk[:, h:]) and torch.equal(values, qkv[:, (h + kh) * e:].view(t, kh, e))
    if k_out is not None:
        assert torch.equal(k_out, qk[:, h:])
    untouched = torch.ones(40 * bs, dtype=torch.bool)
    untouched[slots] = False
    assert not pool[:, :].permute(0, 3, 1, 2, 4).reshape(40 * bs, -1)[untouched].any()


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 50])
@pytest.mark.parametrize("k,n", [(256, 512), (37, 21), (768, 256)])
def test_the_packed_gemm_matches_torch(kernel: PagedAttentionKernel, rows: int, k: int, n: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + n)
    a, w_t = torch.randn(rows, k, generator=g), torch.randn(k, n, generator=g)
    packed = kernel.pack_weight(w_t)
    assert packed.shape == (-(-n // kernel.panel), k, kernel.panel)
    got = kernel.gemm(a, packed, n)
    # the same products, summed over k in order rather than in BLAS's blocks
    torch.testing.assert_close(got, a @ w_t, rtol=1e-5, atol=1e-4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # the panels split across threads: the same numbers
        assert torch.equal(kernel.gemm(a, packed, n), got)
    finally:
        torch.set_num_threads(before)


def _load_in_subprocess(env: dict[str, str]) -> dict[str, object]:
    code = ("import json, logging; logging.basicConfig(level=logging.INFO)\n"
            "from kubeforge_runtime.serve import paged_attention as pa\n"
            "k = pa.load_kernel()\n"
            "import torch; tiny = torch.tensor(1e-40, dtype=torch.float32)\n"
            "print(json.dumps({'loaded': k is not None, 'reason': pa._REASON, 'subnormals': float(tiny * 1.0) != 0.0}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["log"] = proc.stderr
    return out


def test_loading_the_kernel_leaves_the_processs_float_mode_alone(tmp_path: Path) -> None:
    # linked with -ffast-math, a library switches the process to flush-to-zero when loaded
    got = _load_in_subprocess({"KUBEFORGE_KERNEL_CACHE": str(tmp_path / "fresh")})
    assert got["loaded"] is True and got["subnormals"] is True, got


def test_without_a_compiler_or_when_disabled_the_torch_path_is_used_and_said(tmp_path: Path) -> None:
    off = _load_in_subprocess({"KUBEFORGE_PAGED_KERNEL": "0"})
    assert off["loaded"] is False and "KUBEFORGE_PAGED_KERNEL=0" in str(off["log"])
    no_cc = _load_in_subprocess({"CC": str(tmp_path / "no-such-cc"), "KUBEFORGE_KERNEL_CACHE": str(tmp_path / "c")})
    assert no_cc["loaded"] is False and "kernel not used" in str(no_cc["log"]), no_cc
    # and it builds into the cache named, once
    lib = build(tmp_path / "cache")
    assert lib.is_file() and build(tmp_path / "cache") == lib


def test_an_image_without_a_compiler_loads_its_prebuilt_kernel(tmp_path: Path) -> None:
    built = prebuild(tmp_path / "kernels")
    assert built and all(p.is_file() for p in built)
    got = _load_in_subprocess({"CC": str(tmp_path / "no-such-cc"), "KUBEFORGE_KERNEL_CACHE": str(tmp_path / "c"),
                               "KUBEFORGE_KERNEL_PREBUILT": str(tmp_path / "kernels")})
    assert got["loaded"] is True and "using the prebuilt" in str(got["log"]), got
    q, k, v, tables, q_start, q_len, ctx = _case(8, 4, 32, [1, 7, 1])
    want = reference_paged_attention(q, k, v, tables, q_start, q_len, ctx)
    a, w_t = torch.randn(13, 40), torch.randn(40, 70)
    for lib in built:  # every portable build (8-wide vectors, AVX2 or SSE) gives the same answers
        portable = PagedAttentionKernel(lib)
        got_q = portable(q, k, v, tables, q_start, q_len, ctx, torch.zeros_like(q))
        torch.testing.assert_close(got_q, want, rtol=1e-5, atol=1e-5, msg=lambda m, lib=lib: f"{lib.name}: {m}")
        torch.testing.assert_close(portable.gemm(a, portable.pack_weight(w_t), 70), a @ w_t, rtol=1e-5, atol=1e-4)
