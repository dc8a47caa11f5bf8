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
import json
from typing import Any

from kubeforge.api import CheckpointPolicySpec
from kubeforge.api.common import API_VERSION
from kubeforge.api.contract import CHECKPOINT_MOUNT_DIR
from kubeforge.controllers.trainingjob_pods import GPU_TOLERATION, JOB_LABEL, container_security, pod_security
from kubeforge.store.report import JobRef

INSPECTOR_LABEL = "kubeforge.dev/store-inspector"
POLICY_ANNOTATION = "kubeforge.dev/checkpoint-policy"
CONTAINER = "inspector"
#: The inspector is killed (and reported failed) when one pass takes longer than this.
DEADLINE_S = 600
#: Pod names are DNS subdomains (253 characters).
MAX_POLICY_PREFIX = 253 - len("-inspector")


def inspector_name(policy: str) -> str:
    return f"{policy[:MAX_POLICY_PREFIX]}-inspector"


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
    if jobs:
        affinity = {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchExpressions": [
                    {"key": JOB_LABEL, "operator": "In", "values": sorted(j.name for j in jobs)}]}}}]}}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": DEADLINE_S,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security(),
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
    #: while not finished: the pod's phase and, when it cannot be scheduled, the reason
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
    if not isinstance(body.get("jobs"), list) or not isinstance(body.get("deleted", {}), dict):
        return InspectorResult(True, error=f"unexpected termination message: {message[:300]}")
    return InspectorResult(True, report=body)
