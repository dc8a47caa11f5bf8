"""The operator's settings: one ``OperatorSettings`` of grouped, frozen dataclasses (in the
manner of kopf's own ``settings.posting``, ``settings.watching``...).

``main()`` builds it once, from the environment (``KUBEFORGE_*``) and then the command-line
flags of ``kubeforge-operator``, and hands it to the handlers through kopf's memo
(``memo.settings``). No module reads the environment at import, and nothing else reads it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from kubeforge.api.contract import DEFAULT_WORKLOAD_IMAGE, ENV_INSPECTOR_IMAGE, ENV_WORKLOAD_IMAGE


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
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


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """The images of the pods the operator makes."""

    #: Trainer and server pods of resources that name no image (Helm value ``workloadImage``).
    workload: str = DEFAULT_WORKLOAD_IMAGE
    #: A volume CheckpointPolicy's store inspector pod; empty: the workload image. The chart
    #: sets the operator's own (it carries ``kubeforge.store``).
    inspector: str = ""

    def inspector_image(self) -> str:
        return self.inspector or self.workload


@dataclasses.dataclass(frozen=True)
class TrainingJobSettings:
    """How the TrainingJob controller works through its queue."""

    #: Jobs reconciled at the same time (each in a thread: the Kubernetes client blocks).
    workers: int = 8
    #: How long the store's answer (lastCheckpoint) is reused before it is read again.
    store_refresh_s: float = 30.0
    #: Pause before retrying a reconciliation that raised.
    error_backoff_s: float = 5.0
    #: A key taken while this replica is not the active one waits this long, then is tried
    #: again (a replica that just became active knows it at its next read of the peering object).
    standby_retry_s: float = 2.0


@dataclasses.dataclass(frozen=True)
class CheckpointPolicySettings:
    """How often CheckpointPolicies are re-checked."""

    #: How often storage is re-checked and retention applied.
    retention_interval_s: float = 60.0
    #: A failing store is given up on quickly in the operator: the next pass tries again.
    store_retry_deadline_s: float = 10.0
    #: Threads reading one policy's store (``controllers.store_access``): a dead store holds
    #: only these, never the reconcile threads or another policy's.
    store_threads: int = 2
    #: Reads of a store that failed pause this long at most (5 s, doubling up to it).
    store_max_backoff_s: float = 60.0
    #: CheckpointPolicies whose retention runs at the same time (each in its own thread).
    retention_concurrency: int = 8


@dataclasses.dataclass(frozen=True)
class InferenceServiceSettings:
    """How the InferenceService controller polls what it cannot watch."""

    #: How often a TrainingJob's export commit marker is re-read (a newer export rolls out
    #: within this long under FollowLatest).
    export_poll_interval_s: float = 30.0
    #: A failing store is given up on quickly: the next poll tries again.
    store_retry_deadline_s: float = 10.0
    #: InferenceServices re-reconciled by one export poll at the same time.
    export_poll_concurrency: int = 8


@dataclasses.dataclass(frozen=True)
class SecuritySettings:
    """What the workloads the operator makes may reach, and who may reach them (docs/security.md)."""

    #: TrainingJob volumes may be hostPath (Helm value ``security.allowHostPathVolumes``). Off,
    #: such a job fails with reason VolumeSourceRefused: a hostPath gives the pod the node.
    allow_host_path_volumes: bool = False
    #: Every TrainingJob and InferenceService gets its NetworkPolicy (Helm value
    #: ``workloadNetworkPolicies.enabled``). Off, the operator deletes the ones it made.
    network_policies: bool = True
    #: NetworkPolicyPeers (JSON objects) that may also reach the workloads' metrics ports:
    #: Prometheus (Helm value ``workloadNetworkPolicies.scrapeFrom``). A server's /metrics is
    #: on its API port, so these reach its API too (with the API key where one is set).
    scrape_from: tuple[dict[str, Any], ...] = ()
    #: Servers of a TrainingJob's export without spec.model.credentialsSecretRef get the
    #: CheckpointPolicy's (read-write) Secret (Helm value ``security.servingPolicyCredentials``).
    #: Off, such a service shows ModelReady False, ReadOnlyCredentialsRequired.
    serving_policy_credentials: bool = False
    #: NetworkPolicyPeers (JSON objects) that select the operator's own pods (set by the chart):
    #: an InferenceService's router admits them, because a Flywheel's guard rails read the
    #: router's per-revision counters on its port.
    operator_peers: tuple[dict[str, Any], ...] = ()


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in ("1", "true", "yes")


def _peers(value: str | None, name: str = "KUBEFORGE_SCRAPE_FROM") -> tuple[dict[str, Any], ...]:
    """A JSON list of NetworkPolicyPeer objects; a malformed one stops the operator at start."""
    peers = json.loads(value) if value else []
    if not isinstance(peers, list) or not all(isinstance(p, dict) for p in peers):
        raise ValueError(f"{name} must be a JSON list of NetworkPolicyPeer objects: {value}")
    return tuple(peers)


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    process: ProcessSettings = dataclasses.field(default_factory=ProcessSettings)
    images: ImageSettings = dataclasses.field(default_factory=ImageSettings)
    trainingjob: TrainingJobSettings = dataclasses.field(default_factory=TrainingJobSettings)
    checkpointpolicy: CheckpointPolicySettings = dataclasses.field(default_factory=CheckpointPolicySettings)
    inferenceservice: InferenceServiceSettings = dataclasses.field(default_factory=InferenceServiceSettings)
    security: SecuritySettings = dataclasses.field(default_factory=SecuritySettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorSettings:
        """The settings the ``KUBEFORGE_*`` variables of ``env`` give; defaults for the rest."""
        def num(name: str, default: float) -> float:
            return float(env.get(name, default))

        p, tj = ProcessSettings, TrainingJobSettings
        cp, isvc = CheckpointPolicySettings, InferenceServiceSettings
        return cls(
            process=ProcessSettings(
                metrics_port=int(env.get("KUBEFORGE_METRICS_PORT", p.metrics_port)),
                health_port=int(env.get("KUBEFORGE_HEALTH_PORT", p.health_port)),
                namespaces=tuple(n for n in env.get("KUBEFORGE_NAMESPACES", "").split(",") if n),
                log_format=env.get("KUBEFORGE_LOG_FORMAT", p.log_format),
                log_level=env.get("KUBEFORGE_LOG_LEVEL", p.log_level),
                peering=env.get("KUBEFORGE_PEERING", p.peering),
                bind_address=env.get("KUBEFORGE_BIND_ADDRESS", p.bind_address),
            ),
            images=ImageSettings(workload=env.get(ENV_WORKLOAD_IMAGE) or DEFAULT_WORKLOAD_IMAGE,
                                 inspector=env.get(ENV_INSPECTOR_IMAGE, "")),
            trainingjob=TrainingJobSettings(
                workers=int(env.get("KUBEFORGE_TRAININGJOB_WORKERS", tj.workers)),
                store_refresh_s=num("KUBEFORGE_STORE_REFRESH_SECONDS", tj.store_refresh_s),
            ),
            checkpointpolicy=CheckpointPolicySettings(
                retention_interval_s=num("KUBEFORGE_RETENTION_INTERVAL_SECONDS", cp.retention_interval_s),
            ),
            inferenceservice=InferenceServiceSettings(
                export_poll_interval_s=num("KUBEFORGE_EXPORT_POLL_SECONDS", isvc.export_poll_interval_s),
                store_retry_deadline_s=num("KUBEFORGE_STORE_RETRY_DEADLINE_SECONDS", isvc.store_retry_deadline_s),
            ),
            security=SecuritySettings(
                allow_host_path_volumes=_flag(env.get("KUBEFORGE_ALLOW_HOST_PATH_VOLUMES"),
                                              SecuritySettings.allow_host_path_volumes),
                network_policies=_flag(env.get("KUBEFORGE_NETWORK_POLICIES"), SecuritySettings.network_policies),
                scrape_from=_peers(env.get("KUBEFORGE_SCRAPE_FROM")),
                serving_policy_credentials=_flag(env.get("KUBEFORGE_SERVING_POLICY_CREDENTIALS"),
                                                 SecuritySettings.serving_policy_credentials),
                operator_peers=_peers(env.get("KUBEFORGE_OPERATOR_PEERS"), "KUBEFORGE_OPERATOR_PEERS"),
            ),
        )
