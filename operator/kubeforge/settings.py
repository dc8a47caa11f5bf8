"""Operator settings, grouped with their defaults. Environment variables (KUBEFORGE_*) and
command-line flags of ``kubeforge-operator`` fill them."""

from __future__ import annotations

import dataclasses
import os

from kubeforge.api.contract import DEFAULT_WORKLOAD_IMAGE, ENV_INSPECTOR_IMAGE, ENV_WORKLOAD_IMAGE


def workload_image(requested: str | None) -> str:
    """The image a worker or server runs: the resource's own, else the operator's setting."""
    return requested or os.environ.get(ENV_WORKLOAD_IMAGE) or DEFAULT_WORKLOAD_IMAGE


def inspector_image() -> str:
    """The image of a volume CheckpointPolicy's store inspector pod: the operator's own (it
    carries ``kubeforge.store``; the chart sets ``KUBEFORGE_INSPECTOR_IMAGE``), else the workload image."""
    return os.environ.get(ENV_INSPECTOR_IMAGE) or workload_image(None)


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    """How the operator process runs."""

    #: Port of the Prometheus /metrics endpoint.
    metrics_port: int = 8081
    #: Port of the liveness endpoint (/healthz), served by kopf's probes.
    health_port: int = 8080
    #: Namespaces to watch; empty means the whole cluster.
    namespaces: tuple[str, ...] = ()
    #: "json" for one JSON object per log line, "plain" for humans.
    log_format: str = "json"
    #: Log level name.
    log_level: str = "INFO"
    #: Peering name for several replicas (kopf peering objects); empty runs standalone.
    peering: str = ""
    #: Address to bind the endpoints on.
    bind_address: str = "0.0.0.0"
    #: How often CheckpointPolicies re-check their storage and apply retention.
    retention_interval_s: float = 60.0

    @classmethod
    def from_env(cls) -> OperatorSettings:
        env = os.environ
        ns = tuple(n for n in env.get("KUBEFORGE_NAMESPACES", "").split(",") if n)
        return cls(
            metrics_port=int(env.get("KUBEFORGE_METRICS_PORT", cls.metrics_port)),
            health_port=int(env.get("KUBEFORGE_HEALTH_PORT", cls.health_port)),
            namespaces=ns,
            log_format=env.get("KUBEFORGE_LOG_FORMAT", cls.log_format),
            log_level=env.get("KUBEFORGE_LOG_LEVEL", cls.log_level),
            peering=env.get("KUBEFORGE_PEERING", cls.peering),
            bind_address=env.get("KUBEFORGE_BIND_ADDRESS", cls.bind_address),
            retention_interval_s=float(env.get("KUBEFORGE_RETENTION_INTERVAL_SECONDS", cls.retention_interval_s)),
        )
