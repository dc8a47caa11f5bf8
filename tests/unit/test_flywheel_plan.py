"""The Flywheel controller's decisions, driven through whole cycles against a small in-memory
world (the Flywheel, its InferenceService and Dataset, the candidate jobs, the evaluation pod,
the report and the router's counters): what starts a cycle, that each child is made once
under a name fixed by the cycle, the gate, the shadow and canary steps with their guard
rails, promotion, rollback, suspension and deletion; and the router counters read from a
real Prometheus exposition."""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any

import pytest
import yaml
from kubeforge.api import FlywheelSpec, InferenceServiceSpec
from kubeforge.api.common import condition
from kubeforge.controllers.dataset.plan import fmt_time
from kubeforge.controllers.flywheel import manifests as fm
from kubeforge.controllers.flywheel import router_stats
from kubeforge.controllers.flywheel.plan import (
    PROMOTE_ANNOTATION,
    RUN_ANNOTATION,
    FlywheelSettings,
    Observed,
    Plan,
    Problem,
    plan,
    plan_deletion,
)
from kubeforge.store.evaluation import EvaluationReport, GateRule, ModelRef, gate
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tests.fixtures.cluster import REPO

pytestmark = pytest.mark.unit
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
NS, NAME = "ml", "chat-fw"
STORE = fm.EvalStore(root="s3://ckpt/root", secret="s3-creds", store_key=(NS, "every-50-steps"),
                     endpoint="http://minio:9000")
STABLE_URI = "s3://ckpt/root/ml/tiny-llama/runs/u1/export"
CANDIDATE_URI = "s3://ckpt/root/ml/chat-fw-c1/runs/u2/export"


def example_spec(**overrides: Any) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples/10-flywheel.yaml").read_text())
    spec = doc["spec"]
    spec["inferenceServiceRef"]["name"] = "chat"
    spec["datasetRef"]["name"] = "chat-data"
    spec["trigger"] = {}
    spec["rollout"]["shadow"] = {"samplePercent": 100, "minSeconds": 60, "minRequests": 20}
    spec["rollout"]["canarySteps"] = [{"trafficPercent": 10, "minSeconds": 60, "minRequests": 10},
                                      {"trafficPercent": 50, "minSeconds": 60, "minRequests": 10}]
    spec["rollout"]["guardRails"]["warmupSeconds"] = 0  # test_counting_starts_after_the_warm_up has its own
    for k, v in overrides.items():
        spec[k] = v
    return spec


def counters(stable: tuple[int, int, float], candidate: tuple[int, int, float], role: str = "canary") -> dict[str, float]:
    """One router pod's counters: (requests, 5xx, the latency every request took) per revision."""
    out: dict[str, float] = {}
    for rev, (n, errors, seconds) in (("stable", stable), (role, candidate)):
        if role == "shadow" and rev == "shadow":
            out["shadow|shadow|ok"] = n - errors
            out["shadow|shadow|error"] = errors
            prefix = "sdur"
        else:
            out[f"req|{rev}|200"] = n - errors
            out[f"req|{rev}|503"] = errors
            prefix = "dur"
        for le in (0.1, 0.5, 1.0, 5.0, float("inf")):
            out[f"{prefix}|{rev}|{le}"] = n if seconds <= le else 0
    return out


