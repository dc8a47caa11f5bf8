"""What a Dataset controller decides, as pure functions: where its source is
(``store_from_ref``), and from the Dataset, its curation pods and what its store holds, the
whole new status, the pod to start or delete, the Events, the curation outcomes for the
metrics, what retention deletes, and when to look again (``plan``).

The store is read elsewhere (``store_view``, through ``controllers.store_access``, never on
a reconcile thread); a plan uses the last answer. Two rules keep it honest:

- a version counts only once its commit marker exists (the store view lists no other), and a
  finished pod is judged only on a store answer read after it was seen finished
  (``Observed.store_fresh``): a stale answer must not turn a success into a failure;
- the status is written before any pod is created or deleted, so a kill at any line repeats
  work but never starts two curations or loses an outcome. An outcome is recorded once: its
  pod's uid goes into the Curating condition's message (``FailureNote``).

Schedule: a curation starts when no version exists yet and the source has records; when
``schedule.everyNewRecords`` request records are pending; ``schedule.everySeconds`` after the
newest version when any is pending; when the ``kubeforge.dev/curate`` annotation has a value
``status.lastCurationRequest`` does not; and, after a failure, once its backoff has passed.
Never two at once; ``suspend`` starts none.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Any

from kubeforge.api import CheckpointPolicySpec, DatasetSpec
from kubeforge.api.common import StoreRef, condition, set_condition
from kubeforge.api.contract import ExitCode
from kubeforge.api.dataset import CurationRun, DatasetVersion, SplitCounts
from kubeforge.controllers.dataset import manifests
from kubeforge.controllers.dataset.manifests import SourceStore
from kubeforge.controllers.pod_state import not_starting
from kubeforge.controllers.workload import Owner
from kubeforge.store import flywheel
from kubeforge.store.policy import storage_uri

#: The annotation that asks for a curation now: any value ``status.lastCurationRequest`` does not hold.
CURATE_ANNOTATION = "kubeforge.dev/curate"
#: Exit code of the curate module for a source without a committed request record.
SOURCE_EMPTY_EXIT = 3
#: How soon to look again while a finished pod waits for a store answer read after it.
SHORT_REQUEUE_S = 1.0
#: Reasons of the Curating condition that carry a ``FailureNote`` (the outcome of a pod).
OUTCOME_REASONS = ("CurationFailed", "SourceEmpty")


@dataclasses.dataclass(frozen=True)
class DatasetSettings:
    """How the Dataset controller paces curation and reads its store."""

    #: ``activeDeadlineSeconds`` of a curation pod: the kubelet kills a longer one.
    curation_deadline_s: int = 3600
    #: A pod not finished this long after its deadline (never scheduled, image missing) is
    #: deleted and counted as failed.
    stuck_grace_s: int = 120
    #: First retry after a failed curation; each further failure of the version doubles it.
    retry_base_s: float = 60.0
    #: The longest wait between retries.
    retry_max_s: float = 1800.0
    #: How often every Dataset is looked at again (the store has no watch: new shards, the
    #: everySeconds schedule).
    resync_s: float = 30.0
    #: How long a store answer is reused before it is read again.
    store_refresh_s: float = 30.0
    #: Datasets reconciled at the same time (each in a thread: the Kubernetes client blocks).
    workers: int = 4


@dataclasses.dataclass(frozen=True)
class SourceProblem:
    """Why the source cannot be read (a condition's reason and message)."""

    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Shard:
    """A committed capture shard: ``key`` relative to the store root, ``rel`` relative to the
    capture directory (how a manifest's ``source_shards`` names it)."""

    key: str
    rel: str
    records: int
    first_time: str
    last_time: str


@dataclasses.dataclass(frozen=True)
class Version:
    """A committed dataset version, from its marker and manifest. ``seen``: the capture
    shards (relative to the capture directory) it read or skipped as corrupt; None when its
    manifest could not be read."""

    version: int
    time: str
    records: dict[str, int]
    dedup_ratio: float | None = None
    window_start: str | None = None
    window_end: str | None = None
    content_sha256: str | None = None
    seen: frozenset[str] | None = None


@dataclasses.dataclass(frozen=True)
class StoreView:
    """What the store holds for one Dataset: committed request and feedback shards (oldest
    first), committed versions (oldest first) and the version numbers of directories without a
    commit marker (a curation running, or one killed midway: never counted)."""

    requests: tuple[Shard, ...] = ()
    feedback: tuple[Shard, ...] = ()
    versions: tuple[Version, ...] = ()
    incomplete: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Retention:
    """What to delete from the store: versions beyond ``keepVersions``, directories of versions
    that will never be committed (numbers below the newest committed one), and capture shards
    past ``captureMaxAgeDays`` that a committed version already curated (keys relative to the
    root). Markers go first (``store_view.apply_retention``)."""

    versions: tuple[int, ...] = ()
    incomplete: tuple[int, ...] = ()
    shards: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.versions or self.incomplete or self.shards)


