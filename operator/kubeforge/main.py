"""``kubeforge-operator``: the kopf operator process with health and metrics endpoints."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import logging
import os
import secrets
from typing import Any, cast

import kopf
from prometheus_client import start_http_server

from kubeforge.controllers.background import Background
from kubeforge.controllers.peering import Peering
from kubeforge.controllers.store_access import StoreAccess
from kubeforge.metrics import OPERATOR_ACTIVE
from kubeforge.settings import OperatorSettings

#: The handler modules; importing one registers its handlers (nothing else imports them).
HANDLERS = ("kubeforge.controllers.trainingjob.handlers", "kubeforge.controllers.checkpointpolicy.handlers",
            "kubeforge.controllers.inferenceservice.handlers", "kubeforge.controllers.dataset.handlers",
            "kubeforge.controllers.flywheel.handlers")

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


#: How often a replica reads the peering object to know whether it is the active one.
PEERING_REFRESH_S = 2.0


@kopf.on.startup()
async def start_peering(memo: kopf.Memo, **_: Any) -> None:
    peering = cast(Peering, memo.peering)

    async def refresh() -> None:
        OPERATOR_ACTIVE.set(1 if await asyncio.to_thread(peering.refresh) else 0)

    await refresh()
    cast(Background, memo.background).every("peering", PEERING_REFRESH_S, refresh, always=True)


@kopf.on.probe(id="peering")
def peering_probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """In /healthz: whether this replica is the active one, and its priority."""
    peering = cast(Peering, memo.peering)
    return {"state": peering.state, "priority": peering.priority, "name": peering.name}


@kopf.on.cleanup()
async def stop_background(memo: kopf.Memo, **_: Any) -> None:
    """Every task the controllers started, and their thread pools, end with the operator."""
    await cast(Background, memo.background).stop()


def parse_settings(argv: list[str] | None, env: dict[str, str]) -> OperatorSettings:
    """The settings: the environment's, then the flags'."""
    base = OperatorSettings.from_env(env)
    defaults = base.process
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
    process = dataclasses.replace(
        defaults, namespaces=tuple(args.namespace), metrics_port=args.metrics_port, health_port=args.health_port,
        bind_address=args.bind_address, log_format=args.log_format, log_level=args.log_level, peering=args.peering)
    return dataclasses.replace(base, process=process)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv, dict(os.environ))
    p = settings.process
    for module in HANDLERS:
        importlib.import_module(module)

    kopf.configure(log_format=kopf.LogFormat.JSON if p.log_format == "json" else kopf.LogFormat.PLAIN,
                   verbose=p.log_level.upper() == "DEBUG")
    logging.getLogger().setLevel(p.log_level.upper())
    start_http_server(p.metrics_port, addr=p.bind_address)
    logging.getLogger("kubeforge").info("metrics on %s:%d, health on %s:%d", p.bind_address, p.metrics_port,
                                        p.bind_address, p.health_port)
    # kopf pauses every peer of equal priority ("Pausing all operators, including self"), so
    # replicas that all kept the default handled nothing: each draws a priority of its own,
    # and the highest one is the single active replica
    priority = secrets.randbelow(2**31 - 1) + 1 if p.peering else 0
    if p.peering:
        logging.getLogger("kubeforge").info("peering %s with priority %d", p.peering, priority)
    # the memo every handler gets (kopf copies it per object, shallowly): the settings, and
    # the background tasks' owner; each kind's startup handler adds its state
    peering = Peering(p.peering or None, priority, p.namespaces[0] if p.namespaces else None)
    background = Background(active=lambda: peering.active)
    # every controller's reads of S3 stores: off the reconcile threads, failures cached per store
    stores = StoreAccess(settings.checkpointpolicy.store_threads,
                         max_backoff_s=settings.checkpointpolicy.store_max_backoff_s)
    background.close_with(stores.close)
    memo = kopf.Memo(settings=settings, background=background, peering=peering, stores=stores)
    asyncio.run(kopf.operator(
        clusterwide=not p.namespaces,
        namespaces=list(p.namespaces),
        standalone=not p.peering,
        peering_name=p.peering or None,
        priority=priority,
        liveness_endpoint=f"http://{p.bind_address}:{p.health_port}/healthz",
        memo=memo,
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