class World:
    """The objects a Flywheel plan looks at; ``step`` plans once and applies what it decided
    the way the handlers do (status merge, the InferenceService patch, the curate annotation,
    the job and pod creations), so a test drives a cycle pass by pass."""

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        self.now = T0
        self.flywheel: dict[str, Any] = {
            "apiVersion": "kubeforge.dev/v1alpha1", "kind": "Flywheel",
            "metadata": {"name": NAME, "namespace": NS, "uid": "fw-uid", "generation": 1, "resourceVersion": "1",
                         "creationTimestamp": fmt_time(T0), "annotations": {}, "finalizers": []},
            "spec": spec or example_spec()}
        self.isvc: dict[str, Any] | None = {
            "metadata": {"name": "chat", "namespace": NS, "generation": 1},
            "spec": {"model": {"trainingJobRef": {"name": "tiny-llama"}, "credentialsSecretRef": {"name": "s3-creds"},
                               "s3Endpoint": "http://minio:9000"}},
            "status": {"observedGeneration": 1, "model": {"uri": STABLE_URI},
                       "conditions": [{"type": "Ready", "status": "True", "reason": "Serving"}]}}
        self.dataset: dict[str, Any] | None = {
            "metadata": {"name": "chat-data", "namespace": NS, "annotations": {}},
            "status": {"newestVersion": 1, "pendingRecords": 40, "sourceRecords": 240,
                       "versions": [{"version": 1, "uri": "s3://ckpt/root/ml/chat-data/dataset/v-0000000001"}]}}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.report: EvaluationReport | None = None
        self.report_fresh = True
        self.router: dict[str, dict[str, float]] | None = None
        self.plans: list[Plan] = []

    @property
    def status(self) -> dict[str, Any]:
        return self.flywheel.get("status") or {}

    def record(self) -> dict[str, Any]:
        return self.status["cycles"][-1]

    def observe(self) -> Observed:
        spec = FlywheelSpec.model_validate(self.flywheel["spec"])
        isvc_spec = InferenceServiceSpec.model_validate({"engine": {}, **self.isvc["spec"]}) if self.isvc else None
        return Observed(flywheel=copy.deepcopy(self.flywheel), spec=spec, isvc=copy.deepcopy(self.isvc),
                        isvc_spec=isvc_spec, dataset=copy.deepcopy(self.dataset), jobs=copy.deepcopy(self.jobs),
                        eval_pods=copy.deepcopy(self.pods), eval_store=STORE, report=self.report,
                        report_fresh=self.report_fresh, router=copy.deepcopy(self.router),
                        router_error=None if self.router is not None else "no running router pod", now=self.now,
                        image="localhost/kubeforge/trainer:test", settings=FlywheelSettings())

    def step(self, deleting: bool = False) -> Plan:
        obs = self.observe()
        decided = plan_deletion(obs) if deleting else plan(obs)
        self.plans.append(decided)
        self.flywheel["status"] = {k: v for k, v in decided.status.items() if v is not None}
        if decided.finalizer is True:
            self.flywheel["metadata"]["finalizers"] = [fm.FINALIZER]
        elif decided.finalizer is False:
            self.flywheel["metadata"]["finalizers"] = []
        if decided.isvc_patch is not None and self.isvc is not None:
            for k, v in decided.isvc_patch["spec"].items():
                if v is None:
                    self.isvc["spec"].pop(k, None)
                else:
                    self.isvc["spec"][k] = v
            self.isvc["metadata"]["generation"] += 1
        if decided.curate is not None and self.dataset is not None:
            self.dataset["metadata"]["annotations"]["kubeforge.dev/curate"] = decided.curate
        if decided.create_job is not None and decided.create_job["metadata"]["name"] not in self.jobs:
            self.jobs[decided.create_job["metadata"]["name"]] = {**decided.create_job, "status": {"phase": "Pending"}}
        if decided.create_pod is not None:
            self.pods.append(decided.create_pod)
        for job in decided.delete_jobs:
            self.jobs.pop(job, None)
        return decided

    def later(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)

    # ---- what the other controllers do
    def curate(self, version: int) -> None:
        """The Dataset acted on the annotation and committed ``version``."""
        assert self.dataset is not None
        st = self.dataset["status"]
        st["lastCurationRequest"] = self.dataset["metadata"]["annotations"]["kubeforge.dev/curate"]
        st["newestVersion"] = version
        st["pendingRecords"] = 0
        st["versions"].append({"version": version, "uri": f"s3://ckpt/root/ml/chat-data/dataset/v-{version:010d}"})

    def train(self, job: str, phase: str = "Succeeded", export: str | None = CANDIDATE_URI) -> None:
        version = self.jobs[job]["spec"]["data"]["datasetRef"]["version"]
        self.jobs[job]["status"] = {"phase": phase, **({"exportUri": export} if export else {}),
                                    "message": "loss diverged" if phase == "Failed" else "",
                                    "dataset": {"name": "chat-data", "version": version,
                                                "uri": f"s3://ckpt/root/ml/chat-data/dataset/v-{version:010d}"}}

    def evaluate(self, metrics: dict[str, float], baseline: dict[str, float]) -> None:
        spec = FlywheelSpec.model_validate(self.flywheel["spec"])
        rules = {k: GateRule.model_validate(v.dump()) for k, v in spec.evaluation.gate.items()}
        self.report = EvaluationReport(
            time=fmt_time(self.now), candidate=ModelRef(uri=CANDIDATE_URI, revision="r2"),
            baseline=ModelRef(uri=STABLE_URI, revision="r1"), dataset="d", dataset_version=2, golden=None,
            candidate_scores={}, metrics=metrics, baseline_metrics=baseline,
            gate=gate(metrics, baseline, rules) if rules else None, seconds=3.0)
        self.pods[-1]["status"] = {"phase": "Succeeded", "containerStatuses": [
            {"name": fm.CONTAINER, "state": {"terminated": {"exitCode": 0}}}]}

    def revision_ready(self, role: str, ready: int = 1, message: str | None = None) -> None:
        assert self.isvc is not None
        traffic = self.isvc["status"].setdefault("traffic", {"routed": True})
        traffic[role] = {"readyReplicas": ready, "message": message}

    def serve_candidate(self) -> None:
        """The InferenceService rolled its stable pods to the promoted model."""
        assert self.isvc is not None
        st = self.isvc["status"]
        st["model"] = {"uri": CANDIDATE_URI}
        st["observedGeneration"] = self.isvc["metadata"]["generation"]
        st.pop("traffic", None)

    def events(self) -> list[str]:
        return [e.reason for p in self.plans for e in p.events]


