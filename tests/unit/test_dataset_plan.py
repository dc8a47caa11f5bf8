"""The Dataset controller's decisions, against a small in-memory cluster and store: when a
curation pod starts (and that there is never a second), what the status says from what the
store holds, how outcomes (success, failure, source empty, a pod killed midway or gone) are
recorded once and retried with a backoff, what retention deletes; the curation pod pinned;
and the store reads and deletes on a real (file://) backend."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import io
import json
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubeforge.api import CheckpointPolicySpec, DatasetSpec
from kubeforge.api.common import StoreRef, condition
from kubeforge.controllers.dataset import manifests as dm
from kubeforge.controllers.dataset.plan import (
    DatasetSettings,
    FailureNote,
    Observed,
    Plan,
    Shard,
    SourceProblem,
    StoreView,
    Version,
    creation_refused,
    fmt_time,
    pending_shards,
    plan,
    plan_retention,
    store_from_ref,
)
from kubeforge.controllers.dataset.store_view import ViewCache, apply_retention, read_and_apply, read_view
from kubeforge.controllers.workload import Owner
from kubeforge.store import FileDigest
from kubeforge.store.backends import FileBackend
from kubeforge.store.flywheel import (
    DatasetManifest,
    DatasetMarker,
    FilterCount,
    ShardMarker,
    dataset_prefix,
    shard_marker_key,
    shard_name,
    version_prefix,
)

pytestmark = pytest.mark.unit
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
NS, NAME, UID = "ml", "chat-data", "ds-uid"
CAPTURE = "ml/chat/capture"
SOURCE = dm.SourceStore(root="s3://flywheel/root", capture=CAPTURE, output=dataset_prefix(NS, NAME), secret="s3-creds",
                        store_key=(NS, "s3://flywheel/root"), endpoint="http://minio:9000")
SETTINGS = DatasetSettings()
DEFAULT_SETTINGS_JSON = (
    '{"dedup":{"exact":true,"nearDuplicateThreshold":0.8,"numPerm":128,"shingleWords":5},'
    '"feedback":{"minScore":0.5,"requireFeedback":false},'
    '"filters":{"dropFinishReasons":[],"maxPromptChars":16000,"maxRepeatRatio":0.5,"maxTargetChars":16000,'
    '"minAlphaRatio":0.3,"minPromptChars":1,"minTargetChars":1,"scripts":["Latin"]},'
    '"redact":{"enabled":true,"patterns":[]},"split":{"evalPercent":10.0}}')


def ts(t: dt.datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Sim:
    """The API server, the kubelet and the store, as far as the plan can tell: pods are made
    Pending, deletions remove them at once, the status is replaced by the plan's (without
    nulls, as a merge patch leaves it)."""

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        self.dataset: dict[str, Any] = {
            "metadata": {"name": NAME, "namespace": NS, "uid": UID, "generation": 1, "annotations": {},
                         "creationTimestamp": fmt_time(T0)},
            "spec": {"source": {"store": {"uri": "s3://flywheel/root", "credentialsSecretRef": {"name": "s3-creds"}},
                                "prefix": CAPTURE}, **(spec or {})},
            "status": {}}
        self.source: dm.SourceStore | SourceProblem = SOURCE
        self.requests: list[Shard] = []
        self.feedback: list[Shard] = []
        self.versions: list[Version] = []
        self.incomplete: list[int] = []
        self.store_readable = True
        self.store_error: str | None = None
        self.fresh = True
        self.pods: dict[str, dict[str, Any]] = {}
        self.now = T0
        self.events: list[str] = []
        self.outcomes: list[str] = []
        self.last: Plan | None = None

    # ---- what the plan sees
    def view(self) -> StoreView | None:
        if not self.store_readable:
            return None
        return StoreView(requests=tuple(self.requests), feedback=tuple(self.feedback), versions=tuple(self.versions),
                         incomplete=tuple(self.incomplete))

    def observe(self) -> Observed:
        spec = DatasetSpec.model_validate(self.dataset["spec"])
        return Observed(dataset=copy.deepcopy(self.dataset), spec=spec, source=self.source, store=self.view(),
                        store_error=self.store_error, store_fresh=self.fresh,
                        pods=copy.deepcopy(list(self.pods.values())), now=self.now, image="kubeforge/trainer:test",
                        settings=SETTINGS)

    def step(self, cut_after_status: bool = False) -> Plan:
        p = plan(self.observe())
        self.last = p
        self.dataset["status"] = {k: v for k, v in copy.deepcopy(p.status).items() if v is not None}
        if cut_after_status:
            return p
        for name, uid in p.delete:
            if name in self.pods and self.pods[name]["metadata"]["uid"] == uid:
                del self.pods[name]
        if p.create is not None and p.create["metadata"]["name"] not in self.pods:
            pod = copy.deepcopy(p.create)
            pod["metadata"].update(uid=uuid.uuid4().hex, creationTimestamp=fmt_time(self.now))
            pod["status"] = {"phase": "Pending"}
            self.pods[pod["metadata"]["name"]] = pod
        self.events += [e.reason for e in p.events]
        self.outcomes += p.outcomes
        return p

    # ---- the world changes
    def capture(self, records: int, minutes: int = 0, age: dt.timedelta = dt.timedelta(0)) -> Shard:
        first = self.now - age + dt.timedelta(minutes=minutes)
        name = shard_name(ts(first), "server-0", len(self.requests))
        key = f"{CAPTURE}/requests/{name}"
        shard = Shard(key=key, rel=f"requests/{name}", records=records, first_time=ts(first),
                      last_time=ts(first + dt.timedelta(seconds=30)))
        self.requests.append(shard)
        return shard

    def rate(self, records: int, minutes: int = 0) -> Shard:
        """A committed feedback shard."""
        first = self.now + dt.timedelta(minutes=minutes)
        name = shard_name(ts(first), "server-0", len(self.feedback))
        shard = Shard(key=f"{CAPTURE}/feedback/{name}", rel=f"feedback/{name}", records=records, first_time=ts(first),
                      last_time=ts(first + dt.timedelta(seconds=30)))
        self.feedback.append(shard)
        return shard

    def commit(self, version: int, train: int = 90, eval_: int = 10, seen: list[Shard] | None = None) -> Version:
        shards = [*self.requests, *self.feedback] if seen is None else seen
        window = [s for s in shards if s.rel.startswith("requests/")]  # a manifest's window: the requests'
        v = Version(version=version, time=ts(self.now), records={"train": train, "eval": eval_}, dedup_ratio=0.25,
                    window_start=min((s.first_time for s in window), default=None),
                    window_end=max((s.last_time for s in window), default=None), content_sha256="ab" * 32,
                    seen=frozenset(s.rel for s in shards))
        self.versions.append(v)
        return v

    def finish(self, name: str, code: int | None, message: str = "", phase: str | None = None) -> None:
        pod = self.pods[name]
        phase = phase or ("Succeeded" if code == 0 else "Failed")
        pod["status"] = {"phase": phase}
        if code is not None:
            pod["status"]["containerStatuses"] = [{"name": dm.CONTAINER, "state": {"terminated": {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message}}}]

    def run(self, name: str) -> None:
        self.pods[name]["status"] = {"phase": "Running"}

    def cond(self, type_: str) -> dict[str, Any]:
        c = condition(self.dataset["status"].get("conditions"), type_)
        assert c is not None, f"no {type_} condition in {self.dataset['status']}"
        return c


def reasons(sim: Sim) -> dict[str, tuple[str, str]]:
    return {t: (sim.cond(t)["status"], sim.cond(t)["reason"]) for t in ("Ready", "Curating", "SourceEmpty")}


# ---------------------------------------------------------------------------- the pod


def test_curation_pod_is_pinned() -> None:
    spec = DatasetSpec.model_validate({"source": {"inferenceServiceRef": {"name": "chat"}}})
    pod = dm.build_curation_pod(Owner(NAME, NS, UID), spec, SOURCE, 3, 2, "kubeforge/trainer:test", 3600)
    assert pod["metadata"] == {
        "name": "chat-data-curate-v3", "namespace": NS,
        "labels": {"app.kubernetes.io/managed-by": "kubeforge", "app.kubernetes.io/component": "dataset-curation",
                   "kubeforge.dev/dataset": NAME, "kubeforge.dev/dataset-uid": UID, "kubeforge.dev/dataset-version": "3"},
        "annotations": {"kubeforge.dev/curation-attempt": "2"},
        "ownerReferences": [{"apiVersion": "kubeforge.dev/v1alpha1", "kind": "Dataset", "name": NAME, "uid": UID,
                             "controller": True, "blockOwnerDeletion": True}]}
    assert pod["spec"] == {
        "restartPolicy": "Never", "activeDeadlineSeconds": 3600, "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "curate", "image": "kubeforge/trainer:test", "imagePullPolicy": "IfNotPresent",
            "command": ["python", "-m", "kubeforge_runtime.curate",
                        "--source", "s3://flywheel/root/ml/chat/capture",
                        "--output", "s3://flywheel/root/ml/chat-data/dataset",
                        "--version", "3", "--settings", DEFAULT_SETTINGS_JSON,
                        "--s3-endpoint", "http://minio:9000"],
            "envFrom": [{"secretRef": {"name": "s3-creds"}}],
            "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
            "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
            "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": [{"name": "scratch", "mountPath": "/tmp"}]}],
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        # CPU only: off GPU nodes where there are others, onto them (their taint tolerated)
        # where there are not, as on the local cluster's real nodes
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "preference": {"matchExpressions": [
                {"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}]}}]}}}


def test_pod_settings_turn_near_dedup_off_and_keep_the_spec_resources_and_region() -> None:
    spec = DatasetSpec.model_validate({
        "source": {"inferenceServiceRef": {"name": "chat"}}, "resources": {"cpu": "2", "memory": "8Gi"},
        "image": "custom:1", "imagePullPolicy": "Never",
        "curation": {"dedup": {"nearDuplicates": False}, "redact": {"patterns": [{"name": "ORDER", "regex": "O-\\d+"}]}}})
    store = dm.SourceStore(root="s3://b", capture="c", output="ml/x/dataset", secret="s", store_key=(NS, "p"),
                           region="eu-west-1", force_path_style=False)
    pod = dm.build_curation_pod(Owner(NAME, NS, UID), spec, store, 1, 1, "custom:1", 60)
    c = pod["spec"]["containers"][0]
    settings = json.loads(c["command"][c["command"].index("--settings") + 1])
    # nearDuplicates false reaches the curate module as its switch, a null threshold
    assert settings["dedup"]["nearDuplicateThreshold"] is None and "nearDuplicates" not in settings["dedup"]
    assert settings["redact"]["patterns"] == [{"name": "ORDER", "regex": "O-\\d+"}]
    assert "--s3-endpoint" not in c["command"]
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}}
    assert c["env"] == [{"name": "AWS_REGION", "value": "eu-west-1"}, {"name": "KUBEFORGE_S3_FORCE_PATH_STYLE", "value": "false"}]
    assert (c["image"], c["imagePullPolicy"]) == ("custom:1", "Never")


# ---------------------------------------------------------------------------- the source

POLICY = CheckpointPolicySpec.model_validate({
    "schedule": {"everySteps": 10},
    "storage": {"s3": {"bucket": "ckpt", "prefix": "team/", "endpoint": "http://minio:9000", "region": "us-east-1",
                       "credentialsSecretRef": {"name": "policy-creds"}}}})


def test_store_from_a_policy_uses_its_root_and_secret_unless_the_ref_names_one() -> None:
    ref = StoreRef.model_validate({"checkpointPolicyRef": {"name": "p"}})
    got = store_from_ref(ref, "spec.source.store", NS, NAME, CAPTURE, "p", POLICY)
    assert got == dm.SourceStore(root="s3://ckpt/team", capture=CAPTURE, output="ml/chat-data/dataset",
                                 secret="policy-creds", store_key=(NS, "p"), endpoint="http://minio:9000",
                                 region="us-east-1", force_path_style=True)
    assert isinstance(got, dm.SourceStore)
    assert got.source_uri == "s3://ckpt/team/ml/chat/capture" and got.output_uri == "s3://ckpt/team/ml/chat-data/dataset"
    own = StoreRef.model_validate({"checkpointPolicyRef": {"name": "p"}, "credentialsSecretRef": {"name": "mine"}})
    got = store_from_ref(own, "spec.source.store", NS, NAME, CAPTURE, "p", POLICY)
    assert isinstance(got, dm.SourceStore) and got.secret == "mine"


def test_store_from_a_uri_and_a_volume_policy_is_unsupported_naming_the_field() -> None:
    ref = StoreRef.model_validate({"uri": "s3://bucket/pre/", "credentialsSecretRef": {"name": "c"},
                                   "s3Endpoint": "http://s3:9000"})
    got = store_from_ref(ref, "spec.source.store", NS, NAME, CAPTURE)
    assert got == dm.SourceStore(root="s3://bucket/pre", capture=CAPTURE, output="ml/chat-data/dataset", secret="c",
                                 store_key=(NS, "s3://bucket/pre"), endpoint="http://s3:9000")
    volume = CheckpointPolicySpec.model_validate({"schedule": {"everySteps": 1},
                                                  "storage": {"volume": {"claimName": "ckpt"}}})
    got = store_from_ref(StoreRef.model_validate({"checkpointPolicyRef": {"name": "v"}}),
                         "spec.logging.store of InferenceService chat", NS, NAME, CAPTURE, "v", volume)
    assert isinstance(got, SourceProblem) and got.reason == "StoreUnsupported"
    assert got.message.startswith("spec.logging.store of InferenceService chat.checkpointPolicyRef: CheckpointPolicy v")


# ---------------------------------------------------------------------------- schedule


def test_an_empty_source_shows_source_empty_not_ready_and_starts_nothing() -> None:
    sim = Sim()
    sim.step()
    assert sim.pods == {}
    assert reasons(sim) == {"Ready": ("False", "SourceEmpty"), "Curating": ("False", "SourceEmpty"),
                            "SourceEmpty": ("True", "NoCommittedRecords")}
    assert sim.dataset["status"]["sourceRecords"] == 0 and sim.dataset["status"]["sourceUri"] == SOURCE.source_uri
    assert sim.events == ["SourceEmpty"]
    sim.step()
    assert sim.events == ["SourceEmpty"], "the Event is for the change, not for every pass"


def test_first_version_one_pod_then_status_from_its_manifest() -> None:
    sim = Sim()
    sim.capture(70)
    sim.capture(50, minutes=1)
    p = sim.step()
    assert p.create is not None and list(sim.pods) == ["chat-data-curate-v1"]
    assert sim.events == ["CurationStarted"]
    assert sim.dataset["status"]["curating"] == {"version": 1, "pod": "chat-data-curate-v1", "startTime": fmt_time(T0)}
    assert reasons(sim) == {"Ready": ("False", "Curating"), "Curating": ("True", "CurationRunning"),
                            "SourceEmpty": ("False", "RecordsFound")}
    sim.run("chat-data-curate-v1")
    sim.capture(30, minutes=2)
    for _ in range(3):  # never two at once, whatever the records say
        assert sim.step().create is None
    assert list(sim.pods) == ["chat-data-curate-v1"]

    # the pod commits v1 and exits; the store answer at hand predates that (no v1 in it)
    sim.finish("chat-data-curate-v1", 0)
    sim.fresh = False
    p = sim.step()
    assert "chat-data-curate-v1" in sim.pods and p.requeue_after == 1.0
    assert sim.cond("Curating")["status"] == "True" and sim.cond("Ready")["status"] == "False"
    assert "failed" not in sim.outcomes
    sim.commit(1, train=100, eval_=12, seen=sim.requests[:2])
    sim.fresh = True
    p = sim.step()
    assert sim.pods == {}, "the succeeded pod goes once its version is in the status"
    st = sim.dataset["status"]
    assert st["versions"] == [{
        "version": 1, "uri": "s3://flywheel/root/ml/chat-data/dataset/v-0000000001", "time": ts(T0),
        "records": {"train": 100, "eval": 12}, "dedupRatio": 0.25, "windowStart": sim.requests[0].first_time,
        "windowEnd": sim.requests[1].last_time, "contentSha256": "ab" * 32}]
    assert (st["newestVersion"], st["newestUri"], st["records"], st["dedupRatio"]) == (
        1, "s3://flywheel/root/ml/chat-data/dataset/v-0000000001", {"train": 100, "eval": 12}, 0.25)
    assert (st["sourceRecords"], st["pendingRecords"]) == (150, 30)
    assert "curating" not in st
    assert reasons(sim) == {"Ready": ("True", "VersionCommitted"), "Curating": ("False", "Waiting"),
                            "SourceEmpty": ("False", "RecordsFound")}
    assert sim.events == ["CurationStarted", "VersionCommitted"] and sim.outcomes == ["succeeded"]
    assert st["observedGeneration"] == 1
    sim.step()
    assert sim.events == ["CurationStarted", "VersionCommitted"] and sim.pods == {}


def _with_version(spec: dict[str, Any] | None = None) -> Sim:
    sim = Sim(spec)
    sim.capture(100)
    sim.step()
    sim.commit(1)
    sim.finish("chat-data-curate-v1", 0)
    sim.step()
    assert sim.pods == {} and sim.dataset["status"]["newestVersion"] == 1
    return sim


def test_every_new_records() -> None:
    sim = _with_version({"schedule": {"everyNewRecords": 200}})
    sim.capture(150, minutes=5)
    assert sim.step().create is None and sim.dataset["status"]["pendingRecords"] == 150
    assert sim.cond("Curating")["message"].startswith("150 record(s) not curated yet; next curation at 200 new records")
    sim.capture(50, minutes=6)
    p = sim.step()
    assert p.create is not None and p.create["metadata"]["name"] == "chat-data-curate-v2"
    assert "--version" in p.create["spec"]["containers"][0]["command"]
    assert p.create["spec"]["containers"][0]["command"][p.create["spec"]["containers"][0]["command"].index("--version") + 1] == "2"


def test_every_seconds_needs_new_records_and_says_when() -> None:
    sim = _with_version({"schedule": {"everySeconds": 600}})
    sim.now += dt.timedelta(seconds=700)
    assert sim.step().create is None, "nothing new: no version"
    sim.capture(5, minutes=20)
    sim.now = T0 + dt.timedelta(seconds=300)
    p = sim.step()
    assert p.create is None and p.requeue_after == pytest.approx(300)
    sim.now = T0 + dt.timedelta(seconds=601)
    assert sim.step().create is not None


def test_every_seconds_also_takes_new_feedback_alone() -> None:
    """Ratings come after their answers: new feedback with no new request is worth a version
    on the everySeconds schedule, not on everyNewRecords (which counts requests)."""
    sim = _with_version({"schedule": {"everySeconds": 600, "everyNewRecords": 1000}})
    sim.rate(40, minutes=1)
    sim.now = T0 + dt.timedelta(seconds=300)
    p = sim.step()
    assert p.create is None and p.requeue_after == pytest.approx(300)
    assert (sim.dataset["status"]["pendingRecords"], sim.dataset["status"]["pendingFeedback"]) == (0, 40)
    sim.now = T0 + dt.timedelta(seconds=601)
    p = sim.step()
    assert p.create is not None and p.create["metadata"]["name"] == "chat-data-curate-v2"
    assert any("40 new feedback record(s)" in e.message for e in p.events), p.events


def test_a_version_without_a_readable_manifest_counts_feedback_by_its_own_time() -> None:
    """No manifest: requests after its window are pending; feedback, which comes after its
    answers, only when it starts after the version was committed."""
    sim = Sim()
    sim.capture(10)
    early = sim.rate(5, minutes=2)  # rated before version 1 was committed, after the window
    sim.now += dt.timedelta(minutes=5)
    v1 = dataclasses.replace(sim.commit(1), seen=None)
    late_request = sim.capture(3, minutes=1)
    late = sim.rate(4, minutes=1)
    view = StoreView(requests=tuple(sim.requests), feedback=tuple(sim.feedback), versions=(v1,))
    assert pending_shards(view) == [late_request]
    assert pending_shards(view, "feedback") == [late]
    assert early not in pending_shards(view, "feedback")


def test_on_demand_is_recorded_once_and_suspend_starts_nothing() -> None:
    sim = _with_version()
    sim.dataset["metadata"]["annotations"]["kubeforge.dev/curate"] = "now-1"
    sim.dataset["spec"]["suspend"] = True
    assert sim.step().create is None and sim.cond("Curating")["reason"] == "Suspended"
    assert "lastCurationRequest" not in sim.dataset["status"], "a suspended Dataset keeps the request for later"
    sim.dataset["spec"]["suspend"] = False
    p = sim.step()
    assert p.create is not None and sim.dataset["status"]["lastCurationRequest"] == "now-1"
    sim.commit(2)
    sim.finish("chat-data-curate-v2", 0)
    sim.step()
    assert sim.pods == {} and sim.step().create is None, "the same value asks for nothing more"
    sim.dataset["metadata"]["annotations"]["kubeforge.dev/curate"] = "now-2"
    assert sim.step().create is not None


# ---------------------------------------------------------------------------- outcomes


def test_failure_is_recorded_once_kept_for_logs_and_retried_with_a_growing_backoff() -> None:
    sim = Sim()
    sim.capture(10)
    sim.step()
    sim.finish("chat-data-curate-v1", 1, "Traceback ...\nkubeforge: store error: s3://flywheel: head bucket: timeout")
    first_uid = sim.pods["chat-data-curate-v1"]["metadata"]["uid"]
    p = sim.step()
    assert [e.reason for e in p.events] == ["CurationFailed"] and p.events[0].warning
    assert "kubeforge: store error" in p.events[0].message and sim.outcomes == ["failed"]
    assert reasons(sim) == {"Ready": ("False", "CurationFailed"), "Curating": ("False", "CurationFailed"),
                            "SourceEmpty": ("False", "RecordsFound")}
    note = FailureNote.parse(sim.cond("Curating")["message"])
    assert note == FailureNote(1, 1, "chat-data-curate-v1", first_uid, T0 + dt.timedelta(seconds=60))
    assert "chat-data-curate-v1" in sim.pods, "kept for kubectl logs"
    assert p.requeue_after == pytest.approx(60)
    sim.now += dt.timedelta(seconds=30)
    assert sim.step().create is None and sim.outcomes == ["failed"], "not retried in its backoff, not counted again"

    sim.now = T0 + dt.timedelta(seconds=61)
    p = sim.step()
    assert p.delete == [("chat-data-curate-v1", first_uid)] and p.create is not None
    pod = sim.pods["chat-data-curate-v1"]
    assert pod["metadata"]["uid"] != first_uid and pod["metadata"]["annotations"]["kubeforge.dev/curation-attempt"] == "2"
    sim.finish("chat-data-curate-v1", 1, "again")
    sim.step()
    note = FailureNote.parse(sim.cond("Curating")["message"])
    assert note is not None and note.attempt == 2 and note.retry_at == sim.now + dt.timedelta(seconds=120)
    assert sim.outcomes == ["failed", "failed"]


def test_settings_error_is_not_retried_until_the_spec_changes() -> None:
    sim = Sim()
    sim.capture(10)
    sim.step()
    sim.finish("chat-data-curate-v1", 78, "kubeforge: configuration error: invalid curation settings: filters.scripts")
    sim.step()
    assert sim.cond("Curating")["reason"] == "CurationFailed" and "retry never" in sim.cond("Curating")["message"]
    sim.now += dt.timedelta(days=2)
    assert sim.step().create is None
    sim.dataset["metadata"]["generation"] = 2
    p = sim.step()
    assert p.create is not None and sim.dataset["status"]["observedGeneration"] == 2


def test_exit_3_is_source_empty_not_ready() -> None:
    sim = Sim()
    sim.capture(10)
    sim.step()
    sim.finish("chat-data-curate-v1", 3, "kubeforge: source empty: no committed request records under s3://...")
    p = sim.step()
    assert reasons(sim) == {"Ready": ("False", "SourceEmpty"), "Curating": ("False", "SourceEmpty"),
                            "SourceEmpty": ("True", "CurationFoundNoRecords")}
    assert [e.reason for e in p.events] == ["SourceEmpty"] and sim.outcomes == ["source_empty"]
    assert "kubeforge: source empty" in sim.cond("SourceEmpty")["message"]


def test_a_pod_killed_midway_leaves_nothing_counted() -> None:
    sim = Sim()
    sim.capture(10)
    sim.step()
    sim.incomplete.append(1)  # train.tar written, no commit.json
    sim.finish("chat-data-curate-v1", None, phase="Failed")
    sim.pods["chat-data-curate-v1"]["status"].update(
        reason="DeadlineExceeded", message="Pod was active on the node longer than the specified deadline")
    p = sim.step()
    st = sim.dataset["status"]
    assert "versions" not in st or st["versions"] == []
    assert "newestVersion" not in st and sim.cond("Ready")["status"] == "False"
    assert "DeadlineExceeded" in sim.cond("Curating")["message"] and p.outcomes == ["failed"]
    assert not p.retention, "the directory of the version being retried is not deleted"
    sim.now += dt.timedelta(seconds=61)
    p = sim.step()
    assert p.create is not None and p.create["metadata"]["name"] == "chat-data-curate-v1", "the number is taken again"


def test_a_vanished_pod_is_a_failure_judged_on_a_fresh_store_answer() -> None:
    sim = Sim()
    sim.capture(10)
    sim.step()
    del sim.pods["chat-data-curate-v1"]
    sim.fresh = False
    assert sim.step().outcomes == [] and sim.cond("Curating")["status"] == "True"
    sim.fresh = True
    p = sim.step()
    assert p.outcomes == ["failed"] and "disappeared" in sim.cond("Curating")["message"]
    assert "curating" not in sim.dataset["status"]


def test_a_vanished_pod_whose_version_committed_is_a_success() -> None:
    sim = Sim()
    sim.capture(10)
    sim.step()
    del sim.pods["chat-data-curate-v1"]
    sim.commit(1)
    p = sim.step()
    assert p.outcomes == ["succeeded"] and sim.cond("Ready")["status"] == "True"


def test_a_pod_that_never_starts_is_deleted_and_failed() -> None:
    sim = Sim()
    sim.capture(10)
    sim.step()
    sim.pods["chat-data-curate-v1"]["status"] = {"phase": "Pending", "containerStatuses": [{
        "name": "curate", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]}
    sim.now += dt.timedelta(seconds=SETTINGS.curation_deadline_s)
    assert sim.step().outcomes == []
    assert "ImagePullBackOff" in sim.cond("Curating")["message"]
    sim.now += dt.timedelta(seconds=SETTINGS.stuck_grace_s + 1)
    p = sim.step()
    assert p.outcomes == ["failed"] and sim.pods == {} and "ImagePullBackOff" in sim.cond("Curating")["message"]


def test_a_pass_cut_after_its_status_write_records_nothing_twice() -> None:
    sim = Sim()
    sim.capture(10)
    sim.step()
    sim.finish("chat-data-curate-v1", 1, "boom")
    sim.step(cut_after_status=True)
    assert sim.step().outcomes == [] and sim.events.count("CurationFailed") == 0
    # the retry's status is written, but the failed pod of the same name was not replaced
    sim.now += dt.timedelta(seconds=61)
    assert sim.step(cut_after_status=True).create is not None
    old_uid = sim.pods["chat-data-curate-v1"]["metadata"]["uid"]
    p = sim.step()
    assert p.outcomes == [] and p.delete == [("chat-data-curate-v1", old_uid)] and p.create is None
    assert sim.outcomes == [], "the old pod's outcome was recorded (in the status) when it ended: not again"
    sim2 = Sim()
    sim2.capture(10)
    sim2.step(cut_after_status=True)  # the status names v1, the pod was never made
    assert sim2.pods == {}
    p = sim2.step()
    assert p.outcomes == ["failed"] and p.create is None, "a start that never happened is a failed attempt, backed off"


def test_creation_refused_is_a_failed_attempt_with_its_backoff() -> None:
    sim = Sim()
    sim.capture(10)
    p = sim.step(cut_after_status=True)
    assert p.create is not None
    sim.dataset["status"].update(creation_refused(sim.dataset["status"], 1, p.create, "pod refused: 403 quota",
                                                  SETTINGS, T0))
    sim.dataset["status"] = {k: v for k, v in sim.dataset["status"].items() if v is not None}
    assert reasons(sim)["Curating"] == ("False", "CurationFailed")
    assert sim.step().create is None
    sim.now += dt.timedelta(seconds=61)
    assert sim.step().create is not None


# ---------------------------------------------------------------------------- problems


def test_a_missing_source_is_a_condition_and_one_event() -> None:
    sim = Sim()
    sim.source = SourceProblem("InferenceServiceNotFound", "spec.source.inferenceServiceRef: InferenceService chat "
                                                            "does not exist")
    p = sim.step()
    assert reasons(sim) == {"Ready": ("False", "InferenceServiceNotFound"),
                            "Curating": ("False", "InferenceServiceNotFound"),
                            "SourceEmpty": ("Unknown", "InferenceServiceNotFound")}
    assert [(e.reason, e.warning) for e in p.events] == [("InferenceServiceNotFound", True)]
    assert sim.step().events == []


def test_with_a_version_a_later_problem_keeps_ready_and_shows_in_curating() -> None:
    sim = _with_version()
    sim.store_error = "s3://flywheel/root: list: connection refused"
    sim.capture(500, minutes=3)
    p = sim.step()
    assert p.create is None, "no curation while the store cannot be read"
    assert reasons(sim)["Ready"] == ("True", "VersionCommitted")
    assert reasons(sim)["Curating"] == ("False", "StoreUnreachable")
    assert "StoreUnreachable" in sim.dataset["status"]["message"]


def test_no_store_answer_yet() -> None:
    sim = Sim()
    sim.store_readable = False
    sim.step()
    assert reasons(sim) == {"Ready": ("False", "ReadingStore"), "Curating": ("False", "ReadingStore"),
                            "SourceEmpty": ("Unknown", "ReadingStore")}
    assert sim.pods == {}


# ---------------------------------------------------------------------------- records, retention


def test_pending_records_are_the_shards_the_newest_version_did_not_read() -> None:
    sim = Sim()
    a, b = sim.capture(10), sim.capture(20, minutes=1)
    assert pending_shards(sim.view() or StoreView()) == [a, b]
    sim.commit(1, seen=[b])  # a replica's shard committed late, older than the window's end
    late = sim.capture(5, minutes=-10)
    assert pending_shards(sim.view() or StoreView()) == [a, late]
    # a version without a readable manifest: by time
    sim.versions = [Version(version=1, time=ts(T0), records={"train": 1, "eval": 0}, window_end=b.last_time)]
    newer = sim.capture(7, minutes=5)
    assert pending_shards(sim.view() or StoreView()) == [newer]


def test_retention_keeps_the_newest_versions_and_deletes_only_curated_old_shards() -> None:
    old = Sim()
    curated_old = old.capture(10, age=dt.timedelta(days=40))
    curated_new = old.capture(10, age=dt.timedelta(days=1))
    uncurated_old = old.capture(10, age=dt.timedelta(days=39))
    for n in (1, 2, 3, 4):
        old.commit(n, seen=[curated_old, curated_new])
    old.incomplete = [2, 5]
    r = plan_retention(old.view() or StoreView(), keep_versions=2, capture_max_age_days=30, now=T0)
    assert r.versions == (1, 2) and r.incomplete == (2,) and r.shards == (curated_old.key,)
    assert uncurated_old.key not in r.shards
    assert plan_retention(old.view() or StoreView(), 5, None, T0).shards == ()

    sim = Sim({"retention": {"keepVersions": 2, "captureMaxAgeDays": 30}})
    sim.requests, sim.versions = old.requests, old.versions
    p = sim.step()
    assert [v["version"] for v in sim.dataset["status"]["versions"]] == [3, 4]
    assert p.retention.versions == (1, 2) and p.retention.shards == (curated_old.key,)
    sim.capture(10, minutes=1)
    sim.dataset["metadata"]["annotations"]["kubeforge.dev/curate"] = "x"
    p = sim.step()
    assert p.create is not None and p.retention.shards == (), "no shard is deleted under a running curation"
    assert p.retention.versions == (1, 2)


def test_failure_note_round_trip() -> None:
    n = FailureNote(3, 2, "ds-curate-v3", "", T0)
    assert FailureNote.parse(f"curation failed: x {n.render()}") == n
    n = FailureNote(3, 1, "ds-curate-v3", "u-1", None)
    assert FailureNote.parse(n.render()) == n
    assert FailureNote.parse("nothing here") is None


# ---------------------------------------------------------------------------- the store, for real


def _put_shard(backend: FileBackend, kind: str, first: dt.datetime, records: int, seq: int,
               commit: bool = True) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(records):
            data = json.dumps({"type": "request", "id": f"cmpl-{seq}-{i}"}).encode()
            info = tarfile.TarInfo(f"cmpl-{seq}-{i}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    key = f"{CAPTURE}/{kind}/{shard_name(ts(first), 'server-0', seq)}"
    backend.put_bytes(key, raw)
    if commit:
        marker = ShardMarker(kind=kind, writer="server-0", records=records, bytes=len(raw),
                             sha256=hashlib.sha256(raw).hexdigest(), first_time=ts(first),
                             last_time=ts(first + dt.timedelta(seconds=10)), time=ts(first + dt.timedelta(seconds=11)))
        backend.put_bytes(shard_marker_key(key), marker.to_json())
    return key


def _put_version(backend: FileBackend, version: int, shards: list[str], commit: bool = True) -> None:
    prefix = version_prefix(NS, NAME, version)
    backend.put_bytes(f"{prefix}/train.tar", b"t" * 10)
    backend.put_bytes(f"{prefix}/eval.tar", b"e" * 5)
    manifest = DatasetManifest(version=version, time=ts(T0), source=f"file:///x/{CAPTURE}",
                               source_shards=[k[len(CAPTURE) + 1:] for k in shards], window_start=ts(T0),
                               window_end=ts(T0 + dt.timedelta(minutes=5)),
                               filters=[FilterCount(name="exact_dedup", records_in=10, records_out=8)],
                               records={"train": 7, "eval": 1}, dedup_ratio=0.2, content_sha256="cd" * 32)
    backend.put_bytes(f"{prefix}/manifest.json", manifest.to_json())
    if commit:
        marker = DatasetMarker(version=version, time=ts(T0), bytes=15,
                               files={"train.tar": FileDigest(size=10, sha256="0" * 64)}, records={"train": 7, "eval": 1})
        backend.put_bytes(f"{prefix}/commit.json", marker.to_json())


class CountingBackend(FileBackend):
    """A file backend that records what is read and the order of deletes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets: list[str] = []
        self.deletes: list[list[str]] = []

    def get_bytes(self, key: str) -> bytes:
        self.gets.append(key)
        return super().get_bytes(key)

    def delete(self, keys: Any) -> None:
        keys = list(keys)
        self.deletes.append(keys)
        super().delete(keys)