@dataclasses.dataclass
class Observed:
    """Everything a plan looks at. ``store`` is the last answer (None: none yet);
    ``store_error`` the last read's failure; ``store_fresh`` whether the answer was read after
    a finished or vanished curation pod was first seen (always True when none is)."""

    dataset: dict[str, Any]
    spec: DatasetSpec | None
    spec_error: str | None = None
    source: SourceStore | SourceProblem | None = None
    store: StoreView | None = None
    store_error: str | None = None
    store_fresh: bool = True
    pods: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    now: dt.datetime = dataclasses.field(default_factory=lambda: dt.datetime.now(dt.UTC))
    image: str = ""
    settings: DatasetSettings = dataclasses.field(default_factory=DatasetSettings)


@dataclasses.dataclass(frozen=True)
class Event:
    reason: str
    message: str
    warning: bool = False


@dataclasses.dataclass
class Plan:
    """Applied in this order: ``status`` (a merge patch: None clears a field), then ``delete``
    (pod name, uid), ``create``, the Events, the outcomes (``succeeded``, ``failed``,
    ``source_empty``: kubeforge_dataset_curations_total), and ``retention`` in the store."""

    status: dict[str, Any]
    create: dict[str, Any] | None = None
    delete: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)
    outcomes: list[str] = dataclasses.field(default_factory=list)
    retention: Retention = dataclasses.field(default_factory=Retention)
    requeue_after: float | None = None


# ---------------------------------------------------------------------------- the source


def store_from_ref(ref: StoreRef, field: str, namespace: str, dataset: str, capture: str,
                   policy_name: str | None = None, policy: CheckpointPolicySpec | None = None) -> SourceStore | SourceProblem:
    """The store a ``StoreRef`` names (``field`` says where it was, for the messages): a
    CheckpointPolicy's S3 storage and its Secret unless the ref names its own, or an S3 URI
    with its Secret and endpoint. The dataset directory is on the same store."""
    output = flywheel.dataset_prefix(namespace, dataset)
    if ref.checkpoint_policy_ref is not None:
        assert policy is not None and policy_name is not None
        s3 = policy.storage.s3
        if s3 is None:
            return SourceProblem("StoreUnsupported", (
                f"{field}.checkpointPolicyRef: CheckpointPolicy {policy_name} stores on a volume "
                "(spec.storage.volume); a Dataset needs S3 storage: the operator reads the capture and the "
                "curation pod writes versions there"))
        secret = ref.credentials_secret_ref.name if ref.credentials_secret_ref else s3.credentials_secret_ref.name
        return SourceStore(root=storage_uri(policy), capture=capture, output=output, secret=secret,
                           store_key=(namespace, policy_name), endpoint=s3.endpoint, region=s3.region,
                           force_path_style=s3.force_path_style)
    if ref.uri is None or ref.credentials_secret_ref is None:
        return SourceProblem("InvalidSpec", f"{field}: uri and credentialsSecretRef must both be set")
    root = ref.uri.rstrip("/")
    return SourceStore(root=root, capture=capture, output=output, secret=ref.credentials_secret_ref.name,
                       store_key=(namespace, root), endpoint=ref.s3_endpoint)


# ---------------------------------------------------------------------------- times


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)  # Python 3.11 reads the trailing Z
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def fmt_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _after(a: str | None, b: str | None) -> bool:
    """Time ``a`` is later than ``b`` (unparsable: not later)."""
    ta, tb = parse_time(a), parse_time(b)
    return ta is not None and tb is not None and ta > tb


