"""What a TrainingJob controller decides, as one pure function: ``plan(observed) -> Plan``.

Input: the TrainingJob as stored (spec, status, metadata), the pods labelled with its name,
the health of the nodes they are on, the referenced CheckpointPolicy and what the store
says. Output: the complete new status, the pods to create and delete, Events, metric
reasons, and when to look again. The handler applies the status patch *before* any pod
change, so a kill at any line repeats work but never double counts.

Restarts are counted by attempt. ``status.workerPods[i] = {index, attempt, uid}``; the
pod of attempt n carries label ``kubeforge.dev/attempt=n``. Ending a pod's life (counting
it) and moving its index to attempt n+1 happen in one status write; pods of older
attempts are then deleted uncounted. A pod that vanished while its uid is recorded was
deleted by someone else: an infrastructure restart.

Failure classification (docs/trainingjob.md has the table):

====================================  ===============  ===========================
what happened                         counted as       consequence
====================================  ===============  ===========================
exit code CONFIG_ERROR (78)           (none)           job Failed at once
exit code PREEMPTED (75)              infrastructure   pod replaced
pod evicted / DisruptionTarget        infrastructure   pod replaced
pod deleted (by anyone but us)        infrastructure   pod replaced
node NotReady/Unknown > grace         infrastructure   pod force-deleted, replaced
failure while its node is not Ready   infrastructure   pod replaced
failure within the disruption window  infrastructure   pod replaced
failure just before a node was lost   infrastructure   recounted when the loss is noticed
any other failure                     application      replaced; > maxRestarts fails
worker 0 exits 0 (+ export committed) (none)           job Succeeded
worker 0 exits 0, export missing      application      replaced (resumes, re-exports)
====================================  ===============  ===========================

A job with ``spec.data.datasetRef`` creates no pod before the Dataset version is resolved
(Ready False, WaitingForDataset); the resolution is recorded in ``status.dataset`` with the
first status write that can make one, and kept for the job's life: a newer version of the
Dataset never changes what a running (or restarted) job trains on. ``spec.initFrom``'s
export is resolved, recorded (``status.initFrom``) and kept the same way (WaitingForInitFrom).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from kubeforge.api import CheckpointPolicySpec, TrainingJobSpec
from kubeforge.api.common import condition, set_condition
from kubeforge.api.contract import DEFAULT_WORKLOAD_IMAGE, ExitCode
from kubeforge.api.trainingjob import DatasetRef, InitFrom
from kubeforge.controllers.pod_state import not_starting
from kubeforge.controllers.status import parse_spec
from kubeforge.controllers.trainingjob import manifests as pods_
from kubeforge.settings import SecuritySettings
from kubeforge.store import flywheel
from kubeforge.store.report import CRD_OUTDATED, RECORDING_RUN, job_run

#: How long before a node turned NotReady it may already have been dead: the control plane's
#: node-monitor grace (40 s by default) plus a heartbeat. A peer that failed in that time (its
#: rendezvous store or a peer gone silent) failed because of the loss, not of the application.
NODE_SILENCE_S = 60
#: Application failure times kept in status for that recount.
KEPT_FAILURE_TIMES = 10

#: Pod status reasons the kubelet or the control plane set when infrastructure ended a pod.
INFRA_POD_REASONS = frozenset({"Evicted", "Preempting", "NodeLost", "Shutdown", "NodeShutdown", "Terminated",
                               "UnexpectedAdmissionError", "NodeAffinity", "OutOfcpu", "OutOfmemory", "OutOfpods"})
#: How soon to look again while a replaced pod's old incarnation is still going away.
SHORT_REQUEUE_S = 1.0
#: The slowest a job is looked at without any event (refreshes lastCheckpoint from the store).
RESYNC_S = 30.0
#: A running job whose newest checkpoint is older than this many ``schedule.everySeconds``
#: (counted from when it started running, if it has none) is CheckpointLate.
LATE_INTERVALS = 3


@dataclasses.dataclass(frozen=True)
class NodeHealth:
    """A node's Ready condition: "True", "False", "Unknown", or "Missing" (node deleted)."""

    ready: str
    since: dt.datetime


@dataclasses.dataclass(frozen=True)
class StoreView:
    """What the checkpoint store says about the job (None fields: could not be read)."""

    last_checkpoint: dict[str, Any] | None = None
    export_committed: bool | None = None
    export_uri: str | None = None


@dataclasses.dataclass(frozen=True)
class DatasetResolution:
    """What spec.data.datasetRef resolves to now: ``resolved`` = status.dataset ({name,
    version, uri}) or None, and ``message`` why not."""

    resolved: dict[str, Any] | None = None
    message: str = ""


def resolve_dataset(ref: DatasetRef, dataset: dict[str, Any] | None) -> DatasetResolution:
    """The Dataset version ``ref`` names, from the Dataset as read (None: it does not exist):
    the pinned version among status.versions, or status.newestVersion / newestUri."""
    wanted = f"version {ref.version} of Dataset {ref.name}" if ref.version else f"the newest version of Dataset {ref.name}"
    if dataset is None:
        return DatasetResolution(None, f"waiting for {wanted}: Dataset {ref.name} does not exist in this namespace")
    status = dataset.get("status") or {}
    versions = {int(v["version"]): str(v["uri"]) for v in status.get("versions") or []
                if v.get("version") is not None and v.get("uri")}
    if ref.version is not None:
        uri = versions.get(ref.version)
        if uri is None:
            kept = ", ".join(str(v) for v in sorted(versions)) or "none"
            return DatasetResolution(None, f"waiting for {wanted}: it has no committed version {ref.version} "
                                     f"(committed versions kept: {kept})")
        return DatasetResolution({"name": ref.name, "version": ref.version, "uri": uri})
    newest, uri = status.get("newestVersion"), status.get("newestUri")
    if newest is None or not uri:
        if not versions:
            return DatasetResolution(None, f"waiting for {wanted}: it has no committed version yet")
        newest = max(versions)
        uri = versions[newest]
    return DatasetResolution({"name": ref.name, "version": int(newest), "uri": str(uri)})