def test_read_view_counts_only_committed_shards_and_versions(tmp_path: Path) -> None:
    backend = CountingBackend(tmp_path)
    s1 = _put_shard(backend, "requests", T0, 3, 0)
    s2 = _put_shard(backend, "requests", T0 + dt.timedelta(minutes=1), 4, 1)
    _put_shard(backend, "requests", T0 + dt.timedelta(minutes=2), 9, 2, commit=False)  # half written
    fb = _put_shard(backend, "feedback", T0, 2, 3)
    _put_version(backend, 1, [s1])
    _put_version(backend, 2, [s1, s2], commit=False)  # a curation killed midway
    cache = ViewCache()
    view = read_view(backend, CAPTURE, dataset_prefix(NS, NAME), cache)
    assert [s.key for s in view.requests] == [s1, s2] and [s.records for s in view.requests] == [3, 4]
    assert [s.key for s in view.feedback] == [fb]
    assert [v.version for v in view.versions] == [1] and view.incomplete == (2,)
    v = view.versions[0]
    assert (v.records, v.dedup_ratio, v.window_end, v.seen) == (
        {"train": 7, "eval": 1}, 0.2, ts(T0 + dt.timedelta(minutes=5)), frozenset({s1[len(CAPTURE) + 1:]}))
    assert pending_shards(view)[0].key == s2
    backend.gets.clear()
    assert read_view(backend, CAPTURE, dataset_prefix(NS, NAME), cache) == view
    assert backend.gets == [], "markers are written once: a second read fetches none again"


