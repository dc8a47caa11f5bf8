"""Dataset handlers: resolve the source (an InferenceService's capture store, or a store and
prefix), read what the store holds through ``controllers.store_access`` (never on a reconcile
thread: a dead S3 endpoint costs its own store threads, not the reconciles), and run one
curation pod per version when the schedule says so; status, Events and metrics from ``plan``.

Events of Datasets, of their curation pods and of the InferenceServices and CheckpointPolicies
they read only put the Dataset's key on a work queue; each Dataset is also looked at every
``resync_s`` (the store has no watch). Retention is applied in the store thread, before the
next read of the store. State (queue, caches, the retention asked for) is the operator's, in
``memo.datasets``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from typing import Any, cast

import kopf
import kubernetes

from kubeforge import k8s
from kubeforge.api import (
    CheckpointPolicy,
    CheckpointPolicySpec,
    Dataset,
    DatasetSpec,
    InferenceService,
    InferenceServiceSpec,
)
from kubeforge.api.common import GROUP, VERSION, StoreRef
from kubeforge.api.contract import ENV_S3_ACCESS_KEY_ID, ENV_S3_SECRET_ACCESS_KEY
from kubeforge.controllers.background import Background, WorkQueue, queue_worker
from kubeforge.controllers.checkpointpolicy.plan import secret_check
from kubeforge.controllers.dataset import manifests
from kubeforge.controllers.dataset.manifests import SourceStore
from kubeforge.controllers.dataset.plan import (
    DatasetSettings,
    Observed,
    Plan,
    Retention,
    SourceProblem,
    StoreView,
    creation_refused,
    plan,
    pod_outcome,
    store_from_ref,
)
from kubeforge.controllers.dataset.store_view import Deleted, ViewCache, read_and_apply
from kubeforge.controllers.status import parse_spec
from kubeforge.controllers.store_access import StoreAccess, shared_stores
from kubeforge.controllers.workload import workload_image
from kubeforge.metrics import (
    DATASET_CURATIONS,
    DATASET_PENDING_RECORDS,
    DATASET_RECORDS,
    DATASET_RETENTION_DELETED,
    reconciling,
    remove_series,
)
from kubeforge.settings import OperatorSettings
from kubeforge.store import flywheel, open_store

log = logging.getLogger(__name__)
Key = tuple[str, str]
#: a store read of one Dataset: ("dataset", its key, the store root, capture dir, dataset dir)
ReadKey = tuple[str, Key, str, str, str]
OUTCOMES = ("succeeded", "failed", "source_empty")
SPLITS = ("train", "eval")
RETENTION_KINDS = ("version", "incomplete_version", "shard")
#: Pause before retrying a reconciliation that raised; a standby replica's keys wait this long.
ERROR_BACKOFF_S = 5.0
STANDBY_RETRY_S = 2.0


class Datasets:
    """The controller's state: the queue and its threads, the Datasets seen (the resync goes
    over them), the store caches and the retention each Dataset's last plan asked for."""

    def __init__(self, settings: OperatorSettings, stores: StoreAccess | None = None,
                 tuning: DatasetSettings | None = None) -> None:
        self.settings = settings
        self.tuning = tuning or DatasetSettings()
        self.queue: WorkQueue[Key] = WorkQueue()
        #: reads of the S3 stores, off the reconcile threads (shared by every controller)
        self.stores = stores or StoreAccess()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.tuning.workers, thread_name_prefix="dataset")
        self.seen: set[Key] = set()
        #: generation of each InferenceService and CheckpointPolicy last seen: a Dataset reading
        #: one looks again when its spec changes, not at each of its status writes
        self.sources: dict[tuple[str, str, str], int | None] = {}
        self.read_keys: dict[Key, ReadKey] = {}
        self.caches: dict[ReadKey, ViewCache] = collections.defaultdict(ViewCache)
        #: retention a plan asked for, applied by the next store read (which pops it)
        self.retention: dict[Key, Retention] = {}
        #: when a finished (or vanished) curation pod was first seen: its outcome waits for a
        #: store answer read after that (``time.monotonic()``)
        self.fresh_wanted: dict[Key, float] = {}

    def enqueue(self, key: Key, delay: float = 0.0) -> None:
        self.queue.add(key, delay)

    def enqueue_from_thread(self, key: Key) -> None:
        """``enqueue`` from a thread other than the event loop's (a store read that finished)."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.enqueue, key)
        elif self.loop is None:
            self.enqueue(key)

    def forget(self, key: Key) -> None:
        """A deleted Dataset: no resync, no cached answer, no metric."""
        self.seen.discard(key)
        self.stores.forget(lambda k: isinstance(k, tuple) and k[:2] == ("dataset", key))
        read_key = self.read_keys.pop(key, None)
        if read_key is not None:
            self.caches.pop(read_key, None)
        self.retention.pop(key, None)
        self.fresh_wanted.pop(key, None)
        for labels in [(*key, split) for split in SPLITS]:
            remove_series(DATASET_RECORDS, *labels)
        remove_series(DATASET_PENDING_RECORDS, *key)
        for outcome in OUTCOMES:
            remove_series(DATASET_CURATIONS, *key, outcome)
        for what in RETENTION_KINDS:
            remove_series(DATASET_RETENTION_DELETED, *key, what)


def _state(memo: kopf.Memo) -> Datasets:
    return cast(Datasets, memo.datasets)


# ---- watches --------------------------------------------------------------------------

@kopf.on.startup()
async def start_datasets(memo: kopf.Memo, **_: Any) -> None:
    settings = cast(OperatorSettings, memo.settings)
    background = cast(Background, memo.background)
    state = memo.datasets = Datasets(settings, shared_stores(memo))
    state.loop = asyncio.get_running_loop()
    for n in range(state.tuning.workers):
        background.spawn(f"dataset-worker-{n}", queue_worker(
            state.queue, background, state.pool, lambda key: reconcile_dataset(state, *key), "Dataset",
            standby_retry_s=STANDBY_RETRY_S, error_backoff_s=ERROR_BACKOFF_S))
    background.close_with(lambda: state.pool.shutdown(wait=False, cancel_futures=True))

    async def resync() -> None:
        for key in sorted(state.seen):
            state.enqueue(key)

    background.every("dataset-resync", state.tuning.resync_s, resync)


@kopf.on.event(GROUP, VERSION, Dataset.plural)
async def dataset_changed(type: str | None, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """Any change counts (the kubeforge.dev/curate annotation is not in the spec)."""
    state = _state(memo)
    key = (str(meta["namespace"]), str(meta["name"]))
    if type == "DELETED":
        state.forget(key)
        return
    state.seen.add(key)
    state.enqueue(key)


@kopf.on.event("", "v1", "pods", labels={manifests.DATASET_LABEL: kopf.PRESENT})
async def curation_pod_changed(meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    _state(memo).enqueue((str(meta["namespace"]), meta.labels[manifests.DATASET_LABEL]))


@kopf.on.event(GROUP, VERSION, InferenceService.plural)
@kopf.on.event(GROUP, VERSION, CheckpointPolicy.plural)
async def dataset_source_changed(type: str | None, body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo,
                                 **_: Any) -> None:
    """A source made, changed or deleted: the Datasets of its namespace look again now."""
    state = _state(memo)
    namespace = str(meta["namespace"])
    ident = (str(body.get("kind")), namespace, str(meta["name"]))
    generation = None if type == "DELETED" else meta.get("generation")
    if type != "DELETED" and ident in state.sources and state.sources[ident] == generation:
        return
    if type == "DELETED":
        state.sources.pop(ident, None)
    else:
        state.sources[ident] = generation
    for key in sorted(k for k in state.seen if k[0] == namespace):
        state.enqueue(key)


# ---- the reconciliation ---------------------------------------------------------------

def resolve_source(namespace: str, name: str, spec: DatasetSpec) -> tuple[SourceStore, dict[str, str]] | SourceProblem:
    """The store the Dataset reads and writes, and its Secret's data; or why not."""
    src = spec.source
    ref: StoreRef
    if src.inference_service_ref is not None:
        service = src.inference_service_ref.name
        body = k8s.get_custom(namespace, InferenceService.plural, service)
        if body is None:
            return SourceProblem("InferenceServiceNotFound",
                                 f"spec.source.inferenceServiceRef: InferenceService {service} does not exist")
        parsed, error = parse_spec(InferenceServiceSpec, body.get("spec"))
        if parsed is None:
            return SourceProblem("InferenceServiceInvalid", f"InferenceService {service}: {error}")
        if parsed.logging is None:
            return SourceProblem("CaptureNotConfigured", f"spec.source.inferenceServiceRef: InferenceService {service} "
                                                         "has no spec.logging, so it captures no traffic to curate")
        ref, field = parsed.logging.store, f"spec.logging.store of InferenceService {service}"
        capture = flywheel.capture_prefix(namespace, service)
    else:
        assert src.store is not None and src.prefix is not None  # the CRD's rules
        ref, field, capture = src.store, "spec.source.store", src.prefix.strip("/")
    policy_name, policy = None, None
    if ref.checkpoint_policy_ref is not None:
        policy_name = ref.checkpoint_policy_ref.name
        body = k8s.get_custom(namespace, CheckpointPolicy.plural, policy_name)
        if body is None:
            return SourceProblem("CheckpointPolicyNotFound",
                                 f"{field}.checkpointPolicyRef: CheckpointPolicy {policy_name} does not exist")
        policy, error = parse_spec(CheckpointPolicySpec, body.get("spec"))
        if policy is None:
            return SourceProblem("CheckpointPolicyInvalid", f"CheckpointPolicy {policy_name}: {error}")
    resolved = store_from_ref(ref, field, namespace, name, capture, policy_name, policy)
    if isinstance(resolved, SourceProblem):
        return resolved
    try:
        data = k8s.read_secret(namespace, resolved.secret)
    except k8s.SecretForbidden as e:
        return SourceProblem("SecretForbidden", str(e))
    problem = secret_check(resolved.secret, data)
    if problem is not None:
        return SourceProblem(problem.reason, f"{problem.message} (the credentials of {field})")
    assert data is not None
    return resolved, data


