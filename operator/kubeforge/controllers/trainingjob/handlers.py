"""TrainingJob handlers: thin kopf handlers around ``plan.plan``.

Events of TrainingJobs, of their pods and of Nodes only put the job's key on a work queue
(deduplicated, with delays, like controller-runtime's); a few workers take keys off it and
reconcile one job at a time: read the job, its pods, the nodes they run on, the policy
and the store; ``plan()``; write status first, then create and delete pods, post Events.
No per-job daemon and no finalizer: a job deleted while the operator is down goes away
with its children through their ownerReferences.

State (the queue, the caches, the thread pool) is the operator's, in ``memo.trainingjobs``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import logging
import time
from collections import Counter as Tally
from typing import Any, cast

import kopf

from kubeforge import k8s
from kubeforge.api import CheckpointPolicy, CheckpointPolicySpec, Dataset, TrainingJob
from kubeforge.api.common import GROUP, VERSION
from kubeforge.api.trainingjob import DatasetRef, InitFrom
from kubeforge.controllers.background import Background, WorkQueue, queue_worker
from kubeforge.controllers.store_access import StoreAccess, shared_stores
from kubeforge.controllers.trainingjob import manifests as pods_
from kubeforge.controllers.trainingjob.plan import (
    DatasetResolution,
    NodeHealth,
    Observed,
    Plan,
    StoreView,
    node_health,
    plan,
    resolve_dataset,
    resolve_init,
    volume_view,
)
from kubeforge.metrics import (
    CHECKPOINT_INTERVAL,
    LAST_CHECKPOINT_TIME,
    TRAININGJOBS,
    WORKER_REPLACEMENTS,
    reconciling,
    remove_series,
)
from kubeforge.settings import OperatorSettings
from kubeforge.store import open_policy_store
from kubeforge.store.report import job_run

log = logging.getLogger("kubeforge.trainingjob")
Key = tuple[str, str]
PHASES = ("Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed")


@dataclasses.dataclass
class Caches:
    """What the watches taught us; rebuilt from the initial listings after a restart."""

    nodes: dict[str, NodeHealth] = dataclasses.field(default_factory=dict)
    pod_nodes: dict[Key, tuple[Key, str]] = dataclasses.field(default_factory=dict)  # pod → (job, node)
    phases: dict[Key, str] = dataclasses.field(default_factory=dict)
    #: (job uid, generation, status.dataset uri, status.initFrom uri): the children were applied for that
    applied: set[tuple[str, int, str | None, str | None]] = dataclasses.field(default_factory=set)
    #: Dataset (namespace, name) -> the jobs waiting for a version of it
    dataset_waiters: dict[Key, set[Key]] = dataclasses.field(default_factory=dict)
    #: TrainingJob (namespace, name) -> the jobs waiting for its export (spec.initFrom)
    export_waiters: dict[Key, set[Key]] = dataclasses.field(default_factory=dict)
    #: store reads that must be newer than this (monotonic) time: worker 0 finished, its export is in question
    fresh_store_wanted: dict[tuple[str, Key, str], float] = dataclasses.field(default_factory=dict)


class TrainingJobs:
    """The controller's state: settings, work queue, caches, and the threads that reconcile."""

    def __init__(self, settings: OperatorSettings, stores: StoreAccess | None = None) -> None:
        self.settings = settings
        self.queue: WorkQueue[Key] = WorkQueue()
        self.caches = Caches()
        #: reads of the S3 stores, off these threads (shared by every controller)
        self.stores = stores or StoreAccess()
        #: the event loop the queue lives on (set at startup)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=settings.trainingjob.workers,
                                                          thread_name_prefix="trainingjob")

    def enqueue(self, key: Key, delay: float = 0.0) -> None:
        self.queue.add(key, delay)

    def enqueue_from_thread(self, key: Key) -> None:
        """``enqueue`` from a thread other than the event loop's (a store read that finished)."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.enqueue, key)
        elif self.loop is None:
            self.enqueue(key)


def _state(memo: kopf.Memo) -> TrainingJobs:
    return cast(TrainingJobs, memo.trainingjobs)


# ---- watches --------------------------------------------------------------------------

@kopf.on.startup()
async def start_queue(memo: kopf.Memo, **_: Any) -> None:
    settings = cast(OperatorSettings, memo.settings)
    background = cast(Background, memo.background)
    state = memo.trainingjobs = TrainingJobs(settings, shared_stores(memo))
    state.loop = asyncio.get_running_loop()
    for n in range(settings.trainingjob.workers):
        background.spawn(f"trainingjob-worker-{n}", queue_worker(
            state.queue, background, state.pool, lambda key: reconcile_job(state, *key), "TrainingJob",
            standby_retry_s=state.settings.trainingjob.standby_retry_s,
            error_backoff_s=state.settings.trainingjob.error_backoff_s))
    # no wait for a reconciliation blocked on a slow API or store call: the process is ending
    background.close_with(lambda: state.pool.shutdown(wait=False, cancel_futures=True))


@kopf.on.event(GROUP, VERSION, TrainingJob.plural)
async def job_event(type: str | None, meta: kopf.Meta, status: kopf.Status, memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    key = (str(meta["namespace"]), str(meta["name"]))
    for waiting in list(state.caches.export_waiters.get(key, ())):
        state.enqueue(waiting)  # a job starting from this one's export looks again (it may be committed now)
    if type == "DELETED":
        state.caches.phases.pop(key, None)
        _track_dataset_wait(state.caches, key, None)
        _track_wait(state.caches.export_waiters, key, None)
        state.stores.forget(lambda k: k[:2] == ("trainingjob", key))
        wanted = state.caches.fresh_store_wanted  # reconcile threads use it too: removed in place
        for k in [k for k in list(wanted) if k[:2] == ("trainingjob", key)]:
            wanted.pop(k, None)
        _remove_checkpoint_gauges(key)
        _publish_phases(state.caches)
        return
    if type is None or type == "ADDED" or meta.get("generation") != status.get("observedGeneration"):
        state.enqueue(key)


@kopf.on.event("", "v1", "pods", labels={pods_.JOB_LABEL: kopf.PRESENT})
async def pod_event(type: str | None, body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    ns = str(meta["namespace"])
    job = (ns, meta.labels[pods_.JOB_LABEL])
    pod_key = (ns, str(meta["name"]))
    node = body.spec.get("nodeName")
    if type == "DELETED":
        state.caches.pod_nodes.pop(pod_key, None)
    elif node:
        state.caches.pod_nodes[pod_key] = (job, node)
    state.enqueue(job)


@kopf.on.event("", "v1", "services", labels={pods_.JOB_LABEL: kopf.PRESENT})
@kopf.on.event("", "v1", "configmaps", labels={pods_.JOB_LABEL: kopf.PRESENT})
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels={pods_.JOB_LABEL: kopf.PRESENT})
async def child_event(type: str | None, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """A deleted ConfigMap, headless Service or NetworkPolicy of a job is applied again: without
    the Service the workers lose their rendezvous DNS and restart forever, without the policy
    any pod reaches the rendezvous store."""
    if type != "DELETED":
        return
    state = _state(memo)
    owners = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
    state.caches.applied = {a for a in state.caches.applied if a[0] not in owners}
    log.info("%s %s/%s of TrainingJob %s was deleted: applying it again", meta.get("kind", "child"),
             meta["namespace"], meta["name"], meta.labels[pods_.JOB_LABEL])
    state.enqueue((str(meta["namespace"]), meta.labels[pods_.JOB_LABEL]))


@kopf.on.event(GROUP, VERSION, CheckpointPolicy.plural)
async def policy_event(type: str | None, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, memo: kopf.Memo,
                       **_: Any) -> None:
    """For a volume store the policy's status (its inspector's report) is where a job's
    lastCheckpoint comes from: look at the jobs it lists now, not at the next resync."""
    if type == "DELETED" or not (spec.get("storage") or {}).get("volume"):
        return
    for entry in status.get("jobs") or []:
        _state(memo).enqueue((str(meta["namespace"]), entry["name"]))


@kopf.on.event(GROUP, VERSION, Dataset.plural)
async def dataset_event(type: str | None, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """A job waiting for a version of this Dataset looks again now (a new version committed)."""
    key = (str(meta["namespace"]), str(meta["name"]))
    for job in list(_state(memo).caches.dataset_waiters.get(key, ())):
        _state(memo).enqueue(job)


def _track_dataset_wait(caches: Caches, job: Key, dataset: str | None) -> None:
    """Remember which Dataset ``job`` waits for (None: none)."""
    _track_wait(caches.dataset_waiters, job, dataset)


def _track_wait(waiters: dict[Key, set[Key]], job: Key, target: str | None) -> None:
    """Remember which object of its namespace ``job`` waits for (None: none) in ``waiters``."""
    for key, waiting in list(waiters.items()):
        if job in waiting and key != (job[0], target):
            waiting.discard(job)
            if not waiting:
                waiters.pop(key, None)
    if target is not None:
        waiters.setdefault((job[0], target), set()).add(job)


@kopf.on.event("", "v1", "nodes")
async def node_event(type: str | None, body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    caches, name = state.caches, str(meta["name"])
    before = caches.nodes.get(name)
    if type == "DELETED":
        now = dt.datetime.now(dt.UTC)
        caches.nodes[name] = NodeHealth("Missing", before.since if before and before.ready != "True" else now)
    else:
        caches.nodes[name] = node_health(dict(body), before, dt.datetime.now(dt.UTC))
    after = caches.nodes[name]
    if before is None or before.ready != after.ready:
        for job, node in list(caches.pod_nodes.values()):
            if node == name:
                state.enqueue(job)


# ---- the reconciliation ---------------------------------------------------------------

def _nodes_for(caches: Caches, pods: list[dict[str, Any]]) -> dict[str, NodeHealth]:
    """Node health from the watch; a node the watch has not shown yet is read directly, so a
    fresh operator never takes an unseen node for a lost one."""
    out: dict[str, NodeHealth] = {}
    for pod in pods:
        name = (pod.get("spec") or {}).get("nodeName")
        if not name or name in out:
            continue
        health = caches.nodes.get(name)
        if health is None:
            node = k8s.get_or_none(k8s.core().read_node, name)
            now = dt.datetime.now(dt.UTC)
            health = node_health(node, None, now) if node else NodeHealth("Missing", now)
            caches.nodes[name] = health
        out[name] = health
    return out


def _read_policy(namespace: str, name: str,
                 job: str) -> tuple[CheckpointPolicySpec | None, str | None, dict[str, Any] | None]:
    """The policy's spec (or why not) and its ``status.jobs`` entry for ``job``."""
    body = k8s.get_custom(namespace, CheckpointPolicy.plural, name)
    if body is None:
        return None, f"CheckpointPolicy {name} does not exist", None
    entry = next((j for j in (body.get("status") or {}).get("jobs") or [] if j.get("name") == job), None)
    try:
        return CheckpointPolicySpec.model_validate(body.get("spec") or {}), None, entry
    except ValueError as e:
        return None, f"CheckpointPolicy {name} is invalid: {e}", None


