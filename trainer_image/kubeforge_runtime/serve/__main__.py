"""``python -m kubeforge_runtime.serve --model URI --port 8000``: the serving pod's process.

Order of life: listen at once (``/health`` answers 503 "loading"), fetch and load the model
in a worker thread, warm up, then turn ready. On SIGTERM (or SIGINT): ``/health`` turns 503,
new ``/v1`` requests get 503, requests already accepted run to completion for up to
``--shutdown-timeout`` seconds, then the process exits 0. Unlike vLLM, in-flight requests are
not aborted: a rolling update or a scale-down must not cut answers off mid-sentence.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from aiohttp import web
from kubeforge.api.contract import ENV_MODEL_REVISION

from kubeforge_runtime.intmath import cdiv
from kubeforge_runtime.model.hf import eos_token_ids, load_hf
from kubeforge_runtime.serve.api import OpenAIServer, ServerSettings, ServerState
from kubeforge_runtime.serve.async_engine import AsyncEngine
from kubeforge_runtime.serve.engine import EngineConfig, LLMEngine, settle_process
from kubeforge_runtime.serve.metrics import ServingMetrics
from kubeforge_runtime.serve.model_source import fetch_model
from kubeforge_runtime.serve.sampling import SamplingParams
from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

T = TypeVar("T")

log = logging.getLogger("kubeforge_runtime.serve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kubeforge_runtime.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="Hugging Face Llama directory: a path, file:///path or s3://bucket/prefix (a TrainingJob "
                        "export is checked against its commit marker)")
    p.add_argument("--served-model-name", default=None, help="name in the API (default: the URI's last segment; the job's name for an export)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("KUBEFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $KUBEFORGE_API_KEY, else none)")
    p.add_argument("--shutdown-timeout", type=float, default=25.0,
                   help="seconds in-flight requests get to finish after SIGTERM (keep below the pod's "
                        "terminationGracePeriodSeconds)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one step at most")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--num-blocks", type=int, default=None, help="KV blocks in the pool")
    kv.add_argument("--kv-cache-memory-fraction", type=float, default=None,
                    help="fraction of device (GPU) or container (CPU) memory for weights + KV pool "
                         "(default 0.9 on a GPU, 0.2 on the CPU)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens computed per step (prefill chunks + decodes)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--max-queue-len", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn prefix caching off")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="weights and KV dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda when available)")
    p.add_argument("--attention-backend", choices=["auto", "kernel", "torch"], default="auto",
                   help="auto: the fused paged-attention kernel on the CPU in fp32, else gather + matmuls; "
                        "kernel: require it; torch: never")
    p.add_argument("--download-dir", default=os.environ.get("KUBEFORGE_DOWNLOAD_DIR",
                                                            str(Path(tempfile.gettempdir()) / "kubeforge-models")))
    p.add_argument("--expect-revision", default=os.environ.get(ENV_MODEL_REVISION) or None,
                   help="serve the export only if its commit marker has this time (env " + ENV_MODEL_REVISION + ")")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: the container's CPU limit when one is set)")
    p.add_argument("--log-level", default=os.environ.get("KUBEFORGE_LOG_LEVEL", "INFO"))
    return p.parse_args(argv)


def load_engine(args: argparse.Namespace, model_name: str) -> tuple[LLMEngine, ByteTokenizer | HFTokenizer, str]:
    """Fetch, load and warm the engine (runs in a worker thread)."""
    t0 = time.monotonic()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    directory = fetch_model(args.model, Path(args.download_dir), args.expect_revision)
    model = load_hf(directory, device=device, dtype=dtype)
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model only {model.cfg.vocab_size}")
    cfg = EngineConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                       kv_cache_memory_fraction=args.kv_cache_memory_fraction, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                       enable_prefix_caching=args.enable_prefix_caching, attention_backend=args.attention_backend)
    engine = LLMEngine(model, tokenizer, cfg, ServingMetrics(model_name), eos_token_ids(directory))
    warm_up(engine)
    log.info("process settings: %s", "; ".join(settle_process()))
    log.info("model %s loaded in %.1fs: %s on %s %s, %d KV blocks of %d tokens, max_model_len %d, attention %s",
             args.model, time.monotonic() - t0, type(tokenizer).__name__, device, dtype, engine.num_blocks,
             cfg.block_size, engine.max_model_len,
             "native CPU ops (paged-attention kernel)" if engine.runner.kernel is not None else "torch")
    return engine, tokenizer, str(directory)


def warm_up(engine: LLMEngine) -> None:
    """A prefill and a few decodes so the first user request does not pay for lazy kernel
    and allocator set-up; counted in throwaway metrics, and the cache it leaves is dropped."""
    real = engine.metrics
    engine.metrics = ServingMetrics("warmup")
    try:
        n = min(64, engine.max_model_len - 9)
        engine.add_request("warmup-0", [1] * n, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        engine.add_request("warmup-1", [2] * 3, SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        engine.pool.reset_prefix_cache()
    finally:
        engine.metrics = real


def default_model_name(uri: str) -> str:
    """The URI's last path segment, or the job's name for a store export
    (``.../<namespace>/<job>/export``, or a run's ``.../<job>/runs/<uid>/export``)."""
    parts = [p for p in uri.rstrip("/").split("/") if p]
    if len(parts) >= 4 and parts[-1] == "export" and parts[-3] == "runs":
        return parts[-4]
    if len(parts) >= 2 and parts[-1] == "export":
        return parts[-2]
    return parts[-1] if parts else "model"


def in_daemon_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run ``fn`` on a daemon thread: unlike the default executor, a load still downloading
    when SIGTERM arrives does not keep the process from exiting."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if not fut.done():
            fut.set_exception(exc) if exc is not None else fut.set_result(result)

    def run() -> None:
        try:
            result, exc = fn(*args), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:
            pass  # the loop is gone: the process is exiting

    threading.Thread(target=run, name="model-load", daemon=True).start()
    return fut


async def serve(args: argparse.Namespace) -> int:
    model_name = args.served_model_name or default_model_name(args.model)
    state = ServerState()
    server = OpenAIServer(ServerSettings(model_name=model_name, api_key=args.api_key,
                                         max_queue_len=args.max_queue_len), state)
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, shutdown_timeout=1.0)
    await site.start()
    log.info("listening on %s:%d (not ready until the model is loaded)", args.host, args.port)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    load = in_daemon_thread(load_engine, args, model_name)
    stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    pending: set[asyncio.Future[Any]] = {load, stopper}
    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    engine: AsyncEngine | None = None
    rc = 0
    if load.done():
        try:
            llm, tokenizer, root = load.result()
        except Exception as e:
            log.exception("model load failed")
            state.load_error = f"model load failed: {e}"
            rc = 1
        else:
            engine = AsyncEngine(llm)
            engine.start()
            server.attach(engine, tokenizer, root)
            state.ready = True
            log.info("ready")
            await stopper
    stopper.cancel()

    state.draining = True
    if engine is not None:
        log.info("draining: %d requests in flight, up to %.0fs", state.in_flight, args.shutdown_timeout)
        deadline = time.monotonic() + args.shutdown_timeout
        while state.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.in_flight:
            log.warning("shutdown timeout: %d requests still in flight are cut off", state.in_flight)
        else:
            log.info("drained")
    await runner.cleanup()
    if engine is not None:
        engine.stop()
    return rc


def cgroup_cpu_limit() -> int | None:
    """Whole CPUs of the container's quota (cgroup v2 ``cpu.max``), if there is one. torch
    otherwise starts one OpenMP thread per host core, and threads spinning beyond the quota
    make small matmuls many times slower."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, cdiv(int(quota), int(period)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = args.threads or cgroup_cpu_limit()
    if threads:
        torch.set_num_threads(threads)
    rc = asyncio.run(serve(args))
    # a load still running in its thread (SIGTERM while downloading) must not hold the exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    main()
