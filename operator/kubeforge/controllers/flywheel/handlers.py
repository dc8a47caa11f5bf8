"""Flywheel handlers: observe the Flywheel, its InferenceService and Dataset, its candidate
TrainingJobs and evaluation pods, the cycle's evaluation report (read through
``controllers.store_access``, never on a reconcile thread) and, while a candidate takes
traffic, the router pods' counters; then apply what ``plan`` decided, status first.

Events of Flywheels, of their jobs and pods, and of the InferenceServices and Datasets of
their namespace only put the Flywheel's key on a work queue; each Flywheel is also looked at
every ``resync_s``, and sooner when its plan asks (a step's minimum time, the router's
counters). State is the operator's, in ``memo.flywheels``.
"""

from __future__ import annotations

import asyncio
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
    Flywheel,
    FlywheelSpec,
    InferenceService,
    InferenceServiceSpec,
    TrainingJob,
)
from kubeforge.api.common import GROUP, VERSION
from kubeforge.api.contract import ENV_S3_ACCESS_KEY_ID, ENV_S3_SECRET_ACCESS_KEY, SERVING_PORT
from kubeforge.controllers.background import Background, WorkQueue, queue_worker
from kubeforge.controllers.checkpointpolicy.plan import secret_check
from kubeforge.controllers.dataset.plan import CURATE_ANNOTATION, pod_outcome
from kubeforge.controllers.flywheel import manifests, router_stats
from kubeforge.controllers.flywheel.manifests import EvalStore
from kubeforge.controllers.flywheel.plan import (
    OUTCOMES,
    ROLLOUT_STAGES,
    Event,
    FlywheelSettings,
    Observed,
    Plan,
    Problem,
    plan,
    plan_deletion,
)
from kubeforge.controllers.inferenceservice.manifests import ROLE_POD_LABEL, ROUTER
from kubeforge.controllers.status import parse_spec
from kubeforge.controllers.store_access import StoreAccess, shared_stores
from kubeforge.controllers.workload import workload_image
from kubeforge.metrics import FLYWHEEL_CANDIDATE_PERCENT, FLYWHEEL_CYCLES, reconciling, remove_series
from kubeforge.settings import OperatorSettings
from kubeforge.store import open_store
from kubeforge.store.evaluation import EvaluationReport, committed_report_bytes
from kubeforge.store.policy import storage_uri

log = logging.getLogger(__name__)
Key = tuple[str, str]
ERROR_BACKOFF_S = 5.0
STANDBY_RETRY_S = 2.0


class Flywheels:
    """The controller's state: the queue and its threads, the Flywheels seen, and when a
    finished evaluation pod was first seen (its report is judged on a read after that)."""

    def __init__(self, settings: OperatorSettings, stores: StoreAccess | None = None,
                 tuning: FlywheelSettings | None = None) -> None:
        self.settings = settings
        self.tuning = tuning or FlywheelSettings()
        self.queue: WorkQueue[Key] = WorkQueue()
        self.stores = stores or StoreAccess()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.tuning.workers, thread_name_prefix="flywheel")
        self.seen: set[Key] = set()
        self.fresh_wanted: dict[Key, float] = {}
        #: why the API server refused a Flywheel's job or pod: (cycle, message), for its next plan
        self.refused: dict[Key, tuple[int, str]] = {}

    def enqueue(self, key: Key, delay: float = 0.0) -> None:
        self.queue.add(key, delay)

    def enqueue_from_thread(self, key: Key) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.enqueue, key)
        elif self.loop is None:
            self.enqueue(key)

    def forget(self, key: Key) -> None:
        self.seen.discard(key)
        self.fresh_wanted.pop(key, None)
        self.refused.pop(key, None)
        self.stores.forget(lambda k: isinstance(k, tuple) and k[:2] == ("flywheel", key))
        for outcome in OUTCOMES:
            remove_series(FLYWHEEL_CYCLES, *key, outcome)
        for role in ("shadow", "canary"):
            remove_series(FLYWHEEL_CANDIDATE_PERCENT, *key, role)