def _read_store_view(namespace: str, run: str, policy: CheckpointPolicySpec, deadline_s: float) -> StoreView:
    """lastCheckpoint and the export marker of ``run``, read from its S3 store (in a store
    thread of ``state.stores``; raises on failure)."""
    s3 = policy.storage.s3
    assert s3 is not None
    store = open_policy_store(policy, k8s.read_secret(namespace, s3.credentials_secret_ref.name), deadline_s)
    newest = store.newest_committed(namespace, run)
    marker = store.export_marker(namespace, run)
    last = None
    if newest is not None:
        last = {"step": newest.step, "uri": store.checkpoint_uri(namespace, run, newest.step)}
        if newest.marker is not None and newest.marker.time:
            last["time"] = newest.marker.time
    return StoreView(last_checkpoint=last, export_committed=marker is not None,
                     export_uri=store.export_uri(namespace, run))


def _store_view(state: TrainingJobs, key: Key, run: str, policy_name: str, policy: CheckpointPolicySpec,
                fresh: bool) -> StoreView | None:
    """What the S3 store says about the job's ``run`` (a volume's comes from the policy status,
    see ``volume_view``), never waiting for the store: the read runs in the policy's store
    threads (``controllers.store_access``) and re-enqueues the job when it is done. Reused for
    ``store_refresh_s``; with ``fresh`` (worker 0 exited 0: is the export committed?) only an
    answer read after the first such request counts, None until there is one."""
    if policy.storage.s3 is None:
        return None
    ns = key[0]
    deadline = state.settings.checkpointpolicy.store_retry_deadline_s
    read_key: tuple[str, Key, str] = ("trainingjob", key, run)
    now = time.monotonic()
    if fresh:
        wanted = state.caches.fresh_store_wanted.setdefault(read_key, now)
        max_age = now - wanted
    else:
        state.caches.fresh_store_wanted.pop(read_key, None)
        wanted, max_age = None, state.settings.trainingjob.store_refresh_s
    reading = state.stores.read((ns, policy_name), read_key, lambda: _read_store_view(ns, run, policy, deadline),
                                max_age=max_age, on_done=lambda: state.enqueue_from_thread(key))
    if reading.error:  # the change itself is logged once by store_access, with the metric
        log.debug("store of %s/%s unreadable: %s", ns, run, reading.error)
    if wanted is not None and not reading.newer_than(wanted):
        return None
    return reading.value

