"""CheckpointPolicy controller: checks the storage it names, reports what the store holds for
each TrainingJob using it, and enforces its retention on a timer.

Pure parts (``storage_uri``, ``storage_check``, ``retention_for``) take plain inputs; the
handlers read the Secret, the TrainingJobs and the store, then patch status.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import datetime as dt
import logging
import threading
from typing import Any, cast

import kopf
import kubernetes

from kubeforge import kube
from kubeforge.api import CheckpointPolicy, CheckpointPolicySpec, TrainingJob
from kubeforge.api.common import GROUP, VERSION
from kubeforge.controllers import checkpointpolicy_inspector as inspector
from kubeforge.controllers.status import conditions_patch, parse_spec, record_event
from kubeforge.metrics import CHECKPOINTS_DELETED, STORE_INSPECTIONS, reconciling
from kubeforge.settings import OperatorSettings, inspector_image
from kubeforge.store import Store, StoreError, open_store
from kubeforge.store.inspector import MAX_DELETED_LISTED
from kubeforge.store.report import RetentionRule, inspect_store, job_refs

#: Keys the credentials Secret must hold (they reach the workers through envFrom).
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
#: How often storage is re-checked and retention applied.
RETENTION_INTERVAL_S = OperatorSettings.from_env().retention_interval_s
#: A failing store is given up on quickly in the operator: the next timer tries again.
STORE_RETRY_DEADLINE_S = 10.0


def storage_uri(spec: CheckpointPolicySpec, volume_mount: str = "/mnt/checkpoints") -> str:
    """The store root the workers write to: ``s3://bucket/prefix`` or a path in the mounted claim."""
    if spec.storage.s3:
        return f"s3://{spec.storage.s3.bucket}/{spec.storage.s3.prefix.strip('/')}".rstrip("/")
    assert spec.storage.volume is not None
    return f"file://{volume_mount}/{spec.storage.volume.path.strip('/')}".rstrip("/")


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


def open_policy_store(spec: CheckpointPolicySpec, secret: dict[str, str] | None) -> Store:
    s3 = spec.storage.s3
    assert s3 is not None
    creds = secret or {}
    return open_store(storage_uri(spec), endpoint_url=s3.endpoint, region=s3.region,
                      force_path_style=s3.force_path_style, access_key_id=creds.get("AWS_ACCESS_KEY_ID"),
                      secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"), retry_deadline_s=STORE_RETRY_DEADLINE_S)


def read_secret(namespace: str, name: str) -> dict[str, str] | None:
    try:
        secret = kube.core().read_namespaced_secret(name, namespace)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def _jobs_using(namespace: str, policy: str) -> list[dict[str, Any]]:
    listed = cast(dict[str, Any], kube.custom().list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                               TrainingJob.plural))
    jobs: list[dict[str, Any]] = listed["items"]
    return [j for j in jobs if (j.get("spec", {}).get("checkpointPolicyRef") or {}).get("name") == policy]


def check_storage(spec: CheckpointPolicySpec, namespace: str) -> tuple[StorageCheck, Store | None]:
    """Check the Secret and the bucket (S3), or the claim (volume); returns the store when usable
    from the operator (a volume is mounted only in the workers)."""
    if spec.storage.volume:
        claim = spec.storage.volume.claim_name
        try:
            kube.core().read_namespaced_persistent_volume_claim(claim, namespace)
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return StorageCheck(False, "ClaimNotFound", f"PersistentVolumeClaim {claim} does not exist"), None
            raise
        return StorageCheck(True, "ClaimFound", f"PersistentVolumeClaim {claim} exists; an inspector pod "
                                                "mounts it to apply retention and report checkpoints"), None
    s3 = spec.storage.s3
    assert s3 is not None
    secret = read_secret(namespace, s3.credentials_secret_ref.name)
    problem = secret_check(s3.credentials_secret_ref.name, secret)
    if problem:
        return problem, None
    store = open_policy_store(spec, secret)
    try:
        store.check()
    except StoreError as e:
        return StorageCheck(False, "BucketUnreachable", f"bucket {s3.bucket}: {e}"), None
    return StorageCheck(True, "BucketReachable", f"bucket {s3.bucket} answers at {s3.endpoint or 'AWS'}"), store


def record_deletions(body: Any, counts: dict[str, int], steps: dict[str, list[int]], logger: Any) -> None:
    """Metric, log line and Event for what retention deleted (``steps`` may list fewer than
    ``counts`` says: a volume's inspector reports at most 20 per job)."""
    for job, count in counts.items():
        CHECKPOINTS_DELETED.inc(count)
        listed = ", ".join(map(str, steps.get(job, []))) + (", …" if count > len(steps.get(job, [])) else "")
        logger.info("retention deleted %d checkpoint(s) of %s: steps %s", count, job, listed)
        record_event(body, "RetentionApplied", f"deleted {count} checkpoint(s) of TrainingJob {job}: steps {listed}")