def resolve_init(ref: InitFrom, job: dict[str, Any] | None) -> DatasetResolution:
    """The export ``spec.initFrom`` names, from the TrainingJob as read (None: it does not
    exist): its status.exportUri, set once the export is committed."""
    name = ref.training_job_ref.name
    if job is None:
        return DatasetResolution(None, f"waiting for the export of TrainingJob {name}: it does not exist in this "
                                 "namespace")
    uri = (job.get("status") or {}).get("exportUri")
    if not uri:
        phase = (job.get("status") or {}).get("phase") or "Pending"
        return DatasetResolution(None, f"waiting for the export of TrainingJob {name}: it has no committed export "
                                 f"yet (phase {phase})")
    return DatasetResolution({"trainingJob": name, "uri": str(uri)})


@dataclasses.dataclass(frozen=True)
class Observed:
    job: dict[str, Any]
    pods: list[dict[str, Any]]
    nodes: dict[str, NodeHealth]
    policy: CheckpointPolicySpec | None = None
    policy_error: str | None = None
    store: StoreView | None = None
    now: dt.datetime = dataclasses.field(default_factory=lambda: dt.datetime.now(dt.UTC))
    #: The image of pods whose job names none (the operator's setting).
    default_image: str = DEFAULT_WORKLOAD_IMAGE
    #: The run of the TrainingJob ``spec.resumeFrom.trainingJob`` names, when that object exists and
    #: is not this one (None: the trainer looks for the newest earlier run of that name).
    resume_run: str | None = None
    #: hostPath allowed or not, NetworkPolicies made or not (the operator's settings).
    security: SecuritySettings = dataclasses.field(default_factory=SecuritySettings)
    #: spec.data.datasetRef resolved, read only while status.dataset is not recorded yet.
    dataset: DatasetResolution | None = None
    #: spec.initFrom resolved, read only while status.initFrom is not recorded yet.
    init_from: DatasetResolution | None = None


@dataclasses.dataclass(frozen=True)
class PodDeletion:
    name: str
    uid: str
    force: bool


@dataclasses.dataclass(frozen=True)
class Event:
    reason: str
    message: str
    warning: bool = False


@dataclasses.dataclass
class Plan:
    status: dict[str, Any]
    create: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    delete: list[PodDeletion] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)
    #: Reasons of worker replacements (kubeforge_worker_replacements_total{reason}).
    replacements: list[str] = dataclasses.field(default_factory=list)
    #: ConfigMap and Service, applied idempotently when the spec changed.
    children: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    delete_job: bool = False
    requeue_after: float | None = RESYNC_S
    #: The Dataset the job waits for (its events bring the job back), if it waits for one.
    waiting_for_dataset: str | None = None
    #: The TrainingJob whose export the job waits for, if it waits for one.
    waiting_for_export: str | None = None

    def look_again(self, seconds: float) -> None:
        seconds = max(seconds, 0.2)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


# ---- small readers of pod and time fields ---------------------------------------------

def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value)  # Python 3.11 reads the trailing Z


