"""TrainingJob controller: thin kopf handlers around ``trainingjob_plan.plan``.

Events of TrainingJobs, of their pods and of Nodes only put the job's key on a work queue
(deduplicated, with delays, like controller-runtime's); a few workers take keys off it and
reconcile one job at a time: read the job, its pods, the nodes they run on, the policy
and the store; ``plan()``; write status first, then create and delete pods, post Events.
No per-job daemon and no finalizer: a job deleted while the operator is down goes away
with its children through their ownerReferences.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import logging
import os
import time
from collections import Counter as Tally
from typing import Any, cast

import kopf
import kubernetes

from kubeforge import kube
from kubeforge.api import CheckpointPolicySpec, TrainingJob
from kubeforge.api.common import GROUP, VERSION
from kubeforge.controllers import trainingjob_pods as pods_
from kubeforge.controllers.checkpointpolicy import open_policy_store, read_secret
from kubeforge.controllers.status import record_event
from kubeforge.controllers.trainingjob_plan import NodeHealth, Observed, Plan, StoreView, parse_time, plan
from kubeforge.metrics import (
    CHECKPOINT_INTERVAL,
    LAST_CHECKPOINT_TIME,
    TRAININGJOBS,
    WORKER_REPLACEMENTS,
    reconciling,
)
from kubeforge.store import StoreError

log = logging.getLogger("kubeforge.trainingjob")
Key = tuple[str, str]
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
FIELD_MANAGER = "kubeforge"
PHASES = ("Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed")


@dataclasses.dataclass(frozen=True)
class TrainingJobSettings:
    """How the TrainingJob controller works through its queue."""

    #: Jobs reconciled at the same time (each in a thread: the Kubernetes client blocks).
    workers: int = 8
    #: How long the store's answer (lastCheckpoint) is reused before it is read again.
    store_refresh_s: float = 30.0
    #: Pause before retrying a reconciliation that raised.
    error_backoff_s: float = 5.0

    @classmethod
    def from_env(cls) -> TrainingJobSettings:
        env = os.environ
        return cls(workers=int(env.get("KUBEFORGE_TRAININGJOB_WORKERS", cls.workers)),
                   store_refresh_s=float(env.get("KUBEFORGE_STORE_REFRESH_SECONDS", cls.store_refresh_s)))


SETTINGS = TrainingJobSettings.from_env()


class WorkQueue:
    """Keys due at a time; a key is handed to one worker at a time, and adding a key while
    it is being worked on brings it back once that work is done."""

    def __init__(self) -> None:
        self._due: dict[Key, float] = {}
        self._busy: set[Key] = set()
        self._wake = asyncio.Event()

    def add(self, key: Key, delay: float = 0.0) -> None:
        due = time.monotonic() + delay
        self._due[key] = min(self._due.get(key, due), due)
        self._wake.set()

    async def get(self) -> Key:
        while True:
            now = time.monotonic()
            ready = [(due, k) for k, due in self._due.items() if k not in self._busy]
            if ready:
                due, key = min(ready)
                if due <= now:
                    del self._due[key]
                    self._busy.add(key)
                    return key
                timeout: float | None = due - now
            else:
                timeout = None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def done(self, key: Key) -> None:
        self._busy.discard(key)
        self._wake.set()


@dataclasses.dataclass
class _Caches:
    """What the watches taught us; rebuilt from the initial listings after a restart."""

    nodes: dict[str, NodeHealth] = dataclasses.field(default_factory=dict)
    pod_nodes: dict[Key, tuple[Key, str]] = dataclasses.field(default_factory=dict)  # pod → (job, node)
    phases: dict[Key, str] = dataclasses.field(default_factory=dict)
    applied: set[tuple[str, int]] = dataclasses.field(default_factory=set)  # (job uid, generation)
    store: dict[Key, tuple[float, StoreView]] = dataclasses.field(default_factory=dict)


CACHES = _Caches()
QUEUE: WorkQueue | None = None
POOL = concurrent.futures.ThreadPoolExecutor(max_workers=SETTINGS.workers, thread_name_prefix="trainingjob")


def enqueue(key: Key, delay: float = 0.0) -> None:
    if QUEUE is not None:
        QUEUE.add(key, delay)


# ---- watches --------------------------------------------------------------------------

@kopf.on.startup()
async def start_queue(**_: Any) -> None:
    global QUEUE
    QUEUE = WorkQueue()
    for n in range(SETTINGS.workers):
        asyncio.get_running_loop().create_task(_work(QUEUE), name=f"trainingjob-worker-{n}")


@kopf.on.event(GROUP, VERSION, TrainingJob.plural)
async def job_event(type: str | None, body: Any, meta: Any, status: Any, **_: Any) -> None:
    key = (meta["namespace"], meta["name"])
    if type == "DELETED":
        CACHES.phases.pop(key, None)
        CACHES.store.pop(key, None)
        for gauge in (LAST_CHECKPOINT_TIME, CHECKPOINT_INTERVAL):
            try:
                gauge.remove(*key)
            except KeyError:
                pass
        _publish_phases()
        return
    if type is None or type == "ADDED" or meta.get("generation") != (status or {}).get("observedGeneration"):
        enqueue(key)


@kopf.on.event("", "v1", "pods", labels={pods_.JOB_LABEL: kopf.PRESENT})
async def pod_event(type: str | None, body: Any, meta: Any, **_: Any) -> None:
    job = (meta["namespace"], meta["labels"][pods_.JOB_LABEL])
    pod_key = (meta["namespace"], meta["name"])
    if type == "DELETED":
        CACHES.pod_nodes.pop(pod_key, None)
    elif body.get("spec", {}).get("nodeName"):
        CACHES.pod_nodes[pod_key] = (job, body["spec"]["nodeName"])
    enqueue(job)


@kopf.on.event(GROUP, VERSION, "checkpointpolicies")
async def policy_event(type: str | None, body: Any, meta: Any, status: Any, **_: Any) -> None:
    """For a volume store the policy's status (its inspector's report) is where a job's
    lastCheckpoint comes from: look at the jobs it lists now, not at the next resync."""
    if type == "DELETED" or not ((body.get("spec") or {}).get("storage") or {}).get("volume"):
        return
    for entry in (status or {}).get("jobs") or []:
        enqueue((meta["namespace"], entry["name"]))


def node_health(body: Any, before: NodeHealth | None = None) -> NodeHealth:
    """The node's Ready status, and since when it is not Ready: the condition's transition
    time, but never earlier than this process first saw it not Ready (kwok, and some
    node-problem tools, back-date the transition; a restarted operator grants a fresh grace
    rather than force-deleting at once)."""
    now = dt.datetime.now(dt.UTC)
    ready: dict[str, Any] = next(
        (c for c in (body.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), {})
    status = str(ready.get("status", "Unknown"))
    if status == "True":
        return NodeHealth(status, parse_time(ready.get("lastTransitionTime")) or now)
    if before is not None and before.ready != "True":
        return NodeHealth(status, before.since)
    return NodeHealth(status, max(parse_time(ready.get("lastTransitionTime")) or now, now))


@kopf.on.event("", "v1", "nodes")
async def node_event(type: str | None, body: Any, meta: Any, **_: Any) -> None:
    name = meta["name"]
    before = CACHES.nodes.get(name)
    if type == "DELETED":
        now = dt.datetime.now(dt.UTC)
        CACHES.nodes[name] = NodeHealth("Missing", before.since if before and before.ready != "True" else now)
    else:
        CACHES.nodes[name] = node_health(body, before)
    after = CACHES.nodes[name]
    if before is None or before.ready != after.ready:
        for job, node in list(CACHES.pod_nodes.values()):
            if node == name:
                enqueue(job)


# ---- the reconciliation ---------------------------------------------------------------

async def _work(queue: WorkQueue) -> None:
    loop = asyncio.get_running_loop()
    while True:
        key = await queue.get()
        try:
            again = await loop.run_in_executor(POOL, reconcile_job, *key)
        except Exception:
            log.exception("reconciling TrainingJob %s/%s failed", *key)
            again = SETTINGS.error_backoff_s
        finally:
            queue.done(key)
        if again is not None:
            queue.add(key, again)


def _nodes_for(pods: list[dict[str, Any]]) -> dict[str, NodeHealth]:
    """Node health from the watch; a node the watch has not shown yet is read directly, so a
    fresh operator never takes an unseen node for a lost one."""
    out: dict[str, NodeHealth] = {}
    for pod in pods:
        name = (pod.get("spec") or {}).get("nodeName")
        if not name or name in out:
            continue
        health = CACHES.nodes.get(name)
        if health is None:
            node = kube.get_json(kube.core().read_node, name)
            health = node_health(node) if node else NodeHealth("Missing", dt.datetime.now(dt.UTC))
            CACHES.nodes[name] = health
        out[name] = health
    return out


def _read_policy(namespace: str, name: str,
                 job: str) -> tuple[CheckpointPolicySpec | None, str | None, dict[str, Any] | None]:
    """The policy's spec (or why not) and its ``status.jobs`` entry for ``job``."""
    body = kube.get_json(kube.custom().get_namespaced_custom_object, GROUP, VERSION, namespace,
                         "checkpointpolicies", name)
    if body is None:
        return None, f"CheckpointPolicy {name} does not exist", None
    entry = next((j for j in (body.get("status") or {}).get("jobs") or [] if j.get("name") == job), None)
    try:
        return CheckpointPolicySpec.model_validate(body.get("spec") or {}), None, entry
    except ValueError as e:
        return None, f"CheckpointPolicy {name} is invalid: {e}", None