def _read_store(state: Datasets, key: Key, read_key: ReadKey, body: dict[str, Any], source: SourceStore,
                secret: dict[str, str]) -> StoreView:
    """In a store thread: apply the retention the last plan asked for, and read the store."""
    store = open_store(source.root, endpoint_url=source.endpoint, region=source.region,
                       force_path_style=source.force_path_style, access_key_id=secret.get(ENV_S3_ACCESS_KEY_ID),
                       secret_access_key=secret.get(ENV_S3_SECRET_ACCESS_KEY),
                       retry_deadline_s=state.settings.checkpointpolicy.store_retry_deadline_s)
    retention = state.retention.pop(key, None)
    view, deleted = read_and_apply(store.backend, source.capture, source.output, state.caches[read_key], retention)
    if deleted:
        _report_deletions(body, source, deleted)
    return view


def _report_deletions(body: dict[str, Any], source: SourceStore, deleted: Deleted) -> None:
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    parts = []
    if deleted.versions:
        parts.append(f"version(s) {', '.join(map(str, deleted.versions))} (retention.keepVersions)")
        DATASET_RETENTION_DELETED.labels(*key, "version").inc(len(deleted.versions))
    if deleted.incomplete:
        parts.append(f"uncommitted version dir(s) {', '.join(map(str, deleted.incomplete))}")
        DATASET_RETENTION_DELETED.labels(*key, "incomplete_version").inc(len(deleted.incomplete))
    if deleted.shards:
        parts.append(f"{len(deleted.shards)} curated capture shard(s) under {source.source_uri} "
                     "(retention.captureMaxAgeDays)")
        DATASET_RETENTION_DELETED.labels(*key, "shard").inc(len(deleted.shards))
    message = "deleted " + "; ".join(parts)
    log.info("Dataset %s/%s: %s", *key, message)
    k8s.record_event(body, "RetentionApplied", message)


