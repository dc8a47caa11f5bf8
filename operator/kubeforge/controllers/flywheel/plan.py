"""What a Flywheel controller decides, as a pure function of what it observed (``plan``): the
whole new status, the candidate TrainingJob or evaluation pod to create, the patch of the
InferenceService (shadow, canary, promotion, rollback), the Dataset curation to ask for,
the Events, the cycle outcomes for the metrics, and the finalizer.

One cycle at a time, through the stages::

    Idle → Curating → Training → Evaluating → Shadow → Canary (each step) → Promoting → Idle
                                     ↓ gate fails     ↓ guard rail / not ready / suspend
                                   Idle (Rejected)   RollingBack → Idle (RolledBack)

Rules that keep it safe:

- status is written before any child is created or patched, and every child's name is fixed
  by the cycle (``<flywheel>-c<N>``, ``<flywheel>-eval-c<N>``): an operator killed at any line
  repeats a call that is a no-op the second time, never a second job for the same cycle;
- the InferenceService patch of the stage is sent again on every pass while it differs, so a
  lost write, or a user's edit, is put back;
- a candidate takes traffic only after it passed the gate, and its share goes to the stable
  revision while it has no ready pod (the InferenceService's router); one without a ready
  pod for ``rollout.candidateReadySeconds`` is rolled back;
- a guard-rail breach, ``suspend``, a candidate that disappears, router counters that cannot
  be read, or a step that cannot gather its requests in ``rollout.maxStepSeconds`` rolls back
  at once: no stage leaves traffic on a candidate nobody judges. Deleting the Flywheel does
  too, and deletes a candidate job still training (``plan_deletion``: the finalizer is held
  from a cycle's start to its end, and the handlers change nothing else until it is held);
- children are this object's: jobs and reports of an earlier Flywheel of the same name (a
  recreated one) are never adopted: cycles are numbered past every job that carries the name,
  a job of the cycle's name with another uid fails the cycle, and a report counts only when it
  scored this cycle's candidate on its version.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from typing import Any

from kubeforge.api import FlywheelSpec, InferenceServiceSpec
from kubeforge.api.common import condition, set_condition
from kubeforge.api.flywheel import CycleRecord, StepProgress
from kubeforge.controllers.dataset.plan import CURATE_ANNOTATION, fmt_time, parse_time, pod_outcome
from kubeforge.controllers.flywheel import manifests, router_stats
from kubeforge.controllers.flywheel.manifests import EvalStore
from kubeforge.controllers.workload import Owner
from kubeforge.store.evaluation import EvaluationReport

RUN_ANNOTATION = "kubeforge.dev/run-cycle"
PROMOTE_ANNOTATION = "kubeforge.dev/promote"
ROLLOUT_STAGES = ("Shadow", "Canary", "AwaitingPromotion")
STATUS_KEYS = ("stage", "stageStartTime", "cycle", "cycles", "step", "stableTrainingJob", "lastTriggerTime",
               "lastSourceRecords", "lastRunRequest", "curationRequest", "curationBaseVersion", "message")
OUTCOMES = ("Promoted", "RolledBack", "Rejected", "Failed")


@dataclasses.dataclass(frozen=True)
class FlywheelSettings:
    #: How often a Flywheel is looked at while a stage waits on time or on the router's counters.
    poll_s: float = 10.0
    #: Cycles kept in status.cycles.
    history: int = 20
    #: Flywheels reconciled at the same time.
    workers: int = 2
    #: How often every Flywheel is looked at again.
    resync_s: float = 30.0
    #: How long a report read is reused.
    store_refresh_s: float = 15.0


@dataclasses.dataclass(frozen=True)
class Problem:
    reason: str
    message: str


@dataclasses.dataclass
class Observed:
    """Everything a plan looks at. ``router``: each router pod's counters by pod uid (None: not
    read, ``router_error`` says why); ``report``: the committed evaluation report of the
    current cycle (None: none yet); ``report_fresh``: the answer was read after the evaluation
    pod was seen finished."""

    flywheel: dict[str, Any]
    spec: FlywheelSpec | None
    spec_error: str | None = None
    isvc: dict[str, Any] | None = None
    isvc_spec: InferenceServiceSpec | None = None
    isvc_error: str | None = None
    dataset: dict[str, Any] | None = None
    jobs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    eval_pods: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    eval_store: EvalStore | Problem | None = None
    report: EvaluationReport | None = None
    report_error: str | None = None
    report_fresh: bool = True
    #: why the API server refused the cycle's job or evaluation pod (a 4xx other than 409)
    refused: str | None = None
    router: dict[str, router_stats.Counters] | None = None
    router_error: str | None = None
    now: dt.datetime = dataclasses.field(default_factory=lambda: dt.datetime.now(dt.UTC))
    image: str = ""
    settings: FlywheelSettings = dataclasses.field(default_factory=FlywheelSettings)


@dataclasses.dataclass(frozen=True)
class Event:
    reason: str
    message: str
    warning: bool = False


@dataclasses.dataclass
class Plan:
    """Applied in this order: ``status``, ``finalizer`` (True adds, False removes) when adding,
    ``isvc_patch`` (a merge patch of the InferenceService), ``curate`` (the value of the
    Dataset's kubeforge.dev/curate annotation), ``create_job``, ``create_pod``, deletions, the
    Events and the outcomes; a finalizer removal goes last."""

    status: dict[str, Any]
    isvc_patch: dict[str, Any] | None = None
    curate: str | None = None
    create_job: dict[str, Any] | None = None
    create_pod: dict[str, Any] | None = None
    delete_pods: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    delete_jobs: list[str] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)
    outcomes: list[str] = dataclasses.field(default_factory=list)
    finalizer: bool | None = None
    requeue_after: float | None = None


@dataclasses.dataclass(frozen=True)
class Step:
    role: str  # shadow or canary
    percent: float
    min_seconds: int
    min_requests: int

    @property
    def name(self) -> str:
        return "shadow" if self.role == "shadow" else f"canary-{self.percent:g}"


def steps(spec: FlywheelSpec) -> list[Step]:
    r = spec.rollout
    out = [Step("shadow", r.shadow.sample_percent, r.shadow.min_seconds, r.shadow.min_requests)] if r.shadow else []
    return out + [Step("canary", c.traffic_percent, c.min_seconds, c.min_requests) for c in r.canary_steps]


def _sooner(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


class _Pass:
    """One plan in the making: the status and the Plan, and the helpers every stage uses."""

    def __init__(self, obs: Observed) -> None:
        self.obs = obs
        self.meta = obs.flywheel["metadata"]
        self.old = obs.flywheel.get("status") or {}
        self.status: dict[str, Any] = {k: self.old.get(k) for k in STATUS_KEYS}
        self.status["cycles"] = [dict(c) for c in self.old.get("cycles") or []]
        self.status["observedGeneration"] = self.meta.get("generation")
        self.conditions: list[dict[str, Any]] = list(self.old.get("conditions") or [])
        self.out = Plan(status=self.status)
        self.now = fmt_time(obs.now)

    # ---- status helpers
    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def cycle(self) -> int:
        return int(self.status.get("cycle") or 0)

    @property
    def record(self) -> dict[str, Any]:
        """The current cycle's record (empty before the first cycle)."""
        cycles = self.status["cycles"]
        if not self.cycle:
            return {}
        if not cycles or cycles[-1].get("cycle") != self.cycle:
            cycles.append(CycleRecord(cycle=self.cycle).dump())
        return dict(cycles[-1])

    def update(self, **fields: Any) -> None:
        assert self.cycle, "a cycle's record is written only once a cycle started"
        rec = self.record
        rec.update({k: v for k, v in CycleRecord.model_validate({**rec, **fields}).dump().items()})
        self.status["cycles"][-1] = rec

    def cond(self, type_: str, ok: bool, reason: str, message: str = "") -> None:
        self.conditions = set_condition(self.conditions, type_, ok, reason, message, self.meta.get("generation"))

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.out.events.append(Event(reason, f"cycle {self.cycle}: {message}" if self.cycle else message, warning))

    def goto(self, stage: str, message: str, reason: str | None = None) -> None:
        """A stage change: status, an Event, the furthest stage reached."""
        self.status["stage"] = stage
        self.status["stageStartTime"] = self.now
        self.status["message"] = message
        if stage not in ("Idle", "RollingBack"):
            step = self.status.get("step") or {}
            self.update(stageReached=f"{stage} {step.get('percent'):g}%" if stage in ("Shadow", "Canary") else stage)
        self.event(reason or stage, message)

    def finish(self, outcome: str, reason: str, warning: bool = False) -> None:
        """The cycle ends: with a candidate on the InferenceService it first rolls back."""
        self.update(outcome=outcome, reason=reason, completionTime=self.now)
        self.out.outcomes.append(outcome)
        self.status["step"] = None
        self.status["curationRequest"] = None
        self.status["curationBaseVersion"] = None
        carrying = self.carrying()
        if carrying and outcome != "Promoted":
            self.out.isvc_patch = manifests.rollback_patch()
            self.goto("RollingBack", f"{outcome}: {reason}; taking the candidate off the InferenceService",
                      "RollingBack")
        else:
            self.goto("Idle", f"{outcome}: {reason}", outcome if outcome != "Failed" else "CycleFailed")
        if warning:
            self.out.events[-1] = dataclasses.replace(self.out.events[-1], warning=True)

    def elapsed(self, since: str | None) -> float:
        t = parse_time(since)
        return (self.obs.now - t).total_seconds() if t else 0.0

    def wait(self, seconds: float | None = None) -> None:
        self.out.requeue_after = _sooner(self.out.requeue_after, seconds or self.obs.settings.poll_s)

    # ---- what the InferenceService carries
    def isvc_spec_raw(self) -> dict[str, Any]:
        return dict((self.obs.isvc or {}).get("spec") or {})

    def carrying(self) -> bool:
        job = self.record.get("trainingJob")
        return bool(job) and self.obs.isvc is not None and manifests.carries(self.isvc_spec_raw(), str(job))


def plan(obs: Observed) -> Plan:
    p = _Pass(obs)
    spec = obs.spec
    if spec is None:
        p.cond("Ready", False, "InvalidSpec", obs.spec_error or "the spec does not parse")
        p.status["message"] = obs.spec_error
        return _done(p)
    problem = _references(obs)
    stage = p.status.get("stage") or "Idle"
    if problem is not None:
        p.cond("Ready", False, problem.reason, problem.message)
        p.status["stage"] = stage
        if stage in ("Idle", "Curating", "Training", "Evaluating"):
            # nothing serves the candidate yet: wait for the references (a job trains on meanwhile)
            p.status["message"] = problem.message
            if stage != "Idle":
                p.wait()
        elif stage == "RollingBack":  # its outcome is recorded: the candidate only has to go
            _rolling_back(p, spec)
        elif stage == "Promoting" and obs.isvc_spec is not None and obs.isvc_spec.model.training_job_ref:
            _promoting(p, spec)  # the Dataset or the evaluation store are not needed any more
        else:  # the candidate is on (or going to) the service: the cycle cannot be judged
            p.finish("Failed", problem.message, warning=True)
        return _done(p)
    p.cond("Ready", True, "Suspended" if spec.suspend else "LoopReady",
           "spec.suspend: no cycle starts" if spec.suspend else "the InferenceService and the Dataset resolve")
    {"Idle": _idle, "Curating": _curating, "Training": _training, "Evaluating": _evaluating,
     "Shadow": _rollout, "Canary": _rollout, "AwaitingPromotion": _rollout, "Promoting": _promoting,
     "RollingBack": _rolling_back}[stage](p, spec)
    return _done(p)


def _done(p: _Pass) -> Plan:
    stage = p.status.get("stage") or "Idle"
    p.status["stage"] = stage
    held = manifests.FINALIZER in (p.meta.get("finalizers") or [])
    if stage != "Idle" and not held:
        p.out.finalizer = True
    elif stage == "Idle" and held and not p.carrying() and p.out.isvc_patch is None:
        p.out.finalizer = False
    p.cond("Cycling", stage != "Idle", stage if stage != "Idle" else "Idle",
           f"cycle {p.cycle}: {stage}" if stage != "Idle" else "no cycle runs")
    serving = stage in ROLLOUT_STAGES and p.carrying()
    step = p.status.get("step") or {}
    p.cond("CandidateServing", serving, "CandidateServing" if serving else "NoCandidate",
           f"{(p.record.get('trainingJob'))} at {step.get('name')}" if serving else "all traffic on the stable revision")
    p.status["conditions"] = p.conditions
    keep = p.obs.settings.history
    p.status["cycles"] = p.status["cycles"][-keep:]
    return p.out


def _references(obs: Observed) -> Problem | None:
    spec = obs.spec
    assert spec is not None
    isvc = spec.inference_service_ref.name
    if obs.isvc is None:
        return Problem("InferenceServiceNotFound", f"spec.inferenceServiceRef: InferenceService {isvc} does not exist")
    if obs.isvc_spec is None:
        return Problem("InferenceServiceInvalid", f"InferenceService {isvc}: {obs.isvc_error}")
    if obs.isvc_spec.model.training_job_ref is None:
        return Problem("ModelNotFromTrainingJob", f"InferenceService {isvc} serves spec.model.uri; a Flywheel "
                                                  "fine-tunes from a TrainingJob export (spec.model.trainingJobRef)")
    if obs.dataset is None:
        return Problem("DatasetNotFound", f"spec.datasetRef: Dataset {spec.dataset_ref.name} does not exist")
    if isinstance(obs.eval_store, Problem):
        return obs.eval_store
    return None


# ---------------------------------------------------------------------------- the stages


def _trigger(p: _Pass, spec: FlywheelSpec) -> tuple[str | None, float | None]:
    """What starts a cycle now, or None and when to look again."""
    ann = (p.meta.get("annotations") or {}).get(RUN_ANNOTATION)
    if ann and ann != p.status.get("lastRunRequest"):
        return f"{RUN_ANNOTATION}={ann}", None
    t = spec.trigger
    ds = (p.obs.dataset or {}).get("status") or {}
    if t.new_records is not None and p.status.get("lastSourceRecords") is None:
        # counted from when the Flywheel first saw the Dataset, not from the capture's start
        p.status["lastSourceRecords"] = int(ds.get("sourceRecords") or 0)
    elif t.new_records is not None:
        grown = int(ds.get("sourceRecords") or 0) - int(p.status.get("lastSourceRecords") or 0)
        if grown >= t.new_records:
            return f"{grown} new request record(s) (trigger.newRecords {t.new_records})", None
    last = p.status.get("lastTriggerTime")
    if t.on_drift:
        drift = condition(((p.obs.isvc or {}).get("status") or {}).get("conditions"), "DriftDetected")
        if drift and drift.get("status") == "True" and (last is None or
                                                        (parse_time(drift.get("lastTransitionTime")) or p.obs.now)
                                                        > (parse_time(last) or p.obs.now)):
            return f"DriftDetected on the InferenceService: {drift.get('message')}", None
    if t.every_seconds is not None:
        since = p.elapsed(last or p.meta.get("creationTimestamp"))
        if since >= t.every_seconds:
            return f"{t.every_seconds}s since the last cycle (trigger.everySeconds)", None
        return None, t.every_seconds - since
    return None, None


def _idle(p: _Pass, spec: FlywheelSpec) -> None:
    obs = p.obs
    assert obs.isvc_spec is not None and obs.isvc_spec.model.training_job_ref is not None
    stable = obs.isvc_spec.model.training_job_ref.name
    p.status["stableTrainingJob"] = stable
    if p.carrying():  # a candidate left behind (a lost write): off it goes
        p.out.isvc_patch = manifests.rollback_patch()
        p.wait(1.0)
        return
    p.out.delete_jobs = _retention(p, spec, stable)
    p.out.delete_pods = _old_eval_pods(p)
    if spec.suspend:
        return
    raw = p.isvc_spec_raw()
    why, again = _trigger(p, spec)
    if why is None:
        if again is not None:
            p.wait(again)
        return
    if raw.get("canary") or raw.get("shadow"):
        p.status["message"] = (f"a cycle is due ({why}) but InferenceService {spec.inference_service_ref.name} "
                               "already has a canary or a shadow: waiting until it has neither")
        p.wait(30.0)
        return
    ds = (obs.dataset or {}).get("status") or {}
    p.status["cycle"] = max([p.cycle, *(_job_cycle(j) for j in obs.jobs.values())]) + 1
    p.status["lastTriggerTime"] = p.now
    p.status["lastSourceRecords"] = int(ds.get("sourceRecords") or 0)
    ann = (p.meta.get("annotations") or {}).get(RUN_ANNOTATION)
    if ann:
        p.status["lastRunRequest"] = ann
    p.update(trigger=why, startTime=p.now)
    p.goto("Curating", f"started: {why}", "CycleStarted")
    _curating(p, spec)


def _curating(p: _Pass, spec: FlywheelSpec) -> None:
    ds = (p.obs.dataset or {}).get("status") or {}
    newest = ds.get("newestVersion")
    dataset = spec.dataset_ref.name
    request = p.status.get("curationRequest")
    if request is None:
        if int(ds.get("pendingRecords") or 0) > 0 or newest is None or ds.get("curating"):
            request = f"{p.name}-{str(p.meta.get('uid', ''))[:8]}-c{p.cycle}"
            p.status["curationRequest"] = request
            p.status["curationBaseVersion"] = newest
            p.status["message"] = f"asked Dataset {dataset} for a new version ({CURATE_ANNOTATION}={request})"
        else:
            _take_version(p, spec, int(newest), "the newest version (nothing pending)")
            return
    if ((p.obs.dataset or {}).get("metadata", {}).get("annotations") or {}).get(CURATE_ANNOTATION) != request:
        p.out.curate = request
    if ds.get("lastCurationRequest") != request or ds.get("curating"):
        if ((p.obs.dataset or {}).get("spec") or {}).get("suspend"):
            p.finish("Failed", f"Dataset {dataset} is suspended (spec.suspend): it curates no version for the cycle",
                     warning=True)
            return
        p.wait()
        return
    base = p.status.get("curationBaseVersion")
    if newest is not None and (base is None or int(newest) > int(base)):
        _take_version(p, spec, int(newest), "curated for this cycle")
        return
    cur = condition(ds.get("conditions"), "Curating") or {}
    if cur.get("reason") == "CurationFailed":
        p.finish("Failed", f"the curation of Dataset {dataset} failed: {cur.get('message')}", warning=True)
    elif newest is not None:
        _take_version(p, spec, int(newest), "no new record was kept; the newest version")
    else:
        p.finish("Failed", f"Dataset {dataset} has no version: {cur.get('message') or 'nothing to curate'}",
                 warning=True)


def _take_version(p: _Pass, spec: FlywheelSpec, version: int, why: str) -> None:
    p.status["curationRequest"] = None
    p.status["curationBaseVersion"] = None
    p.update(datasetVersion=version)
    p.goto("Training", f"training {manifests.job_name(p.name, p.cycle)} on version {version} of Dataset "
                       f"{spec.dataset_ref.name} ({why}) from the export of {p.status.get('stableTrainingJob')}",
           "TrainingStarted")
    _training(p, spec)


def _training(p: _Pass, spec: FlywheelSpec) -> None:
    name = manifests.job_name(p.name, p.cycle)
    job = p.obs.jobs.get(name)
    rec = p.record
    uid = str(p.meta.get("uid", ""))
    if job is not None and (job["metadata"].get("labels") or {}).get(manifests.FLYWHEEL_UID_LABEL) != uid:
        p.finish("Failed", f"TrainingJob {name} exists and is not this Flywheel's (another object of the name made "
                           "it, or someone else did): the cycle does not adopt it", warning=True)
        return
    if job is None and p.obs.refused:
        p.finish("Failed", f"TrainingJob {name} was refused: {p.obs.refused}", warning=True)
        return
    if job is None:
        if rec.get("trainingJob"):
            p.finish("Failed", f"TrainingJob {name} was deleted before it finished", warning=True)
            return
        owner = Owner(p.name, str(p.meta["namespace"]), str(p.meta.get("uid", "")), "Flywheel")
        p.out.create_job = manifests.candidate_job(owner, spec, p.cycle, spec.dataset_ref.name,
                                                   int(rec["datasetVersion"]), str(p.status.get("stableTrainingJob")))
        p.wait(5.0)
        return
    if not rec.get("trainingJob"):
        p.update(trainingJob=name)
    st = job.get("status") or {}
    phase = st.get("phase")
    if phase == "Succeeded" and st.get("exportUri"):
        p.update(candidateUri=st["exportUri"])
        p.goto("Evaluating", f"scoring {name}'s export against the served model", "EvaluationStarted")
        _evaluating(p, spec)
    elif phase == "Succeeded":
        p.finish("Failed", f"TrainingJob {name} succeeded without an export (spec.training.template.export.enabled "
                           "must be true)", warning=True)
    elif phase == "Failed":
        p.finish("Failed", f"TrainingJob {name} failed: {st.get('message')}", warning=True)
    else:
        p.status["message"] = f"training {name}: {phase or 'Pending'}" + (f" ({st['message']})" if st.get("message")
                                                                          else "")


def _evaluating(p: _Pass, spec: FlywheelSpec) -> None:
    obs = p.obs
    rec = p.record
    pname = manifests.eval_pod_name(p.name, p.cycle)
    pods = [x for x in obs.eval_pods if x["metadata"]["name"] == pname]
    report = obs.report
    if report is not None and (report.candidate.uri != rec.get("candidateUri")
                               or report.dataset_version != rec.get("datasetVersion")):
        p.finish("Failed", f"the committed report for cycle {p.cycle} scored {report.candidate.uri} on version "
                           f"{report.dataset_version}, not this cycle's candidate: a report is never rewritten; the "
                           "next cycle writes its own", warning=True)
        return
    if report is not None:
        gate = report.gate
        p.update(scores=report.metrics, baselineScores=report.baseline_metrics,
                 gatePassed=gate is None or gate.passed)
        if gate is not None and not gate.passed:
            why = "; ".join(f"{c.metric}: {c.reason}" for c in gate.failures)
            p.finish("Rejected", f"the evaluation gate did not pass: {why}")
            return
        if spec.suspend:
            p.status["message"] = "the candidate passed the gate; spec.suspend holds it before shadow"
            return
        _enter_step(p, spec, 0)
        return
    if not pods and obs.refused:
        p.finish("Failed", f"evaluation pod {pname} was refused: {obs.refused}", warning=True)
        return
    if not pods:
        store = obs.eval_store
        baseline = (((obs.isvc or {}).get("status") or {}).get("model") or {}).get("uri")
        # the version the job trained on, as it resolved it (retention may since have pruned it from
        # the Dataset's status list)
        job = obs.jobs.get(str(rec.get("trainingJob"))) or {}
        version_uri = ((job.get("status") or {}).get("dataset") or {}).get("uri")
        if not isinstance(store, EvalStore) or not baseline or not version_uri:
            missing = ("the InferenceService's served model (status.model.uri)" if not baseline else
                       f"the Dataset version in TrainingJob {rec.get('trainingJob')}'s status.dataset"
                       if not version_uri else "the evaluation store")
            p.status["message"] = f"waiting for {missing}"
            p.wait()
            return
        owner = Owner(p.name, str(p.meta["namespace"]), str(p.meta.get("uid", "")), "Flywheel")
        command = manifests.evaluation_command(spec, store, owner.namespace, p.name, p.cycle, str(rec["candidateUri"]),
                                               baseline, version_uri.rsplit("/", 1)[0], int(rec["datasetVersion"]))
        p.out.create_pod = manifests.evaluation_pod(owner, spec, store, p.cycle, obs.image, command)
        p.wait()
        return
    outcome = pod_outcome(pods[0], manifests.CONTAINER)
    if not outcome.finished:
        p.status["message"] = f"evaluating: pod {pname} {outcome.waiting}"
        p.wait()
        return
    if not obs.report_fresh:
        p.wait(1.0)  # judged on a store answer read after the pod finished
        return
    if outcome.succeeded:
        p.finish("Failed", f"evaluation pod {pname} succeeded but no committed report was found"
                           + (f" ({obs.report_error})" if obs.report_error else ""), warning=True)
    else:
        p.finish("Failed", f"evaluation pod {pname} failed (exit {outcome.exit_code}): {outcome.message}",
                 warning=True)


def _enter_step(p: _Pass, spec: FlywheelSpec, index: int) -> None:
    all_steps = steps(spec)
    step = all_steps[index]
    job = str(p.record["trainingJob"])
    assert p.obs.isvc_spec is not None
    stable = p.obs.isvc_spec.model
    p.status["step"] = StepProgress(index=index, name=step.name, percent=step.percent, start_time=p.now).dump()
    if step.role == "shadow":
        p.out.isvc_patch = manifests.shadow_patch(stable, job, step.percent)
    else:
        p.out.isvc_patch = manifests.canary_patch(stable, job, step.percent)
    stage = "Shadow" if step.role == "shadow" else "Canary"
    what = f"a copy of {step.percent:g}% of requests" if step.role == "shadow" else f"{step.percent:g}% of requests"
    p.goto(stage, f"{job} answers {what} (step {index + 1} of {len(all_steps)}: at least {step.min_seconds}s and "
                  f"{step.min_requests} request(s))", "ShadowStarted" if stage == "Shadow" else "CanaryStep")
    p.wait()


def _wanted_patch(p: _Pass, spec: FlywheelSpec, step: Step) -> dict[str, Any] | None:
    """The patch that puts the step back on the InferenceService, when it is not there."""
    assert p.obs.isvc_spec is not None
    job = str(p.record["trainingJob"])
    want = (manifests.shadow_patch if step.role == "shadow" else manifests.canary_patch)(
        p.obs.isvc_spec.model, job, step.percent)
    raw = p.isvc_spec_raw()
    role = step.role
    other = "canary" if role == "shadow" else "shadow"
    have = raw.get(role) or {}
    percent_key = "samplePercent" if role == "shadow" else "trafficPercent"
    ok = (manifests.carries({role: have}, job) and float(have.get(percent_key) or -1) == step.percent
          and not raw.get(other))
    return None if ok else want


def _rollout(p: _Pass, spec: FlywheelSpec) -> None:
    obs = p.obs
    all_steps = steps(spec)
    cur = dict(p.status.get("step") or {})
    index = int(cur.get("index") or 0)
    if index >= len(all_steps):  # the spec lost steps meanwhile
        index = len(all_steps) - 1
    step = all_steps[index]
    job = str(p.record.get("trainingJob"))
    if spec.suspend:
        p.finish("RolledBack", "spec.suspend is true: the candidate does not stay on traffic unwatched")
        return
    if job not in obs.jobs:
        p.finish("Failed", f"the candidate's TrainingJob {job} was deleted", warning=True)
        return
    p.out.isvc_patch = _wanted_patch(p, spec, step)
    traffic = ((obs.isvc or {}).get("status") or {}).get("traffic") or {}
    revision = traffic.get(step.role) or {}
    elapsed = p.elapsed(cur.get("startTime"))
    if int(revision.get("readyReplicas") or 0) < 1:
        unready = p.elapsed(cur.get("lastReadyTime") or cur.get("startTime"))
        if unready >= spec.rollout.candidate_ready_seconds:
            p.finish("RolledBack", f"the candidate's {step.role} revision had no ready pod for {unready:.0f}s "
                                   f"(rollout.candidateReadySeconds): {revision.get('message') or 'not created'}",
                     warning=True)
            return
        p.status["message"] = f"waiting for the candidate's {step.role} pod: {revision.get('message') or 'not created'}"
        p.wait()
        return
    cur["lastReadyTime"] = p.now
    if not cur.get("readySince"):
        cur["readySince"] = p.now
    p.status["step"] = StepProgress.model_validate(cur).dump()
    warm = spec.rollout.guard_rails.warmup_seconds - p.elapsed(cur.get("readySince"))
    if obs.router is not None:  # the routers' first sightings count toward their own warm-up
        seen = {uid: t for uid, t in (cur.get("routerSeen") or {}).items() if uid in obs.router}
        cur["routerSeen"] = {**{uid: p.now for uid in obs.router}, **seen}
        p.status["step"] = StepProgress.model_validate(cur).dump()
    if warm > 0 and not cur.get("baselineTaken"):
        # the routers reach a new revision a moment after its pod is Ready (endpoints, the
        # NetworkPolicy's sets): those first requests do not judge the candidate
        p.status["message"] = f"{step.name}: the candidate is ready; counting starts in {warm:.0f}s (guardRails.warmupSeconds)"
        p.wait(max(1.0, warm))
        return
    if obs.router is None:
        since = p.elapsed(cur.get("lastReadTime") or cur.get("startTime"))
        why = obs.router_error or "not read yet"
        if since >= spec.rollout.candidate_ready_seconds:
            p.finish("RolledBack", f"the router's counters could not be read for {since:.0f}s "
                                   f"(rollout.candidateReadySeconds): {why}; the guard rails cannot be judged",
                     warning=True)
            return
        p.status["message"] = f"{step.name}: waiting for the router's counters ({why})"
        p.wait()
        return
    cur["lastReadTime"] = p.now
    cur["baselineTaken"] = True
    # each router pod counts from warmupSeconds after it was first seen: the routers roll when
    # the share changes, and a new router reaches the revisions a moment after it is Ready
    # (a CI run rolled a good canary back on one such request)
    warmup = spec.rollout.guard_rails.warmup_seconds
    seen = dict(cur.get("routerSeen") or {})
    baseline = {uid: b for uid, b in (cur.get("baseline") or {}).items() if uid in obs.router}
    for uid, series in obs.router.items():
        if uid not in baseline and p.elapsed(seen[uid]) >= warmup:
            baseline[uid] = series
    cur["routerSeen"], cur["baseline"] = seen, baseline
    counts = router_stats.delta({uid: obs.router[uid] for uid in baseline}, baseline)
    cand = router_stats.shadow_stats(counts) if step.role == "shadow" else router_stats.revision_stats(counts, "canary")
    stable = router_stats.revision_stats(counts, "stable")
    cur.update(candidateRequests=cand.requests, candidateErrorRate=cand.error_rate, stableErrorRate=stable.error_rate,
               candidateP95Seconds=_finite(cand.p95_s), stableP95Seconds=_finite(stable.p95_s))
    p.status["step"] = StepProgress.model_validate(cur).dump()
    breach = _guard_rails(spec, cand, stable)
    if breach is not None:
        p.finish("RolledBack", f"guard rail at {step.name}: {breach}", warning=True)
        return
    stage = p.status.get("stage")
    if stage == "AwaitingPromotion":
        if (p.meta.get("annotations") or {}).get(PROMOTE_ANNOTATION) == str(p.cycle):
            _promote(p, spec, f"{PROMOTE_ANNOTATION}={p.cycle}")
        else:
            p.wait()
        return
    if elapsed >= spec.rollout.max_step_seconds and cand.requests < step.min_requests:
        p.finish("RolledBack", f"{step.name}: {cand.requests} of {step.min_requests} request(s) in {elapsed:.0f}s "
                               "(rollout.maxStepSeconds): too little traffic to judge the candidate")
        return
    if elapsed < step.min_seconds or cand.requests < step.min_requests:
        p.status["message"] = (f"{step.name}: {cand.requests}/{step.min_requests} request(s), "
                               f"{elapsed:.0f}/{step.min_seconds}s; guard rails hold")
        p.wait(min(obs.settings.poll_s, max(1.0, step.min_seconds - elapsed)) if elapsed < step.min_seconds else None)
        return
    p.event("StepPassed", f"{step.name} passed: {cand.requests} request(s) in {elapsed:.0f}s, error rate "
                          f"{_pct(cand.error_rate)} vs {_pct(stable.error_rate)}, p95 {_secs(cand.p95_s)} vs "
                          f"{_secs(stable.p95_s)}")
    if index + 1 < len(all_steps):
        _enter_step(p, spec, index + 1)
    elif spec.rollout.auto_promote:
        _promote(p, spec, "every step passed")
    else:
        p.goto("AwaitingPromotion", f"every step passed; annotate {PROMOTE_ANNOTATION}={p.cycle} to promote "
                                    f"(the last step's share stays meanwhile)")
        p.wait()


def _finite(v: float | None) -> float | None:
    """Status is JSON: no inf."""
    return v if v is None or math.isfinite(v) else None


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _secs(v: float | None) -> str:
    if v is not None and math.isinf(v):
        return "beyond the router's last latency bucket"
    return "n/a" if v is None else f"{v:g}s"


def _guard_rails(spec: FlywheelSpec, cand: router_stats.RevisionStats, stable: router_stats.RevisionStats) -> str | None:
    g = spec.rollout.guard_rails
    if cand.requests < g.min_requests:
        return None
    cand_rate = cand.error_rate or 0.0
    stable_rate = stable.error_rate or 0.0
    if cand_rate - stable_rate > g.max_error_rate_increase:
        return (f"error rate {_pct(cand_rate)} over {cand.requests} request(s) vs the stable revision's "
                f"{_pct(stable_rate)} (guardRails.maxErrorRateIncrease {g.max_error_rate_increase:g})")
    if (stable.requests >= g.min_requests and cand.p95_s is not None and stable.p95_s is not None
            and cand.p95_s > g.max_p95_latency_ratio * stable.p95_s):  # inf: beyond the last bucket
        return (f"p95 {_secs(cand.p95_s)} vs the stable revision's {_secs(stable.p95_s)} "
                f"(guardRails.maxP95LatencyRatio {g.max_p95_latency_ratio:g})")
    return None


def _promote(p: _Pass, spec: FlywheelSpec, why: str) -> None:
    assert p.obs.isvc_spec is not None
    job = str(p.record["trainingJob"])
    p.out.isvc_patch = manifests.promote_patch(p.obs.isvc_spec.model, job)
    p.status["step"] = None
    p.goto("Promoting", f"{why}: {job}'s export becomes the InferenceService's model", "Promoting")
    p.wait()


def _promoting(p: _Pass, spec: FlywheelSpec) -> None:
    obs = p.obs
    assert obs.isvc_spec is not None
    job = str(p.record["trainingJob"])
    ref = obs.isvc_spec.model.training_job_ref
    if ref is None or ref.name != job or p.carrying():
        p.out.isvc_patch = manifests.promote_patch(obs.isvc_spec.model, job)
        p.wait(1.0)
        return
    st = (obs.isvc or {}).get("status") or {}
    ready = condition(st.get("conditions"), "Ready") or {}
    served = (st.get("model") or {}).get("uri")
    if served == p.record.get("candidateUri") and ready.get("status") == "True" and \
            st.get("observedGeneration") == (obs.isvc or {}).get("metadata", {}).get("generation"):
        p.status["stableTrainingJob"] = job
        p.finish("Promoted", f"the InferenceService serves {job}'s export ({served})")
        return
    p.status["message"] = f"promoting {job}: the InferenceService rolls its pods ({ready.get('message') or 'pending'})"
    p.wait()


def _rolling_back(p: _Pass, spec: FlywheelSpec) -> None:
    if p.carrying():
        p.out.isvc_patch = manifests.rollback_patch()
        p.wait(1.0)
        return
    rec = p.record
    p.goto("Idle", f"{rec.get('outcome')}: {rec.get('reason')}; all traffic is on the stable revision", "RolledBack")


def _job_cycle(job: dict[str, Any]) -> int:
    try:
        return int((job["metadata"].get("labels") or {}).get(manifests.CYCLE_LABEL, "0"))
    except ValueError:
        return 0


def _old_eval_pods(p: _Pass) -> list[tuple[str, str]]:
    """Finished evaluation pods of earlier cycles (the last cycle's stays for its logs)."""
    last = manifests.eval_pod_name(p.name, p.cycle) if p.cycle else None
    return [(x["metadata"]["name"], str(x["metadata"].get("uid", ""))) for x in p.obs.eval_pods
            if x["metadata"]["name"] != last and pod_outcome(x, manifests.CONTAINER).finished]


def _retention(p: _Pass, spec: FlywheelSpec, stable: str) -> list[str]:
    """Finished candidate jobs beyond ``training.maxRetainedJobs`` (never the served one)."""
    finished = []
    for name, job in p.obs.jobs.items():
        phase = (job.get("status") or {}).get("phase")
        if name == stable or phase not in ("Succeeded", "Failed"):
            continue
        if (job["metadata"].get("labels") or {}).get(manifests.FLYWHEEL_UID_LABEL) != p.meta.get("uid"):
            continue  # an earlier Flywheel's: not this one's to delete
        finished.append((_job_cycle(job), name))
    finished.sort()
    return [name for _c, name in finished[:-spec.training.max_retained_jobs]] if \
        len(finished) > spec.training.max_retained_jobs else []


def plan_deletion(obs: Observed) -> Plan:
    """A Flywheel being deleted: the candidate leaves the InferenceService, then the finalizer goes."""
    p = _Pass(obs)
    if p.carrying():
        p.out.isvc_patch = manifests.rollback_patch()
        p.event("RollingBack", "the Flywheel is being deleted: taking the candidate off the InferenceService")
        p.wait(1.0)
        return p.out
    job = p.record.get("trainingJob") or (manifests.job_name(p.name, p.cycle) if p.cycle else None)
    current = obs.jobs.get(str(job)) if job else None
    served = obs.isvc_spec.model.training_job_ref if obs.isvc_spec is not None else None
    if current is not None and (current.get("status") or {}).get("phase") not in ("Succeeded", "Failed") and \
            (current["metadata"].get("labels") or {}).get(manifests.FLYWHEEL_UID_LABEL) == p.meta.get("uid") and \
            (served is None or served.name != job):
        p.out.delete_jobs = [str(job)]
        p.event("CandidateDeleted", f"the Flywheel is being deleted: deleting its unfinished TrainingJob {job}")
    p.out.finalizer = False
    return p.out