def run_to_evaluating(w: World) -> None:
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "1"
    w.step()
    assert w.status["stage"] == "Curating"
    w.curate(2)
    w.step()
    assert w.status["stage"] == "Training"
    w.step()
    w.train("chat-fw-c1")
    w.step()
    assert w.status["stage"] == "Evaluating", w.status["message"]


def run_to_shadow(w: World) -> None:
    run_to_evaluating(w)
    w.evaluate({"eval.mean_logprob": -1.0, "preference": 0.7}, {"eval.mean_logprob": -1.2})
    w.step()
    assert w.status["stage"] == "Shadow", w.status["message"]


# ---------------------------------------------------------------------------- references


@pytest.mark.parametrize("missing, reason", [("isvc", "InferenceServiceNotFound"), ("dataset", "DatasetNotFound"),
                                             ("uri", "ModelNotFromTrainingJob")])
def test_a_missing_reference_waits_with_a_condition_naming_it(missing: str, reason: str) -> None:
    w = World()
    if missing == "isvc":
        w.isvc = None
    elif missing == "dataset":
        w.dataset = None
    else:
        assert w.isvc is not None
        w.isvc["spec"]["model"] = {"uri": "s3://models/tiny"}
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "1"
    w.step()
    ready = condition(w.status["conditions"], "Ready")
    assert ready is not None and ready["status"] == "False" and ready["reason"] == reason
    assert w.status["stage"] == "Idle" and "cycle" not in w.status
    assert w.plans[-1].create_job is None and w.plans[-1].isvc_patch is None


def test_an_evaluation_store_problem_is_the_ready_condition() -> None:
    w = World()
    obs = w.observe()
    obs.eval_store = Problem("StoreUnsupported", "CheckpointPolicy p stores on a volume")
    decided = plan(obs)
    ready = condition(decided.status["conditions"], "Ready")
    assert ready is not None and ready["reason"] == "StoreUnsupported"


# ---------------------------------------------------------------------------- triggers


def test_no_trigger_no_cycle_and_a_manual_one_starts_exactly_one() -> None:
    w = World()
    w.step()
    assert w.status["stage"] == "Idle" and w.plans[-1].curate is None
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "a"
    w.step()
    assert w.status["cycle"] == 1 and w.status["lastRunRequest"] == "a" and "CycleStarted" in w.events()
    w.step()
    assert w.status["cycle"] == 1  # the same value does not start another


def test_new_records_trigger_counts_from_when_the_dataset_was_first_seen_then_from_the_last_cycle() -> None:
    w = World(example_spec(trigger={"newRecords": 100}))
    assert w.dataset is not None
    w.step()  # the 240 captured before the Flywheel existed do not count
    assert "cycle" not in w.status and w.status["lastSourceRecords"] == 240 and w.status["cycles"] == []
    w.dataset["status"]["sourceRecords"] = 339
    w.step()
    assert "cycle" not in w.status
    w.dataset["status"]["sourceRecords"] = 340
    w.step()
    assert w.status["cycle"] == 1 and "100 new request record(s)" in w.record()["trigger"]
    assert w.status["lastSourceRecords"] == 340 and [r["cycle"] for r in w.status["cycles"]] == [1]


def test_the_service_gone_mid_rollout_fails_the_cycle() -> None:
    w = World()
    run_to_shadow(w)
    w.isvc = None
    w.step()
    assert w.record()["outcome"] == "Failed" and "does not exist" in w.record()["reason"]
    assert w.status["stage"] == "Idle"
    ready = condition(w.status["conditions"], "Ready")
    assert ready is not None and ready["reason"] == "InferenceServiceNotFound"


def test_a_model_changed_to_a_uri_mid_rollout_takes_the_candidate_off() -> None:
    w = World()
    run_to_shadow(w)
    assert w.isvc is not None
    w.isvc["spec"]["model"] = {"uri": "s3://models/other"}
    w.step()
    assert w.record()["outcome"] == "Failed" and w.status["stage"] == "RollingBack"
    assert "shadow" not in w.isvc["spec"]
    w.step()
    assert w.status["stage"] == "Idle" and [o for p in w.plans for o in p.outcomes] == ["Failed"]


def test_every_seconds_trigger_waits_its_interval() -> None:
    w = World(example_spec(trigger={"everySeconds": 600}))
    w.step()
    assert "cycle" not in w.status and 599 <= (w.plans[-1].requeue_after or 0) <= 600
    w.later(601)
    w.step()
    assert w.status["cycle"] == 1


def test_drift_trigger_needs_a_transition_after_the_last_cycle() -> None:
    w = World(example_spec(trigger={"onDrift": True}))
    assert w.isvc is not None
    w.isvc["status"]["conditions"].append({"type": "DriftDetected", "status": "True", "message": "psi 0.4",
                                           "lastTransitionTime": fmt_time(T0 + dt.timedelta(seconds=5))})
    w.later(10)
    w.step()
    assert w.status["cycle"] == 1 and "DriftDetected" in w.record()["trigger"]


