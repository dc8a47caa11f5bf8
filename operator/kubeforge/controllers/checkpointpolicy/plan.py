"""What a CheckpointPolicy controller decides, as pure functions: whether its storage is
usable (``secret_check``), and for a volume what one look at its store inspector pod
(``manifests.build_inspector_pod``) means: ``inspector_result`` reads the pod's report,
``plan_volume_pass`` decides what to write and do.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

from kubeforge.api import CheckpointPolicySpec
from kubeforge.api.contract import CHECKPOINT_MOUNT_DIR
from kubeforge.controllers.checkpointpolicy.manifests import CONTAINER, DEADLINE_S, INSPECTOR_LABEL, inspector_name
from kubeforge.controllers.status import Condition
from kubeforge.store import CREDENTIAL_KEYS, checkpoint_prefix, export_prefix, storage_uri

#: The operator deletes an inspector pod that has not finished this long after its creation
#: (never scheduled, stuck on a lost node, waiting for a volume to attach).
STUCK_S = DEADLINE_S + 120


@dataclasses.dataclass(frozen=True)
class StorageCheck:
    """The outcome of checking a policy's storage: a condition's status, reason and message."""

    ok: bool
    reason: str
    message: str


def secret_check(name: str, data: dict[str, str] | None) -> StorageCheck | None:
    """None when the Secret is usable, else why not."""
    if data is None:
        return StorageCheck(False, "SecretNotFound", f"Secret {name} does not exist")
    missing = [k for k in CREDENTIAL_KEYS if not data.get(k)]
    if missing:
        return StorageCheck(False, "SecretMissingKeys", f"Secret {name} must have keys {', '.join(missing)}")
    return None


@dataclasses.dataclass(frozen=True)
class InspectorResult:
    """What an inspector pod says: not finished yet, a report, or why it failed."""

    finished: bool
    report: dict[str, Any] | None = None
    error: str | None = None
    #: while not finished: the pod's phase and what it waits for (scheduling, a volume, the image)
    waiting: str | None = None


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            term: dict[str, Any] | None = (cs.get("state") or {}).get("terminated")
            return term
    return None


def inspector_result(pod: dict[str, Any]) -> InspectorResult:
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    term = _terminated(pod)
    if phase not in ("Succeeded", "Failed") and term is None:
        why = next((f"{c.get('reason')}: {c.get('message')}" for c in status.get("conditions") or []
                    if c.get("type") == "PodScheduled" and c.get("status") == "False"), None)
        if why is None:
            why = next((f"{w.get('reason')}" + (f": {w['message']}" if w.get("message") else "")
                        for cs in status.get("containerStatuses") or []
                        if (w := (cs.get("state") or {}).get("waiting"))), None)
        return InspectorResult(False, waiting=f"{phase}" + (f" ({why})" if why else ""))
    if term is None:  # e.g. killed at activeDeadlineSeconds before the container reported
        return InspectorResult(True, error=f"pod {phase}: {status.get('reason') or ''} {status.get('message') or ''}"
                               .strip())
    message = term.get("message") or ""
    try:
        body = json.loads(message)
    except json.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        return InspectorResult(True, error=f"exit code {term.get('exitCode')}, {term.get('reason') or ''}: "
                                           f"{message[:300] or 'no termination message'}")
    if term.get("exitCode") != 0 or "error" in body:
        return InspectorResult(True, error=str(body.get("error") or f"exit code {term.get('exitCode')}"))
    if not _well_formed(body):
        return InspectorResult(True, error=f"unexpected termination message: {message[:300]}")
    return InspectorResult(True, report=body)


def _well_formed(body: dict[str, Any]) -> bool:
    jobs, deleted, counts = body.get("jobs"), body.get("deleted", {}), body.get("deletedCount", {})
    return (isinstance(jobs, list) and all(isinstance(j, dict) and isinstance(j.get("name"), str) for j in jobs)
            and isinstance(deleted, dict) and isinstance(counts, dict)
            and all(isinstance(v, list) and all(isinstance(x, int) for x in v) for v in deleted.values())
            and all(isinstance(v, int) for v in counts.values()))


@dataclasses.dataclass
class VolumePass:
    """What one look at a policy's inspector pod decided. Applied in this order: status (with
    ``fields`` and ``condition``) first, then the Events and metrics of a collected pass, then
    ``collect`` (the finished pod) is deleted, then, with ``start``, the next pass begins."""

    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    condition: Condition | None = None
    collect: str | None = None
    deleted: dict[str, int] = dataclasses.field(default_factory=dict)  # job → checkpoints deleted
    deleted_steps: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    failure: str | None = None  # a Warning Event's message
    succeeded: bool | None = None  # for the metric: None when nothing was collected
    start: bool = False
    next_pod: dict[str, Any] | None = None  # the manifest, filled in by the controller when ``start``


def _age_s(pod: dict[str, Any], now: dt.datetime) -> float:
    created = pod["metadata"].get("creationTimestamp")
    if not created:
        return 0.0
    return (now - dt.datetime.fromisoformat(created.replace("Z", "+00:00"))).total_seconds()


def with_uris(entry: dict[str, Any], root: str, namespace: str) -> dict[str, Any]:
    """A report entry with the URIs the inspector leaves out of its message."""
    out = dict(entry)
    run = out.get("run") or out["name"]
    if out.get("newestStep") is not None:
        out["newestUri"] = f"{root}/{checkpoint_prefix(namespace, run, int(out['newestStep']))}"
    if out.get("exportTime"):
        out["exportUri"] = f"{root}/{export_prefix(namespace, run)}"
    return out


def plan_volume_pass(policy: dict[str, Any], spec: CheckpointPolicySpec, pod: dict[str, Any] | None,
                     jobs: list[str], start: bool, now: dt.datetime) -> VolumePass:
    """Pure: from the policy, its inspector pod (or None) and the jobs using it, what to write
    and do. A report is collected once: the pod's uid goes into the condition's message, and a
    pod whose uid is already there (the operator stopped between writing and deleting) is only
    deleted."""
    meta = policy["metadata"]
    name = inspector_name(meta["name"])
    status = policy.get("status") or {}
    previous: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Inspected"), {})
    vp = VolumePass(start=start)
    if pod is not None and (pod["metadata"].get("labels") or {}).get(INSPECTOR_LABEL) != meta.get("uid"):
        vp.start = False  # left by a deleted policy of the same name; its owner reference removes it
        return vp
    if pod is None:
        return vp
    uid = pod["metadata"].get("uid", "")
    result = inspector_result(pod)
    if not result.finished:
        vp.start = False
        if _age_s(pod, now) > STUCK_S:
            vp.collect, vp.succeeded, vp.start = name, False, start
            vp.failure = f"pod {name} did not finish within {STUCK_S}s ({result.waiting}); deleted"
            vp.condition = ("Inspected", False, "InspectorStuck", vp.failure)
        else:
            vp.condition = ("Inspected", "Unknown", "InspectorPending", f"pod {name} is {result.waiting}")
        return vp
    vp.collect = name
    if uid and uid in (previous.get("message") or ""):
        return vp  # collected before; only the deletion was left to do
    report = result.report
    if report is None:
        vp.succeeded, vp.failure = False, f"pod {name} (uid {uid}): {result.error}"
        vp.condition = ("Inspected", False, "InspectorFailed", vp.failure)
        return vp
    vp.succeeded = True
    root = storage_uri(spec, CHECKPOINT_MOUNT_DIR)
    entries = {e["name"]: with_uris(e, root, meta["namespace"]) for e in report["jobs"]}
    # jobs the message had no room for, or that started using the policy after the pod was
    # made, keep their previous entry; jobs no longer using it go
    previous_entries = {e.get("name"): e for e in status.get("jobs") or []}
    vp.fields["jobs"] = [entries.get(j) or previous_entries[j] for j in jobs
                         if j in entries or j in previous_entries]
    vp.deleted = {k: v for k, v in (report.get("deletedCount") or
                                    {k: len(v) for k, v in report.get("deleted", {}).items()}).items() if v}
    vp.deleted_steps = {k: report.get("deleted", {}).get(k, []) for k in vp.deleted}
    note = f"; {report['truncated']} job(s) did not fit the message and keep their previous entry" \
        if report.get("truncated") else ""
    vp.condition = ("Inspected", True, "InspectorSucceeded",
                    f"pod {name} (uid {uid}) read {len(report['jobs'])} job(s) on the volume{note}")
    return vp
