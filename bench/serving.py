"""Serving throughput and latency: kubeforge's engine vs one-at-a-time transformers ``generate``
(naive) vs transformers' own continuous batching (hf_cb).

All three serve the same random-init Llama (written once with ``save_hf`` and loaded by each
from that directory), the same prompts of mixed lengths, greedy, the same number of new
tokens per request (end-of-sequence ignored), 64 requests with at most 16 in flight:

- kubeforge: ``AsyncEngine`` in-process (the server's engine path without HTTP, with the
  process settings the server applies after warm-up, ``settle_process``; attention by the
  fused CPU paged-attention kernel, as the server picks it, ``--attention-backend``), 16 client
  coroutines each sending its next request when the previous one finishes; TTFT and
  inter-token latency are measured by those clients as tokens arrive;
- naive: ``LlamaForCausalLM.generate`` on one request at a time (concurrency 1 by nature);
- hf_cb: ``ContinuousBatchingManager`` (``init_continuous_batching``, paged cache, ``sdpa``
  attention), fed by the same 16-in-flight rule.

``prefix_ttft_reduction`` = 1 - TTFT(1k-token shared prefix, cache on) / TTFT(cache off), over
requests sent one at a time after the prefix was seen once.

Every system runs with the same number of torch threads (``--threads``, default 1: this
machine's two cores are shared, and OpenMP spinning on a busy core makes small matmuls many
times slower for everyone). Writes ``bench/results/serving.json`` (or ``--out``) and prints a table.

``--smoke`` (run by tests/bench, so the script cannot rot): the same three systems and the prefix
figure with a few short requests and one round, every key written to ``--out`` (by default a
file in the system's tmp, never over the committed results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from kubeforge_runtime.model.hf import load_hf, save_hf
from kubeforge_runtime.model.llama import Llama, LlamaConfig
from kubeforge_runtime.serve.async_engine import AsyncEngine
from kubeforge_runtime.serve.engine import EngineConfig, LLMEngine, settle_process
from kubeforge_runtime.serve.sampling import SamplingParams
from kubeforge_runtime.tokenizer import ByteTokenizer

RESULTS = Path(__file__).parent / "results" / "serving.json"
#: Where a smoke run writes unless ``--out`` says: never over the committed results.
SMOKE_OUT = Path(tempfile.gettempdir()) / "kubeforge-bench-smoke" / "serving.json"

# "small" preset narrowed so that the naive baseline finishes in minutes on two shared cores,
# with room for the 1k-token prefix
MODEL: dict[str, Any] = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 2048}
#: What ``--smoke`` changes in the defaults (a flag given on the command line still wins).
SMOKE_DEFAULTS: dict[str, Any] = {"requests": 4, "concurrency": 2, "new_tokens": 8, "prompt_max": 64,
                                  "prefix_requests": 2, "rounds": 1, "out": SMOKE_OUT}


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def write_model(directory: Path) -> Path:
    tok = ByteTokenizer()
    m = Llama(LlamaConfig(**MODEL))
    m.init_weights(0)
    save_hf(m, directory, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(directory)
    return directory


def workload(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[ByteTokenizer.bos_id] + [rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# -- kubeforge --------------------------------------------------------------------------------

def make_engine(model_dir: Path, args: argparse.Namespace, prefix_caching: bool = True) -> LLMEngine:
    model = load_hf(model_dir)
    cfg = EngineConfig(block_size=16, max_num_seqs=args.concurrency, max_num_batched_tokens=args.max_batched_tokens,
                       num_blocks=args.concurrency * (2048 // 16) + 256, enable_prefix_caching=prefix_caching,
                       attention_backend=getattr(args, "attention_backend", "auto"))
    return LLMEngine(model, ByteTokenizer(), cfg)


async def _drive(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, concurrency: int,
                 ) -> dict[str, Any]:
    aeng = AsyncEngine(engine)
    aeng.start()
    todo = list(enumerate(prompts))
    ttfts: list[float] = []
    itls: list[float] = []
    generated = 0
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def client() -> None:
        nonlocal generated
        while todo:
            i, p = todo.pop(0)
            t0 = time.perf_counter()
            last = None
            async for out in aeng.generate(f"r{i}", p, params):
                now = time.perf_counter()
                if last is None:
                    ttfts.append(now - t0)
                else:
                    itls.append(now - last)
                last = now
                generated += len(out.new_token_ids)

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t
    aeng.stop()
    return {"wall_s": wall, "generated": generated, "tok_s": generated / wall, "ttfts": ttfts, "itls": itls}


def run_kubeforge(model_dir: Path, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    engine = make_engine(model_dir, args)
    asyncio.run(_drive(engine, workload(4, 8, 64, seed=99), 4, 4))  # warm-up
    engine.pool.reset_prefix_cache()
    settle_process()  # as the server does once its engine is warm
    out = asyncio.run(_drive(engine, prompts, args.new_tokens, args.concurrency))
    out["attention"] = "kernel" if engine.runner.kernel is not None else "torch"
    return out


def run_prefix(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(1)
    prefix = [ByteTokenizer.bos_id] + [rng.randrange(256) for _ in range(1023)]
    suffixes = [[rng.randrange(256) for _ in range(rng.randint(8, 32))] for _ in range(args.prefix_requests)]
    out: dict[str, float] = {}
    for on in (True, False):
        engine = make_engine(model_dir, args, prefix_caching=on)
        asyncio.run(_drive(engine, [prefix + [1, 2, 3]], 2, 1))  # the prefix is seen once (and warms up)
        r = asyncio.run(_drive(engine, [prefix + s for s in suffixes], 2, 1))
        out["on" if on else "off"] = statistics.median(r["ttfts"])
    return {"ttft_cache_on_ms": out["on"] * 1e3, "ttft_cache_off_ms": out["off"] * 1e3,
            "prefix_ttft_reduction": 1 - out["on"] / out["off"]}


# -- transformers ----------------------------------------------------------------------------

def run_naive(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    # transformers' own annotations do not type-check generate() on a concrete model class
    model: Any = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    kw: dict[str, Any] = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                          "pad_token_id": ByteTokenizer.pad_id}
    model.generate(torch.tensor([prompts[0][:16]]), **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
    generated = 0
    t = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p]), **kw)
            generated += out.shape[1] - len(p)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "generated": generated, "tok_s": generated / wall}


def run_hf_cb(model_dir: Path, prompts: list[list[int]], new_tokens: int, concurrency: int,
              page_size: int = 16) -> dict[str, Any]:
    from transformers import GenerationConfig, LlamaForCausalLM
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model: Any = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,  # type: ignore[no-untyped-call]
                           pad_token_id=ByteTokenizer.pad_id)
    cb = ContinuousBatchingConfig(page_size=page_size, max_requests_per_batch=concurrency, max_batch_tokens=512,
                                  num_blocks=concurrency * (2048 // 16) + 256, auto_switch_to_flash=False,
                                  use_cuda_graph=False)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    manager.start()
    try:
        for i, p in enumerate(workload(4, 8, 64, seed=99)):  # warm-up
            manager.add_request(p, request_id=f"w{i}", max_new_tokens=4)
        for _ in range(4):
            manager.get_result(timeout=120)
        todo = list(enumerate(prompts))
        in_flight = 0
        generated = 0
        t = time.perf_counter()
        while todo or in_flight:
            while todo and in_flight < concurrency:
                i, p = todo.pop(0)
                manager.add_request(p, request_id=f"r{i}", max_new_tokens=new_tokens)
                in_flight += 1
            res = manager.get_result(timeout=300)
            if res is None:
                raise RuntimeError("transformers continuous batching produced no result in 300s")
            if res.is_finished():
                in_flight -= 1
                generated += len(res.generated_tokens)
        wall = time.perf_counter() - t
    finally:
        manager.stop(block=True, timeout=10)
    return {"wall_s": wall, "generated": generated, "tok_s": generated / wall}


# -- main ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-min", type=int, default=16)
    ap.add_argument("--prompt-max", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=512)
    ap.add_argument("--prefix-requests", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attention-backend", choices=["auto", "kernel", "torch"], default="auto",
                    help="kubeforge's attention (the server's flag of the same name)")
    ap.add_argument("--hf-page-size", type=int, default=16, help="transformers' KV page size (its default: 256)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of the three systems (best kept)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["naive", "hf_cb", "prefix"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true",
                    help="a few short requests, one round: checks the script runs (" +
                         ", ".join(f"{k}={v}" for k, v in SMOKE_DEFAULTS.items()) + ")")
    if ap.parse_known_args(argv)[0].smoke:
        ap.set_defaults(**SMOKE_DEFAULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers

    load_before = os.getloadavg()
    prompts = workload(args.requests, args.prompt_min, args.prompt_max)
    kf_runs: list[dict[str, Any]] = []
    cb_runs: list[dict[str, Any]] = []
    naive_runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp))
        # other work shares this machine's cores: the three systems alternate and each keeps
        # its best round, so a burst of foreign load does not decide a ratio
        for r in range(args.rounds):
            kf_runs.append(run_kubeforge(model_dir, prompts, args))
            print(f"round {r}: kubeforge {kf_runs[-1]['tok_s']:.1f} tok/s", file=sys.stderr)
            if "hf_cb" not in args.skip:
                cb_runs.append(run_hf_cb(model_dir, prompts, args.new_tokens, args.concurrency,
                                         args.hf_page_size))
                print(f"round {r}: hf_cb {cb_runs[-1]['tok_s']:.1f} tok/s", file=sys.stderr)
            if "naive" not in args.skip:
                naive_runs.append(run_naive(model_dir, prompts, args.new_tokens))
                print(f"round {r}: naive {naive_runs[-1]['tok_s']:.1f} tok/s", file=sys.stderr)
        prefix = None if "prefix" in args.skip else run_prefix(model_dir, args)
    kf = max(kf_runs, key=lambda x: x["tok_s"])
    attention = kf["attention"]
    hf_cb = max(cb_runs, key=lambda x: x["tok_s"]) if cb_runs else None
    naive = max(naive_runs, key=lambda x: x["tok_s"]) if naive_runs else None

    cfg = LlamaConfig(**MODEL)
    result: dict[str, Any] = {
        "tok_s": {"kubeforge": round(kf["tok_s"], 1), "naive": naive and round(naive["tok_s"], 1),
                  "hf_cb": hf_cb and round(hf_cb["tok_s"], 1)},
        "ratio_vs_naive": naive and round(kf["tok_s"] / naive["tok_s"], 2),
        "ratio_vs_hf_cb": hf_cb and round(kf["tok_s"] / hf_cb["tok_s"], 2),
        "ttft_p50_ms": round(percentile(kf["ttfts"], 50) * 1e3, 1),
        "ttft_p99_ms": round(percentile(kf["ttfts"], 99) * 1e3, 1),
        "itl_p50_ms": round(percentile(kf["itls"], 50) * 1e3, 2),
        "prefix_ttft_reduction": prefix and round(prefix["prefix_ttft_reduction"], 3),
        "prefix_ttft_ms": prefix and {"cache_on": round(prefix["ttft_cache_on_ms"], 1),
                                      "cache_off": round(prefix["ttft_cache_off_ms"], 1)},
        "goals": {"ratio_vs_naive": 8, "ratio_vs_hf_cb": 1.5, "prefix_ttft_reduction": 0.5},
        "smoke": args.smoke,
        "setup": {
            "requests": args.requests, "concurrency": args.concurrency, "new_tokens_per_request": args.new_tokens,
            "prompt_tokens": [args.prompt_min + 1, args.prompt_max + 1], "greedy": True, "eos_ignored": True,
            "model": {**MODEL, "vocab_size": cfg.vocab_size, "params": cfg.num_params(), "dtype": "float32",
                      "init": "random"},
            "kubeforge": {"block_size": 16, "max_num_batched_tokens": args.max_batched_tokens, "http": False,
                          "attention_backend": args.attention_backend, "attention": attention},
            "hf_cb": {"api": "ContinuousBatchingManager", "attn_implementation": "sdpa", "page_size": args.hf_page_size,
                      "max_batch_tokens": 512},
            "transformers": transformers.__version__, "torch": torch.__version__, "torch_threads": args.threads,
            "device": "cpu", "cpu_count": os.cpu_count(), "rounds": args.rounds,
            # foreign load on the machine, 1-minute average, when the benchmark started and ended
            "loadavg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "tok_s_all_rounds": {"kubeforge": [round(x["tok_s"], 1) for x in kf_runs],
                                 "hf_cb": [round(x["tok_s"], 1) for x in cb_runs],
                                 "naive": [round(x["tok_s"], 1) for x in naive_runs]},
            "wall_s": {"kubeforge": round(kf["wall_s"], 1),
                                        "naive": naive and round(naive["wall_s"], 1),
                                        "hf_cb": hf_cb and round(hf_cb["wall_s"], 1)},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [("tok/s kubeforge", result["tok_s"]["kubeforge"]), ("tok/s naive", result["tok_s"]["naive"]),
            ("tok/s hf_cb", result["tok_s"]["hf_cb"]), ("ratio vs naive (goal 8)", result["ratio_vs_naive"]),
            ("ratio vs hf_cb (goal 1.5)", result["ratio_vs_hf_cb"]), ("TTFT p50 ms", result["ttft_p50_ms"]),
            ("TTFT p99 ms", result["ttft_p99_ms"]), ("ITL p50 ms", result["itl_p50_ms"]),
            ("prefix TTFT reduction (goal 0.5)", result["prefix_ttft_reduction"])]
    print(f"{'metric':<34}{'value':>12}")
    for name, value in rows:
        print(f"{name:<34}{'-' if value is None else value:>12}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
