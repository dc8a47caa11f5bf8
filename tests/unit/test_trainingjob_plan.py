"""The TrainingJob controller's decisions, against a small in-memory cluster: what it
creates, how it classifies failures, counts restarts (exactly once, also when a pass is cut
short at any point), suspends, fails and succeeds."""

from __future__ import annotations

import copy
import datetime as dt
import random
import uuid
from typing import Any

import pytest
from kubeforge.api import CheckpointPolicySpec
from kubeforge.api.common import condition
from kubeforge.controllers.trainingjob import manifests as tp
from kubeforge.controllers.trainingjob.plan import NodeHealth, Observed, Plan, StoreView, fmt_time, plan
from kubeforge.settings import SecuritySettings

pytestmark = pytest.mark.unit
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
POLICY = CheckpointPolicySpec.model_validate({
    "schedule": {"everySteps": 10},
    "storage": {"s3": {"bucket": "ckpt", "endpoint": "http://minio:9000", "credentialsSecretRef": {"name": "s"}}}})


class Sim:
    """The API server and kubelets, as far as the plan can tell: pods are created Pending,
    deletions remove them at once (as kwok does), status is replaced by the plan's."""

    def __init__(self, spec: dict[str, Any], policy: CheckpointPolicySpec | None = None) -> None:
        self.job: dict[str, Any] = {
            "metadata": {"name": "llm", "namespace": "ns", "uid": "job-uid", "generation": 1,
                         "creationTimestamp": fmt_time(T0)},
            "spec": spec, "status": {}}
        self.pods: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, NodeHealth] = {}
        self.policy = policy
        self.store: StoreView | None = StoreView(export_committed=True, export_uri="s3://ckpt/ns/llm/export")
        self.now = T0
        self.events: list[str] = []
        self.node_of: dict[str, str] = {}
        self.last: Plan | None = None
        self.security = SecuritySettings()
        #: status fields the API server drops on write (a CRD that predates them)
        self.pruned: frozenset[str] = frozenset()

    def observe(self) -> Observed:
        return Observed(job=copy.deepcopy(self.job), pods=copy.deepcopy(list(self.pods.values())), nodes=self.nodes,
                        policy=self.policy, store=self.store, now=self.now, security=self.security)

    def step(self, cut_after_status: bool = False) -> Plan:
        """One pass; ``cut_after_status`` applies only the status write (the operator was
        killed right after it)."""
        p = plan(self.observe())
        self.last = p
        self.job["status"] = {k: v for k, v in copy.deepcopy(p.status).items()
                              if v is not None and k not in self.pruned}
        if cut_after_status:
            return p
        for d in p.delete:
            if d.name in self.pods and self.pods[d.name]["metadata"]["uid"] == d.uid:
                del self.pods[d.name]
        for m in p.create:
            if m["metadata"]["name"] not in self.pods:
                pod = copy.deepcopy(m)
                pod["metadata"]["uid"] = uuid.uuid4().hex
                pod["status"] = {"phase": "Pending"}
                self.pods[m["metadata"]["name"]] = pod
        self.events += [e.reason for e in p.events]
        return p

    def converge(self, passes: int = 4) -> Plan:
        p = self.step()
        for _ in range(passes - 1):
            p = self.step()
        return p

    def run(self, name: str, node: str | None = None) -> None:
        pod = self.pods[name]
        node = node or f"node-{name}"
        pod["spec"]["nodeName"] = node
        self.nodes.setdefault(node, NodeHealth("True", T0))
        pod["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                         "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}

    def run_all(self) -> None:
        for name, pod in self.pods.items():
            if pod["status"]["phase"] == "Pending":
                self.run(name)

    def exit(self, name: str, code: int, message: str = "") -> None:
        pod = self.pods[name]
        pod["status"] = {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"exitCode": code, "message": message}}}]}

    def status(self) -> dict[str, Any]:
        return self.job["status"]

    def cond(self, type_: str) -> dict[str, Any]:
        c = condition(self.status().get("conditions"), type_)
        assert c is not None, f"no {type_} condition in {self.status()}"
        return c

    def workers(self) -> list[dict[str, Any]]:
        return [p for p in self.pods.values() if p["metadata"]["labels"][tp.ROLE_LABEL] == tp.ROLE_WORKER]


def job_spec(min_r: int = 2, max_r: int = 4, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"workers": {"minReplicas": min_r, "maxReplicas": max_r}}
    spec.update(over)
    return spec