def _not_after(a: str | None, b: str | None) -> bool:
    ta, tb = parse_time(a), parse_time(b)
    return ta is not None and tb is not None and ta <= tb


# ---------------------------------------------------------------------------- records


def pending_shards(view: StoreView, kind: str = flywheel.REQUESTS) -> list[Shard]:
    """Shards of ``kind`` (request or feedback) the newest version has not curated: those its
    manifest neither read nor skipped (curation reads every committed shard, so that is exact);
    for a version whose manifest is unreadable, request shards starting after its window and
    feedback shards starting after the version was committed (feedback comes after its
    answers, so the window of the requests says nothing about it); every shard when there is
    no version."""
    shards = view.requests if kind == flywheel.REQUESTS else view.feedback
    if not view.versions:
        return list(shards)
    newest = view.versions[-1]
    if newest.seen is not None:
        return [s for s in shards if s.rel not in newest.seen]
    if kind == flywheel.REQUESTS:
        return [s for s in shards if newest.window_end is None or _after(s.first_time, newest.window_end)]
    return [s for s in shards if _after(s.first_time, newest.time)]


def plan_retention(view: StoreView, keep_versions: int, capture_max_age_days: int | None,
                   now: dt.datetime) -> Retention:
    """Versions beyond the newest ``keep_versions`` (the newest is always kept); version
    directories without a marker numbered below the newest committed version (nothing will
    commit them: a new curation takes the next number); and, with ``capture_max_age_days``,
    request and feedback shards whose records all are older than that and that the newest
    version curated (its manifest names them, and they end by its window's end)."""
    committed = [v.version for v in view.versions]
    drop = tuple(committed[:-keep_versions]) if len(committed) > keep_versions else ()
    newest = view.versions[-1] if view.versions else None
    incomplete = tuple(n for n in view.incomplete if newest is not None and n < newest.version)
    shards: tuple[str, ...] = ()
    if capture_max_age_days and newest is not None and newest.seen is not None and newest.window_end:
        cutoff = now - dt.timedelta(days=capture_max_age_days)
        shards = tuple(s.key for s in (*view.requests, *view.feedback)
                       if s.rel in newest.seen and _not_after(s.last_time, newest.window_end)
                       and (parse_time(s.last_time) or now) < cutoff)
    return Retention(versions=drop, incomplete=incomplete, shards=shards)


def version_entry(v: Version, root: str, namespace: str, dataset: str) -> dict[str, Any]:
    """A version as ``status.versions`` holds it."""
    return DatasetVersion(
        version=v.version, uri=f"{root}/{flywheel.version_prefix(namespace, dataset, v.version)}", time=v.time,
        records=SplitCounts(train=int(v.records.get("train", 0)), eval=int(v.records.get("eval", 0))),
        dedup_ratio=v.dedup_ratio, window_start=v.window_start, window_end=v.window_end,
        content_sha256=v.content_sha256).dump()


# ---------------------------------------------------------------------------- pods


@dataclasses.dataclass(frozen=True)
class PodOutcome:
    """How a curation pod ended (``finished`` False: it has not), or what it waits for."""

    finished: bool
    succeeded: bool = False
    exit_code: int | None = None
    message: str = ""
    waiting: str = ""


def _short(text: str, limit: int = 600) -> str:
    """The end of ``text`` on one line: a failing program says why last."""
    text = " ".join(text.split())
    return text if len(text) <= limit else "..." + text[-limit:]


def pod_outcome(pod: dict[str, Any], container: str = manifests.CONTAINER) -> PodOutcome:
    """How a one-container step pod (curation, evaluation) ended, or why it has not."""
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    term: dict[str, Any] = next(((cs.get("state") or {}).get("terminated") or {}
                                 for cs in status.get("containerStatuses") or [] if cs.get("name") == container),
                                {})
    if phase not in ("Succeeded", "Failed") and not term:
        why = not_starting([pod]) or next((f"{c.get('reason')}: {c.get('message')}" for c in status.get("conditions") or []
                                           if c.get("type") == "PodScheduled" and c.get("status") == "False"), "")
        return PodOutcome(False, waiting=f"{phase}" + (f" ({why})" if why else ""))
    code = term.get("exitCode")
    message = _short(str(term.get("message") or ""))
    if not message:
        message = _short(f"{term.get('reason') or status.get('reason') or ''} {status.get('message') or ''}".strip()) \
            or "no termination message"
    succeeded = code == 0 if code is not None else phase == "Succeeded"
    return PodOutcome(True, succeeded=succeeded, exit_code=code, message=message)


