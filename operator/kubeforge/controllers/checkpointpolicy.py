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
from kubeforge.settings import OperatorSettings, workload_image
from kubeforge.store import Store, StoreError, open_store
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


def _record_deletions(body: Any, deleted: dict[str, list[int]], logger: Any) -> None:
    for job, steps in deleted.items():
        CHECKPOINTS_DELETED.inc(len(steps))
        logger.info("retention deleted steps %s of %s", steps, job)
        record_event(body, "RetentionApplied", f"deleted checkpoints {steps} of TrainingJob {job}")


def s3_status(parsed: CheckpointPolicySpec, store: Store, namespace: str, jobs: list[dict[str, Any]],
              retention: bool, body: Any, logger: Any) -> dict[str, Any]:
    """Retention (when asked) and the per-job summaries, read by the operator itself."""
    rule = RetentionRule(parsed.retention.keep_last, parsed.retention.keep_every,
                         parsed.retention.incomplete_grace_seconds) if retention else None
    report = inspect_store(store, namespace, job_refs(jobs), rule)
    _record_deletions(body, report.deleted, logger)
    return {"jobs": report.jobs}


# One lock per policy: the retention loop and the inspector pod's watch may collect the same
# finished pod at once; the second must see it gone rather than report it twice.
_INSPECT_LOCKS: dict[tuple[str, str], threading.Lock] = collections.defaultdict(threading.Lock)


def volume_status(parsed: CheckpointPolicySpec, namespace: str, jobs: list[dict[str, Any]], start: bool,
                  body: Any, logger: Any) -> tuple[dict[str, Any], tuple[str, bool | str, str, str] | None]:
    """Collect a finished inspector pod's report (then delete the pod) and, when ``start``,
    start the next pass. Returns the status fields and the ``Inspected`` condition (None:
    nothing new to say)."""
    meta = body["metadata"]
    name = inspector.inspector_name(meta["name"])
    out: dict[str, Any] = {}
    cond: tuple[str, bool | str, str, str] | None = None
    with _INSPECT_LOCKS[(namespace, meta["name"])]:
        pod: dict[str, Any] | None = kube.get_json(kube.core().read_namespaced_pod, name, namespace)
        if pod is not None and pod["metadata"].get("labels", {}).get(inspector.INSPECTOR_LABEL) != meta.get("uid"):
            pod = None  # left by a deleted policy of the same name; its owner reference removes it
        if pod is not None:
            result = inspector.inspector_result(pod)
            if result.finished:
                _delete_pod(name, namespace)
                STORE_INSPECTIONS.labels("success" if result.report is not None else "failure").inc()
                if result.report is not None:
                    out["jobs"] = result.report["jobs"]
                    _record_deletions(body, result.report.get("deleted") or {}, logger)
                    note = f"; {result.report['truncated']} job(s) left out (message size)" \
                        if result.report.get("truncated") else ""
                    cond = ("Inspected", True, "InspectorSucceeded",
                            f"pod {name} read {len(result.report['jobs'])} job(s) on the volume{note}")
                else:
                    logger.warning("store inspector %s failed: %s", name, result.error)
                    record_event(body, "InspectorFailed", f"pod {name}: {result.error}", warning=True)
                    cond = ("Inspected", False, "InspectorFailed", f"pod {name}: {result.error}")
                pod = None
            elif result.waiting and result.waiting.startswith("Pending ("):
                cond = ("Inspected", "Unknown", "InspectorPending", f"pod {name} is {result.waiting}")
        if pod is None and start:
            manifest = inspector.inspector_pod(meta["name"], namespace, meta["uid"], parsed, job_refs(jobs),
                                               workload_image(None))
            try:
                kube.core().create_namespaced_pod(namespace, manifest)  # type: ignore[arg-type]  # dicts go as they are
                logger.info("started store inspector %s", name)
            except kubernetes.client.ApiException as e:
                if e.status != 409:  # 409: the previous one is still being deleted; next pass
                    raise
    return out, cond


def _delete_pod(name: str, namespace: str) -> None:
    try:
        kube.core().delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    except kubernetes.client.ApiException as e:
        if e.status != 404:
            raise


def policy_status(body: Any, retention: bool, logger: Any, start_inspector: bool = True) -> dict[str, Any]:
    """Check storage, apply retention when asked (S3; a volume's inspector pod always does) and
    report per-job checkpoints; returns the status patch."""
    meta, namespace = body["metadata"], body["metadata"]["namespace"]
    status = body.get("status") or {}
    with reconciling(CheckpointPolicy.kind):
        parsed, error = parse_spec(CheckpointPolicySpec, body.get("spec"))
        generation = meta.get("generation")
        if error:
            logger.warning("invalid spec: %s", error)
            return conditions_patch(status, generation, [("Ready", False, "InvalidSpec", error)])
        check, store = check_storage(parsed, namespace)
        conds: list[tuple[str, bool | str, str, str]] = [("StorageReachable", check.ok, check.reason, check.message),
                                                         ("Ready", check.ok, check.reason, check.message)]
        if not check.ok:
            logger.warning("storage not usable: %s", check.message)
            return conditions_patch(status, generation, conds)
        jobs = _jobs_using(namespace, meta["name"])
        if store is not None:
            fields = s3_status(parsed, store, namespace, jobs, retention, body, logger)
        else:
            fields, inspected = volume_status(parsed, namespace, jobs, start_inspector, body, logger)
            conds += [inspected] if inspected else []
        return {**conditions_patch(status, generation, conds), **fields}


@kopf.on.resume(GROUP, VERSION, CheckpointPolicy.plural)
@kopf.on.create(GROUP, VERSION, CheckpointPolicy.plural)
@kopf.on.update(GROUP, VERSION, CheckpointPolicy.plural, field="spec")
def reconcile(body: Any, patch: kopf.Patch, logger: Any, **_: Any) -> None:
    patch.status.update(policy_status(body, retention=False, logger=logger))


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


def enforce(namespace: str, name: str, start_inspector: bool = True) -> None:
    """One retention pass over one policy (for a volume: collect the last inspector pod's
    report and start the next one); the status goes out as a merge patch."""
    try:
        body = kube.custom().get_namespaced_custom_object(GROUP, VERSION, namespace, CheckpointPolicy.plural, name)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            POLICIES.discard((namespace, name))
            return
        raise
    status = policy_status(body, retention=True, logger=log, start_inspector=start_inspector)
    kube.custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, CheckpointPolicy.plural, name,
                                                        {"status": status})


@kopf.on.event("", "v1", "pods", labels={inspector.INSPECTOR_LABEL: kopf.PRESENT})
async def inspector_finished(type: str | None, body: Any, **_: Any) -> None:
    """Read an inspector pod's report as soon as it ends, not one retention interval later."""
    if type == "DELETED" or not inspector.inspector_result(body).finished:
        return
    policy = (body["metadata"].get("annotations") or {}).get(inspector.POLICY_ANNOTATION)
    if policy:
        try:
            await asyncio.to_thread(enforce, body["metadata"]["namespace"], policy, False)
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