def running_job(**over: Any) -> Sim:
    sim = Sim(job_spec(**over))
    sim.converge(2)
    sim.run_all()
    sim.step()
    return sim


def test_creates_store_and_workers_then_runs() -> None:
    sim = Sim(job_spec())
    first = sim.step()
    assert first.create == [] and sim.status()["run"] == "llm/runs/job-uid"  # the run reads back first
    assert sim.cond("Ready")["reason"] == "RecordingRun" and first.requeue_after == 1.0
    p = sim.step()
    assert sorted(m["metadata"]["name"] for m in p.create) == ["llm-rdzv", "llm-worker-0", "llm-worker-1",
                                                               "llm-worker-2", "llm-worker-3"]
    assert {c["kind"] for c in p.children} == {"ConfigMap", "Service", "NetworkPolicy"}
    assert sim.status()["phase"] == "Pending" and sim.cond("Running")["reason"] == "WaitingForWorkers"
    assert sim.step().create == []  # idempotent: nothing more to create
    sim.run_all()
    sim.step()
    assert sim.status()["phase"] == "Running" and sim.cond("Ready")["status"] == "True"
    assert sim.status()["workers"] == {"desired": 4, "active": 4, "ready": 4, "failed": 0}
    assert sim.status()["startTime"] == fmt_time(T0)
    assert [r["attempt"] for r in sim.status()["workerPods"]] == [0, 0, 0, 0]