def test_a_due_cycle_waits_while_the_service_has_a_canary_of_someone_else() -> None:
    w = World()
    assert w.isvc is not None
    w.isvc["spec"]["canary"] = {"model": {"uri": "s3://m/other"}, "trafficPercent": 5}
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "1"
    w.step()
    assert "cycle" not in w.status and "already has a canary" in w.status["message"]


# ---------------------------------------------------------------------------- curation, training


def test_curation_is_asked_of_the_dataset_and_its_new_version_is_trained_on() -> None:
    w = World()
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "1"
    w.step()
    assert w.plans[-1].curate == "chat-fw-fw-uid-c1" and w.status["curationBaseVersion"] == 1
    w.step()
    assert w.status["stage"] == "Curating" and w.plans[-1].curate is None  # asked once, annotation is there
    w.curate(2)
    w.step()
    job = w.plans[-1].create_job
    assert job is not None and job["metadata"]["name"] == "chat-fw-c1"
    assert job["spec"]["data"] == {"datasetRef": {"name": "chat-data", "version": 2}}
    assert job["spec"]["initFrom"] == {"trainingJobRef": {"name": "tiny-llama"}}
    assert job["metadata"]["labels"][fm.FLYWHEEL_LABEL] == NAME and "ownerReferences" not in job["metadata"]
    assert w.record()["datasetVersion"] == 2


def test_nothing_pending_takes_the_newest_version_without_curating() -> None:
    w = World()
    assert w.dataset is not None
    w.dataset["status"]["pendingRecords"] = 0
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "1"
    w.step()
    assert w.status["stage"] == "Training" and w.plans[-1].curate is None and w.record()["datasetVersion"] == 1


def test_a_failed_curation_fails_the_cycle() -> None:
    w = World()
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "1"
    w.step()
    assert w.dataset is not None
    w.dataset["status"]["lastCurationRequest"] = "chat-fw-fw-uid-c1"
    w.dataset["status"]["conditions"] = [{"type": "Curating", "status": "False", "reason": "CurationFailed",
                                          "message": "exit 78: bad settings"}]
    w.step()
    assert w.status["stage"] == "Idle" and w.record()["outcome"] == "Failed" and "exit 78" in w.record()["reason"]


def test_a_restarted_operator_never_starts_a_second_job_for_the_cycle() -> None:
    w = World()
    w.dataset["status"]["pendingRecords"] = 0  # type: ignore[index]
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "1"
    w.step()
    first = w.plans[-1].create_job
    assert first is not None
    # the create was lost (the operator died before it): the same name is asked for again
    w.jobs.clear()
    w.step()
    assert w.plans[-1].create_job is not None and w.plans[-1].create_job["metadata"]["name"] == "chat-fw-c1"
    w.step()  # the job exists now: none is asked for, and the record names it
    assert w.plans[-1].create_job is None and w.record()["trainingJob"] == "chat-fw-c1"
    w.jobs.clear()  # deleted by someone once seen: the cycle fails rather than train again
    w.step()
    assert w.record()["outcome"] == "Failed" and w.plans[-1].create_job is None


def test_a_failed_job_fails_the_cycle_with_its_message() -> None:
    w = World()
    w.dataset["status"]["pendingRecords"] = 0  # type: ignore[index]
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "1"
    w.step()
    w.step()
    w.train("chat-fw-c1", "Failed", None)
    w.step()
    assert w.record()["outcome"] == "Failed" and "loss diverged" in w.record()["reason"]
    assert "CycleFailed" in w.events()


# ---------------------------------------------------------------------------- evaluation