def volume_view(entry: dict[str, Any] | None) -> StoreView | None:
    """lastCheckpoint of a job on a volume store, from the policy's status (its inspector pod
    mounts the claim; the operator cannot). No verdict on the export when it is not listed:
    worker 0 exits 0 only after committing it."""
    if not entry or entry.get("newestStep") is None:
        return None
    last = {"step": entry["newestStep"], "uri": entry.get("newestUri")}
    if entry.get("newestTime"):
        last["time"] = entry["newestTime"]
    return StoreView(last_checkpoint={k: v for k, v in last.items() if v is not None},
                     export_committed=True if entry.get("exportUri") else None, export_uri=entry.get("exportUri"))


def _store_view(key: Key, policy: CheckpointPolicySpec, fresh: bool) -> StoreView | None:
    """lastCheckpoint and the export marker read from the store (S3; a volume's come from the
    policy status, see ``volume_view``). Cached for ``store_refresh_s`` unless ``fresh``."""
    s3 = policy.storage.s3
    if s3 is None:
        return None
    cached = CACHES.store.get(key)
    if cached and not fresh and time.monotonic() - cached[0] < SETTINGS.store_refresh_s:
        return cached[1]
    ns, job = key
    try:
        store = open_policy_store(policy, read_secret(ns, s3.credentials_secret_ref.name))
        newest = store.newest_committed(ns, job)
        marker = store.export_marker(ns, job)
    except StoreError as e:
        log.warning("store of %s/%s unreadable: %s", ns, job, e)
        return None
    last = None
    if newest is not None:
        last = {"step": newest.step, "uri": store.checkpoint_uri(ns, job, newest.step)}
        if newest.marker is not None and newest.marker.time:
            last["time"] = newest.marker.time
            LAST_CHECKPOINT_TIME.labels(ns, job).set(dt.datetime.fromisoformat(newest.marker.time).timestamp())
    if policy.schedule.every_seconds:
        CHECKPOINT_INTERVAL.labels(ns, job).set(policy.schedule.every_seconds)
    view = StoreView(last_checkpoint=last, export_committed=marker is not None, export_uri=store.export_uri(ns, job))
    CACHES.store[key] = (time.monotonic(), view)
    return view