def observe(state: TrainingJobs, namespace: str, name: str) -> Observed | None:
    job = k8s.get_custom(namespace, TrainingJob.plural, name)
    if job is None or job["metadata"].get("deletionTimestamp"):
        return None
    pods = k8s.list_pods(namespace, f"{pods_.JOB_LABEL}={name}")
    spec = job.get("spec") or {}
    policy, policy_error, store = None, None, None
    ref = (spec.get("checkpointPolicyRef") or {}).get("name")
    entry: dict[str, Any] | None = None
    if ref:
        policy, policy_error, entry = _read_policy(namespace, ref, name)
    run = job_run(job)
    if policy is not None and policy.storage.volume is not None:
        store = volume_view(entry, run)
    elif policy is not None:
        worker0_done = any(p["metadata"]["name"] == pods_.worker_name(name, 0) and
                           (p.get("status") or {}).get("phase") == "Succeeded" for p in pods)
        store = _store_view(state, (namespace, name), run, str(ref), policy, fresh=worker0_done)
    return Observed(job=job, pods=pods, nodes=_nodes_for(state.caches, pods), policy=policy,
                    policy_error=policy_error, store=store, default_image=state.settings.images.workload,
                    security=state.settings.security, resume_run=_resume_run(job), dataset=_read_dataset(job),
                    init_from=_read_init(job))