def test_the_evaluation_pod_scores_the_candidate_against_the_served_model() -> None:
    w = World()
    run_to_evaluating(w)
    pod = w.plans[-1].create_pod
    assert pod is not None and pod["metadata"]["name"] == "chat-fw-eval-c1"
    cmd = pod["spec"]["containers"][0]["command"]
    assert cmd[:3] == ["python", "-m", "kubeforge_runtime.evaluate"]
    args = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert args["--model"] == CANDIDATE_URI and args["--baseline"] == STABLE_URI
    assert args["--dataset"] == "s3://ckpt/root/ml/chat-data/dataset" and args["--dataset-version"] == "2"
    assert args["--output"] == "s3://ckpt/root/ml/chat-fw/evaluation/cycle-0000000001"
    assert '"eval.mean_logprob":{"minGain":0.0}' in args["--settings"]
    assert pod["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_a_candidate_that_fails_the_gate_never_meets_traffic() -> None:
    w = World()
    run_to_evaluating(w)
    w.evaluate({"eval.mean_logprob": -1.5, "preference": 0.3}, {"eval.mean_logprob": -1.2})
    w.step()
    rec = w.record()
    assert rec["outcome"] == "Rejected" and rec["gatePassed"] is False and "eval.mean_logprob" in rec["reason"]
    assert rec["scores"]["preference"] == 0.3 and rec["baselineScores"]["eval.mean_logprob"] == -1.2
    assert w.status["stage"] == "Idle" and all(p.isvc_patch is None for p in w.plans)
    assert w.isvc is not None and "canary" not in w.isvc["spec"] and "shadow" not in w.isvc["spec"]


def test_a_failed_evaluation_pod_fails_the_cycle_only_on_a_fresh_store_answer() -> None:
    w = World()
    run_to_evaluating(w)
    w.pods[-1]["status"] = {"phase": "Failed", "containerStatuses": [
        {"name": fm.CONTAINER, "state": {"terminated": {"exitCode": 78, "message": "golden set missing"}}}]}
    w.report_fresh = False
    w.step()
    assert w.status["stage"] == "Evaluating"
    w.report_fresh = True
    w.step()
    assert w.record()["outcome"] == "Failed" and "exit 78" in w.record()["reason"]


# ---------------------------------------------------------------------------- rollout


def test_a_whole_cycle_shadow_canary_steps_and_promotion() -> None:
    w = World()
    run_to_shadow(w)
    assert w.isvc is not None
    shadow = w.isvc["spec"]["shadow"]
    assert shadow["model"]["trainingJobRef"] == {"name": "chat-fw-c1"} and shadow["samplePercent"] == 100
    assert shadow["model"]["updatePolicy"] == "Pinned" and shadow["model"]["credentialsSecretRef"] == {"name": "s3-creds"}
    assert w.flywheel["metadata"]["finalizers"] == [fm.FINALIZER]
    # no ready pod yet: waits, its share stays on the stable revision
    w.step()
    assert w.status["stage"] == "Shadow" and "waiting for the candidate" in w.status["message"]
    w.revision_ready("shadow")
    w.router = {"pod-a": counters((100, 0, 0.4), (50, 0, 0.4), "shadow")}
    w.step()
    assert w.status["step"]["baselineTaken"] and w.status["step"]["candidateRequests"] == 0
    w.router = {"pod-a": counters((130, 0, 0.4), (75, 0, 0.4), "shadow")}
    w.later(61)
    w.step()
    assert w.status["stage"] == "Canary" and w.isvc["spec"]["canary"]["trafficPercent"] == 10
    assert "shadow" not in w.isvc["spec"] and "StepPassed" in w.events()
    cond = condition(w.status["conditions"], "CandidateServing")
    assert cond is not None and cond["status"] == "True"
    w.revision_ready("canary")
    w.router = {"pod-b": counters((10, 0, 0.4), (1, 0, 0.4))}  # new router pods (the share changed)
    w.step()
    w.router = {"pod-b": counters((100, 0, 0.4), (12, 0, 0.4))}
    w.later(30)
    w.step()
    assert w.status["stage"] == "Canary" and "11/10" in w.status["message"]  # time not up yet
    w.later(31)
    w.step()
    assert w.status["stage"] == "Canary" and w.isvc["spec"]["canary"]["trafficPercent"] == 50
    w.router = {"pod-c": counters((0, 0, 0.4), (0, 0, 0.4))}
    w.step()
    w.router = {"pod-c": counters((20, 0, 0.4), (20, 0, 0.5))}
    w.later(61)
    w.step()
    assert w.status["stage"] == "Promoting"
    assert w.isvc["spec"]["model"]["trainingJobRef"] == {"name": "chat-fw-c1"}
    assert w.isvc["spec"]["model"]["updatePolicy"] == "FollowLatest"  # the stable's policy carries over
    assert "canary" not in w.isvc["spec"]
    w.step()
    assert w.status["stage"] == "Promoting"  # the pods have not rolled yet
    w.serve_candidate()
    w.step()
    rec = w.record()
    assert rec["outcome"] == "Promoted" and w.status["stableTrainingJob"] == "chat-fw-c1"
    assert rec["stageReached"] == "Promoting" and w.status["stage"] == "Idle"
    assert w.plans[-1].outcomes == ["Promoted"]
    w.step()
    assert w.flywheel["metadata"]["finalizers"] == []
    # the next cycle fine-tunes from the promoted candidate
    w.dataset["status"]["pendingRecords"] = 0  # type: ignore[index]
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "2"
    w.step()
    job = w.plans[-1].create_job
    assert job is not None and job["metadata"]["name"] == "chat-fw-c2"
    assert job["spec"]["initFrom"] == {"trainingJobRef": {"name": "chat-fw-c1"}}


def test_a_guard_rail_breach_rolls_back_at_once() -> None:
    w = World()
    run_to_shadow(w)
    w.revision_ready("shadow")
    w.router = {"pod-a": counters((0, 0, 0.4), (0, 0, 0.4), "shadow")}
    w.step()
    w.router = {"pod-a": counters((40, 0, 0.4), (20, 5, 0.4), "shadow")}
    w.step()
    assert w.status["stage"] == "RollingBack" and w.record()["outcome"] == "RolledBack"
    assert "error rate 25.0%" in w.record()["reason"]
    assert w.isvc is not None and "shadow" not in w.isvc["spec"]
    w.step()
    assert w.status["stage"] == "Idle" and "RolledBack" in w.events()
    assert w.isvc["spec"]["model"]["trainingJobRef"] == {"name": "tiny-llama"}


def test_a_slower_candidate_is_rolled_back_on_p95() -> None:
    w = World()
    run_to_shadow(w)
    w.revision_ready("shadow")
    w.router = {"pod-a": counters((0, 0, 0.4), (0, 0, 0.4), "shadow")}
    w.step()
    w.router = {"pod-a": counters((40, 0, 0.4), (20, 0, 3.0), "shadow")}
    w.step()
    assert w.record()["outcome"] == "RolledBack" and "p95 5s vs the stable revision's 0.5s" in w.record()["reason"]


def test_a_candidate_slower_than_the_last_bucket_breaches_and_status_stays_json() -> None:
    w = World()
    run_to_shadow(w)
    w.revision_ready("shadow")
    w.router = {"pod-a": counters((0, 0, 0.4), (0, 0, 0.4), "shadow")}
    w.step()
    w.router = {"pod-a": counters((40, 0, 0.4), (20, 0, 900.0), "shadow")}
    w.step()
    assert w.record()["outcome"] == "RolledBack" and "beyond the router's last latency bucket" in w.record()["reason"]
    json.dumps(w.plans[-1].status, allow_nan=False)


def test_a_candidate_that_never_gets_ready_is_rolled_back() -> None:
    w = World()
    run_to_shadow(w)
    w.revision_ready("shadow", 0, "no pod ready (export marker missing); its share goes to the stable revision")
    w.later(901)
    w.step()
    assert w.record()["outcome"] == "RolledBack" and "export marker missing" in w.record()["reason"]


def test_suspend_mid_canary_takes_the_candidate_away() -> None:
    w = World()
    run_to_shadow(w)
    w.flywheel["spec"]["suspend"] = True
    w.step()
    assert w.record()["outcome"] == "RolledBack" and "suspend" in w.record()["reason"]
    assert w.isvc is not None and "shadow" not in w.isvc["spec"]


def test_a_lost_patch_is_sent_again() -> None:
    w = World()
    run_to_shadow(w)
    assert w.isvc is not None
    del w.isvc["spec"]["shadow"]  # the write was lost, or a user removed it
    w.step()
    assert w.plans[-1].isvc_patch is not None and w.isvc["spec"]["shadow"]["samplePercent"] == 100


def test_without_auto_promote_the_last_share_waits_for_the_annotation() -> None:
    spec = example_spec()
    spec["rollout"] = {**spec["rollout"], "shadow": None, "autoPromote": False,
                       "canarySteps": [{"trafficPercent": 20, "minSeconds": 0, "minRequests": 1}]}
    w = World(spec)
    run_to_evaluating(w)
    w.evaluate({"eval.mean_logprob": -1.0, "preference": 0.7}, {"eval.mean_logprob": -1.2})
    w.step()
    assert w.status["stage"] == "Canary"
    w.revision_ready("canary")
    w.router = {"p": counters((0, 0, 0.4), (0, 0, 0.4))}
    w.step()
    w.router = {"p": counters((10, 0, 0.4), (3, 0, 0.4))}
    w.step()
    assert w.status["stage"] == "AwaitingPromotion"
    w.step()
    assert w.status["stage"] == "AwaitingPromotion" and w.isvc["spec"]["canary"]["trafficPercent"] == 20  # type: ignore[index]
    w.flywheel["metadata"]["annotations"][PROMOTE_ANNOTATION] = "1"
    w.step()
    assert w.status["stage"] == "Promoting"


def test_deleting_the_flywheel_mid_rollout_returns_all_traffic_to_stable() -> None:
    w = World()
    run_to_shadow(w)
    w.flywheel["metadata"]["deletionTimestamp"] = fmt_time(w.now)
    decided = w.step(deleting=True)
    assert decided.isvc_patch == fm.rollback_patch() and decided.finalizer is None
    assert w.isvc is not None and "shadow" not in w.isvc["spec"]
    decided = w.step(deleting=True)
    assert decided.finalizer is False


def test_retention_keeps_the_served_and_the_newest_finished_jobs() -> None:
    w = World(example_spec(training={**example_spec()["training"], "maxRetainedJobs": 1}))
    for c in (1, 2, 3):
        w.jobs[f"chat-fw-c{c}"] = {"metadata": {"name": f"chat-fw-c{c}", "labels": {
            fm.CYCLE_LABEL: str(c), fm.FLYWHEEL_UID_LABEL: "fw-uid"}}, "status": {"phase": "Succeeded"}}
    assert w.isvc is not None
    w.isvc["spec"]["model"]["trainingJobRef"] = {"name": "chat-fw-c1"}
    w.step()
    assert w.plans[-1].delete_jobs == ["chat-fw-c2"]


# ---------------------------------------------------------------------------- router counters


def test_router_counters_from_a_real_exposition_and_their_growth_per_pod() -> None:
    reg = CollectorRegistry()
    requests = Counter("kubeforge:router_requests", "", ["revision", "code"], registry=reg)
    duration = Histogram("kubeforge:router_request_duration_seconds", "", ["revision"],
                         buckets=(0.1, 0.5, 1.0), registry=reg)
    shadow = Counter("kubeforge:shadow_requests", "", ["revision", "outcome"], registry=reg)
    fallbacks = Counter("kubeforge:router_fallbacks", "", ["revision"], registry=reg)
    for _ in range(18):
        requests.labels("stable", "200").inc()
        duration.labels("stable").observe(0.05)
    requests.labels("stable", "503").inc(2)
    for _ in range(10):
        requests.labels("canary", "200").inc()
        duration.labels("canary").observe(0.7)
    requests.labels("canary", "client_closed").inc(4)  # neither a success nor a failure
    requests.labels("canary", "aborted").inc(1)  # broke off mid-answer: a failure
    fallbacks.labels("canary").inc(2)  # could not be connected to: the stable one answered
    shadow.labels("shadow", "ok").inc(3)
    shadow.labels("shadow", "timeout").inc(1)
    shadow.labels("shadow", "dropped").inc(5)
    parsed = router_stats.parse(generate_latest(reg).decode())
    stable = router_stats.revision_stats(parsed, "stable")
    canary = router_stats.revision_stats(parsed, "canary")
    assert (stable.requests, stable.errors, stable.p95_s) == (20, 2, 0.1)
    assert (canary.requests, canary.errors, canary.p95_s) == (13, 3, 1.0)
    sh = router_stats.shadow_stats(parsed)
    assert (sh.requests, sh.errors) == (4, 1)  # dropped copies are not the shadow's answers
    # a pod in the baseline counts its growth; a new pod all; a restarted one (below) from zero
    base = {"a": {"req|stable|200": 10.0}, "b": {"req|stable|200": 50.0}}
    now = {"a": {"req|stable|200": 15.0}, "b": {"req|stable|200": 4.0}, "c": {"req|stable|200": 7.0}}
    assert router_stats.delta(now, base) == {"req|stable|200": 5.0 + 4.0 + 7.0}


# ---------------------------------------------------------------------------- a recreated Flywheel, refusals, deadlines


def test_a_recreated_flywheel_numbers_its_cycles_past_the_jobs_of_the_name_and_adopts_none() -> None:
    w = World()
    w.dataset["status"]["pendingRecords"] = 0  # type: ignore[index]
    w.jobs["chat-fw-c1"] = {"metadata": {"name": "chat-fw-c1", "labels": {
        fm.FLYWHEEL_LABEL: NAME, fm.FLYWHEEL_UID_LABEL: "old-uid", fm.CYCLE_LABEL: "1"}}, "status": {"phase": "Succeeded"}}
    assert w.isvc is not None
    w.isvc["spec"]["model"]["trainingJobRef"] = {"name": "chat-fw-c1"}  # the old one's promoted candidate
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "1"
    w.step()
    assert w.status["cycle"] == 2 and w.plans[-1].create_job is not None
    assert w.plans[-1].create_job["metadata"]["name"] == "chat-fw-c2"
    assert w.plans[-1].create_job["spec"]["initFrom"] == {"trainingJobRef": {"name": "chat-fw-c1"}}
    w.step()
    assert w.plans[-1].delete_jobs == []  # never the old object's jobs


def test_a_job_of_the_cycles_name_made_by_someone_else_fails_the_cycle() -> None:
    w = World()
    w.dataset["status"]["pendingRecords"] = 0  # type: ignore[index]
    w.jobs["chat-fw-c1"] = {"metadata": {"name": "chat-fw-c1", "labels": {}}, "status": {"phase": "Running"}}
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "1"
    w.step()
    assert w.record()["outcome"] == "Failed" and "is not this Flywheel's" in w.record()["reason"]


def test_a_refused_job_fails_the_cycle_instead_of_retrying_forever() -> None:
    w = World()
    w.dataset["status"]["pendingRecords"] = 0  # type: ignore[index]
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "1"
    obs = w.observe()
    decided = plan(obs)
    assert decided.create_job is not None
    w.flywheel["status"] = {k: v for k, v in decided.status.items() if v is not None}
    obs = w.observe()
    obs.refused = "422 Unprocessable Entity: spec.workers.maxReplicas: must be >= minReplicas"
    decided = plan(obs)
    assert decided.create_job is None and decided.outcomes == ["Failed"]
    assert "422" in decided.status["cycles"][-1]["reason"]


def test_a_report_of_another_candidate_is_not_taken_for_this_one() -> None:
    w = World()
    run_to_evaluating(w)
    w.evaluate({"eval.mean_logprob": -1.0}, {"eval.mean_logprob": -1.2})
    assert w.report is not None
    w.report = w.report.model_copy(update={"candidate": ModelRef(uri="s3://ckpt/root/ml/other/export", revision="x")})
    w.step()
    assert w.record()["outcome"] == "Failed" and "not this cycle's candidate" in w.record()["reason"]
    assert w.isvc is not None and "shadow" not in w.isvc["spec"]


def test_router_counters_unreadable_too_long_roll_back() -> None:
    w = World()
    run_to_shadow(w)
    w.revision_ready("shadow")
    w.router = None
    w.later(600)
    w.step()
    assert w.status["stage"] == "Shadow" and "waiting for the router's counters" in w.status["message"]
    w.later(301)
    w.step()
    assert w.record()["outcome"] == "RolledBack" and "could not be read" in w.record()["reason"]


def test_a_step_without_enough_traffic_rolls_back_at_its_deadline() -> None:
    w = World()
    run_to_shadow(w)
    w.revision_ready("shadow")
    w.router = {"p": counters((0, 0, 0.4), (0, 0, 0.4), "shadow")}
    w.step()
    w.router = {"p": counters((3, 0, 0.4), (2, 0, 0.4), "shadow")}
    w.later(3601)
    w.step()
    assert w.record()["outcome"] == "RolledBack" and "too little traffic" in w.record()["reason"]


def test_the_finalizer_is_held_from_the_cycle_start_and_deleting_mid_training_deletes_the_job() -> None:
    w = World()
    w.dataset["status"]["pendingRecords"] = 0  # type: ignore[index]
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "1"
    w.step()
    assert w.flywheel["metadata"]["finalizers"] == [fm.FINALIZER] and w.status["stage"] == "Training"
    w.step()
    w.flywheel["metadata"]["deletionTimestamp"] = fmt_time(w.now)
    decided = w.step(deleting=True)
    assert decided.delete_jobs == ["chat-fw-c1"] and decided.finalizer is False
    assert "CandidateDeleted" in w.events()


def test_a_suspended_dataset_fails_the_cycle_that_waits_for_it() -> None:
    w = World()
    w.flywheel["metadata"]["annotations"][RUN_ANNOTATION] = "1"
    w.step()
    assert w.dataset is not None
    w.dataset["spec"] = {"suspend": True}
    w.step()
    assert w.record()["outcome"] == "Failed" and "suspended" in w.record()["reason"]
    assert w.flywheel["metadata"]["finalizers"] == []


def test_counting_starts_after_the_warm_up() -> None:
    spec = example_spec()
    spec["rollout"]["guardRails"]["warmupSeconds"] = 15
    w = World(spec)
    run_to_shadow(w)
    w.revision_ready("shadow")
    # the first copies fail while the routers cannot reach the new revision yet: not judged
    w.router = {"pod-a": counters((10, 0, 0.4), (5, 5, 0.4), "shadow")}
    w.step()
    assert w.status["stage"] == "Shadow" and "counting starts in 15s" in w.status["message"]
    assert not w.status["step"]["baselineTaken"] and w.plans[-1].requeue_after == 15
    w.later(16)
    w.router = {"pod-a": counters((20, 0, 0.4), (10, 5, 0.4), "shadow")}
    w.step()
    assert w.status["step"]["baselineTaken"] and w.status["stage"] == "Shadow"
    w.router = {"pod-a": counters((60, 0, 0.4), (40, 5, 0.4), "shadow")}
    w.later(61)
    w.step()
    assert w.status["stage"] == "Canary", w.status["message"]


def test_a_candidate_that_loses_its_ready_pod_late_in_a_step_gets_the_whole_grace_again() -> None:
    w = World()
    run_to_shadow(w)
    w.revision_ready("shadow")
    w.router = {"p": counters((0, 0, 0.4), (0, 0, 0.4), "shadow")}
    w.later(1000)  # a long step (too few requests yet)
    w.step()
    w.revision_ready("shadow", 0, "no pod ready (restarting)")
    w.later(10)
    w.step()
    assert w.status["stage"] == "Shadow", w.status.get("message")  # 10 s without, not 1010
    w.later(900)
    w.step()
    assert w.record()["outcome"] == "RolledBack" and "no ready pod for 9" in w.record()["reason"]


def test_a_router_pod_that_appears_mid_step_counts_after_its_own_warm_up() -> None:
    spec = example_spec()
    spec["rollout"]["guardRails"]["warmupSeconds"] = 15
    w = World(spec)
    run_to_shadow(w)
    w.revision_ready("shadow")
    w.router = {"old": counters((0, 0, 0.4), (0, 0, 0.4), "shadow")}
    w.step()
    w.later(16)
    w.step()  # "old" counts from here
    # a router pod rolled in: its first copies fail while it cannot reach the shadow yet
    w.router = {"old": counters((20, 0, 0.4), (10, 0, 0.4), "shadow"),
                "new": counters((5, 0, 0.4), (5, 5, 0.4), "shadow")}
    w.step()
    assert w.status["stage"] == "Shadow" and w.status["step"]["candidateRequests"] == 10
    w.later(16)
    w.router = {"old": counters((30, 0, 0.4), (15, 0, 0.4), "shadow"),
                "new": counters((10, 0, 0.4), (10, 5, 0.4), "shadow")}
    w.step()  # "new" counts from here, its early failures left out
    w.router = {"old": counters((40, 0, 0.4), (20, 0, 0.4), "shadow"),
                "new": counters((20, 0, 0.4), (15, 5, 0.4), "shadow")}
    w.later(30)
    w.step()
    assert w.status["stage"] == "Canary", w.status.get("message")