def test_apply_retention_deletes_markers_first(tmp_path: Path) -> None:
    backend = CountingBackend(tmp_path)
    old = T0 - dt.timedelta(days=60)
    s1 = _put_shard(backend, "requests", old, 3, 0)
    s2 = _put_shard(backend, "requests", old, 3, 1)  # as old, but no version read it
    for n in (1, 2, 3):
        _put_version(backend, n, [s1])
    _put_version(backend, 4, [s1], commit=False)
    out = dataset_prefix(NS, NAME)
    view = read_view(backend, CAPTURE, out, ViewCache())
    r = plan_retention(view, keep_versions=1, capture_max_age_days=30, now=T0)
    assert r.versions == (1, 2) and r.incomplete == () and r.shards == (s1,)
    backend.deletes.clear()
    view2, deleted = read_and_apply(backend, CAPTURE, out, ViewCache(), r)
    assert deleted.versions == (1, 2) and deleted.shards == (s1,)
    v1 = version_prefix(NS, NAME, 1)
    assert backend.deletes[0] == [f"{v1}/commit.json"], "a version's marker goes before its files"
    assert backend.deletes[-2] == [shard_marker_key(s1)] and backend.deletes[-1] == [s1], "a shard's marker goes first"
    assert [v.version for v in view2.versions] == [3] and [sh.key for sh in view2.requests] == [s2]
    assert not (tmp_path / v1).exists() and (tmp_path / version_prefix(NS, NAME, 4)).exists()
    again = apply_retention(backend, out, view2, r)
    assert not again, "what is gone is not deleted (nor reported) twice"
