"""The store inspector pod of a CheckpointPolicy on a volume: manifest and result, as pure
functions tested without a cluster.

The operator cannot mount a PersistentVolumeClaim, so for volume storage it runs one short
pod per pass that mounts the claim at the workers' path, applies the policy's retention and
reports every job's checkpoints (``python -m kubeforge.store.inspector``); the result comes
back as the pod's termination message, which the kubelet puts in the pod's status.

- name ``<policy>-inspector``, labelled ``kubeforge.dev/store-inspector=<policy uid>``, owned
  by the policy (deleting the policy deletes a running inspector);
- restricted PodSecurity, small requests, ``activeDeadlineSeconds``, never restarted;
- tolerates the GPU taint and prefers a node where a worker of a job using the policy runs,
  so a ReadWriteOnce claim attached there can be mounted by the inspector too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from typing import Any

from kubeforge.api import CheckpointPolicySpec
from kubeforge.api.common import API_VERSION
from kubeforge.api.contract import CHECKPOINT_MOUNT_DIR
from kubeforge.controllers.trainingjob_pods import GPU_TOLERATION, JOB_LABEL, container_security, pod_security
from kubeforge.store import checkpoint_prefix, export_prefix
from kubeforge.store.report import JobRef

INSPECTOR_LABEL = "kubeforge.dev/store-inspector"
POLICY_ANNOTATION = "kubeforge.dev/checkpoint-policy"
CONTAINER = "inspector"
#: The kubelet kills a pass that runs longer than this (``activeDeadlineSeconds``) ...
DEADLINE_S = 600
#: ... and the operator deletes a pod that has not finished this long after its creation
#: (never scheduled, stuck on a lost node, waiting for a volume to attach).
STUCK_S = DEADLINE_S + 120
#: Pod names are DNS subdomains (253 characters).
MAX_NAME = 253
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")

Condition = tuple[str, bool | str, str, str]


def inspector_name(policy: str) -> str:
    """``<policy>-inspector``; a name too long for that is cut and told apart by a hash."""
    name = f"{policy}-inspector"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(policy.encode()).hexdigest()[:8]
    return f"{policy[:MAX_NAME - len(digest) - len('--inspector')].rstrip('.-')}-{digest}-inspector"


def inspector_pod(policy: str, namespace: str, uid: str, spec: CheckpointPolicySpec, jobs: list[JobRef],
                  image: str) -> dict[str, Any]:
    """The pod of one inspection pass over the policy's volume: retention, then the report."""
    assert spec.storage.volume is not None
    from kubeforge.controllers.checkpointpolicy import storage_uri

    r = spec.retention
    args = ["python", "-m", "kubeforge.store.inspector",
            "--store", storage_uri(spec, CHECKPOINT_MOUNT_DIR), "--namespace", namespace,
            "--jobs", json.dumps([{"name": j.name, "lastStep": j.last_step} for j in jobs], separators=(",", ":")),
            "--keep-last", str(r.keep_last), "--incomplete-grace-seconds", str(r.incomplete_grace_seconds)]
    if r.keep_every:
        args += ["--keep-every", str(r.keep_every)]
    owner = {"apiVersion": API_VERSION, "kind": "CheckpointPolicy", "name": policy, "uid": uid, "controller": True}
    affinity: dict[str, Any] = {}
    # only names that can be label values: a job with a longer one has no pods anyway
    names = sorted(j.name for j in jobs if _LABEL_VALUE.match(j.name))
    if names:
        affinity = {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchExpressions": [{"key": JOB_LABEL, "operator": "In", "values": names}]}}}]}}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": DEADLINE_S,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # no recursive chown of the whole checkpoint volume on every pass
        "securityContext": {**pod_security(), "fsGroupChangePolicy": "OnRootMismatch"},
        "tolerations": [GPU_TOLERATION],
        "containers": [{
            "name": CONTAINER, "image": image, "command": args,
            "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
            "securityContext": container_security(),
            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
            "volumeMounts": [{"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT_DIR}],
        }],
        "volumes": [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": spec.storage.volume.claim_name}}],
    }
    if affinity:
        pod_spec["affinity"] = affinity
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": inspector_name(policy), "namespace": namespace,
                         "labels": {INSPECTOR_LABEL: uid, "app.kubernetes.io/managed-by": "kubeforge",
                                    "app.kubernetes.io/component": "store-inspector"},
                         "annotations": {POLICY_ANNOTATION: policy},
                         "ownerReferences": [owner]},
            "spec": pod_spec}


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
    if out.get("newestStep") is not None:
        out["newestUri"] = f"{root}/{checkpoint_prefix(namespace, out['name'], int(out['newestStep']))}"
    if out.get("exportTime"):
        out["exportUri"] = f"{root}/{export_prefix(namespace, out['name'])}"
    return out


def plan_volume_pass(policy: dict[str, Any], spec: CheckpointPolicySpec, pod: dict[str, Any] | None,
                     jobs: list[str], start: bool, now: dt.datetime) -> VolumePass:
    """Pure: from the policy, its inspector pod (or None) and the jobs using it, what to write
    and do. A report is collected once: the pod's uid goes into the condition's message, and a
    pod whose uid is already there (the operator stopped between writing and deleting) is only
    deleted."""
    from kubeforge.controllers.checkpointpolicy import storage_uri

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