def s3_status(parsed: CheckpointPolicySpec, store: Store, namespace: str, jobs: list[dict[str, Any]],
              retention: bool, body: Any, logger: Any) -> dict[str, Any]:
    """Retention (when asked) and the per-job summaries, read by the operator itself."""
    rule = RetentionRule(parsed.retention.keep_last, parsed.retention.keep_every,
                         parsed.retention.incomplete_grace_seconds) if retention else None
    report = inspect_store(store, namespace, job_refs(jobs), rule)
    record_deletions(body, {k: len(v) for k, v in report.deleted.items()},
                     {k: sorted(v)[:MAX_DELETED_LISTED] for k, v in report.deleted.items()}, logger)
    return {"jobs": report.jobs}


def policy_status(body: Any, retention: bool, logger: Any,
                  start_inspector: bool = True) -> tuple[dict[str, Any], inspector.VolumePass | None]:
    """Check storage; for S3 apply retention when asked and read the summaries, for a volume
    plan what to do with the inspector pod (``enforce`` does it). Returns the status patch."""
    meta, namespace = body["metadata"], body["metadata"]["namespace"]
    status = dict(body.get("status") or {})
    with reconciling(CheckpointPolicy.kind):
        parsed, error = parse_spec(CheckpointPolicySpec, body.get("spec"))
        generation = meta.get("generation")
        if error:
            logger.warning("invalid spec: %s", error)
            return conditions_patch(_without_inspected(status), generation,
                                    [("Ready", False, "InvalidSpec", error)]), None
        check, store = check_storage(parsed, namespace)
        conds: list[inspector.Condition] = [("StorageReachable", check.ok, check.reason, check.message),
                                            ("Ready", check.ok, check.reason, check.message)]
        if parsed.storage.volume is None:
            status = _without_inspected(status)
        if not check.ok:
            logger.warning("storage not usable: %s", check.message)
            return conditions_patch(status, generation, conds), None
        jobs = _jobs_using(namespace, meta["name"])
        if store is not None:
            return {**conditions_patch(status, generation, conds),
                    **s3_status(parsed, store, namespace, jobs, retention, body, logger)}, None
        pod = kube.get_json(kube.core().read_namespaced_pod, inspector.inspector_name(meta["name"]), namespace)
        vp = inspector.plan_volume_pass(body, parsed, pod, [j["metadata"]["name"] for j in jobs],
                                        start_inspector, dt.datetime.now(dt.UTC))
        if vp.start:
            vp.next_pod = inspector.inspector_pod(meta["name"], namespace, meta["uid"], parsed, job_refs(jobs),
                                                  inspector_image())
        return {**conditions_patch(status, generation, conds + ([vp.condition] if vp.condition else [])),
                **vp.fields}, vp


def _without_inspected(status: dict[str, Any]) -> dict[str, Any]:
    """A policy that is no longer on a volume has no inspector to speak of."""
    return {**status, "conditions": [c for c in status.get("conditions") or [] if c.get("type") != "Inspected"]}


def _delete_pod(name: str, namespace: str) -> None:
    try:
        kube.core().delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    except kubernetes.client.ApiException as e:
        if e.status != 404:
            raise


def _after_status(body: Any, vp: inspector.VolumePass, logger: Any) -> None:
    """What a volume pass does once its status is written: Events and metrics of the collected
    pass, the finished pod deleted, the next one started (a refusal is a condition, not a crash)."""
    meta = body["metadata"]
    if vp.succeeded is not None:
        STORE_INSPECTIONS.labels("success" if vp.succeeded else "failure").inc()
    record_deletions(body, vp.deleted, vp.deleted_steps, logger)
    if vp.failure:
        logger.warning("store inspector: %s", vp.failure)
        record_event(body, "InspectorFailed", vp.failure, warning=True)
    if vp.collect:
        _delete_pod(vp.collect, meta["namespace"])
    next_pod = vp.next_pod
    if next_pod is None:
        return
    try:
        kube.core().create_namespaced_pod(meta["namespace"], next_pod)  # type: ignore[arg-type]  # dicts go as they are
        logger.info("started store inspector %s", next_pod["metadata"]["name"])
    except kubernetes.client.ApiException as e:
        if e.status == 409:  # the previous one is still going away: the next pass starts it
            return
        reason = f"pod {next_pod['metadata']['name']} was refused: {e.status} {e.reason}: {str(e.body)[:300]}"
        logger.warning("store inspector: %s", reason)
        record_event(body, "InspectorNotCreated", reason, warning=True)
        patch = conditions_patch(body.get("status"), meta.get("generation"),
                                 [("Inspected", False, "InspectorNotCreated", reason)])
        kube.custom().patch_namespaced_custom_object_status(GROUP, VERSION, meta["namespace"],
                                                            CheckpointPolicy.plural, meta["name"], {"status": patch})


