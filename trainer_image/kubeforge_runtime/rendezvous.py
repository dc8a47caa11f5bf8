"""``python -m kubeforge_runtime.rendezvous --port 29400``: a TrainingJob's rendezvous store.

With torchrun's c10d backend the store normally lives inside the agent on the endpoint
host; when that host dies every other agent exits with a rendezvous error, and the job is
lost with one node. The operator runs this process instead, in its own small pod off the
GPU nodes, and every worker's agent connects to it as a client
(``--rdzv-conf=is_host=false``). Losing any GPU node then loses no rendezvous state: the
surviving agents restart their workers, re-rendezvous here and resume from the last
checkpoint; the replacement worker joins at the next round.

The store holds only rendezvous state (a few keys per round), so it needs little CPU and
memory. If this pod itself is lost, the agents fail, the operator counts that as an
infrastructure restart and recreates the store and the workers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
import threading
from types import FrameType

from kubeforge.api.contract import RENDEZVOUS_PORT


def serve(host: str, port: int, stop: threading.Event) -> None:
    """Host a TCPStore on ``host:port`` until ``stop`` is set."""
    # torch documents torch.distributed.TCPStore but re-exports it without `as`, which mypy reads as private
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    store = TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=dt.timedelta(seconds=300))
    logging.getLogger("kubeforge.rendezvous").info("rendezvous store listening on %s:%d", host, store.port)
    stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubeforge_runtime.rendezvous", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="0.0.0.0", help="address to listen on")
    ap.add_argument("--port", type=int, default=RENDEZVOUS_PORT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serve(args.host, args.port, stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
