"""CheckpointPolicy controller: checks the storage it names, reports what the store holds for
each TrainingJob using it, and enforces its retention on a timer.

Pure parts (``storage_uri``, ``storage_check``, ``retention_for``) take plain inputs; the
handlers read the Secret, the TrainingJobs and the store, then patch status.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
from typing import Any, cast

import kopf
import kubernetes

from kubeforge import kube
from kubeforge.api import CheckpointPolicy, CheckpointPolicySpec, TrainingJob
from kubeforge.api.common import GROUP, VERSION
from kubeforge.controllers.status import conditions_patch, parse_spec, record_event
from kubeforge.metrics import CHECKPOINTS_DELETED, reconciling
from kubeforge.settings import OperatorSettings
from kubeforge.store import Store, StoreError, open_store, plan_retention

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
        return StorageCheck(True, "ClaimFound", f"PersistentVolumeClaim {claim} exists; "
                                                "retention runs in the workers for volume storage"), None
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


def job_summaries(store: Store, namespace: str, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for job in jobs:
        name = job["metadata"]["name"]
        s = store.summary(namespace, name)
        entry: dict[str, Any] = {"name": name, "committed": s.committed, "bytes": s.bytes}
        if s.newest_step is not None:
            entry["newestStep"] = s.newest_step
        if s.newest_time:
            entry["newestTime"] = s.newest_time
        out.append(entry)
    return out


def protected_steps(job: dict[str, Any], store: Store) -> set[int]:
    """Never deleted: the checkpoint a job last reported, and the one its rank 0 is restoring
    right now (a fallback after a corrupt newest one can be older than what retention keeps)."""
    last = (job.get("status") or {}).get("lastCheckpoint") or {}
    out = {int(last["step"])} if "step" in last else set()
    restoring = store.restoring_step(job["metadata"]["namespace"], job["metadata"]["name"])
    return out | ({restoring} if restoring is not None else set())


def apply_retention(spec: CheckpointPolicySpec, store: Store, namespace: str, jobs: list[dict[str, Any]],
                    logger: Any, body: Any) -> None:
    r = spec.retention
    for job in jobs:
        name = job["metadata"]["name"]
        plan = plan_retention(store.list_checkpoints(namespace, name), keep_last=r.keep_last,
                              keep_every=r.keep_every, protected_steps=protected_steps(job, store),
                              incomplete_grace_seconds=r.incomplete_grace_seconds)
        deleted = store.apply_retention(namespace, name, plan)
        if deleted:
            CHECKPOINTS_DELETED.inc(len(deleted))
            logger.info("retention deleted steps %s of %s", deleted, name)
            record_event(body, "RetentionApplied", f"deleted checkpoints {deleted} of TrainingJob {name}")


def policy_status(body: Any, retention: bool, logger: Any) -> dict[str, Any]:
    """Check storage (and apply retention when asked); returns the status patch."""
    meta, namespace = body["metadata"], body["metadata"]["namespace"]
    status = body.get("status") or {}
    with reconciling(CheckpointPolicy.kind):
        parsed, error = parse_spec(CheckpointPolicySpec, body.get("spec"))
        generation = meta.get("generation")
        if error:
            logger.warning("invalid spec: %s", error)
            return conditions_patch(status, generation, [("Ready", False, "InvalidSpec", error)])
        check, store = check_storage(parsed, namespace)
        out = conditions_patch(status, generation, [("StorageReachable", check.ok, check.reason, check.message),
                                                    ("Ready", check.ok, check.reason, check.message)])
        if store is None:
            if not check.ok:
                logger.warning("storage not usable: %s", check.message)
            return out
        jobs = _jobs_using(namespace, meta["name"])
        if retention:
            apply_retention(parsed, store, namespace, jobs, logger, body)
        out["jobs"] = job_summaries(store, namespace, jobs)
        return out


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


def enforce(namespace: str, name: str) -> None:
    """One retention pass over one policy; the status goes out as a merge patch."""
    try:
        body = kube.custom().get_namespaced_custom_object(GROUP, VERSION, namespace, CheckpointPolicy.plural, name)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            POLICIES.discard((namespace, name))
            return
        raise
    status = policy_status(body, retention=True, logger=log)
    kube.custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, CheckpointPolicy.plural, name,
                                                        {"status": status})


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
