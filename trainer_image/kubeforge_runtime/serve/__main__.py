"""``python -m kubeforge_runtime.serve --model URI --port 8000``: the serving pod's process.

Order of life: listen at once (``/health`` answers 503 "loading"), fetch and load the model
in a worker thread, warm up, then turn ready. On SIGTERM (or SIGINT): ``/health`` turns 503,
new ``/v1`` requests get 503, requests already accepted run to completion for up to
``--shutdown-timeout`` seconds, then the process exits 0. Unlike vLLM, in-flight requests are
not aborted: a rolling update or a scale-down must not cut answers off mid-sentence.

With ``--capture-uri``, sampled requests and all feedback are written to the store by a
background thread (``serve/capture.py``); the drain then closes it last, flushing what is
queued into final shards and the prompt profile within the shutdown budget.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
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
from kubeforge_runtime.redact import Redactor
from kubeforge_runtime.serve.api import OpenAIServer, ServerSettings, ServerState
from kubeforge_runtime.serve.async_engine import AsyncEngine
from kubeforge_runtime.serve.capture import CaptureSettings, CaptureWriter, open_capture_backend, writer_name
from kubeforge_runtime.serve.engine import EngineConfig, LLMEngine, settle_process
from kubeforge_runtime.serve.feedback import DEFAULT_TTL_S, CompletionIds
from kubeforge_runtime.serve.metrics import CaptureMetrics, ServingMetrics
from kubeforge_runtime.serve.model_source import fetch_model
from kubeforge_runtime.serve.sampling import SamplingParams
from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

T = TypeVar("T")

log = logging.getLogger("kubeforge_runtime.serve")

#: share of the shutdown budget (at most CAPTURE_DRAIN_MAX_S) kept for flushing capture
CAPTURE_DRAIN_SHARE = 0.2
CAPTURE_DRAIN_MAX_S = 5.0

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
    add_capture_args(p)
    args = p.parse_args(argv)
    check_capture_args(p, args)
    return args


def add_capture_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("capture and feedback (the data flywheel; docs/flywheel.md)")
    g.add_argument("--capture-uri", default=None,
                   help="capture directory, s3://bucket/prefix/<ns>/<svc>/capture or file:///...; unset: capture "
                        "and feedback are off")
    g.add_argument("--capture-s3-endpoint", default=os.environ.get("KUBEFORGE_CAPTURE_S3_ENDPOINT") or None,
                   help="S3 endpoint of the capture store (env KUBEFORGE_CAPTURE_S3_ENDPOINT); credentials from "
                        "KUBEFORGE_CAPTURE_AWS_ACCESS_KEY_ID/_SECRET_ACCESS_KEY, else AWS_*")
    g.add_argument("--capture-s3-region", default=os.environ.get("KUBEFORGE_CAPTURE_S3_REGION") or None,
                   help="S3 region of the capture store (env KUBEFORGE_CAPTURE_S3_REGION); without it, "
                        "boto's default applies: AWS_REGION, which in a server pod is the model store's")
    g.add_argument("--capture-s3-force-path-style", action=argparse.BooleanOptionalAction, default=True,
                   help="path-style addressing of the capture store (MinIO and most S3-compatible stores); "
                        "--no-capture-s3-force-path-style for virtual-hosted buckets")
    g.add_argument("--capture-sample-rate", type=float, default=1.0, help="share of requests recorded, 0..1")
    g.add_argument("--no-capture-redact", dest="capture_redact", action="store_false",
                   help="record prompts and completions as they are (PII redaction is on by default)")
    g.add_argument("--capture-redact-pattern", action="append", default=[], metavar="NAME=RE",
                   help="also replace matches of RE by <NAME> (repeatable)")
    g.add_argument("--capture-max-record-bytes", type=int, default=65536,
                   help="a record's JSON is cut to this size (truncated=true)")
    g.add_argument("--capture-queue-size", type=int, default=10000,
                   help="records held in memory for the writer; beyond, dropped and counted")
    g.add_argument("--capture-shard-records", type=int, default=1000, help="records per shard at most")
    g.add_argument("--capture-shard-seconds", type=float, default=60.0, help="seconds a shard stays open at most")
    g.add_argument("--capture-writer", default=os.environ.get("KUBEFORGE_POD_NAME") or socket.gethostname(),
                   help="this server's name in shard and profile names (env KUBEFORGE_POD_NAME, else the host name)")
    g.add_argument("--feedback-key", default=os.environ.get("KUBEFORGE_FEEDBACK_KEY") or None,
                   help="HMAC key signing completion ids, shared by all replicas (env KUBEFORGE_FEEDBACK_KEY); "
                        "without one a per-process key is drawn and feedback verifies only here")
    g.add_argument("--feedback-ttl-seconds", type=float, default=DEFAULT_TTL_S,
                   help="feedback is accepted this long after the answer")
    g.add_argument("--drift-window", type=int, default=500, help="prompts per live-profile window")
    g.add_argument("--profile-interval-seconds", type=float, default=30.0,
                   help="how often the live prompt profile is written to the store")
    g.add_argument("--served-revision", default=os.environ.get(ENV_MODEL_REVISION) or None,
                   help="revision recorded with each captured request (env " + ENV_MODEL_REVISION + ")")


def check_capture_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0.0 <= args.capture_sample_rate <= 1.0:
        p.error(f"--capture-sample-rate must be within 0..1, got {args.capture_sample_rate}")
    for name, low in [("capture_max_record_bytes", 1024), ("capture_queue_size", 1), ("capture_shard_records", 1),
                      ("drift_window", 1)]:
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}")
    for name in ("capture_shard_seconds", "profile_interval_seconds", "feedback_ttl_seconds"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be above 0")
    patterns = []
    for item in args.capture_redact_pattern:
        name, sep, regex = item.partition("=")
        if not sep or not regex:
            p.error(f"--capture-redact-pattern must be NAME=REGEX, got {item!r}")
        patterns.append((name, regex))
    try:
        Redactor(patterns)
    except ValueError as e:
        p.error(f"--capture-redact-pattern: {e}")
    args.capture_redact_patterns = tuple(patterns)


def capture_settings(args: argparse.Namespace) -> CaptureSettings:
    return CaptureSettings(
        sample_rate=args.capture_sample_rate, redact=args.capture_redact, redact_patterns=args.capture_redact_patterns,
        max_record_bytes=args.capture_max_record_bytes, queue_size=args.capture_queue_size,
        shard_records=args.capture_shard_records, shard_seconds=args.capture_shard_seconds,
        writer=writer_name(args.capture_writer), drift_window=args.drift_window,
        profile_interval_s=args.profile_interval_seconds)


def completion_ids(args: argparse.Namespace) -> CompletionIds:
    if args.feedback_key:
        return CompletionIds(args.feedback_key.encode(), args.feedback_ttl_seconds)
    if args.capture_uri:
        log.warning("no --feedback-key (KUBEFORGE_FEEDBACK_KEY): completion ids are signed with a key of this "
                    "process, so feedback verifies only on this replica and only until it restarts")
    return CompletionIds.random_key(args.feedback_ttl_seconds)


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
                                         max_queue_len=args.max_queue_len, served_revision=args.served_revision,
                                         max_correction_bytes=args.capture_max_record_bytes // 2),
                          state, completion_ids(args))
    # opened before listening so that a malformed URI fails the pod at once; an unreachable
    # store is not checked: it costs records (counted), never the service
    capture_backend = None
    if args.capture_uri:
        env = os.environ.get
        capture_backend = open_capture_backend(
            args.capture_uri, args.capture_s3_endpoint,
            env("KUBEFORGE_CAPTURE_AWS_ACCESS_KEY_ID") or env("AWS_ACCESS_KEY_ID") or None,
            env("KUBEFORGE_CAPTURE_AWS_SECRET_ACCESS_KEY") or env("AWS_SECRET_ACCESS_KEY") or None,
            region=args.capture_s3_region, force_path_style=args.capture_s3_force_path_style)
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
    capture: CaptureWriter | None = None
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
            if capture_backend is not None:
                capture = CaptureWriter(capture_backend, capture_settings(args),
                                        CaptureMetrics(model_name, llm.metrics.registry), tokenizer.decode,
                                        tokenizer.encode)
                capture.start()
                log.info("capturing %.0f%% of requests to %s (redaction %s)", 100 * args.capture_sample_rate,
                         capture_backend.uri, "on" if args.capture_redact else "off")
            server.attach(engine, tokenizer, root, capture)
            state.ready = True
            log.info("ready")
            await stopper
    stopper.cancel()

    state.draining = True
    deadline = time.monotonic() + args.shutdown_timeout
    if engine is not None:
        log.info("draining: %d requests in flight, up to %.0fs", state.in_flight, args.shutdown_timeout)
        # the capture flush comes last, inside the same budget
        requests_deadline = deadline - (min(CAPTURE_DRAIN_MAX_S, CAPTURE_DRAIN_SHARE * args.shutdown_timeout)
                                        if capture is not None else 0.0)
        while state.in_flight and time.monotonic() < requests_deadline:
            await asyncio.sleep(0.05)
        if state.in_flight:
            log.warning("shutdown timeout: %d requests still in flight are cut off", state.in_flight)
        else:
            log.info("drained")
    await runner.cleanup()
    if capture is not None:
        if await asyncio.to_thread(capture.close, max(0.5, deadline - time.monotonic())):
            log.info("capture flushed")
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