def observe(namespace: str, name: str) -> Observed | None:
    job = kube.get_json(kube.custom().get_namespaced_custom_object, GROUP, VERSION, namespace, TrainingJob.plural, name)
    if job is None or job["metadata"].get("deletionTimestamp"):
        return None
    pods = kube.get_json(kube.core().list_namespaced_pod, namespace,
                         label_selector=f"{pods_.JOB_LABEL}={name}")["items"]
    spec = job.get("spec") or {}
    policy, policy_error, store = None, None, None
    ref = (spec.get("checkpointPolicyRef") or {}).get("name")
    entry: dict[str, Any] | None = None
    if ref:
        policy, policy_error, entry = _read_policy(namespace, ref, name)
    if policy is not None and policy.storage.volume is not None:
        store = volume_view(entry)
        if store and store.last_checkpoint and store.last_checkpoint.get("time"):
            LAST_CHECKPOINT_TIME.labels(namespace, name).set(
                dt.datetime.fromisoformat(store.last_checkpoint["time"]).timestamp())
    elif policy is not None:
        worker0_done = any(p["metadata"]["name"] == pods_.worker_name(name, 0) and
                           (p.get("status") or {}).get("phase") == "Succeeded" for p in pods)
        store = _store_view((namespace, name), policy, fresh=worker0_done)
    return Observed(job=job, pods=pods, nodes=_nodes_for(pods), policy=policy, policy_error=policy_error,
                    store=store)


