"""``python -m kubeforge_runtime.route --config FILE``: the router in front of an
InferenceService's revisions (stable, and a canary and/or a shadow).

The config (JSON, ``split.RouterConfig``) is reread when the file changes (a mounted
ConfigMap is updated in place), so a canary step or a rollback needs no restart; a file that
does not parse leaves the previous config in force and is counted. On SIGTERM ``/health``
turns 503, new requests get 503, and the router exits once the requests in flight have
finished or ``--shutdown-timeout`` has passed.

Exit codes: 0 after a drain; 78 the config cannot work at start (never retried).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

from aiohttp import web
from kubeforge.api.contract import ExitCode
from pydantic import ValidationError

from kubeforge_runtime.route.proxy import Router
from kubeforge_runtime.route.split import RouterConfig

log = logging.getLogger("kubeforge.route")
RELOAD_POLL_S = 1.0


def read_config(path: Path) -> RouterConfig:
    """The config, or ValueError naming the field."""
    try:
        return RouterConfig.model_validate_json(path.read_bytes())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except ValidationError as e:
        parts = [f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors()]
        raise ValueError(f"{path}: " + "; ".join(parts)) from None


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()  # a ConfigMap volume swaps a symlink: follow it
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


async def watch_config(path: Path, router: Router) -> None:
    seen = _stamp(path)
    while True:
        await asyncio.sleep(RELOAD_POLL_S)
        now = _stamp(path)
        if now == seen or now is None:
            continue
        seen = now
        try:
            config = read_config(path)
        except ValueError as e:
            router.metrics.config_errors.inc()
            log.error("config not reloaded, the previous one stays: %s", e)
            continue
        if config != router.config:
            router.update(config)
            log.info("config reloaded: %s", config.model_dump_json(exclude_none=True))


async def serve(args: argparse.Namespace, config: RouterConfig) -> int:
    router = Router(config)
    # a client that hangs up cancels its handler, and with it the upstream request
    runner = web.AppRunner(router.app(), handle_signals=False, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    log.info("routing on %s:%d: %s", args.host, args.port, config.model_dump_json(exclude_none=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(watch_config(Path(args.config), router))
    await stop.wait()
    router.draining = True
    deadline = time.monotonic() + args.shutdown_timeout
    log.info("draining: %d requests in flight, up to %.0fs", router.in_flight, args.shutdown_timeout)
    while router.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    watcher.cancel()
    await runner.cleanup()
    log.info("drained" if not router.in_flight else "shutdown timeout: %d requests cut", router.in_flight)
    return int(ExitCode.SUCCESS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubeforge_runtime.route", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="router config JSON file (reread when it changes)")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="seconds in-flight requests get to finish after SIGTERM")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        config = read_config(Path(args.config))
    except ValueError as e:
        print(f"kubeforge: configuration error: {e}", file=sys.stderr, flush=True)
        return int(ExitCode.CONFIG_ERROR)
    return asyncio.run(serve(args, config))


if __name__ == "__main__":
    sys.exit(main())