@kopf.on.resume(GROUP, VERSION, CheckpointPolicy.plural)
@kopf.on.create(GROUP, VERSION, CheckpointPolicy.plural)
@kopf.on.update(GROUP, VERSION, CheckpointPolicy.plural, field="spec")
def reconcile(namespace: str | None, name: str, **_: Any) -> None:
    """Storage checked and status written at once (retention waits for the loop; a volume's
    first inspector pass starts now)."""
    assert namespace is not None  # a namespaced kind
    enforce(namespace, name, retention=False)


# Retention runs in one operator-wide loop over the policies seen by the watch, not in a
# kopf timer: kopf puts a finalizer on every object with a timer, and a CheckpointPolicy has
# nothing to clean up on deletion, so it must stay deletable while the operator is down.
POLICIES: set[tuple[str, str]] = set()
log = logging.getLogger(__name__)


@kopf.on.event(GROUP, VERSION, CheckpointPolicy.plural)
def track(type: str | None, meta: Any, **_: Any) -> None:
    key = (meta["namespace"], meta["name"])
    if type == "DELETED" or meta.get("deletionTimestamp"):
        POLICIES.discard(key)
    else:
        POLICIES.add(key)


# One lock per policy around read, decide, write: the retention loop, the inspector pod's watch
# and kopf's handler all write this status, and each must start from what the last one wrote
# (conditions are replaced as a whole list by a merge patch).
_LOCKS: dict[tuple[str, str], threading.Lock] = collections.defaultdict(threading.Lock)


def enforce(namespace: str, name: str, start_inspector: bool = True, retention: bool = True) -> None:
    """One pass over one policy: storage, retention (S3 here; a volume's in its inspector pod,
    whose last report is collected and whose next pass starts); the status goes out as a merge
    patch before anything else is done."""
    with _LOCKS[(namespace, name)]:
        body = kube.get_json(kube.custom().get_namespaced_custom_object, GROUP, VERSION, namespace,
                             CheckpointPolicy.plural, name)
        if body is None:
            POLICIES.discard((namespace, name))
            return
        status, vp = policy_status(body, retention=retention, logger=log, start_inspector=start_inspector)
        kube.custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, CheckpointPolicy.plural,
                                                            name, {"status": status})
        if vp is not None:
            _after_status({**body, "status": {**(body.get("status") or {}), **status}}, vp, log)
        elif any(c.get("type") == "Inspected" for c in (body.get("status") or {}).get("conditions") or []):
            _delete_inspectors(namespace, body["metadata"].get("uid", ""))


def _delete_inspectors(namespace: str, uid: str) -> None:
    """The policy left volume storage (or its spec became invalid): no inspector of it runs on."""
    listed = kube.get_json(kube.core().list_namespaced_pod, namespace, label_selector=f"{inspector.INSPECTOR_LABEL}={uid}")
    for pod in (listed or {}).get("items", []):
        _delete_pod(pod["metadata"]["name"], namespace)


@kopf.on.event("", "v1", "pods", labels={inspector.INSPECTOR_LABEL: kopf.PRESENT})
async def inspector_finished(type: str | None, body: Any, **_: Any) -> None:
    """Read an inspector pod's report as soon as it ends, not one retention interval later."""
    if type == "DELETED" or not inspector.inspector_result(body).finished:
        return
    policy = (body["metadata"].get("annotations") or {}).get(inspector.POLICY_ANNOTATION)
    if policy:
        try:
            await asyncio.to_thread(enforce, body["metadata"]["namespace"], policy, False, False)
        except Exception:  # the retention loop collects it on its next pass
            log.exception("could not collect store inspector %s", body["metadata"]["name"])


async def _retention_loop(interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        for namespace, name in sorted(POLICIES):
            try:
                await asyncio.to_thread(enforce, namespace, name)
            except Exception:  # one policy's failure must not stop the others' retention
                log.exception("retention pass failed for CheckpointPolicy %s/%s", namespace, name)


@kopf.on.startup()
async def start_retention(memo: kopf.Memo, **_: Any) -> None:
    memo.retention_task = asyncio.create_task(_retention_loop(RETENTION_INTERVAL_S))


@kopf.on.cleanup()
async def stop_retention(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("retention_task")
    if task is not None:
        task.cancel()