def _needs_fresh_store(body: dict[str, Any], pods: list[dict[str, Any]]) -> bool:
    """A curation pod succeeded, or the one the status names is gone: its outcome is judged on
    a store answer read after this was seen."""
    uid = body["metadata"].get("uid")
    ours = [p for p in pods if (p["metadata"].get("labels") or {}).get(manifests.DATASET_UID_LABEL) == uid]
    if any(outcome.finished and outcome.succeeded for outcome in map(pod_outcome, ours)):
        return True
    named = ((body.get("status") or {}).get("curating") or {}).get("pod")
    return bool(named) and not any(p["metadata"]["name"] == named for p in ours)


def observe(state: Datasets, namespace: str, name: str) -> Observed | None:
    body = k8s.get_custom(namespace, Dataset.plural, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    spec, error = parse_spec(DatasetSpec, body.get("spec"))
    obs = Observed(dataset=body, spec=spec, spec_error=error, settings=state.tuning)
    if spec is None:
        return obs
    key = (namespace, name)
    obs.image = workload_image(spec.image, state.settings.images.workload)
    obs.pods = k8s.list_pods(namespace, f"{manifests.DATASET_LABEL}={name}")
    resolved = resolve_source(namespace, name, spec)
    if isinstance(resolved, SourceProblem):
        obs.source = resolved
        return obs
    source, secret = resolved
    obs.source = source
    read_key: ReadKey = ("dataset", key, source.root, source.capture, source.output)
    if state.read_keys.get(key, read_key) != read_key:  # the source moved: the old answers go
        old = state.read_keys[key]
        state.stores.forget(lambda k: k == old)
        state.caches.pop(old, None)
    state.read_keys[key] = read_key
    now = time.monotonic()
    wanted: float | None = None
    if _needs_fresh_store(body, obs.pods):
        wanted = state.fresh_wanted.setdefault(key, now)
    else:
        state.fresh_wanted.pop(key, None)
    max_age = state.tuning.store_refresh_s
    if wanted is not None:
        max_age = now - wanted
    elif key in state.retention:
        max_age = 0.0
    reading = state.stores.read(source.store_key, read_key, lambda: _read_store(state, key, read_key, body, source, secret),
                                max_age=max_age, on_done=lambda: state.enqueue_from_thread(key))
    obs.store, obs.store_error = reading.value, reading.error
    obs.store_fresh = wanted is None or reading.newer_than(wanted)
    return obs


def reconcile_dataset(state: Datasets, namespace: str, name: str) -> float | None:
    """One pass over one Dataset; returns when to look again (None: on events and the resync)."""
    with reconciling(Dataset.kind):
        obs = observe(state, namespace, name)
        if obs is None:
            return None
        decided = plan(obs)
        if not apply_status(obs, decided):
            return 0.5  # someone wrote the Dataset meanwhile: observe again
        again = apply_children(state, obs, decided)
        _publish(state, (namespace, name), decided.status)
        if again is not None:
            return again if decided.requeue_after is None else min(again, decided.requeue_after)
        return decided.requeue_after


def apply_status(obs: Observed, decided: Plan) -> bool:
    """Write the new status (first, before any pod changes); False on a write conflict."""
    old = obs.dataset.get("status") or {}
    new = {k: v for k, v in decided.status.items() if v is not None}
    if {k: v for k, v in old.items() if v is not None} == new:
        return True
    meta = obs.dataset["metadata"]
    return k8s.patch_status(Dataset.plural, meta["namespace"], meta["name"],
                            {**{k: None for k in old if k not in new}, **decided.status},
                            resource_version=meta["resourceVersion"])


def apply_children(state: Datasets, obs: Observed, decided: Plan) -> float | None:
    """Pods, Events, metrics and the retention for the next store read; returns how soon to
    look again when that matters (retention waits for its read)."""
    meta = obs.dataset["metadata"]
    ns, name = meta["namespace"], meta["name"]
    for pod_name, uid in decided.delete:
        k8s.delete_pod(pod_name, ns, uid=uid or None, force=True)
    events, outcomes = list(decided.events), list(decided.outcomes)
    if decided.create is not None:
        pod_name = decided.create["metadata"]["name"]
        try:
            created = k8s.create(k8s.core().create_namespaced_pod, ns, decided.create)
        except kubernetes.client.ApiException as e:
            why = f"pod {pod_name} was refused: {e.status} {e.reason}: {str(e.body)[:300]}"
            log.warning("Dataset %s/%s: %s", ns, name, why)
            events = [ev for ev in events if ev.reason != "CurationStarted"]
            k8s.update_status(Dataset.plural, ns, name,
                              lambda st: creation_refused(st, meta.get("generation"), decided.create or {}, why,
                                                          obs.settings, obs.now))
            k8s.record_event(obs.dataset, "CurationNotCreated", why, warning=True)
            outcomes.append("failed")
        else:
            if created:
                log.info("Dataset %s/%s: started %s", ns, name, pod_name)
    for event in events:
        k8s.record_event(obs.dataset, event.reason, event.message, event.warning)
    for outcome in outcomes:
        DATASET_CURATIONS.labels(ns, name, outcome).inc()
    key = (ns, name)
    if decided.retention:
        if state.retention.get(key) != decided.retention:
            state.retention[key] = decided.retention
            return 0.5  # the next pass starts the store read that applies it
    else:
        state.retention.pop(key, None)
    return None


def _publish(state: Datasets, key: Key, status: dict[str, Any]) -> None:
    if key not in state.seen:
        return  # deleted while this pass ran: it is not counted back
    records = status.get("records")
    for split in SPLITS:
        if records is None:
            remove_series(DATASET_RECORDS, *key, split)
        else:
            DATASET_RECORDS.labels(*key, split).set(int(records.get(split) or 0))
    if status.get("pendingRecords") is None:
        remove_series(DATASET_PENDING_RECORDS, *key)
    else:
        DATASET_PENDING_RECORDS.labels(*key).set(int(status["pendingRecords"]))