def _read_dataset(job: dict[str, Any]) -> DatasetResolution | None:
    """spec.data.datasetRef resolved against the Dataset as it is now; read only until
    status.dataset records a version (then kept for the job's life)."""
    ref = ((job.get("spec") or {}).get("data") or {}).get("datasetRef")
    if not ref or (job.get("status") or {}).get("dataset"):
        return None
    try:
        parsed = DatasetRef.model_validate(ref)
    except ValueError:
        return None  # plan() reports the invalid spec
    return resolve_dataset(parsed, k8s.get_custom(job["metadata"]["namespace"], Dataset.plural, parsed.name))


def _read_init(job: dict[str, Any]) -> DatasetResolution | None:
    """spec.initFrom resolved against the TrainingJob it names as it is now; read only until
    status.initFrom records it."""
    ref = (job.get("spec") or {}).get("initFrom")
    if not ref or (job.get("status") or {}).get("initFrom"):
        return None
    try:
        parsed = InitFrom.model_validate(ref)
    except ValueError:
        return None  # plan() reports the invalid spec
    return resolve_init(parsed, k8s.get_custom(job["metadata"]["namespace"], TrainingJob.plural,
                                               parsed.training_job_ref.name))


def _resume_run(job: dict[str, Any]) -> str | None:
    """The run of the TrainingJob ``spec.resumeFrom.trainingJob`` names, when that object exists
    and is not this one."""
    resume = (job.get("spec") or {}).get("resumeFrom") or {}
    meta = job["metadata"]
    source = resume.get("trainingJob")
    if not source or source == meta["name"]:
        return None
    other = k8s.get_custom(meta["namespace"], TrainingJob.plural, source)
    return job_run(other) if other is not None else None