def fmt_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def node_health(body: dict[str, Any], before: NodeHealth | None, now: dt.datetime) -> NodeHealth:
    """The node's Ready status, and since when it is not Ready: the condition's transition
    time, but never earlier than this process first saw it not Ready (kwok, and some
    node-problem tools, back-date the transition; a restarted operator grants a fresh grace
    rather than force-deleting at once)."""
    ready: dict[str, Any] = next(
        (c for c in (body.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), {})
    status = str(ready.get("status", "Unknown"))
    if status == "True":
        return NodeHealth(status, parse_time(ready.get("lastTransitionTime")) or now)
    if before is not None and before.ready != "True":
        return NodeHealth(status, before.since)
    return NodeHealth(status, max(parse_time(ready.get("lastTransitionTime")) or now, now))


def volume_view(entry: dict[str, Any] | None, run: str | None = None) -> StoreView | None:
    """lastCheckpoint of a job on a volume store, from the policy's status (its inspector pod
    mounts the claim; the operator cannot). No verdict on the export when it is not listed:
    worker 0 exits 0 only after committing it. An entry of another ``run`` (a deleted object
    of the same name, or the report of before this job had one) says nothing about this job."""
    if not entry or entry.get("newestStep") is None:
        return None
    if run is not None and (entry.get("run") or entry.get("name")) != run:
        return None
    last = {"step": entry["newestStep"], "uri": entry.get("newestUri")}
    if entry.get("newestTime"):
        last["time"] = entry["newestTime"]
    return StoreView(last_checkpoint={k: v for k, v in last.items() if v is not None},
                     export_committed=True if entry.get("exportUri") else None, export_uri=entry.get("exportUri"))


def _label(pod: dict[str, Any], key: str) -> str | None:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(key)


def _attempt(pod: dict[str, Any]) -> int:
    try:
        return int(_label(pod, pods_.ATTEMPT_LABEL) or 0)
    except ValueError:
        return 0


def _index(pod: dict[str, Any]) -> int | None:
    try:
        return int(_label(pod, pods_.INDEX_LABEL) or "")
    except ValueError:
        return None


def _uid(pod: dict[str, Any]) -> str:
    return str(pod["metadata"].get("uid", ""))


def _terminating(pod: dict[str, Any]) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def _phase(pod: dict[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def _pod_ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return _phase(pod) == "Running" and any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def termination(pod: dict[str, Any]) -> tuple[int | None, str]:
    """Exit code and message of the first terminated container (None: no container ended)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term is not None:
            message = (term.get("message") or "").strip()
            reason = term.get("reason") or ""
            if reason and reason not in ("Error", "Completed"):  # OOMKilled, ContainerCannotRun...
                message = f"{reason}: {message}" if message else reason
            return int(term.get("exitCode", 1)), message or reason
    return None, ""


def _disruption_target(pod: dict[str, Any]) -> str | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "DisruptionTarget" and c.get("status") == "True":
            return str(c.get("reason") or "DisruptionTarget")
    return None


def _short(message: str, limit: int = 400) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else "..." + message[-limit:]


# ---- the decision ---------------------------------------------------------------------

@dataclasses.dataclass
class _Outcome:
    """How one worker pod's life ended."""

    reason: str
    message: str
    infrastructure: bool
    force: bool = False
    #: For a node's loss: since when the node has not been Ready.
    began: dt.datetime | None = None


class _Planner:
    def __init__(self, obs: Observed, spec: TrainingJobSpec) -> None:
        self.obs, self.spec, self.now = obs, spec, obs.now
        meta = obs.job["metadata"]
        self.owner = pods_.Owner(meta["name"], meta["namespace"], meta["uid"])
        self.generation = meta.get("generation")
        self.created = parse_time(meta.get("creationTimestamp")) or self.now
        old = obs.job.get("status") or {}
        self.old = old
        #: this object's run in the store, decided once (``job_run``) and kept in status.run
        self.run = job_run(obs.job)
        self.conds: list[dict[str, Any]] = [dict(c) for c in old.get("conditions") or []]
        restarts = old.get("restarts") or {}
        self.restarts = {"application": int(restarts.get("application", 0)),
                         "infrastructure": int(restarts.get("infrastructure", 0))}
        self.start_time = old.get("startTime")
        self.completion_time = old.get("completionTime")
        self.disruption = parse_time(old.get("lastDisruptionTime"))
        self.app_failures = [t for t in (parse_time(x) for x in old.get("applicationFailureTimes") or []) if t]
        self.records: dict[int, dict[str, Any]] = {}
        for r in old.get("workerPods") or []:
            self.records[int(r["index"])] = {k: v for k, v in r.items() if k in ("index", "attempt", "uid")}
        self.plan = Plan(status={})
        #: status.dataset: recorded once, kept for the job's life
        self.dataset: dict[str, Any] | None = old.get("dataset")
        #: status.initFrom: recorded once, kept for the job's life
        self.init_from: dict[str, Any] | None = old.get("initFrom")
        self.failed = 0
        self.replaced: list[_Outcome] = []
        #: from ``workers()``: worker 0's pod if it succeeded, the active and the ready workers
        self.winner: dict[str, Any] | None = None
        self.active = self.ready = 0

    # -- helpers
    def cond(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        before = (condition(self.conds, type_) or {}).get("status")
        self.conds = set_condition(self.conds, type_, status, reason, message, self.generation)
        if before != ("True" if status else "False"):  # transitions at the observation's time
            changed = condition(self.conds, type_)
            assert changed is not None
            changed["lastTransitionTime"] = fmt_time(self.now)

    def node_lost(self, pod: dict[str, Any]) -> bool:
        """The pod's node has not been Ready for longer than the grace."""
        health = self._node(pod)
        if health is None or health.ready == "True":
            return False
        grace = dt.timedelta(seconds=self.spec.failure_policy.node_failure_grace_seconds)
        waited = self.now - health.since
        if waited >= grace:
            return True
        self.plan.look_again((grace - waited).total_seconds())
        return False

    def node_not_ready(self, pod: dict[str, Any]) -> bool:
        health = self._node(pod)
        return health is not None and health.ready != "True"

    def not_ready_since(self, pod: dict[str, Any]) -> dt.datetime | None:
        health = self._node(pod)
        return health.since if health is not None and health.ready != "True" else None

    def disrupted(self, node_not_ready_since: dt.datetime | None) -> None:
        """Record an infrastructure disruption. When it is a node's (NotReady since the time
        given), recount as infrastructure the application failures it explains: those since the
        node may already have been silent. Other disruptions (a pod deleted, evicted,
        preempted) are seen as they happen, so they explain only what follows them."""
        self.disruption = self.now
        if node_not_ready_since is None:
            return
        began = node_not_ready_since
        cutoff = began - dt.timedelta(seconds=NODE_SILENCE_S)
        explained = [t for t in self.app_failures if t >= cutoff]
        for t in explained:
            self.restarts["application"] -= 1
            self.restarts["infrastructure"] += 1
            self.event("RestartRecounted", f"the application failure at {fmt_time(t)} came "
                       f"{(self.now - t).total_seconds():.0f}s before an infrastructure disruption was noticed "
                       f"(its node NotReady since {fmt_time(began)}); counted as infrastructure now", warning=True)
        self.app_failures = [t for t in self.app_failures if t < cutoff]

    def _node(self, pod: dict[str, Any]) -> NodeHealth | None:
        node = (pod.get("spec") or {}).get("nodeName")
        return self.obs.nodes.get(node) if node else None

    def delete(self, pod: dict[str, Any], force: bool = False) -> None:
        if not force and _terminating(pod):
            return
        self.plan.delete.append(PodDeletion(pod["metadata"]["name"], _uid(pod), force))

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.plan.events.append(Event(reason, message, warning))

    def checkpoints_current(self) -> None:
        """Condition CheckpointsCurrent of a running job whose policy saves every T seconds:
        False (CheckpointLate, a Warning event) once no checkpoint was committed for
        LATE_INTERVALS × T, since the newest one or since the job started running. A failed
        upload, a full staging volume or a stuck save is otherwise only a line in a worker's log."""
        policy, running = self.obs.policy, condition(self.conds, "Running") or {}
        every = policy.schedule.every_seconds if policy is not None else None
        if not every or running.get("status") != "True":
            return
        store = self.obs.store
        last = (store.last_checkpoint if store is not None and store.last_checkpoint else None) \
            or self.old.get("lastCheckpoint") or {}
        since = [t for t in (parse_time(last.get("time")), parse_time(running.get("lastTransitionTime"))) if t]
        if not since:
            return
        limit = dt.timedelta(seconds=LATE_INTERVALS * every)
        age = self.now - max(since)
        if age <= limit:
            self.cond("CheckpointsCurrent", True, "CheckpointsCommitted",
                      f"a checkpoint at least every {LATE_INTERVALS * every}s ({LATE_INTERVALS} x schedule.everySeconds)")
            self.plan.look_again((limit - age).total_seconds() + 1)
            return
        newest = f"the newest is step {last['step']} of {last['time']}" if last.get("time") else "there is none yet"
        message = (f"no checkpoint committed for more than {LATE_INTERVALS * every}s ({LATE_INTERVALS} x "
                   f"schedule.everySeconds); {newest}. A worker's log says why (a failed upload, a full "
                   "staging volume: storage.s3.stagingSizeLimit)")
        if (condition(self.conds, "CheckpointsCurrent") or {}).get("status") != "False":
            self.event("CheckpointLate", message, warning=True)
        self.cond("CheckpointsCurrent", False, "CheckpointLate", message)

    # -- phases of the job
    def finished(self) -> str | None:
        for type_ in ("Succeeded", "Failed"):
            c = condition(self.conds, type_)
            if c and c.get("status") == "True":
                return type_
        return None

    def remove_active_pods(self) -> None:
        for pod in self.obs.pods:
            if _phase(pod) in ("Succeeded", "Failed") and not _terminating(pod):
                continue  # keep finished pods for their logs, as a Job does
            force = self.node_lost(pod)
            if force or not _terminating(pod):
                self.delete(pod, force=force)

    def fail(self, reason: str, message: str) -> None:
        self.cond("Failed", True, reason, message)
        self.cond("Succeeded", False, reason, message)
        self.cond("Running", False, reason, message)
        self.cond("Restarting", False, reason, message)
        self.cond("Ready", False, reason, message)
        self.completion_time = fmt_time(self.now)
        self.event(reason, f"TrainingJob failed: {message}", warning=True)
        self.remove_active_pods()

    def succeed(self, message: str) -> None:
        self.cond("Succeeded", True, "Completed", message)
        self.cond("Failed", False, "Completed", message)
        self.cond("Running", False, "Completed", message)
        self.cond("Restarting", False, "Completed", message)
        self.cond("Ready", True, "Succeeded", message)
        self.completion_time = fmt_time(self.now)
        self.event("Succeeded", message)
        self.remove_active_pods()

    # -- workers
    def classify(self, pod: dict[str, Any], index: int) -> _Outcome | None:
        """None while the pod lives; else how its life ended."""
        code, message = termination(pod)
        phase = _phase(pod)
        where = f"worker {index} (pod {_uid(pod)[:8]})"
        if _terminating(pod):
            return _Outcome("PodDeleted", f"{where} was deleted", True, force=self.node_lost(pod))
        if phase == "Failed":
            status = pod.get("status") or {}
            if code == ExitCode.CONFIG_ERROR:
                return _Outcome("ConfigurationError", _short(message) or f"{where} exited {code}", False)
            if code == ExitCode.RESUME_SOURCE_INVALID:
                return _Outcome("ResumeSourceInvalid", _short(message) or f"{where} exited {code}: "
                                "spec.resumeFrom names no loadable checkpoint", False)
            if code == ExitCode.PREEMPTED:
                return _Outcome("Preempted", f"{where} was preempted (exit {code})", True)
            if status.get("reason") in INFRA_POD_REASONS:
                return _Outcome(str(status["reason"]), f"{where}: {status.get('message') or status['reason']}", True)
            target = _disruption_target(pod)
            if target:
                return _Outcome("Disrupted", f"{where} was disrupted: {target}", True)
            if self.node_not_ready(pod):
                return _Outcome("NodeLost", f"{where} failed on a node that is not Ready", True,
                                began=self.not_ready_since(pod))
            window = dt.timedelta(seconds=self.spec.failure_policy.disruption_window_seconds)
            if self.disruption is not None and self.now - self.disruption < window:
                return _Outcome("PeerDisrupted", f"{where} failed (exit {code}) after an infrastructure "
                                f"disruption of the job at {fmt_time(self.disruption)}", True)
            detail = f": {_short(message, 200)}" if message else ""
            return _Outcome("Failed", f"{where} failed with exit code {code}{detail}", False)
        if phase == "Succeeded":
            return None
        if self.node_lost(pod):
            return _Outcome("NodeLost", f"{where} is on node {pod['spec'].get('nodeName')}, not Ready for more "
                            f"than {self.spec.failure_policy.node_failure_grace_seconds}s", True, force=True,
                            began=self.not_ready_since(pod))
        return None

    def end_life(self, index: int, outcome: _Outcome, pod: dict[str, Any] | None) -> None:
        rec = self.records[index]
        kind = "infrastructure" if outcome.infrastructure else "application"
        self.restarts[kind] += 1
        if outcome.infrastructure:
            self.disrupted(outcome.began)
        else:
            self.app_failures = [*self.app_failures, self.now][-KEPT_FAILURE_TIMES:]
        rec["attempt"] = int(rec.get("attempt", 0)) + 1
        rec.pop("uid", None)
        if pod is not None:
            self.delete(pod, force=outcome.force)
        self.replaced.append(outcome)
        self.plan.replacements.append(outcome.reason)
        self.event("WorkerReplaced" if outcome.infrastructure else "WorkerFailed",
                   f"{outcome.message}; counted as {kind} restart ({self.restarts[kind]}), replacing it",
                   warning=True)

    def workers(self) -> tuple[dict[str, Any] | None, int, int]:
        """Account every worker index; returns (worker 0's pod if it succeeded, active, ready)."""
        by_index = self._pods_by_index()
        winner: dict[str, Any] | None = None
        active = ready = 0
        group_restart = False
        for i in range(self.spec.workers.max_replicas):
            current, vanished = self._current_pod(i, by_index.get(i, []))
            group_restart |= vanished
            if current is None:
                continue
            outcome = self.classify(current, i)
            if outcome is None:
                if _phase(current) == "Succeeded":
                    if i == 0 and termination(current)[0] == 0:
                        winner = current
                    continue
                active += 1
                ready += _pod_ready(current)
                continue
            if outcome.reason in ("ConfigurationError", "ResumeSourceInvalid"):
                self.fail(outcome.reason, outcome.message)
                return None, 0, 0
            self.failed += _phase(current) == "Failed"
            self.end_life(i, outcome, current)
            group_restart = True
        if group_restart and self.spec.failure_policy.restart_policy == "RestartGroup":
            self._restart_group(by_index)
            active = ready = 0
        return winner, active, ready

    def _pods_by_index(self) -> dict[int, list[dict[str, Any]]]:
        """The worker pods by index; pods of an index past maxReplicas (scaled down, or not ours
        to keep) are deleted, and so are their records."""
        n = self.spec.workers.max_replicas
        by_index: dict[int, list[dict[str, Any]]] = {}
        for pod in self.obs.pods:
            if _label(pod, pods_.ROLE_LABEL) != pods_.ROLE_WORKER:
                continue
            i = _index(pod)
            if i is None or i >= n:
                self.delete(pod, force=self.node_lost(pod))
                continue
            by_index.setdefault(i, []).append(pod)
        self.records = {i: r for i, r in self.records.items() if i < n}
        for i in range(n):
            self.records.setdefault(i, {"index": i, "attempt": 0})
        return by_index

    def _current_pod(self, i: int, pods: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, bool]:
        """The pod of worker ``i``'s current attempt (pods of older attempts are deleted), None
        when there is none or the recorded one was replaced by another (its life ended here);
        and whether the recorded pod vanished."""
        rec = self.records[i]
        current = None
        for pod in sorted(pods, key=_attempt, reverse=True):
            if current is None and _attempt(pod) >= rec["attempt"]:
                if _attempt(pod) > rec["attempt"]:  # status was lost or rewritten: adopt
                    rec.update(attempt=_attempt(pod), uid=_uid(pod))
                current = pod
            else:
                lost = self.node_lost(pod)
                if lost or not _terminating(pod):
                    self.delete(pod, force=lost)
        deleted = _Outcome("PodDeleted", f"worker {i} (pod {str(rec.get('uid', ''))[:8]}) was deleted", True)
        if current is None:
            if rec.get("uid"):
                self.end_life(i, deleted, None)
                return None, True
            return None, False
        if not rec.get("uid"):
            rec["uid"] = _uid(current)
        elif rec["uid"] != _uid(current):
            self.end_life(i, deleted, current)
            return None, False
        return current, False

    def _restart_group(self, by_index: dict[int, list[dict[str, Any]]]) -> None:
        """restartPolicy RestartGroup: the survivors are recreated too, uncounted."""
        for i, rec in self.records.items():
            if rec.get("uid"):
                survivor = next((p for p in by_index.get(i, []) if _uid(p) == rec["uid"]), None)
                rec["attempt"] = int(rec["attempt"]) + 1
                rec.pop("uid", None)
                if survivor is not None:
                    self.delete(survivor, force=self.node_lost(survivor))
        self.event("GroupRestarted", "restartPolicy RestartGroup: every worker is recreated")

    def create_missing(self, policy: CheckpointPolicySpec | None) -> None:
        names = {p["metadata"]["name"] for p in self.obs.pods}
        for i, rec in sorted(self.records.items()):
            name = pods_.worker_name(self.owner.name, i)
            if rec.get("uid"):
                continue
            if name in names:
                self.plan.look_again(SHORT_REQUEUE_S)  # the old incarnation is still going away
                continue
            self.plan.create.append(pods_.build_worker_pod(self.owner, self.spec, policy, i, int(rec["attempt"]),
                                                           self.obs.default_image, run=self.run,
                                                           resume_run=self.obs.resume_run))

    def rendezvous(self) -> None:
        name = pods_.rendezvous_name(self.owner.name)
        pod = next((p for p in self.obs.pods if p["metadata"]["name"] == name), None)
        if pod is None:
            self.plan.create.append(pods_.build_rendezvous_pod(self.owner, self.spec, self.obs.default_image))
            return
        lost = self.node_lost(pod)
        if _terminating(pod):
            if lost:
                self.delete(pod, force=True)
            self.plan.look_again(SHORT_REQUEUE_S)
            return
        if _phase(pod) in ("Failed", "Succeeded") or lost:
            self.delete(pod, force=lost)
            self.disrupted(self.not_ready_since(pod))
            self.plan.replacements.append("RendezvousLost")
            self.event("RendezvousReplaced", f"rendezvous store pod {name} "
                       f"{'is on a lost node' if lost else 'ended'}; replacing it (workers re-rendezvous)",
                       warning=True)
            self.plan.look_again(SHORT_REQUEUE_S)

    def capacity(self, ready: int) -> None:
        w, fp = self.spec.workers, self.spec.failure_policy
        msg = f"{ready} of {w.max_replicas} workers ready (min {w.min_replicas})"
        if ready >= w.min_replicas:
            self.cond("Running", True, "WorkersRunning", msg)
            if self.start_time is None:
                self.start_time = fmt_time(self.now)
            return
        running = condition(self.conds, "Running")
        since = max(t for t in (self.created, parse_time((running or {}).get("lastTransitionTime")),
                                parse_time((condition(self.conds, "Suspended") or {}).get("lastTransitionTime")))
                    if t is not None)
        if running and running.get("status") == "True":
            since = self.now
        timeout = dt.timedelta(seconds=fp.insufficient_capacity_timeout_seconds)
        if self.now - since >= timeout:
            why = sorted({c.get("message", "") for p in self.obs.pods for c in (p.get("status") or {}).get(
                "conditions") or [] if c.get("type") == "PodScheduled" and c.get("status") == "False"} - {""})
            detail = f"; scheduler: {_short(why[0], 300)}" if why else ""
            old = condition(self.conds, "Running") or {}
            if old.get("reason") != "InsufficientCapacity":
                self.event("InsufficientCapacity", f"{msg} for {fp.insufficient_capacity_timeout_seconds}s{detail}",
                           warning=True)
            self.cond("Running", False, "InsufficientCapacity",
                      f"{msg} for more than {fp.insufficient_capacity_timeout_seconds}s{detail}")
        elif stuck := not_starting(self.obs.pods):
            old = condition(self.conds, "Running") or {}
            if old.get("reason") != "WorkersNotStarting" or old.get("message") != f"{msg}; {stuck}":
                self.event("WorkersNotStarting", f"{msg}; {stuck}", warning=True)
            self.cond("Running", False, "WorkersNotStarting", f"{msg}; {stuck}")
            self.plan.look_again((timeout - (self.now - since)).total_seconds())
        else:
            self.cond("Running", False, "WaitingForWorkers", msg)
            self.plan.look_again((timeout - (self.now - since)).total_seconds())


def _status(p: _Planner, phase: str, workers: dict[str, int] | None = None) -> dict[str, Any]:
    old = p.old
    ready = condition(p.conds, "Ready") or {}
    status: dict[str, Any] = {
        "observedGeneration": p.generation,
        "conditions": p.conds,
        "phase": phase,
        "workers": workers or {"desired": p.spec.workers.max_replicas, "active": 0, "ready": 0, "failed": 0},
        "restarts": p.restarts,
        "workerPods": [p.records[i] for i in sorted(p.records)],
        "startTime": p.start_time,
        "completionTime": p.completion_time,
        "lastDisruptionTime": fmt_time(p.disruption) if p.disruption else None,
        "applicationFailureTimes": [fmt_time(t) for t in p.app_failures],
        "lastCheckpoint": old.get("lastCheckpoint"),
        "exportUri": old.get("exportUri"),
        "run": p.run,
        "dataset": p.dataset,
        "initFrom": p.init_from,
        "message": ready.get("message") or None,
    }
    store = p.obs.store
    if store is not None:
        if store.last_checkpoint is not None:
            status["lastCheckpoint"] = store.last_checkpoint
        if store.export_committed:
            status["exportUri"] = store.export_uri
    return status


def _ttl(p: _Planner) -> None:
    ttl = p.spec.ttl_seconds_after_finished
    done = parse_time(p.completion_time)
    if ttl is None or done is None:
        p.plan.requeue_after = None
        return
    left = (done + dt.timedelta(seconds=ttl) - p.now).total_seconds()
    if left <= 0:
        p.plan.delete_job = True
        p.plan.requeue_after = None
    else:
        p.plan.requeue_after = left


def _finish(p: _Planner, phase: str, workers: dict[str, int] | None = None) -> Plan:
    """The plan of a job that ended (or just did): TTL, then the status."""
    _ttl(p)
    p.plan.status = _status(p, phase, workers)
    return p.plan


def _invalid(obs: Observed, error: str, reason: str = "InvalidSpec") -> Plan:
    meta = obs.job["metadata"]
    old = obs.job.get("status") or {}
    before = condition(old.get("conditions"), "Ready") or {}
    conds = set_condition(list(old.get("conditions") or []), "Ready", False, reason, error,
                          meta.get("generation"))
    events = [] if (before.get("reason"), before.get("message")) == (reason, error) else [Event(reason, error, True)]
    return Plan(status={**old, "observedGeneration": meta.get("generation"), "conditions": conds,
                        "phase": "Failed", "message": error}, events=events, requeue_after=None)


# ---- the phases: each returns the Plan when it decides the job's, else None -----------

def _already_finished(p: _Planner) -> Plan | None:
    done = p.finished()
    if done is None:
        return None
    p.remove_active_pods()
    _finish(p, done, p.old.get("workers") or None)
    if p.plan.delete:
        p.plan.look_again(SHORT_REQUEUE_S)
    return p.plan


def _suspension(p: _Planner) -> Plan | None:
    """Suspended: every worker deleted, status and checkpoints kept. On resume, a condition
    and an Event, and the other phases go on."""
    suspended = condition(p.conds, "Suspended")
    if not p.spec.suspend:
        if (suspended or {}).get("status") == "True":
            p.cond("Suspended", False, "Resumed", "spec.suspend is false; restoring from the last checkpoint")
            p.event("Resumed", "spec.suspend is false: workers recreated, training resumes from the last checkpoint")
        elif suspended is None:
            p.cond("Suspended", False, "NotSuspended", "")
        return None
    for pod in p.obs.pods:
        lost = p.node_lost(pod)
        if lost or not _terminating(pod):
            p.delete(pod, force=lost)
    for rec in p.records.values():
        if rec.get("uid"):
            rec["attempt"] = int(rec["attempt"]) + 1
            rec.pop("uid", None)
    if (suspended or {}).get("status") != "True":
        p.event("Suspended", "spec.suspend is true: workers deleted, status and checkpoints kept")
    for type_ in ("Suspended", "Running", "Restarting", "Ready"):
        p.cond(type_, type_ == "Suspended", "Suspended", "spec.suspend is true")
    p.start_time = None  # as for a Job: activeDeadlineSeconds counts again from the resume
    p.plan.status = _status(p, "Suspended")
    if p.plan.delete:
        p.plan.look_again(SHORT_REQUEUE_S)
    return p.plan


def _policy_missing(p: _Planner) -> Plan | None:
    ref = p.spec.checkpoint_policy_ref
    if ref is None or p.obs.policy is not None:
        return None
    p.cond("Ready", False, "CheckpointPolicyNotFound", p.obs.policy_error or f"CheckpointPolicy {ref.name} not found")
    p.plan.status = _status(p, "Pending")
    p.plan.look_again(10.0)
    return p.plan


def _dataset_missing(p: _Planner) -> Plan | None:
    """spec.data.datasetRef not resolved yet: no pod, Ready False WaitingForDataset (an Event
    when the wait begins or its reason changes), looked at again on the Dataset's events."""
    ref = p.spec.data.dataset_ref if p.spec.data else None
    if ref is None or p.dataset is not None:
        return None
    resolution = p.obs.dataset or DatasetResolution(None, f"waiting for Dataset {ref.name}")
    old = condition(p.conds, "Ready") or {}
    if (old.get("reason"), old.get("message")) != ("WaitingForDataset", resolution.message):
        p.event("WaitingForDataset", f"no worker is created until then: {resolution.message}")
    p.cond("Ready", False, "WaitingForDataset", resolution.message)
    p.plan.status = _status(p, "Pending")
    p.plan.waiting_for_dataset = ref.name
    p.plan.look_again(10.0)
    return p.plan


def _init_missing(p: _Planner) -> Plan | None:
    """spec.initFrom's export not resolved yet: no pod, Ready False WaitingForInitFrom, looked
    at again on that job's events."""
    ref = p.spec.init_from
    if ref is None or p.init_from is not None:
        return None
    resolution = p.obs.init_from or DatasetResolution(None, f"waiting for the export of TrainingJob "
                                                      f"{ref.training_job_ref.name}")
    old = condition(p.conds, "Ready") or {}
    if (old.get("reason"), old.get("message")) != ("WaitingForInitFrom", resolution.message):
        p.event("WaitingForInitFrom", f"no worker is created until then: {resolution.message}")
    p.cond("Ready", False, "WaitingForInitFrom", resolution.message)
    p.plan.status = _status(p, "Pending")
    p.plan.waiting_for_export = ref.training_job_ref.name
    p.plan.look_again(10.0)
    return p.plan


def _deadline(p: _Planner) -> Plan | None:
    start, deadline = parse_time(p.start_time), p.spec.active_deadline_seconds
    if not deadline or start is None:
        return None
    left = (start + dt.timedelta(seconds=deadline) - p.now).total_seconds()
    if left > 0:
        p.plan.look_again(left)
        return None
    p.fail("DeadlineExceeded", f"the job ran longer than activeDeadlineSeconds={deadline}")
    return _finish(p, "Failed")


def _run_recorded(p: _Planner) -> Plan | None:
    """No pod of a new run before its ``status.run`` reads back from the API server (and no
    other phase: a write of theirs is what this waits for).

    A CRD that predates the field (helm never upgrades CRDs) drops it on write; ``job_run``
    would then recompute the run from the status, and once pods exist it names the legacy run:
    the later pods would write elsewhere than the first ones. So the first write records the
    run (Ready False RecordingRun) and creates nothing; when a later read shows that write but
    not the run, the CRD is outdated: Ready False CRDOutdated, one Warning Event, no pods, and
    the status stays as it is (job_run keeps naming the new run). A legacy run (the job started
    before runs were keyed by uid) is decided by its history and needs no such wait."""
    if p.old.get("run") or p.run == p.owner.name:
        return None
    ready = condition(p.conds, "Ready") or {}
    if ready.get("reason") in (RECORDING_RUN, CRD_OUTDATED):  # the write went through, status.run did not
        message = (f"status.run ({p.run}) does not read back from the API server: the installed TrainingJob CRD "
                   "predates it. Apply crds/ (kubectl apply --server-side -f crds/): helm does not upgrade CRDs. "
                   "No worker is created until then")
        if ready.get("reason") != CRD_OUTDATED:
            p.event(CRD_OUTDATED, message, warning=True)
        p.cond("Ready", False, CRD_OUTDATED, message)
        p.plan.status = _status(p, "Pending")  # looked at again every RESYNC_S: the CRD may be applied by then
        return p.plan
    _announce_run(p)
    p.cond("Ready", False, RECORDING_RUN, f"recording status.run ({p.run}) before the first worker")
    p.plan.status = _status(p, "Pending")
    p.plan.look_again(SHORT_REQUEUE_S)
    return p.plan


def _workers(p: _Planner) -> Plan | None:
    """Account every worker; a configuration error fails the job."""
    p.winner, p.active, p.ready = p.workers()
    return _finish(p, "Failed") if p.finished() == "Failed" else None


def _success(p: _Planner) -> Plan | None:
    """Worker 0 exited 0: the job succeeded once its export is committed (when it exports)."""
    winner, obs = p.winner, p.obs
    if winner is None:
        return None
    if p.spec.export.enabled and obs.policy is not None:
        export = obs.store.export_committed if obs.store else None
        if export is None and obs.policy.storage.s3 is not None:
            # The store could not be read just now: no verdict until it can be.
            p.cond("Succeeded", False, "ExportUnverified",
                   "worker 0 exited 0; the export's commit marker could not be read from the store yet")
            p.plan.look_again(5.0)
            return None
        if export is False:  # None for a volume: worker 0 exits 0 only after committing it
            p.end_life(0, _Outcome("ExportMissing", "worker 0 exited 0 but the export has no commit marker", False),
                       winner)
            return None
    p.succeed(f"worker 0 exited 0 after {p.restarts['application']} application and "
              f"{p.restarts['infrastructure']} infrastructure restarts")
    return _finish(p, "Succeeded", {"desired": p.spec.workers.max_replicas, "active": 0, "ready": 0,
                                    "failed": p.failed})


def _restart_budget(p: _Planner) -> Plan | None:
    fp = p.spec.failure_policy
    if p.restarts["application"] <= fp.max_restarts:
        return None
    last = next((o.message for o in reversed(p.replaced) if not o.infrastructure), "")
    p.fail("RestartBudgetExhausted", f"{p.restarts['application']} application failures exceed "
           f"failurePolicy.maxRestarts={fp.max_restarts}; last: {last}")
    return _finish(p, "Failed")


def _running(p: _Planner) -> Plan:
    """The job runs (or waits for workers): the rendezvous store, missing workers, conditions."""
    p.rendezvous()
    p.create_missing(p.obs.policy)
    if p.replaced:
        first = p.replaced[0]
        p.cond("Restarting", True, first.reason, first.message)
        p.plan.look_again(SHORT_REQUEUE_S)
    p.capacity(p.ready)
    running = (condition(p.conds, "Running") or {}).get("status") == "True"
    if running and not p.replaced:
        p.cond("Restarting", False, "WorkersRunning", "")
    elif condition(p.conds, "Restarting") is None:
        p.cond("Restarting", False, "NoRestarts", "")
    run = condition(p.conds, "Running") or {}
    p.cond("Ready", running, str(run.get("reason", "WaitingForWorkers")), str(run.get("message", "")))
    p.checkpoints_current()
    restarting = (condition(p.conds, "Restarting") or {}).get("status") == "True"
    phase = "Restarting" if restarting else "Running" if running else "Pending"
    p.plan.status = _status(p, phase, {"desired": p.spec.workers.max_replicas, "active": p.active, "ready": p.ready,
                                       "failed": p.failed})
    return p.plan


def _announce_run(p: _Planner) -> None:
    """The Event of the run decided for this object (recorded in status.run with the same write)."""
    where = f"{p.owner.namespace}/{p.run}"
    if p.run == p.owner.name:
        p.event("RunAssigned", f"keeps the run it started before runs were keyed by uid: checkpoints and "
                f"export under {where}")
        return
    r = p.spec.resume_from
    if r is None:
        p.event("RunAssigned", f"a new run under {where}, from step 0: no checkpoint or export of an earlier "
                f"TrainingJob named {p.owner.name} is resumed or served (spec.resumeFrom asks for one)")
        return
    source = r.training_job or p.owner.name
    run = (f"run {p.obs.resume_run}" if p.obs.resume_run else
           f"the newest run an earlier TrainingJob named {source} left in the store")
    at = f"step {r.step}" if r.step is not None else "its newest loadable checkpoint"
    p.event("RunAssigned", f"a new run under {where}, starting from spec.resumeFrom: {run}, {at}; the job "
            "fails with reason ResumeSourceInvalid if that is not there")


PHASES = (_already_finished, _run_recorded, _suspension, _policy_missing, _dataset_missing, _init_missing, _deadline,
          _workers, _success, _restart_budget)


def _record_dataset(p: _Planner) -> None:
    """Record spec.data.datasetRef's resolution, once (an unfinished job only)."""
    ref = p.spec.data.dataset_ref if p.spec.data else None
    resolved = p.obs.dataset.resolved if p.obs.dataset else None
    if ref is None or p.dataset is not None or resolved is None or p.finished() is not None:
        return
    p.dataset = resolved
    p.event("DatasetResolved", f"trains on Dataset {resolved['name']} version {resolved['version']} "
            f"({resolved['uri']}/{flywheel.TRAIN_SPLIT}); newer versions of the Dataset do not change this job")


def _record_init(p: _Planner) -> None:
    """Record spec.initFrom's resolution, once (an unfinished job only)."""
    resolved = p.obs.init_from.resolved if p.obs.init_from else None
    if p.spec.init_from is None or p.init_from is not None or resolved is None or p.finished() is not None:
        return
    p.init_from = resolved
    p.event("InitFromResolved", f"starts from the export of TrainingJob {resolved['trainingJob']} ({resolved['uri']}); "
            "a later export of that job does not change this job")


def plan(obs: Observed) -> Plan:
    """Everything the controller does for one TrainingJob, from what it observed: the first
    phase that decides the job's plan returns it; a job none of them ends is running."""
    spec, error = parse_spec(TrainingJobSpec, obs.job.get("spec"))
    if spec is not None and len(obs.job["metadata"]["name"]) > pods_.MAX_JOB_NAME:
        spec, error = None, (f"metadata.name must be at most {pods_.MAX_JOB_NAME} characters "
                             "(worker hostnames are DNS labels)")
    if spec is None:
        return _invalid(obs, error or "invalid spec")
    p = _Planner(obs, spec)
    refused = pods_.refused_volumes(spec, obs.security.allow_host_path_volumes)
    if refused and p.finished() is None:
        # a job that finished stays as it ended; a live one (made before the setting or the
        # admission policy) fails, and its pods, which hold the node's files, are removed
        p.fail("VolumeSourceRefused", refused)
        return _finish(p, "Failed")
    if not p.old.get("run") and p.run == p.owner.name:
        _announce_run(p)  # a new run is announced with the write that records it (``_run_recorded``)
    _record_dataset(p)
    _record_init(p)
    p.plan.children = [pods_.build_headless_service(p.owner)]
    if (p.dataset is not None or not (spec.data and spec.data.dataset_ref)) and \
            (p.init_from is not None or spec.init_from is None):
        # a job waiting for its dataset or its initial weights gets no config yet: no worker could mount it
        p.plan.children.insert(0, pods_.build_config_map(p.owner, spec, (p.dataset or {}).get("uri"),
                                                         (p.init_from or {}).get("uri")))
    if obs.security.network_policies:
        p.plan.children.append(pods_.build_network_policy(p.owner, obs.security.scrape_from))
    for phase in PHASES:
        decided = phase(p)
        if decided is not None:
            return decided
    return _running(p)