def test_elastic_running_with_min_replicas_and_insufficient_capacity_after_timeout() -> None:
    sim = Sim(job_spec(failurePolicy={"insufficientCapacityTimeoutSeconds": 20}))
    sim.converge(2)
    sim.run("llm-rdzv")
    sim.run("llm-worker-0")
    p = sim.step()
    assert sim.cond("Running")["status"] == "False" and p.requeue_after == pytest.approx(20)
    sim.now = T0 + dt.timedelta(seconds=21)
    sim.pods["llm-worker-2"]["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "message": "0/5 nodes are available: Insufficient nvidia.com/gpu"}]
    sim.step()
    running = sim.cond("Running")
    assert running["reason"] == "InsufficientCapacity" and "Insufficient nvidia.com/gpu" in running["message"]
    assert "InsufficientCapacity" in sim.events
    sim.run("llm-worker-1")
    sim.step()
    assert sim.cond("Running")["status"] == "True" and sim.status()["workers"]["ready"] == 2


def test_workers_that_cannot_start_show_the_kubelets_reason_never_running() -> None:
    sim = Sim(job_spec(min_r=2, max_r=2))
    sim.converge(2)
    for w in sim.workers():
        w["spec"]["nodeName"] = "n"
        w["status"] = {"phase": "Pending", "containerStatuses": [{"name": "trainer", "state": {"waiting": {
            "reason": "ImagePullBackOff", "message": 'Back-off pulling image "own/missing:1"'}}}]}
    sim.step()
    running = sim.cond("Running")
    assert running["status"] == "False" and running["reason"] == "WorkersNotStarting", running
    assert "ImagePullBackOff" in running["message"] and "own/missing:1" in running["message"]
    assert sim.status()["phase"] != "Running" and "WorkersNotStarting" in sim.events


def test_deleted_worker_is_replaced_and_counted_as_infrastructure_once() -> None:
    sim = running_job()
    old_uid = sim.pods["llm-worker-1"]["metadata"]["uid"]
    del sim.pods["llm-worker-1"]
    p = sim.step()
    assert sim.status()["restarts"] == {"application": 0, "infrastructure": 1}
    assert p.replacements == ["PodDeleted"] and "WorkerReplaced" in sim.events
    new = sim.pods["llm-worker-1"]
    assert new["metadata"]["uid"] != old_uid and new["metadata"]["labels"][tp.ATTEMPT_LABEL] == "1"
    sim.converge(3)
    assert sim.status()["restarts"]["infrastructure"] == 1


def test_application_failures_count_against_the_budget_then_fail() -> None:
    sim = running_job(failurePolicy={"maxRestarts": 1})
    sim.exit("llm-worker-2", 1, "Traceback ... RuntimeError: boom")
    sim.step()
    assert sim.status()["restarts"]["application"] == 1 and sim.status()["phase"] == "Restarting"
    assert sim.cond("Restarting")["reason"] == "Failed"
    sim.step()
    sim.run_all()
    sim.step()
    sim.exit("llm-worker-0", 137)
    sim.step()
    failed = sim.cond("Failed")
    assert failed["status"] == "True" and failed["reason"] == "RestartBudgetExhausted"
    assert "maxRestarts=1" in failed["message"] and sim.status()["phase"] == "Failed"
    assert sim.status()["completionTime"]
    assert all(p["status"]["phase"] in ("Failed", "Succeeded") for p in sim.pods.values())


def test_configuration_error_fails_at_once_with_the_message() -> None:
    sim = running_job(failurePolicy={"maxRestarts": 5})
    sim.exit("llm-worker-3", 78, "kubeforge: configuration error: train.stepz: unknown key")
    sim.step()
    failed = sim.cond("Failed")
    assert failed["reason"] == "ConfigurationError" and "train.stepz: unknown key" in failed["message"]
    assert sim.status()["restarts"] == {"application": 0, "infrastructure": 0}
    assert sim.status()["phase"] == "Failed"


def test_preempted_and_evicted_are_infrastructure() -> None:
    sim = running_job(failurePolicy={"maxRestarts": 0, "disruptionWindowSeconds": 0})
    sim.exit("llm-worker-1", 75)
    sim.step()
    sim.pods["llm-worker-2"]["status"] = {"phase": "Failed", "reason": "Evicted", "message": "low on memory"}
    sim.step()
    sim.exit("llm-worker-3", 143)
    sim.pods["llm-worker-3"]["status"]["conditions"] = [
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]
    sim.step()
    assert sim.status()["restarts"] == {"application": 0, "infrastructure": 3}
    assert sim.last is not None and condition(sim.status()["conditions"], "Failed") is None


def test_node_lost_beyond_grace_force_deletes_and_peers_failing_after_it_are_infrastructure() -> None:
    sim = running_job(failurePolicy={"nodeFailureGraceSeconds": 30, "maxRestarts": 0})
    node = sim.pods["llm-worker-0"]["spec"]["nodeName"]
    sim.now = T0 + dt.timedelta(seconds=100)
    sim.nodes[node] = NodeHealth("Unknown", sim.now)
    p = sim.step()
    assert p.delete == [] and p.requeue_after == pytest.approx(30)
    sim.now += dt.timedelta(seconds=31)
    p = sim.step()
    assert [(d.name, d.force) for d in p.delete] == [("llm-worker-0", True)]
    assert p.replacements == ["NodeLost"] and sim.status()["restarts"]["infrastructure"] == 1
    # the survivors' agents lose their collective partner and fail: not the application's fault
    sim.now += dt.timedelta(seconds=20)
    sim.exit("llm-worker-1", 1, "RendezvousConnectionError")
    sim.step()
    assert sim.status()["restarts"] == {"application": 0, "infrastructure": 2}
    assert condition(sim.status()["conditions"], "Failed") is None


def test_a_peer_failing_before_its_node_loss_is_noticed_is_recounted_as_infrastructure() -> None:
    """Seen on the real nodes: the node dies, the surviving worker fails within seconds (its
    rendezvous store or peer went silent), and the node turns NotReady only after the
    control plane's heartbeat grace, the operator's grace later still."""
    sim = running_job(failurePolicy={"nodeFailureGraceSeconds": 30, "maxRestarts": 3})
    node = sim.pods["llm-worker-0"]["spec"]["nodeName"]
    sim.now = T0 + dt.timedelta(seconds=100)  # the node dies now, silently
    sim.now += dt.timedelta(seconds=5)
    sim.exit("llm-worker-1", 1, "RendezvousConnectionError")
    sim.step()
    assert sim.status()["restarts"] == {"application": 1, "infrastructure": 0}
    sim.now += dt.timedelta(seconds=35)  # the heartbeat grace: NotReady now
    sim.nodes[node] = NodeHealth("Unknown", sim.now)
    sim.step()
    sim.now += dt.timedelta(seconds=31)
    sim.step()
    assert sim.status()["restarts"] == {"application": 0, "infrastructure": 2}
    assert "RestartRecounted" in sim.events
    assert sim.status()["applicationFailureTimes"] == []


def test_an_application_failure_long_before_a_node_loss_stays_an_application_failure() -> None:
    sim = running_job(failurePolicy={"nodeFailureGraceSeconds": 30, "maxRestarts": 3})
    node = sim.pods["llm-worker-0"]["spec"]["nodeName"]
    sim.exit("llm-worker-1", 1, "CUDA error")
    sim.step()
    sim.now = T0 + dt.timedelta(seconds=600)
    sim.nodes[node] = NodeHealth("Unknown", sim.now)
    sim.step()
    sim.now += dt.timedelta(seconds=31)
    sim.step()
    assert sim.status()["restarts"] == {"application": 1, "infrastructure": 1}
    assert "RestartRecounted" not in sim.events


def test_lost_rendezvous_store_is_recreated_and_opens_the_disruption_window() -> None:
    sim = running_job(failurePolicy={"maxRestarts": 0})
    sim.exit("llm-rdzv", 137)
    p = sim.step()
    assert "RendezvousLost" in p.replacements and "llm-rdzv" not in [d.name for d in p.create]
    sim.step()
    assert "llm-rdzv" in sim.pods and sim.pods["llm-rdzv"]["status"]["phase"] == "Pending"
    sim.exit("llm-worker-2", 1)
    sim.step()
    assert sim.status()["restarts"] == {"application": 0, "infrastructure": 1}


def test_success_only_when_worker_zero_exits_zero_with_export() -> None:
    sim = Sim(job_spec(checkpointPolicyRef={"name": "p"}), policy=POLICY)
    sim.converge(2)
    sim.run_all()
    sim.step()
    sim.exit("llm-worker-2", 0)
    sim.step()
    assert condition(sim.status()["conditions"], "Succeeded") is None and sim.status()["phase"] == "Running"
    sim.exit("llm-worker-0", 0)
    sim.step()
    assert sim.cond("Succeeded")["status"] == "True" and sim.status()["phase"] == "Succeeded"
    assert sim.cond("Ready")["status"] == "True" and sim.status()["exportUri"] == "s3://ckpt/ns/llm/export"
    assert sim.workers() and all(p["status"]["phase"] == "Succeeded" for p in sim.workers())
    assert "llm-rdzv" not in sim.pods


def test_worker_zero_exit_zero_without_export_is_an_application_failure() -> None:
    sim = Sim(job_spec(checkpointPolicyRef={"name": "p"}), policy=POLICY)
    sim.store = StoreView(export_committed=False)
    sim.converge(2)
    sim.run_all()
    sim.step()
    sim.exit("llm-worker-0", 0)
    p = sim.step()
    assert p.replacements == ["ExportMissing"] and sim.status()["restarts"]["application"] == 1
    assert condition(sim.status()["conditions"], "Succeeded") is None


def test_unreadable_store_delays_success_until_the_export_marker_is_seen() -> None:
    sim = Sim(job_spec(checkpointPolicyRef={"name": "p"}), policy=POLICY)
    sim.converge(2)
    sim.run_all()
    sim.step()
    sim.store = None  # S3 did not answer
    sim.exit("llm-worker-0", 0)
    p = sim.step()
    assert sim.status()["phase"] != "Succeeded" and not p.replacements and p.requeue_after is not None
    assert sim.cond("Succeeded")["status"] == "False" and sim.cond("Succeeded")["reason"] == "ExportUnverified"
    sim.store = StoreView(export_committed=True, export_uri="s3://ckpt/ns/llm/export")
    sim.step()
    assert sim.status()["phase"] == "Succeeded" and sim.status()["exportUri"] == "s3://ckpt/ns/llm/export"


def test_volume_storage_trusts_worker_zero_exit_code_for_the_export() -> None:
    volume = CheckpointPolicySpec.model_validate({
        "schedule": {"everySteps": 10}, "storage": {"volume": {"claimName": "ckpt"}}})
    sim = Sim(job_spec(checkpointPolicyRef={"name": "p"}), policy=volume)
    sim.store = None  # the operator cannot read a volume mounted only in the workers
    sim.converge(2)
    sim.run_all()
    sim.step()
    sim.exit("llm-worker-0", 0)
    sim.step()
    assert sim.status()["phase"] == "Succeeded"


def test_suspend_deletes_pods_without_counting_and_resume_recreates() -> None:
    sim = running_job()
    sim.job["spec"]["suspend"] = True
    sim.job["metadata"]["generation"] = 2
    sim.converge(2)
    assert sim.pods == {} and sim.status()["phase"] == "Suspended" and sim.cond("Suspended")["status"] == "True"
    assert sim.status()["restarts"] == {"application": 0, "infrastructure": 0}
    sim.job["spec"]["suspend"] = False
    sim.job["metadata"]["generation"] = 3
    sim.converge(2)
    assert len(sim.workers()) == 4 and sim.cond("Suspended")["reason"] == "Resumed"
    sim.run_all()
    sim.step()
    assert sim.status()["phase"] == "Running" and sim.status()["restarts"]["infrastructure"] == 0
    assert "Suspended" in sim.events and "Resumed" in sim.events


def test_active_deadline_and_ttl() -> None:
    sim = running_job(activeDeadlineSeconds=100, ttlSecondsAfterFinished=50)
    sim.now = T0 + dt.timedelta(seconds=99)
    assert sim.step().requeue_after == pytest.approx(1)
    sim.now = T0 + dt.timedelta(seconds=101)
    p = sim.step()
    assert sim.cond("Failed")["reason"] == "DeadlineExceeded" and p.requeue_after == pytest.approx(50)
    assert not sim.workers()
    sim.now += dt.timedelta(seconds=51)
    assert sim.step().delete_job


def test_restart_group_recreates_every_worker_for_one_failure() -> None:
    sim = running_job(failurePolicy={"restartPolicy": "RestartGroup"})
    sim.exit("llm-worker-1", 1)
    sim.converge(2)
    assert sim.status()["restarts"] == {"application": 1, "infrastructure": 0}
    assert [r["attempt"] for r in sim.status()["workerPods"]] == [1, 1, 1, 1]
    assert all(p["metadata"]["labels"][tp.ATTEMPT_LABEL] == "1" for p in sim.workers())


def test_a_pass_cut_after_its_status_write_never_double_counts() -> None:
    rng = random.Random(7)
    for trial in range(30):
        sim = running_job(failurePolicy={"maxRestarts": 100, "disruptionWindowSeconds": 0})
        expected = {"application": 0, "infrastructure": 0}
        for _ in range(6):
            victim = f"llm-worker-{rng.randrange(4)}"
            if victim not in sim.pods or sim.pods[victim]["status"]["phase"] != "Running":
                sim.converge(2)
                sim.run_all()
                sim.step()
                continue
            if rng.random() < 0.5:
                sim.exit(victim, 1)
                expected["application"] += 1
            else:
                del sim.pods[victim]
                expected["infrastructure"] += 1
            for _ in range(rng.randrange(3)):
                sim.step(cut_after_status=True)  # killed after the status write, before the pod changes
            sim.converge(2)
            sim.run_all()
            sim.step()
        assert sim.status()["restarts"] == expected, f"trial {trial}"
        assert len(sim.workers()) == 4


def test_status_lost_or_rewritten_adopts_newer_attempts_without_counting() -> None:
    sim = running_job()
    del sim.pods["llm-worker-1"]
    sim.converge(2)
    sim.job["status"]["workerPods"] = []
    sim.step()
    rec = {r["index"]: r for r in sim.status()["workerPods"]}
    assert rec[1]["attempt"] == 1 and rec[1]["uid"] == sim.pods["llm-worker-1"]["metadata"]["uid"]
    assert len(sim.workers()) == 4


def test_missing_policy_and_invalid_names_are_reported() -> None:
    sim = Sim(job_spec(checkpointPolicyRef={"name": "nope"}))
    p = sim.converge(2)  # the first pass records the run
    assert p.create == [] and sim.cond("Ready")["reason"] == "CheckpointPolicyNotFound"
    long = Sim(job_spec())
    long.job["metadata"]["name"] = "x" * 60
    p = long.step()
    assert p.create == [] and long.cond("Ready")["reason"] == "InvalidSpec"


def test_a_running_job_whose_checkpoints_stop_is_checkpoint_late_once() -> None:
    # issue 16 item 5: a failed or stuck save was only a worker's log line while training went on
    policy = CheckpointPolicySpec.model_validate({
        "schedule": {"everySeconds": 60},
        "storage": {"s3": {"bucket": "ckpt", "endpoint": "http://minio:9000", "credentialsSecretRef": {"name": "s"}}}})
    sim = Sim(job_spec(1, 1), policy)
    sim.converge(2)
    sim.run_all()
    sim.step()
    assert sim.cond("CheckpointsCurrent")["status"] == "True"
    sim.now = T0 + dt.timedelta(seconds=100)
    sim.store = StoreView(last_checkpoint={"step": 10, "uri": "s3://ckpt/ns/llm/checkpoints/step-0000000010",
                                           "time": fmt_time(T0 + dt.timedelta(seconds=90))}, export_committed=False)
    sim.step()
    assert sim.cond("CheckpointsCurrent")["status"] == "True"
    assert sim.last is not None and sim.last.requeue_after is not None and sim.last.requeue_after <= 171
    sim.now = T0 + dt.timedelta(seconds=90 + 181)  # no new commit for more than 3 x 60 s
    sim.step()
    late = sim.cond("CheckpointsCurrent")
    assert late["status"] == "False" and late["reason"] == "CheckpointLate" and "step 10" in late["message"]
    sim.now += dt.timedelta(seconds=30)
    sim.step()
    assert sim.events.count("CheckpointLate") == 1  # one Warning at the transition, not one per pass
    sim.store = StoreView(last_checkpoint={"step": 20, "time": fmt_time(sim.now)}, export_committed=False)
    sim.step()
    assert sim.cond("CheckpointsCurrent")["status"] == "True"


def test_s3_workers_stage_on_a_sized_empty_dir() -> None:
    from kubeforge.api import TrainingJobSpec
    from kubeforge.api.contract import CHECKPOINT_STAGING_DIR, ENV_CHECKPOINT_STAGING_DIR

    policy = CheckpointPolicySpec.model_validate({
        "schedule": {"everySteps": 10},
        "storage": {"s3": {"bucket": "ckpt", "credentialsSecretRef": {"name": "s"}, "stagingSizeLimit": "20Gi"}}})
    spec = TrainingJobSpec.model_validate(job_spec(1, 1))
    owner = tp.Owner(namespace="ns", name="llm", uid="u")
    pod = tp.build_worker_pod(owner, spec, policy, 0, 0)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["checkpoint-staging"]["emptyDir"] == {"sizeLimit": "20Gi"}
    c = pod["spec"]["containers"][0]
    assert {"name": "checkpoint-staging", "mountPath": CHECKPOINT_STAGING_DIR} in c["volumeMounts"]
    assert {"name": ENV_CHECKPOINT_STAGING_DIR, "value": CHECKPOINT_STAGING_DIR} in c["env"]
    volume_policy = CheckpointPolicySpec.model_validate({
        "schedule": {"everySteps": 10}, "storage": {"volume": {"claimName": "ckpt"}}})
    assert "checkpoint-staging" not in {v["name"] for v in tp.build_worker_pod(owner, spec, volume_policy, 0, 0)["spec"]["volumes"]}


HOST_PATH_POD = {"volumes": [{"name": "node-root", "hostPath": {"path": "/"}}],
                 "volumeMounts": [{"name": "node-root", "mountPath": "/host"}]}


def test_a_running_job_with_a_refused_host_path_fails_and_its_pods_go() -> None:
    """A job made before hostPath was refused (or while the admission policy was off) does not
    keep running unmanaged: it fails with the reason and its pods, which hold the node, go."""
    sim = Sim(job_spec(2, 2, pod=HOST_PATH_POD))
    sim.security = SecuritySettings(allow_host_path_volumes=True)
    sim.converge(2)
    sim.run_all()
    sim.step()
    assert len(sim.workers()) == 2 and sim.status()["phase"] == "Running"
    sim.security = SecuritySettings()  # the operator's setting is off now
    p = sim.step()
    assert sim.status()["phase"] == "Failed" and sim.status().get("completionTime")
    assert (sim.cond("Failed")["status"], sim.cond("Failed")["reason"]) == ("True", "VolumeSourceRefused")
    assert "hostPath" in sim.cond("Ready")["message"]
    assert sim.workers() == [] and {d.name for d in p.delete} >= {"llm-worker-0", "llm-worker-1"}
    assert sim.events.count("VolumeSourceRefused") == 1
    sim.step()
    assert sim.events.count("VolumeSourceRefused") == 1, "the failure is posted once"


def test_a_finished_job_with_a_host_path_stays_as_it_ended() -> None:
    sim = Sim(job_spec(1, 1, pod=HOST_PATH_POD))
    sim.job["status"] = {"phase": "Succeeded", "completionTime": fmt_time(T0), "run": "llm", "conditions": [
        {"type": "Succeeded", "status": "True", "reason": "Completed", "message": "done",
         "lastTransitionTime": fmt_time(T0)}]}
    sim.step()
    assert sim.status()["phase"] == "Succeeded" and sim.cond("Succeeded")["status"] == "True"
    assert "VolumeSourceRefused" not in sim.events
