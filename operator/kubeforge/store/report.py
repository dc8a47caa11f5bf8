"""What a CheckpointPolicy reports and deletes, as one pass over a store.

Each TrainingJob is looked at in its own run (``job_run``): retention never touches the runs
of deleted objects of the same name, and a job's entry reports its own run only.

The operator runs it itself against S3; for a volume store (a PersistentVolumeClaim the
operator cannot mount) the same pass runs in a short-lived inspector pod that mounts the
claim (``python -m kubeforge.store.inspector``) and hands its result back as the pod's
termination message. One function, so both paths keep and report exactly the same things.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from kubeforge.store.layout import run_key
from kubeforge.store.retention import plan_retention
from kubeforge.store.store import Store

#: Ready reasons of a job whose new run is being recorded (the operator waits for ``status.run``
#: to read back before any pod) or whose CRD drops ``status.run``: see ``trainingjob.plan``.
RECORDING_RUN = "RecordingRun"
CRD_OUTDATED = "CRDOutdated"


def started_before_runs(status: dict[str, Any]) -> bool:
    """Whether a job without ``status.run`` already ran under an operator that keyed the store
    by name only: its pods exist or existed (worker records), it started, checkpointed or ended.
    Such a job keeps its legacy run ``<job>``, where its own checkpoints are. Not a job that this
    operator holds while its run is recorded (or cannot be: an outdated CRD): whatever else its
    status says, its run is the new one, so it never flips."""
    reasons = {c.get("reason") for c in status.get("conditions") or [] if c.get("type") == "Ready"}
    if reasons & {RECORDING_RUN, CRD_OUTDATED}:
        return False
    records = status.get("workerPods") or []
    return bool(status.get("startTime") or status.get("lastCheckpoint") or status.get("completionTime")
                or status.get("exportUri") or any(r.get("uid") or int(r.get("attempt") or 0) > 0 for r in records))


def job_run(job: dict[str, Any]) -> str:
    """The run (store key, ``layout.run_key``) of a TrainingJob as stored: ``status.run`` once
    the operator recorded it, else what it will record: the legacy run for a job that
    started before runs were keyed by uid, else ``<job>/runs/<uid>``."""
    status, meta = job.get("status") or {}, job["metadata"]
    if status.get("run"):
        return str(status["run"])
    return run_key(meta["name"], None if started_before_runs(status) else meta["uid"])


@dataclasses.dataclass(frozen=True)
class JobRef:
    """A TrainingJob using the policy: its name, the step its status last reported, and its
    run (where its checkpoints are; None: the legacy run named like the job)."""

    name: str
    last_step: int | None = None
    run: str | None = None

    @property
    def store_key(self) -> str:
        return self.run or self.name

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> JobRef:
        last = (job.get("status") or {}).get("lastCheckpoint") or {}
        return cls(job["metadata"]["name"], int(last["step"]) if "step" in last else None, job_run(job))


@dataclasses.dataclass(frozen=True)
class RetentionRule:
    keep_last: int
    keep_every: int | None
    incomplete_grace_seconds: float


@dataclasses.dataclass
class StoreReport:
    """Per-job summaries (the policy's ``status.jobs`` entries) and what retention deleted."""

    jobs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    deleted: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def dump(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "deleted": self.deleted}


def job_summary(store: Store, namespace: str, job: str, name: str | None = None) -> dict[str, Any]:
    """One ``status.jobs`` entry for run ``job`` of TrainingJob ``name`` (default: the run is
    the legacy one, named like the job): committed count and bytes, newest step, time and URI,
    and the export when it is committed."""
    s = store.summary(namespace, job)
    entry: dict[str, Any] = {"name": name or job, "committed": s.committed, "bytes": s.bytes}
    if name is not None and name != job:
        entry["run"] = job
    if s.newest_step is not None:
        entry["newestStep"] = s.newest_step
        entry["newestUri"] = store.checkpoint_uri(namespace, job, s.newest_step)
    if s.newest_time:
        entry["newestTime"] = s.newest_time
    if s.unloadable:
        entry["unloadable"] = s.unloadable
    export = store.export_marker(namespace, job)
    if export is not None:
        entry["exportUri"] = store.export_uri(namespace, job)
        entry["exportTime"] = export.time
    return entry


def protected_steps(store: Store, namespace: str, job: JobRef) -> set[int]:
    """Never deleted: the checkpoint a job last reported, the one its rank 0 is restoring right
    now (a fallback after a corrupt newest one can be older than what retention keeps), and the
    ones other runs are resuming from (``spec.resumeFrom``: each reader leases its own)."""
    out = {job.last_step} if job.last_step is not None else set()
    return out | store.restoring_steps(namespace, job.store_key)


def inspect_store(store: Store, namespace: str, jobs: Sequence[JobRef],
                  retention: RetentionRule | None) -> StoreReport:
    """Apply ``retention`` (when given) to every job's checkpoints, then summarise them."""
    report = StoreReport()
    for job in jobs:
        if retention is not None:
            plan = plan_retention(store.list_checkpoints(namespace, job.store_key), keep_last=retention.keep_last,
                                  keep_every=retention.keep_every,
                                  protected_steps=protected_steps(store, namespace, job),
                                  incomplete_grace_seconds=retention.incomplete_grace_seconds)
            deleted = store.apply_retention(namespace, job.store_key, plan)
            if deleted:
                report.deleted[job.name] = deleted
        report.jobs.append(job_summary(store, namespace, job.store_key, job.name))
    return report


def job_refs(jobs: Iterable[dict[str, Any]]) -> list[JobRef]:
    return [JobRef.from_job(j) for j in jobs]
