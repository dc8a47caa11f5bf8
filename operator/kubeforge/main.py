"""``kubeforge-operator``: the kopf operator process with health and metrics endpoints."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
from typing import Any

import kopf
from prometheus_client import start_http_server

from kubeforge.settings import OperatorSettings

ANNOTATION_PREFIX = "kubeforge.dev"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # progress and diff-base in annotations: status holds only what our schema describes
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    settings.execution.max_workers = 20
    settings.batching.worker_limit = 100


def main(argv: list[str] | None = None) -> int:
    defaults = OperatorSettings.from_env()
    ap = argparse.ArgumentParser(description="Run the kubeforge operator.")
    ap.add_argument("--namespace", "-n", action="append", default=list(defaults.namespaces),
                    help="namespace to watch (repeatable); none means all")
    ap.add_argument("--metrics-port", type=int, default=defaults.metrics_port)
    ap.add_argument("--health-port", type=int, default=defaults.health_port)
    ap.add_argument("--bind-address", default=defaults.bind_address)
    ap.add_argument("--log-format", choices=["json", "plain"], default=defaults.log_format)
    ap.add_argument("--log-level", default=defaults.log_level)
    ap.add_argument("--peering", default=defaults.peering, help="kopf peering name; empty runs standalone")
    args = ap.parse_args(argv)

    import kubeforge.controllers  # noqa: F401  (registers the handlers)

    kopf.configure(log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
                   verbose=args.log_level.upper() == "DEBUG")
    logging.getLogger().setLevel(args.log_level.upper())
    start_http_server(args.metrics_port, addr=args.bind_address)
    logging.getLogger("kubeforge").info("metrics on %s:%d, health on %s:%d", args.bind_address, args.metrics_port,
                                        args.bind_address, args.health_port)
    # kopf pauses every peer of equal priority ("Pausing all operators, including self"), so
    # replicas that all kept the default handled nothing: each draws a priority of its own,
    # and the highest one is the single active replica
    priority = secrets.randbelow(2**31 - 1) + 1 if args.peering else 0
    if args.peering:
        logging.getLogger("kubeforge").info("peering %s with priority %d", args.peering, priority)
    asyncio.run(kopf.operator(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=not args.peering,
        peering_name=args.peering or None,
        priority=priority,
        liveness_endpoint=f"http://{args.bind_address}:{args.health_port}/healthz",
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