def _pod_version(pod: dict[str, Any]) -> int | None:
    try:
        return int((pod["metadata"].get("labels") or {}).get(manifests.VERSION_LABEL, ""))
    except ValueError:
        return None


def _attempt(pod: dict[str, Any]) -> int:
    try:
        return max(1, int((pod["metadata"].get("annotations") or {}).get(manifests.ATTEMPT_ANNOTATION, "1")))
    except ValueError:
        return 1


def _age_s(pod: dict[str, Any], now: dt.datetime) -> float:
    created = parse_time(pod["metadata"].get("creationTimestamp"))
    return (now - created).total_seconds() if created else 0.0


# ---------------------------------------------------------------------------- outcome notes

_NOTE = re.compile(r"\[version (\d+); attempt (\d+); pod (\S+) uid (\S*); retry (?:at (\S+)|(never))\]$")


@dataclasses.dataclass(frozen=True)
class FailureNote:
    """The outcome of a curation pod, at the end of the Curating condition's message, so that
    it survives an operator restart: which version and attempt, which pod (its uid: the
    outcome is recorded once), and when the next attempt may start (None: only after the spec
    or the annotation changes, e.g. for settings the curate module refused)."""

    version: int
    attempt: int
    pod: str
    uid: str
    retry_at: dt.datetime | None

    def render(self) -> str:
        retry = f"at {fmt_time(self.retry_at)}" if self.retry_at else "never"
        return f"[version {self.version}; attempt {self.attempt}; pod {self.pod} uid {self.uid}; retry {retry}]"

    @classmethod
    def parse(cls, message: str | None) -> FailureNote | None:
        m = _NOTE.search(message or "")
        if m is None:
            return None
        return cls(int(m.group(1)), int(m.group(2)), m.group(3), m.group(4), parse_time(m.group(5)))


def backoff_s(settings: DatasetSettings, attempt: int) -> float:
    return float(min(settings.retry_max_s, settings.retry_base_s * 2 ** max(0, attempt - 1)))


# ---------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class _Outcome:
    """A curation outcome decided in this pass: the Curating condition and what goes with it."""

    reason: str
    message: str
    note: FailureNote
    event: Event
    outcome: str


def _record_failure(obs: Observed, pod_name: str, uid: str, version: int, attempt: int, exit_code: int | None,
                    why: str) -> _Outcome:
    s = obs.settings
    if exit_code == SOURCE_EMPTY_EXIT:
        note = FailureNote(version, attempt, pod_name, uid, obs.now + dt.timedelta(seconds=backoff_s(s, attempt)))
        text = f"pod {pod_name} found no committed request record to curate: {why}"
        return _Outcome("SourceEmpty", text, note, Event("SourceEmpty", text), "source_empty")
    retry_at = None if exit_code == ExitCode.CONFIG_ERROR else obs.now + dt.timedelta(seconds=backoff_s(s, attempt))
    text = f"curation of version {version} failed: {why}"
    if retry_at is None:
        text += " (the settings or arguments cannot work: not retried until the spec or kubeforge.dev/curate changes)"
    note = FailureNote(version, attempt, pod_name, uid, retry_at)
    return _Outcome("CurationFailed", text, note, Event("CurationFailed", f"{text} {note.render()}", warning=True),
                    "failed")