def _state(memo: kopf.Memo) -> Flywheels:
    return cast(Flywheels, memo.flywheels)


# ---- watches --------------------------------------------------------------------------

@kopf.on.startup()
async def start_flywheels(memo: kopf.Memo, **_: Any) -> None:
    settings = cast(OperatorSettings, memo.settings)
    background = cast(Background, memo.background)
    state = memo.flywheels = Flywheels(settings, shared_stores(memo))
    state.loop = asyncio.get_running_loop()
    for n in range(state.tuning.workers):
        background.spawn(f"flywheel-worker-{n}", queue_worker(
            state.queue, background, state.pool, lambda key: reconcile_flywheel(state, *key), "Flywheel",
            standby_retry_s=STANDBY_RETRY_S, error_backoff_s=ERROR_BACKOFF_S))
    background.close_with(lambda: state.pool.shutdown(wait=False, cancel_futures=True))

    async def resync() -> None:
        for key in sorted(state.seen):
            state.enqueue(key)

    background.every("flywheel-resync", state.tuning.resync_s, resync)


@kopf.on.event(GROUP, VERSION, Flywheel.plural)
async def flywheel_changed(type: str | None, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """Any change counts (the run-cycle and promote annotations are not in the spec)."""
    state = _state(memo)
    key = (str(meta["namespace"]), str(meta["name"]))
    if type == "DELETED":
        state.forget(key)
        return
    state.seen.add(key)
    state.enqueue(key)


@kopf.on.event(GROUP, VERSION, TrainingJob.plural, labels={manifests.FLYWHEEL_LABEL: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={manifests.FLYWHEEL_LABEL: kopf.PRESENT})
async def flywheel_child_changed(meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    _state(memo).enqueue((str(meta["namespace"]), meta.labels[manifests.FLYWHEEL_LABEL]))


@kopf.on.event(GROUP, VERSION, InferenceService.plural)
@kopf.on.event(GROUP, VERSION, Dataset.plural)
async def flywheel_input_changed(meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """An InferenceService or Dataset changed (status too: readiness, new versions): the
    Flywheels of its namespace look again."""
    state = _state(memo)
    namespace = str(meta["namespace"])
    for key in sorted(k for k in state.seen if k[0] == namespace):
        state.enqueue(key)


# ---- the reconciliation ---------------------------------------------------------------

def resolve_eval_store(namespace: str, spec: FlywheelSpec) -> tuple[EvalStore, dict[str, str]] | Problem:
    """The training CheckpointPolicy's S3 store (candidate exports and evaluation reports)."""
    ref = spec.training.template.checkpoint_policy_ref
    field = "spec.training.template.checkpointPolicyRef"
    if ref is None:
        return Problem("InvalidSpec", f"{field} must be set: the candidate's export and the evaluation report are "
                                      "written to that policy's S3 storage")
    body = k8s.get_custom(namespace, CheckpointPolicy.plural, ref.name)
    if body is None:
        return Problem("CheckpointPolicyNotFound", f"{field}: CheckpointPolicy {ref.name} does not exist")
    policy, error = parse_spec(CheckpointPolicySpec, body.get("spec"))
    if policy is None:
        return Problem("CheckpointPolicyInvalid", f"CheckpointPolicy {ref.name}: {error}")
    s3 = policy.storage.s3
    if s3 is None:
        return Problem("StoreUnsupported", f"{field}: CheckpointPolicy {ref.name} stores on a volume; a Flywheel "
                                           "needs S3 storage (the operator reads the evaluation report there)")
    secret = s3.credentials_secret_ref.name
    try:
        data = k8s.read_secret(namespace, secret)
    except k8s.SecretForbidden as e:
        return Problem("SecretForbidden", str(e))
    problem = secret_check(secret, data)
    if problem is not None:
        return Problem(problem.reason, f"{problem.message} (the credentials of CheckpointPolicy {ref.name})")
    assert data is not None
    return EvalStore(root=storage_uri(policy), secret=secret, store_key=(namespace, ref.name), endpoint=s3.endpoint,
                     region=s3.region, force_path_style=s3.force_path_style), data


def _read_report(state: Flywheels, store: EvalStore, secret: dict[str, str], report_dir: str) -> EvaluationReport | None:
    """In a store thread: the committed report, or None."""
    backend = open_store(store.root, endpoint_url=store.endpoint, region=store.region,
                         force_path_style=store.force_path_style, access_key_id=secret.get(ENV_S3_ACCESS_KEY_ID),
                         secret_access_key=secret.get(ENV_S3_SECRET_ACCESS_KEY),
                         retry_deadline_s=state.settings.checkpointpolicy.store_retry_deadline_s).backend
    body = committed_report_bytes(lambda name: backend.get_bytes(f"{report_dir}/{name}"))
    return EvaluationReport.model_validate_json(body) if body is not None else None


def read_router(namespace: str, service: str) -> tuple[dict[str, router_stats.Counters] | None, str | None]:
    """Each running router pod's counters, by pod uid; None and why when none could be read."""
    pods = k8s.list_pods(namespace, f"{ROLE_POD_LABEL}={service}.{ROUTER}")
    out: dict[str, router_stats.Counters] = {}
    errors = []
    for pod in pods:
        ip = (pod.get("status") or {}).get("podIP")
        if (pod.get("status") or {}).get("phase") != "Running" or not ip or pod["metadata"].get("deletionTimestamp"):
            continue
        try:
            out[str(pod["metadata"]["uid"])] = router_stats.scrape(ip, SERVING_PORT)
        except (OSError, ValueError) as e:
            errors.append(f"{pod['metadata']['name']}: {e}")
    if not out:
        return None, "; ".join(errors) or f"no running router pod of InferenceService {service}"
    return out, None


def observe(state: Flywheels, namespace: str, name: str) -> Observed | None:
    body = k8s.get_custom(namespace, Flywheel.plural, name)
    if body is None:
        return None
    spec, error = parse_spec(FlywheelSpec, body.get("spec"))
    obs = Observed(flywheel=body, spec=spec, spec_error=error, settings=state.tuning)
    if spec is None:
        return obs
    key = (namespace, name)
    obs.image = workload_image(spec.evaluation.image, state.settings.images.workload)
    obs.isvc = k8s.get_custom(namespace, InferenceService.plural, spec.inference_service_ref.name)
    if obs.isvc is not None:
        obs.isvc_spec, obs.isvc_error = parse_spec(InferenceServiceSpec, obs.isvc.get("spec"))
    obs.dataset = k8s.get_custom(namespace, Dataset.plural, spec.dataset_ref.name)
    # every job of the name (an earlier Flywheel's too: the plan numbers cycles past them and
    # adopts none), and the current cycle's by name, labelled or not
    obs.jobs = {j["metadata"]["name"]: j for j in k8s.list_custom(namespace, TrainingJob.plural,
                                                                   f"{manifests.FLYWHEEL_LABEL}={name}")}
    cycle_now = int((body.get("status") or {}).get("cycle") or 0)
    current = manifests.job_name(name, cycle_now)
    if cycle_now and current not in obs.jobs:
        found = k8s.get_custom(namespace, TrainingJob.plural, current)
        if found is not None:
            obs.jobs[current] = found
    obs.eval_pods = k8s.list_pods(namespace, f"{manifests.FLYWHEEL_LABEL}={name}")
    resolved = resolve_eval_store(namespace, spec)
    status = body.get("status") or {}
    stage, cycle = status.get("stage"), int(status.get("cycle") or 0)
    refused = state.refused.get(key)
    obs.refused = refused[1] if refused is not None and refused[0] == cycle else None
    if isinstance(resolved, Problem):
        obs.eval_store = resolved
        return obs
    store, secret = resolved
    obs.eval_store = store
    if stage == "Evaluating" and cycle:
        pod_name = manifests.eval_pod_name(name, cycle)
        finished = any(p["metadata"]["name"] == pod_name and pod_outcome(p, manifests.CONTAINER).finished
                       for p in obs.eval_pods)
        now = time.monotonic()
        wanted = state.fresh_wanted.setdefault(key, now) if finished else None
        if not finished:
            state.fresh_wanted.pop(key, None)
        report_dir = store.report_dir(namespace, name, cycle)
        reading = state.stores.read(store.store_key, ("flywheel", key, report_dir),
                                    lambda: _read_report(state, store, secret, report_dir),
                                    max_age=(now - wanted) if wanted is not None else state.tuning.store_refresh_s,
                                    on_done=lambda: state.enqueue_from_thread(key))
        obs.report, obs.report_error = reading.value, reading.error
        # a read that found no report is an answer too (its value is None)
        obs.report_fresh = wanted is None or (reading.taken is not None and reading.taken >= wanted)
    if stage in ROLLOUT_STAGES:
        obs.router, obs.router_error = read_router(namespace, spec.inference_service_ref.name)
    return obs


def reconcile_flywheel(state: Flywheels, namespace: str, name: str) -> float | None:
    """One pass over one Flywheel; returns when to look again."""
    with reconciling(Flywheel.kind):
        obs = observe(state, namespace, name)
        if obs is None:
            return None
        if obs.flywheel["metadata"].get("deletionTimestamp"):
            if manifests.FINALIZER not in (obs.flywheel["metadata"].get("finalizers") or []):
                return None
            decided = plan_deletion(obs)
            apply_children(state, obs, decided)
            return decided.requeue_after
        decided = plan(obs)
        if not apply_status(obs, decided):
            return 0.5  # someone wrote the Flywheel meanwhile: observe again
        apply_children(state, obs, decided)
        _publish(state, (namespace, name), decided.status)
        return decided.requeue_after


def apply_status(obs: Observed, decided: Plan) -> bool:
    old = obs.flywheel.get("status") or {}
    new = {k: v for k, v in decided.status.items() if v is not None}
    if {k: v for k, v in old.items() if v is not None} == new:
        return True
    meta = obs.flywheel["metadata"]
    return k8s.patch_status(Flywheel.plural, meta["namespace"], meta["name"],
                            {**{k: None for k in old if k not in new}, **decided.status},
                            resource_version=meta["resourceVersion"])


def _set_finalizer(obs: Observed, present: bool) -> bool:
    """Add or remove our finalizer; True when it is as asked (a Flywheel being deleted or gone
    gets none added: False)."""
    meta = obs.flywheel["metadata"]
    ns, name = meta["namespace"], meta["name"]
    for _ in range(5):
        current = k8s.get_custom(ns, Flywheel.plural, name)
        if current is None:
            return not present
        have = list(current["metadata"].get("finalizers") or [])
        if (manifests.FINALIZER in have) == present:
            return True
        if present and current["metadata"].get("deletionTimestamp"):
            return False  # the API server refuses new finalizers on an object being deleted
        want = [*have, manifests.FINALIZER] if present else [f for f in have if f != manifests.FINALIZER]
        if k8s.patch_custom(ns, Flywheel.plural, name, {"metadata": {"finalizers": want}},
                            resource_version=current["metadata"]["resourceVersion"]):
            log.info("Flywheel %s/%s: finalizer %s %s", ns, name, manifests.FINALIZER, "added" if present else "removed")
            return True
    raise RuntimeError(f"the finalizers of Flywheel {ns}/{name} kept changing")


def apply_children(state: Flywheels, obs: Observed, decided: Plan) -> None:
    """Finalizer (held before any child is made or the candidate goes on: nothing else is
    done without it), the InferenceService patch, the Dataset's curate annotation, the job,
    the pod, deletions, Events, outcomes; a finalizer is removed last."""
    meta = obs.flywheel["metadata"]
    ns, name = meta["namespace"], meta["name"]
    key = (ns, name)
    cycle = int(decided.status.get("cycle") or 0)
    if decided.finalizer is True and not _set_finalizer(obs, True):
        log.info("Flywheel %s/%s: no finalizer (being deleted): nothing else is applied", ns, name)
        return
    if decided.isvc_patch is not None and obs.spec is not None:
        service = obs.spec.inference_service_ref.name
        if k8s.patch_custom(ns, InferenceService.plural, service, decided.isvc_patch):
            log.info("Flywheel %s/%s: patched InferenceService %s: %s", ns, name, service, decided.isvc_patch)
    if decided.curate is not None and obs.spec is not None:
        k8s.patch_custom(ns, Dataset.plural, obs.spec.dataset_ref.name,
                         {"metadata": {"annotations": {CURATE_ANNOTATION: decided.curate}}})
    events = list(decided.events)
    if decided.create_job is not None:
        try:
            if k8s.create(lambda n, b: k8s.custom().create_namespaced_custom_object(GROUP, VERSION, n,
                                                                                     TrainingJob.plural, b),
                          ns, decided.create_job):
                log.info("Flywheel %s/%s: created TrainingJob %s", ns, name, decided.create_job["metadata"]["name"])
        except kubernetes.client.ApiException as e:
            why = f"{e.status} {e.reason}: {str(e.body)[:400]}"
            log.warning("Flywheel %s/%s: TrainingJob %s was refused: %s", ns, name,
                        decided.create_job["metadata"]["name"], why)
            events.append(Event("TrainingJobNotCreated", f"TrainingJob {decided.create_job['metadata']['name']} "
                                                         f"was refused: {why}", warning=True))
            if e.status is not None and 400 <= e.status < 500 and e.status not in (409, 429):
                state.refused[key] = (cycle, why)  # the next plan fails the cycle
    if decided.create_pod is not None:
        try:
            k8s.create(k8s.core().create_namespaced_pod, ns, decided.create_pod)
        except kubernetes.client.ApiException as e:
            why = f"{e.status} {e.reason}: {str(e.body)[:300]}"
            log.warning("Flywheel %s/%s: pod %s was refused: %s", ns, name, decided.create_pod["metadata"]["name"], why)
            events.append(Event("EvaluationNotCreated", f"pod {decided.create_pod['metadata']['name']} was refused: "
                                                        f"{why}", warning=True))
            if e.status is not None and 400 <= e.status < 500 and e.status not in (409, 429):
                state.refused[key] = (cycle, why)
    for pod_name, uid in decided.delete_pods:
        k8s.delete_pod(pod_name, ns, uid=uid or None)
    for job in decided.delete_jobs:
        if k8s.delete(k8s.custom().delete_namespaced_custom_object, GROUP, VERSION, ns, TrainingJob.plural, job):
            log.info("Flywheel %s/%s: deleted finished TrainingJob %s (training.maxRetainedJobs)", ns, name, job)
    for event in events:
        k8s.record_event(obs.flywheel, event.reason, event.message, event.warning)
    for outcome in decided.outcomes:
        FLYWHEEL_CYCLES.labels(ns, name, outcome).inc()
        log.info("Flywheel %s/%s: cycle %s %s", ns, name, decided.status.get("cycle"), outcome)
    if decided.finalizer is False:
        _set_finalizer(obs, False)


def _publish(state: Flywheels, key: Key, status: dict[str, Any]) -> None:
    if key not in state.seen:
        return
    step = status.get("step") or {}
    stage = status.get("stage")
    for role in ("shadow", "canary"):
        # the step's role is in its name (shadow, canary-<percent>); AwaitingPromotion keeps the last step's
        on = stage in ROLLOUT_STAGES and (step.get("name") == "shadow") == (role == "shadow")
        FLYWHEEL_CANDIDATE_PERCENT.labels(*key, role).set(float(step.get("percent") or 0) if on else 0.0)