def reconcile_job(namespace: str, name: str) -> float | None:
    """One pass over one job; returns when to look again (None: only on events)."""
    with reconciling(TrainingJob.kind):
        obs = observe(namespace, name)
        if obs is None:
            return None
        decided = plan(obs)
        if not apply_status(obs, decided):
            return 0.5  # someone wrote the job meanwhile: observe again
        apply_children(obs, decided)
        CACHES.phases[(namespace, name)] = decided.status.get("phase") or "Pending"
        _publish_phases()
        return decided.requeue_after


def apply_status(obs: Observed, decided: Plan) -> bool:
    """Write the new status (first, before any pod changes); False on a write conflict."""
    old = obs.job.get("status") or {}
    new = {k: v for k, v in decided.status.items() if v is not None}
    if {k: v for k, v in old.items() if v is not None} == new:
        return True
    body = {"metadata": {"resourceVersion": obs.job["metadata"]["resourceVersion"]},
            "status": {**{k: None for k in old if k not in new}, **new}}
    meta = obs.job["metadata"]
    try:
        kube.custom().patch_namespaced_custom_object_status(GROUP, VERSION, meta["namespace"], TrainingJob.plural,
                                                            meta["name"], body, _content_type=MERGE)
    except kubernetes.client.ApiException as e:
        if e.status in (404, 409):
            return False
        raise
    return True


def apply_children(obs: Observed, decided: Plan) -> None:
    meta = obs.job["metadata"]
    ns, core = meta["namespace"], kube.core()
    applied = (meta["uid"], int(meta.get("generation") or 0))
    if decided.children and applied not in CACHES.applied:
        for child in decided.children:
            _apply(child)
        CACHES.applied.add(applied)
    for d in decided.delete:
        options = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(uid=d.uid),
                                                    grace_period_seconds=0 if d.force else None)
        try:
            core.delete_namespaced_pod(d.name, ns, body=options, grace_period_seconds=0 if d.force else None)
        except kubernetes.client.ApiException as e:
            if e.status not in (404, 409):
                raise
    for manifest in decided.create:
        try:
            core.create_namespaced_pod(ns, cast(Any, manifest))  # the client sends dicts as they are
        except kubernetes.client.ApiException as e:
            if e.status != 409:
                raise
    for event in decided.events:
        record_event(obs.job, event.reason, event.message, event.warning)
    for reason, n in Tally(decided.replacements).items():
        WORKER_REPLACEMENTS.labels(reason).inc(n)
    if decided.delete_job:
        try:
            kube.custom().delete_namespaced_custom_object(GROUP, VERSION, ns, TrainingJob.plural, meta["name"],
                                                          propagation_policy="Background")
        except kubernetes.client.ApiException as e:
            if e.status != 404:
                raise


def _apply(child: dict[str, Any]) -> None:
    """Server-side apply of a ConfigMap or Service (creates, or updates what changed)."""
    core = kube.core()
    call = {"ConfigMap": core.patch_namespaced_config_map, "Service": core.patch_namespaced_service}[child["kind"]]
    call(child["metadata"]["name"], child["metadata"]["namespace"], child, field_manager=FIELD_MANAGER, force=True,
         _content_type=APPLY)


def _publish_phases() -> None:
    counts = Tally(CACHES.phases.values())
    for phase in PHASES:
        TRAININGJOBS.labels(phase).set(counts.get(phase, 0))