def plan(obs: Observed) -> Plan:
    """Pure: the new status and what to do, from what was observed."""
    body = obs.dataset
    meta = body["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    old: dict[str, Any] = dict(body.get("status") or {})
    conds = list(old.get("conditions") or [])
    out = Plan(status={})
    spec = obs.spec
    if spec is None:
        message = f"invalid spec: {obs.spec_error}"
        for type_ in ("Ready", "Curating"):
            conds = set_condition(conds, type_, False, "InvalidSpec", message, generation)
        out.status = {"observedGeneration": generation, "conditions": conds, "message": message}
        return out

    s = obs.settings
    source = obs.source if isinstance(obs.source, SourceStore) else None
    problem = obs.source if isinstance(obs.source, SourceProblem) else None
    view = obs.store if source is not None else None
    if source is not None and obs.store_error and problem is None:
        problem = SourceProblem("StoreUnreachable", f"reading {source.root}: {obs.store_error}")
    prev_curating = condition(conds, "Curating") or {}
    prev_note = FailureNote.parse(prev_curating.get("message")) \
        if prev_curating.get("reason") in OUTCOME_REASONS else None
    old_curating = old.get("curating") or {}
    committed = {v.version for v in view.versions} if view is not None else \
        {int(v["version"]) for v in old.get("versions") or []}
    outcome: _Outcome | None = None
    waiting_for_store = False

    # --- the pods: at most one is "the curation"; finished ones are judged, then go
    ours = [p for p in obs.pods if (p["metadata"].get("labels") or {}).get(manifests.DATASET_UID_LABEL) == meta.get("uid")]
    ours.sort(key=lambda p: _pod_version(p) or 0)
    running: dict[str, Any] | None = None
    going = False  # a pod being deleted that has not finished: nothing starts beside it
    finished: list[tuple[dict[str, Any], PodOutcome]] = []
    for pod in ours:
        result = pod_outcome(pod)
        if result.finished:
            finished.append((pod, result))
        elif pod["metadata"].get("deletionTimestamp"):
            going = True
        elif running is None or (_pod_version(pod) or 0) > (_pod_version(running) or 0):
            running = pod
    keep_for_logs: set[str] = set()
    awaiting: set[str] = set()
    started = parse_time(old_curating.get("startTime"))
    for pod, result in finished:
        pname, uid, version = pod["metadata"]["name"], pod["metadata"].get("uid", ""), _pod_version(pod) or 0
        created = parse_time(pod["metadata"].get("creationTimestamp"))
        if pname == old_curating.get("pod") and started and created and created < started:
            # an earlier attempt's pod still there when this one was to be made (its outcome was
            # recorded when it ended): it goes, and the attempt the status names counts as gone
            out.delete.append((pname, uid))
            going = True
        elif result.succeeded and view is not None and version in committed:
            out.delete.append((pname, uid))  # its version is in the status, which is written first
        elif result.succeeded and not (obs.store_fresh and view is not None):
            awaiting.add(pname)  # judged on a store answer read after it finished
        elif (prev_note is not None and prev_note.uid == uid) or (outcome is not None and outcome.note.uid == uid):
            keep_for_logs.add(pname)  # recorded; kept for `kubectl logs` until a new curation starts
        else:
            if result.succeeded:
                why = (f"pod {pname} exited 0 but version {version} has no commit marker under "
                       f"{source.output_uri if source else 'the store'}")
                code: int | None = 1
            else:
                code = result.exit_code
                why = result.message if code == SOURCE_EMPTY_EXIT else \
                    f"pod {pname} ({'no exit code' if code is None else f'exit code {code}'}): {result.message}"
            outcome = _record_failure(obs, pname, uid, version, _attempt(pod), code, why)
            keep_for_logs.add(pname)
    out.delete += [(p["metadata"]["name"], p["metadata"].get("uid", "")) for p, r in finished
                   if r.succeeded and p["metadata"]["name"] not in awaiting | keep_for_logs
                   and (p["metadata"]["name"], p["metadata"].get("uid", "")) not in out.delete]
    waiting_for_store = bool(awaiting)

    # a curation the status names whose pod is gone (deleted by someone, or never made)
    if running is None and not going and old_curating.get("pod") and not any(
            p["metadata"]["name"] == old_curating["pod"] for p in ours):
        version = int(old_curating.get("version") or 0)
        if version in committed:
            pass  # it committed before it went
        elif not (obs.store_fresh and view is not None):
            waiting_for_store = True
        elif outcome is None:
            outcome = _record_failure(obs, old_curating["pod"], "", version, 1, 1,
                                      f"pod {old_curating['pod']} disappeared before version {version} was committed")

    # --- a pod that never finishes (never scheduled, its image missing) is deleted and failed
    if running is not None:
        age = _age_s(running, obs.now)
        limit = s.curation_deadline_s + s.stuck_grace_s
        if age > limit:
            pname, uid = running["metadata"]["name"], running["metadata"].get("uid", "")
            out.delete.append((pname, uid))
            outcome = _record_failure(obs, pname, uid, _pod_version(running) or 0, _attempt(running), 1,
                                      f"pod {pname} did not finish within {limit}s "
                                      f"({pod_outcome(running).waiting}); deleted")
            running, going = None, True
        else:
            out.requeue_after = max(1.0, limit - age)

    note = outcome.note if outcome is not None else prev_note
    # --- versions, records
    status: dict[str, Any] = {}
    if view is not None and source is not None:
        retention = plan_retention(view, spec.retention.keep_versions, spec.retention.capture_max_age_days, obs.now)
        out.retention = retention
        kept = [v for v in view.versions if v.version not in retention.versions]
        status["versions"] = [version_entry(v, source.root, namespace, name) for v in kept]
        pending = pending_shards(view)
        status["sourceUri"] = source.source_uri
        status["sourceRecords"] = sum(sh.records for sh in view.requests)
        status["pendingRecords"] = sum(sh.records for sh in pending)
        status["pendingFeedback"] = sum(sh.records for sh in pending_shards(view, flywheel.FEEDBACK))
    else:
        status["versions"] = list(old.get("versions") or [])
        for k in ("sourceUri", "sourceRecords", "pendingRecords", "pendingFeedback"):
            status[k] = old.get(k)
        if source is not None:
            status["sourceUri"] = source.source_uri
    versions: list[dict[str, Any]] = status["versions"]
    newest = versions[-1] if versions else None
    status["newestVersion"] = newest["version"] if newest else None
    status["newestUri"] = newest["uri"] if newest else None
    status["records"] = dict(newest.get("records") or {"train": 0, "eval": 0}) if newest else None
    status["dedupRatio"] = newest.get("dedupRatio") if newest else None
    status["lastCurationRequest"] = old.get("lastCurationRequest")
    source_records = status.get("sourceRecords")
    pending_records = int(status.get("pendingRecords") or 0)
    # feedback usually comes after its answer: new ratings and corrections alone are worth a
    # version on the everySeconds schedule (everyNewRecords counts request records)
    pending_any = pending_records + int(status.get("pendingFeedback") or 0)
    source_empty = view is not None and not view.requests

    # --- whether to start one
    request = (meta.get("annotations") or {}).get(CURATE_ANNOTATION)
    on_demand = request is not None and request != old.get("lastCurationRequest")
    start_why: str | None = None
    blocked = running is not None or going or waiting_for_store or spec.suspend or problem is not None \
        or view is None or source is None
    if not blocked and source_empty:
        if on_demand:
            status["lastCurationRequest"] = request
            out.events.append(Event("SourceEmpty", f"kubeforge.dev/curate={request}: nothing to curate, no committed "
                                                   f"request record under {status['sourceUri']}"))
    elif not blocked:
        assert view is not None
        newest_view = view.versions[-1] if view.versions else None
        every_s = spec.schedule.every_seconds
        committed_at = parse_time(newest_view.time) if newest_view is not None else None
        due_at = committed_at + dt.timedelta(seconds=every_s) if committed_at is not None and every_s else None
        respec = prev_curating.get("observedGeneration") not in (None, generation)
        retry_due = note is not None and (respec or (note.retry_at is not None and note.retry_at <= obs.now))
        in_backoff = note is not None and not retry_due
        if on_demand:
            start_why = f"asked for by kubeforge.dev/curate={request}"
        elif in_backoff:
            if note is not None and note.retry_at is not None:
                out.requeue_after = _sooner(out.requeue_after, (note.retry_at - obs.now).total_seconds())
        elif retry_due and note is not None:
            start_why = f"retry {note.attempt + 1} after {('the spec changed' if respec else 'the backoff')}"
        elif newest_view is None:
            start_why = f"no version yet, {source_records} record(s) captured"
        elif spec.schedule.every_new_records and pending_records >= spec.schedule.every_new_records:
            start_why = f"{pending_records} new record(s), schedule.everyNewRecords is {spec.schedule.every_new_records}"
        elif due_at is not None and pending_any > 0 and due_at <= obs.now:
            start_why = (f"{every_s}s since version {newest_view.version}, {pending_records} new record(s), "
                         f"{pending_any - pending_records} new feedback record(s)")
        elif due_at is not None and pending_any > 0:
            out.requeue_after = _sooner(out.requeue_after, (due_at - obs.now).total_seconds())

    if start_why is not None:
        assert source is not None
        version = max([*committed, int(old.get("newestVersion") or 0)], default=0) + 1
        attempt = note.attempt + 1 if note is not None and note.version == version else 1
        owner = Owner(name, namespace, meta.get("uid", ""), "Dataset")
        pod = manifests.build_curation_pod(owner, spec, source, version, attempt, obs.image, s.curation_deadline_s)
        pname = pod["metadata"]["name"]
        # the failed pods kept for their logs make way (one of them may have this name)
        out.delete += [(p["metadata"]["name"], p["metadata"].get("uid", "")) for p, _r in finished
                       if p["metadata"]["name"] in keep_for_logs]
        out.create = pod
        running = pod
        if on_demand:
            status["lastCurationRequest"] = request
        status["curating"] = CurationRun(version=version, pod=pname, start_time=fmt_time(obs.now)).dump()
        out.events.append(Event("CurationStarted", f"pod {pname} curates version {version} of {source.source_uri} "
                                                   f"into {source.output_uri}: {start_why}"))
        out.requeue_after = _sooner(out.requeue_after, float(s.curation_deadline_s + s.stuck_grace_s))
    elif running is not None:
        rname = running["metadata"]["name"]
        status["curating"] = CurationRun(
            version=_pod_version(running) or 0, pod=rname,
            start_time=running["metadata"].get("creationTimestamp") or old_curating.get("startTime")).dump()
    elif waiting_for_store and old_curating:
        status["curating"] = dict(old_curating)  # finished: judged once the store is read again
    else:
        status["curating"] = None
    if waiting_for_store:
        out.requeue_after = _sooner(out.requeue_after, SHORT_REQUEUE_S)
    if running is not None or going:
        # a running curation reads every shard: none is deleted under it
        out.retention = dataclasses.replace(out.retention, shards=())

    # --- outcome events and metrics (a version that appeared, a pod that failed)
    old_versions = {int(v["version"]) for v in old.get("versions") or []}
    old_newest = int(old.get("newestVersion") or 0)
    for v in versions:
        if int(v["version"]) not in old_versions and int(v["version"]) > old_newest:
            rec = v.get("records") or {}
            out.events.append(Event("VersionCommitted", (
                f"version {v['version']} committed: {rec.get('train', 0)} train, {rec.get('eval', 0)} eval record(s)"
                + (f", dedup ratio {v['dedupRatio']:.3f}" if v.get("dedupRatio") is not None else "")
                + f", at {v['uri']}")))
            out.outcomes.append("succeeded")
    if outcome is not None:
        out.events.append(outcome.event)
        out.outcomes.append(outcome.outcome)

    # --- conditions
    curating_now = status.get("curating") if running is not None else None
    curating_cond: tuple[str, str, str]
    if curating_now is not None:
        rname = curating_now["pod"]
        wait = pod_outcome(running).waiting if running is not None and running.get("status") else "Pending"
        attempt = _attempt(running) if running is not None else 1
        curating_cond = ("True", "CurationRunning", f"pod {rname} curates version {curating_now['version']}"
                         + (f" (attempt {attempt})" if attempt > 1 else "") + f": {wait}")
    elif waiting_for_store:
        curating_cond = ("True", "CurationRunning", f"pod {old_curating.get('pod', '')} finished; reading "
                                                   "the store for its version")
    elif outcome is not None:
        curating_cond = ("False", outcome.reason, f"{outcome.message} {outcome.note.render()}")
    elif problem is not None:
        curating_cond = ("False", problem.reason, problem.message)
    elif note is not None and prev_curating.get("reason") in OUTCOME_REASONS:
        curating_cond = ("False", str(prev_curating["reason"]), str(prev_curating.get("message") or ""))
    elif spec.suspend:
        curating_cond = ("False", "Suspended", "spec.suspend is true: no curation starts")
    elif view is None:
        curating_cond = ("False", "ReadingStore", f"reading {status.get('sourceUri') or 'the store'}")
    elif source_empty:
        curating_cond = ("False", "SourceEmpty", f"no committed request record under {status['sourceUri']}")
    else:
        curating_cond = ("False", "Waiting", _next_trigger(spec, pending_records))
    conds = set_condition(conds, "Curating", curating_cond[0], curating_cond[1], curating_cond[2], generation)

    if view is not None and source_empty:
        empty: tuple[str, str, str] = ("True", "NoCommittedRecords",
                                       f"no committed request record under {status['sourceUri']}")
    elif curating_cond[1] == "SourceEmpty" and note is not None:
        empty = ("True", "CurationFoundNoRecords", curating_cond[2])
    elif view is not None:
        empty = ("False", "RecordsFound",
                 f"{source_records} request record(s) in {len(view.requests)} committed shard(s), "
                 f"{pending_records} not curated yet")
    elif problem is not None:
        empty = ("Unknown", problem.reason, problem.message)
    else:
        empty = ("Unknown", "ReadingStore", f"reading {status.get('sourceUri') or 'the store'}")
    prev_empty = condition(conds, "SourceEmpty") or {}
    if empty[0] == "True" and prev_empty.get("status") != "True" and outcome is None:
        out.events.append(Event("SourceEmpty", empty[2]))
    conds = set_condition(conds, "SourceEmpty", empty[0], empty[1], empty[2], generation)

    if newest is not None:
        rec = newest.get("records") or {}
        ready: tuple[bool, str, str] = (True, "VersionCommitted", (
            f"version {newest['version']}: {rec.get('train', 0)} train, {rec.get('eval', 0)} eval record(s) at "
            f"{newest['uri']}"))
    elif problem is not None:
        ready = (False, problem.reason, problem.message)
    elif curating_cond[0] == "True":
        ready = (False, "Curating", f"no version yet; {curating_cond[2]}")
    elif empty[0] == "True":
        ready = (False, "SourceEmpty", empty[2])
    elif curating_cond[1] in ("CurationFailed", "Suspended", "ReadingStore"):
        ready = (False, curating_cond[1], curating_cond[2])
    else:
        ready = (False, "NoVersion", f"no version yet: {curating_cond[2]}")
    prev_ready = condition(conds, "Ready") or {}
    if problem is not None and problem.reason not in (prev_ready.get("reason"), prev_curating.get("reason")):
        out.events.append(Event(problem.reason, problem.message, warning=True))
    conds = set_condition(conds, "Ready", ready[0], ready[1], ready[2], generation)

    message = ready[2] if ready[0] else f"{ready[1]}: {ready[2]}"
    if newest is not None and curating_cond[0] == "False" and curating_cond[1] not in ("Waiting",):
        message += f"; {curating_cond[1]}: {curating_cond[2]}"
    status.update(observedGeneration=generation, conditions=conds, message=message)
    out.status = status
    return out


def creation_refused(status: dict[str, Any], generation: int | None, pod: dict[str, Any], why: str,
                     settings: DatasetSettings, now: dt.datetime) -> dict[str, Any]:
    """The status patch when the API server refused the curation pod (a quota, an admission
    policy): a failed attempt, retried after its backoff like any other."""
    meta = pod["metadata"]
    attempt = _attempt(pod)
    note = FailureNote(_pod_version(pod) or 0, attempt, meta["name"], "",
                       now + dt.timedelta(seconds=backoff_s(settings, attempt)))
    conds = set_condition(list(status.get("conditions") or []), "Curating", False, "CurationFailed",
                          f"{why} {note.render()}", generation)
    if not status.get("newestVersion"):
        conds = set_condition(conds, "Ready", False, "CurationFailed", why, generation)
    return {"curating": None, "conditions": conds, "message": f"CurationFailed: {why}"}


def _sooner(a: float | None, b: float) -> float:
    b = max(SHORT_REQUEUE_S, b)
    return b if a is None else min(a, b)


def _next_trigger(spec: DatasetSpec, pending: int) -> str:
    parts = []
    if spec.schedule.every_new_records:
        parts.append(f"at {spec.schedule.every_new_records} new records")
    if spec.schedule.every_seconds:
        parts.append(f"{spec.schedule.every_seconds}s after the newest version")
    parts.append(f"on demand ({CURATE_ANNOTATION}=<new value>)")
    return f"{pending} record(s) not curated yet; next curation " + ", or ".join(parts)
