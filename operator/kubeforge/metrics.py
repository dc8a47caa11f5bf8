"""The operator's Prometheus metrics. Every decision the operator takes moves one of these."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_TOTAL = Counter("kubeforge_reconcile_total", "Reconciliations by kind and result.", ["kind", "result"])
RECONCILE_DURATION = Histogram("kubeforge_reconcile_duration_seconds", "Time spent in one reconciliation.", ["kind"])
TRAININGJOBS = Gauge("kubeforge_trainingjobs", "TrainingJobs by phase.", ["phase"])
WORKER_REPLACEMENTS = Counter("kubeforge_worker_replacements_total", "Worker pods replaced, by reason.", ["reason"])
OPERATOR_ACTIVE = Gauge("kubeforge_operator_active",
                        "1 while this replica is the active one among its peers (always 1 without peering).")
INFERENCESERVICES_READY = Gauge("kubeforge_inferenceservices_ready", "InferenceServices whose Ready condition is True.")
INFERENCESERVICE_READY = Gauge("kubeforge_inferenceservice_ready",
                               "1 while an InferenceService's Ready condition is True, else 0; gone once it is deleted.",
                               ["namespace", "inferenceservice"])


@contextlib.contextmanager
def reconciling(kind: str) -> Iterator[None]:
    """Count and time one reconciliation; an exception counts as result="error"."""
    t0 = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILE_TOTAL.labels(kind, "error").inc()
        raise
    else:
        RECONCILE_TOTAL.labels(kind, "success").inc()
    finally:
        RECONCILE_DURATION.labels(kind).observe(time.perf_counter() - t0)
STORE_REACHABLE = Gauge("kubeforge_store_reachable",
                        "1 when the operator's last read of a CheckpointPolicy's S3 store succeeded, 0 while it "
                        "is down (its reads pause with a backoff, nothing else waits for it).",
                        ["namespace", "policy"])
CHECKPOINTS_DELETED = Counter("kubeforge_checkpoints_deleted_total", "Checkpoints deleted by retention.")
STORE_INSPECTIONS = Counter("kubeforge_store_inspections_total",
                            "Passes of the store inspector pod of volume CheckpointPolicies, by result.", ["result"])
LAST_CHECKPOINT_TIME = Gauge("kubeforge_trainingjob_last_checkpoint_timestamp_seconds",
                             "Commit time of a TrainingJob's newest checkpoint (Unix seconds).",
                             ["namespace", "trainingjob"])
CHECKPOINT_INTERVAL = Gauge("kubeforge_trainingjob_checkpoint_interval_seconds",
                            "The checkpoint interval of a TrainingJob's policy (schedule.everySeconds).",
                            ["namespace", "trainingjob"])
DRIFT_PSI = Gauge("kubeforge_drift_psi",
                  "Population Stability Index of an InferenceService's live prompts against the served export's "
                  "training baseline, per feature (prompt_length, token_frequency); present only while measured.",
                  ["namespace", "service", "feature"])
DATASET_RECORDS = Gauge("kubeforge_dataset_records",
                        "Records per split (train, eval) of a Dataset's newest committed version.",
                        ["namespace", "dataset", "split"])
DATASET_PENDING_RECORDS = Gauge("kubeforge_dataset_pending_records",
                                "Captured request records of a Dataset's source that no committed version curated yet.",
                                ["namespace", "dataset"])
DATASET_CURATIONS = Counter("kubeforge_dataset_curations_total",
                            "Curations of a Dataset by outcome: succeeded (a version committed), failed, source_empty.",
                            ["namespace", "dataset", "outcome"])
DATASET_RETENTION_DELETED = Counter("kubeforge_dataset_retention_deleted_total",
                                    "What a Dataset's retention deleted from its store: version, incomplete_version "
                                    "or shard.", ["namespace", "dataset", "what"])
FLYWHEEL_CYCLES = Counter("kubeforge_flywheel_cycles_total",
                          "Flywheel cycles by outcome: Promoted, RolledBack, Rejected (the evaluation gate), Failed.",
                          ["namespace", "flywheel", "outcome"])
FLYWHEEL_CANDIDATE_PERCENT = Gauge("kubeforge_flywheel_candidate_percent",
                                   "The share of requests the current candidate answers (canary) or is copied (shadow); "
                                   "0 between rollouts.", ["namespace", "flywheel", "role"])


def remove_series(metric: Counter | Gauge | Histogram, *labels: str) -> None:
    """Drop one labelled series of ``metric``; one that was never set is no error."""
    try:
        metric.remove(*labels)
    except KeyError:
        pass