def reconcile_job(state: TrainingJobs, namespace: str, name: str) -> float | None:
    """One pass over one job; returns when to look again (None: only on events)."""
    with reconciling(TrainingJob.kind):
        obs = observe(state, namespace, name)
        if obs is None:
            return None
        decided = plan(obs)
        if not apply_status(obs, decided):
            return 0.5  # someone wrote the job meanwhile: observe again
        apply_children(state.caches, obs, decided)
        _track_dataset_wait(state.caches, (namespace, name), decided.waiting_for_dataset)
        _track_wait(state.caches.export_waiters, (namespace, name), decided.waiting_for_export)
        phase = decided.status.get("phase") or "Pending"
        state.caches.phases[(namespace, name)] = phase
        _publish_checkpoint_gauges((namespace, name), phase, obs)
        _publish_phases(state.caches)
        return decided.requeue_after


#: Phases in which a job writes no checkpoint: its checkpoint gauges go, so that
#: KubeforgeCheckpointStale does not fire for a job that finished or is suspended.
NOT_CHECKPOINTING = frozenset({"Succeeded", "Failed", "Suspended"})


def _publish_checkpoint_gauges(key: Key, phase: str, obs: Observed) -> None:
    """The newest checkpoint's time and the policy's interval, for KubeforgeCheckpointStale;
    removed while the job writes none."""
    if phase in NOT_CHECKPOINTING or obs.policy is None:
        _remove_checkpoint_gauges(key)
        return
    last = (obs.store.last_checkpoint if obs.store else None) or {}
    if last.get("time"):
        LAST_CHECKPOINT_TIME.labels(*key).set(dt.datetime.fromisoformat(last["time"]).timestamp())
    if obs.policy.schedule.every_seconds:
        CHECKPOINT_INTERVAL.labels(*key).set(obs.policy.schedule.every_seconds)


def _remove_checkpoint_gauges(key: Key) -> None:
    for gauge in (LAST_CHECKPOINT_TIME, CHECKPOINT_INTERVAL):
        remove_series(gauge, *key)


def apply_status(obs: Observed, decided: Plan) -> bool:
    """Write the new status (first, before any pod changes); False on a write conflict."""
    old = obs.job.get("status") or {}
    new = {k: v for k, v in decided.status.items() if v is not None}
    if {k: v for k, v in old.items() if v is not None} == new:
        return True
    meta = obs.job["metadata"]
    return k8s.patch_status(TrainingJob.plural, meta["namespace"], meta["name"],
                            {**{k: None for k in old if k not in new}, **new},
                            resource_version=meta["resourceVersion"])


def apply_children(caches: Caches, obs: Observed, decided: Plan) -> None:
    meta = obs.job["metadata"]
    ns = meta["namespace"]
    # the config follows status.dataset too: recorded after the first children were applied
    applied = (meta["uid"], int(meta.get("generation") or 0), (decided.status.get("dataset") or {}).get("uri"),
               (decided.status.get("initFrom") or {}).get("uri"))
    if decided.children and applied not in caches.applied:
        for child in decided.children:
            k8s.apply(child)
        if not obs.security.network_policies and k8s.delete_network_policy(pods_.network_policy_name(meta["name"]), ns):
            log.info("deleted NetworkPolicy of TrainingJob %s/%s: the operator makes none", ns, meta["name"])
        caches.applied.add(applied)
    for d in decided.delete:
        k8s.delete_pod(d.name, ns, uid=d.uid, force=d.force)
    for manifest in decided.create:
        k8s.create(k8s.core().create_namespaced_pod, ns, manifest)
    for event in decided.events:
        k8s.record_event(obs.job, event.reason, event.message, event.warning)
    for reason, n in Tally(decided.replacements).items():
        WORKER_REPLACEMENTS.labels(reason).inc(n)
    if decided.delete_job:
        k8s.delete(k8s.custom().delete_namespaced_custom_object, GROUP, VERSION, ns, TrainingJob.plural,
                   meta["name"], propagation_policy="Background")


def _publish_phases(caches: Caches) -> None:
    counts = Tally(caches.phases.values())
    for phase in PHASES:
        TRAININGJOBS.labels(phase).set(counts.get(phase, 0))
