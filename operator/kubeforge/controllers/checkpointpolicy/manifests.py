"""The store inspector pod of a CheckpointPolicy on a volume, as a pure manifest.

The operator cannot mount a PersistentVolumeClaim, so for volume storage it runs one short
pod per pass that mounts the claim at the workers' path, applies the policy's retention and
reports every job's checkpoints (``python -m kubeforge.store.inspector``); the result comes
back as the pod's termination message, which the kubelet puts in the pod's status
(``plan.inspector_result`` reads it).

- name ``<policy>-inspector``, labelled ``kubeforge.dev/store-inspector=<policy uid>``, owned
  by the policy (deleting the policy deletes a running inspector);
- restricted PodSecurity, small requests, ``activeDeadlineSeconds``, never restarted;
- tolerates the GPU taint and prefers a node where a worker of a job using the policy runs,
  so a ReadWriteOnce claim attached there can be mounted by the inspector too.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from kubeforge.api import CheckpointPolicy, CheckpointPolicySpec
from kubeforge.api.contract import CHECKPOINT_MOUNT_DIR
from kubeforge.controllers.trainingjob.manifests import JOB_LABEL
from kubeforge.controllers.workload import GPU_TOLERATION, Owner, container_security, pod_security
from kubeforge.store.policy import storage_uri
from kubeforge.store.report import JobRef

INSPECTOR_LABEL = "kubeforge.dev/store-inspector"
POLICY_ANNOTATION = "kubeforge.dev/checkpoint-policy"
CONTAINER = "inspector"
#: The kubelet kills a pass that runs longer than this (``activeDeadlineSeconds``).
DEADLINE_S = 600
#: Pod names are DNS subdomains (253 characters).
MAX_NAME = 253
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def inspector_name(policy: str) -> str:
    """``<policy>-inspector``; a name too long for that is cut and told apart by a hash."""
    name = f"{policy}-inspector"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(policy.encode()).hexdigest()[:8]
    return f"{policy[:MAX_NAME - len(digest) - len('--inspector')].rstrip('.-')}-{digest}-inspector"


def build_inspector_pod(policy: str, namespace: str, uid: str, spec: CheckpointPolicySpec, jobs: list[JobRef],
                        image: str) -> dict[str, Any]:
    """The pod of one inspection pass over the policy's volume: retention, then the report."""
    assert spec.storage.volume is not None
    r = spec.retention
    args = ["python", "-m", "kubeforge.store.inspector",
            "--store", storage_uri(spec, CHECKPOINT_MOUNT_DIR), "--namespace", namespace,
            "--jobs", json.dumps([{"name": j.name, "lastStep": j.last_step, **({"run": j.run} if j.run else {})}
                                  for j in jobs], separators=(",", ":")),
            "--keep-last", str(r.keep_last), "--incomplete-grace-seconds", str(r.incomplete_grace_seconds)]
    if r.keep_every:
        args += ["--keep-every", str(r.keep_every)]
    owner = Owner(policy, namespace, uid, CheckpointPolicy.kind).reference(block_owner_deletion=False)
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
        "tolerations": [dict(GPU_TOLERATION)],
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
