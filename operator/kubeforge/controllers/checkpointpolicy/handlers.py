"""CheckpointPolicy handlers: check the storage the policy names, report what the store
holds for each TrainingJob using it, and enforce its retention in a periodic pass.

The handlers read the Secret, the TrainingJobs and the store, call ``plan``, then patch
status. State (the policies seen, a lock per policy) is the operator's, in
``memo.checkpointpolicies``.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import threading
from typing import Any, cast

import kopf
import kubernetes

from kubeforge import k8s
from kubeforge.api import CheckpointPolicy, CheckpointPolicySpec, TrainingJob
from kubeforge.api.common import GROUP, VERSION
from kubeforge.controllers.background import Background, SideBySide
from kubeforge.controllers.checkpointpolicy import manifests
from kubeforge.controllers.checkpointpolicy import plan as insp
from kubeforge.controllers.checkpointpolicy.plan import StorageCheck, secret_check
from kubeforge.controllers.status import Condition, conditions_patch, parse_spec
from kubeforge.controllers.store_access import StoreAccess, shared_stores
from kubeforge.metrics import CHECKPOINTS_DELETED, STORE_INSPECTIONS, reconciling
from kubeforge.settings import OperatorSettings
from kubeforge.store import Store, StoreError, open_policy_store
from kubeforge.store.inspector import MAX_DELETED_LISTED
from kubeforge.store.report import RetentionRule, inspect_store, job_refs

log = logging.getLogger(__name__)
Key = tuple[str, str]


class CheckpointPolicies:
    """The controller's state: the policies the watch has shown (the retention pass goes over
    them), and one lock per policy around read, decide, write: the retention pass, the
    inspector pod's watch and kopf's handler all write a policy's status, and each must start
    from what the last one wrote (conditions are replaced as a whole list by a merge patch)."""

    def __init__(self, settings: OperatorSettings, stores: StoreAccess | None = None) -> None:
        self.settings = settings
        self.seen: set[Key] = set()
        self.locks: dict[Key, threading.Lock] = collections.defaultdict(threading.Lock)
        #: the operator's view of which stores are down (shared with the other controllers)
        self.stores = stores or StoreAccess()
        #: the retention pass: policies side by side, each at most once at a time
        self.passes: SideBySide[Key] = SideBySide("retention", settings.checkpointpolicy.retention_concurrency)


def _state(memo: kopf.Memo) -> CheckpointPolicies:
    return cast(CheckpointPolicies, memo.checkpointpolicies)


def _jobs_using(namespace: str, policy: str) -> list[dict[str, Any]]:
    return [j for j in k8s.list_custom(namespace, TrainingJob.plural)
            if (j.get("spec", {}).get("checkpointPolicyRef") or {}).get("name") == policy]


def check_storage(state: CheckpointPolicies, spec: CheckpointPolicySpec,
                  namespace: str, name: str) -> tuple[StorageCheck, Store | None]:
    """Check the Secret and the bucket (S3), or the claim (volume); returns the store when usable
    from the operator (a volume is mounted only in the workers)."""
    if spec.storage.volume:
        claim = spec.storage.volume.claim_name
        if k8s.get_or_none(k8s.core().read_namespaced_persistent_volume_claim, claim, namespace) is None:
            return StorageCheck(False, "ClaimNotFound", f"PersistentVolumeClaim {claim} does not exist"), None
        return StorageCheck(True, "ClaimFound", f"PersistentVolumeClaim {claim} exists; an inspector pod "
                                                "mounts it to apply retention and report checkpoints"), None
    s3 = spec.storage.s3
    assert s3 is not None
    try:
        secret = k8s.read_secret(namespace, s3.credentials_secret_ref.name)
    except k8s.SecretForbidden as e:
        return StorageCheck(False, "SecretForbidden", str(e)), None
    problem = secret_check(s3.credentials_secret_ref.name, secret)
    if problem:
        return problem, None
    store = open_policy_store(spec, secret, state.settings.checkpointpolicy.store_retry_deadline_s)
    try:
        state.stores.call((namespace, name), store.check)  # fails fast while the store is down
    except StoreError as e:
        return StorageCheck(False, "BucketUnreachable", f"bucket {s3.bucket}: {e}"), None
    return StorageCheck(True, "BucketReachable", f"bucket {s3.bucket} answers at {s3.endpoint or 'AWS'}"), store


def record_deletions(body: dict[str, Any], counts: dict[str, int], steps: dict[str, list[int]],
                     logger: logging.Logger) -> None:
    """Metric, log line and Event for what retention deleted (``steps`` may list fewer than
    ``counts`` says: a volume's inspector reports at most 20 per job)."""
    for job, count in counts.items():
        CHECKPOINTS_DELETED.inc(count)
        listed = ", ".join(map(str, steps.get(job, []))) + (", …" if count > len(steps.get(job, [])) else "")
        logger.info("retention deleted %d checkpoint(s) of %s: steps %s", count, job, listed)
        k8s.record_event(body, "RetentionApplied", f"deleted {count} checkpoint(s) of TrainingJob {job}: steps {listed}")


def s3_status(parsed: CheckpointPolicySpec, store: Store, namespace: str, jobs: list[dict[str, Any]],
              retention: bool, body: dict[str, Any], logger: logging.Logger) -> dict[str, Any]:
    """Retention (when asked) and the per-job summaries, read by the operator itself."""
    rule = RetentionRule(parsed.retention.keep_last, parsed.retention.keep_every,
                         parsed.retention.incomplete_grace_seconds) if retention else None
    report = inspect_store(store, namespace, job_refs(jobs), rule)
    record_deletions(body, {k: len(v) for k, v in report.deleted.items()},
                     {k: sorted(v)[:MAX_DELETED_LISTED] for k, v in report.deleted.items()}, logger)
    return {"jobs": report.jobs}


def policy_status(state: CheckpointPolicies, body: dict[str, Any], retention: bool, logger: logging.Logger,
                  start_inspector: bool = True) -> tuple[dict[str, Any], insp.VolumePass | None]:
    """Check storage; for S3 apply retention when asked and read the summaries, for a volume
    plan what to do with the inspector pod (``enforce`` does it). Returns the status patch."""
    meta, namespace = body["metadata"], body["metadata"]["namespace"]
    status = dict(body.get("status") or {})
    with reconciling(CheckpointPolicy.kind):
        parsed, error = parse_spec(CheckpointPolicySpec, body.get("spec"))
        generation = meta.get("generation")
        if parsed is None:
            logger.warning("invalid spec: %s", error)
            return conditions_patch(_without_inspected(status), generation,
                                    [("Ready", False, "InvalidSpec", str(error))]), None
        check, store = check_storage(state, parsed, namespace, meta["name"])
        conds: list[Condition] = [("StorageReachable", check.ok, check.reason, check.message),
                                            ("Ready", check.ok, check.reason, check.message)]
        if parsed.storage.volume is None:
            status = _without_inspected(status)
        if not check.ok:
            logger.warning("storage not usable: %s", check.message)
            return conditions_patch(status, generation, conds), None
        jobs = _jobs_using(namespace, meta["name"])
        if store is not None:
            try:
                summaries = s3_status(parsed, store, namespace, jobs, retention, body, logger)
            except StoreError as e:
                state.stores.failed((namespace, meta["name"]), str(e))
                raise
            return {**conditions_patch(status, generation, conds), **summaries}, None
        pod = k8s.get_or_none(k8s.core().read_namespaced_pod, manifests.inspector_name(meta["name"]), namespace)
        vp = insp.plan_volume_pass(body, parsed, pod, [j["metadata"]["name"] for j in jobs],
                                   start_inspector, dt.datetime.now(dt.UTC))
        if vp.start:
            vp.next_pod = manifests.build_inspector_pod(meta["name"], namespace, meta["uid"], parsed, job_refs(jobs),
                                                        state.settings.images.inspector_image())
        return {**conditions_patch(status, generation, conds + ([vp.condition] if vp.condition else [])),
                **vp.fields}, vp


def _without_inspected(status: dict[str, Any]) -> dict[str, Any]:
    """A policy that is no longer on a volume has no inspector to speak of."""
    return {**status, "conditions": [c for c in status.get("conditions") or [] if c.get("type") != "Inspected"]}


def _after_status(body: dict[str, Any], vp: insp.VolumePass, logger: logging.Logger) -> None:
    """What a volume pass does once its status is written: Events and metrics of the collected
    pass, the finished pod deleted, the next one started (a refusal is a condition, not a crash)."""
    meta = body["metadata"]
    if vp.succeeded is not None:
        STORE_INSPECTIONS.labels("success" if vp.succeeded else "failure").inc()
    record_deletions(body, vp.deleted, vp.deleted_steps, logger)
    if vp.failure:
        logger.warning("store inspector: %s", vp.failure)
        k8s.record_event(body, "InspectorFailed", vp.failure, warning=True)
    if vp.collect:
        k8s.delete_pod(vp.collect, meta["namespace"], force=True)
    next_pod = vp.next_pod
    if next_pod is None:
        return
    try:
        if k8s.create(k8s.core().create_namespaced_pod, meta["namespace"], next_pod):
            logger.info("started store inspector %s", next_pod["metadata"]["name"])
        # else the previous one is still going away: the next pass starts it
    except kubernetes.client.ApiException as e:
        reason = f"pod {next_pod['metadata']['name']} was refused: {e.status} {e.reason}: {str(e.body)[:300]}"
        logger.warning("store inspector: %s", reason)
        k8s.record_event(body, "InspectorNotCreated", reason, warning=True)
        k8s.patch_status(CheckpointPolicy.plural, meta["namespace"], meta["name"],
                         conditions_patch(body.get("status"), meta.get("generation"),
                                          [("Inspected", False, "InspectorNotCreated", reason)]))


@kopf.on.resume(GROUP, VERSION, CheckpointPolicy.plural)
@kopf.on.create(GROUP, VERSION, CheckpointPolicy.plural)
@kopf.on.update(GROUP, VERSION, CheckpointPolicy.plural, field="spec")
def reconcile(namespace: str | None, name: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Storage checked and status written at once (retention waits for the periodic pass; a
    volume's first inspector pass starts now)."""
    assert namespace is not None and name is not None  # a namespaced kind
    state = _state(memo)
    # a new or changed spec (endpoint, bucket, Secret) is tried at once, not after the old one's backoff
    state.stores.forget_store((namespace, name))
    enforce(state, namespace, name, retention=False)


@kopf.on.event(GROUP, VERSION, CheckpointPolicy.plural)
def track(type: str | None, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    key = (str(meta["namespace"]), str(meta["name"]))
    seen = _state(memo).seen
    if type == "DELETED" or meta.get("deletionTimestamp"):
        seen.discard(key)
        if type == "DELETED":
            _state(memo).stores.forget_store(key)
    else:
        seen.add(key)


def enforce(state: CheckpointPolicies, namespace: str, name: str, start_inspector: bool = True,
            retention: bool = True) -> None:
    """One pass over one policy: storage, retention (S3 here; a volume's in its inspector pod,
    whose last report is collected and whose next pass starts); the status goes out as a merge
    patch before anything else is done."""
    with state.locks[(namespace, name)]:
        body = k8s.get_custom(namespace, CheckpointPolicy.plural, name)
        if body is None:
            state.seen.discard((namespace, name))
            return
        status, vp = policy_status(state, body, retention=retention, logger=log, start_inspector=start_inspector)
        k8s.patch_status(CheckpointPolicy.plural, namespace, name, status)
        if vp is not None:
            _after_status({**body, "status": {**(body.get("status") or {}), **status}}, vp, log)
        elif any(c.get("type") == "Inspected" for c in (body.get("status") or {}).get("conditions") or []):
            _delete_inspectors(namespace, body["metadata"].get("uid", ""))


def _delete_inspectors(namespace: str, uid: str) -> None:
    """The policy left volume storage (or its spec became invalid): no inspector of it runs on."""
    for pod in k8s.list_pods(namespace, f"{manifests.INSPECTOR_LABEL}={uid}"):
        k8s.delete_pod(pod["metadata"]["name"], namespace, force=True)


@kopf.on.event("", "v1", "pods", labels={manifests.INSPECTOR_LABEL: kopf.PRESENT})
async def inspector_finished(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Read an inspector pod's report as soon as it ends, not one retention interval later."""
    if type == "DELETED" or not insp.inspector_result(dict(body)).finished:
        return
    policy = body.metadata.annotations.get(manifests.POLICY_ANNOTATION)
    if policy:
        try:
            await asyncio.to_thread(enforce, _state(memo), str(body.metadata.namespace), policy, False, False)
        except Exception:  # the retention pass collects it on its next run
            log.exception("could not collect store inspector %s", body.metadata.name)


async def _retention_pass(state: CheckpointPolicies) -> None:
    """Every policy side by side (``retention_concurrency`` at a time): one whose store is dead
    takes its retry deadline without delaying the others."""
    await state.passes.run(sorted(state.seen), lambda key: enforce(state, *key),
                           state.settings.checkpointpolicy.retention_interval_s)


@kopf.on.startup()
async def start_retention(memo: kopf.Memo, **_: Any) -> None:
    settings = cast(OperatorSettings, memo.settings)
    state = memo.checkpointpolicies = CheckpointPolicies(settings, shared_stores(memo))
    cast(Background, memo.background).close_with(state.passes.close)
    cast(Background, memo.background).every("checkpointpolicy-retention", settings.checkpointpolicy.retention_interval_s,
                                            lambda: _retention_pass(state))
