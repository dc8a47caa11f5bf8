"""TrainingJob controller against the real API server, scheduler and kwok GPU nodes.

Every test brings its own GPU nodes (a unique ``nvidia.com/gpu.product`` and a private
taint), so the shared nodes of other tests are never failed or filled; the nodes are
removed afterwards. Container exits are simulated by writing the pod status the kubelet
would write (phase and terminated exit code).
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from devcluster import Cluster
from kubeforge.api.common import condition
from kubeforge.api.contract import ExitCode

from tests.fixtures.cluster import OperatorProcess, kubectl_json, wait_for

pytestmark = pytest.mark.cluster
JOB = "kubeforge.dev/job-name"


class GpuPool:
    """Private kwok GPU nodes: only jobs with this pool's product and toleration land on them."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.id = uuid.uuid4().hex[:6]
        self.product = f"TEST-{self.id}"
        self.taint = {"key": "kubeforge.dev/test-pool", "value": self.id, "effect": "NoSchedule"}
        self.nodes: list[str] = []

    def add(self, gpus: int = 8) -> str:
        name = f"tj-{self.id}-{len(self.nodes)}"
        self.cluster.add_node(name, gpus=gpus)
        self.nodes.append(name)
        self.cluster.kubectl("taint", "node", name, f"{self.taint['key']}={self.id}:NoSchedule", "--overwrite")
        self.cluster.kubectl("label", "node", name, f"nvidia.com/gpu.product={self.product}", "--overwrite")
        wait_for(f"node {name} Ready", lambda: self.cluster.node_ready(name) == "True", 30)
        return name

    def remove_all(self) -> None:
        for name in self.nodes:
            self.cluster.kubectl("delete", "node", name, "--wait=false", check=False)


@pytest.fixture
def pool(cluster: Cluster) -> Iterator[GpuPool]:
    p = GpuPool(cluster)
    yield p
    p.remove_all()


def training_job(pool: GpuPool, name: str = "llm", min_r: int = 2, max_r: int = 2, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "workers": {"minReplicas": min_r, "maxReplicas": max_r, "gpusPerWorker": 8, "gpuProduct": pool.product,
                    "resources": {"cpu": "4", "memory": "16Gi"}},
        "trainer": {"config": {"model": {"preset": "tiny"}, "train": {"steps": 20}}},
        "pod": {"tolerations": [{"key": pool.taint["key"], "operator": "Exists", "effect": "NoSchedule"}]},
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name}, "spec": body}


def apply(c: Cluster, ns: str, obj: dict[str, Any]) -> None:
    c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))


def get_job(c: Cluster, ns: str, name: str = "llm") -> dict[str, Any]:
    return kubectl_json(c, "get", "trainingjob", name, "-n", ns)


def job_status(c: Cluster, ns: str, name: str = "llm") -> dict[str, Any]:
    return get_job(c, ns, name).get("status") or {}


def cond(c: Cluster, ns: str, type_: str, name: str = "llm") -> dict[str, Any]:
    return condition(job_status(c, ns, name).get("conditions"), type_) or {}


def workers(c: Cluster, ns: str, name: str = "llm") -> list[dict[str, Any]]:
    pods = kubectl_json(c, "get", "pods", "-n", ns, "-l", f"{JOB}={name},kubeforge.dev/role=worker")["items"]
    return sorted(pods, key=lambda p: p["metadata"]["name"])


def running_workers(c: Cluster, ns: str, name: str = "llm") -> list[dict[str, Any]]:
    return [p for p in workers(c, ns, name) if p["status"].get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")]


def exit_pod(c: Cluster, ns: str, name: str, code: int, message: str = "", container: str = "trainer") -> None:
    """What the kubelet writes when the container exits with ``code`` (and a termination message)."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message,
                  "startedAt": now, "finishedAt": now}
    patch = {"status": {"phase": "Succeeded" if code == 0 else "Failed", "conditions": [
        {"type": "Ready", "status": "False", "lastTransitionTime": now}],
        "containerStatuses": [{"name": container, "ready": False, "restartCount": 0, "image": "trainer",
                               "imageID": "", "state": {"terminated": terminated}}]}}
    c.kubectl("patch", "pod", name, "-n", ns, "--subresource=status", "--type=strategic", "-p", json.dumps(patch))


def events(c: Cluster, ns: str, reason: str) -> list[dict[str, Any]]:
    items = kubectl_json(c, "get", "events", "-n", ns, "--field-selector", "involvedObject.kind=TrainingJob")["items"]
    return [e for e in items if e.get("reason") == reason]


def is_(check: Callable[[], Any]) -> Callable[[], Any]:
    def safe() -> Any:
        try:
            return check()
        except (RuntimeError, KeyError, json.JSONDecodeError):
            return None
    return safe


def test_create_runs_workers_on_gpu_nodes_with_the_pod_contract(operator: OperatorProcess, namespace: str,
                                                                 pool: GpuPool) -> None:
    c = operator.cluster
    for _ in range(2):
        pool.add()
    apply(c, namespace, training_job(pool))
    wait_for("Running", is_(lambda: cond(c, namespace, "Running").get("status") == "True"), 60)
    pods = running_workers(c, namespace)
    assert [p["metadata"]["name"] for p in pods] == ["llm-worker-0", "llm-worker-1"]
    assert {p["spec"]["nodeName"] for p in pods} == set(pool.nodes)  # one 8-GPU worker per node
    spec = pods[0]["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "--nnodes=2:2" in container["command"] and f"--rdzv-endpoint=llm-rdzv.llm.{namespace}.svc:29400" in \
        container["command"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBEFORGE_JOB_NAME"] == "llm" and env["KUBEFORGE_JOB_NAMESPACE"] == namespace
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    rdzv = kubectl_json(c, "get", "pod", "llm-rdzv", "-n", namespace)
    assert rdzv["spec"]["nodeName"] not in pool.nodes
    svc = kubectl_json(c, "get", "service", "llm", "-n", namespace)
    assert svc["spec"]["clusterIP"] == "None"
    cm = kubectl_json(c, "get", "configmap", "llm-config", "-n", namespace)
    assert "preset: tiny" in cm["data"]["trainer.yaml"]
    st = job_status(c, namespace)
    assert st["phase"] == "Running" and st["workers"]["ready"] == 2 and st["observedGeneration"] == 1
    assert cond(c, namespace, "Ready")["status"] == "True"
    printed = c.kubectl("get", "trainingjob", "llm", "-n", namespace).stdout
    assert "PHASE" in printed and "Running" in printed
    assert 'kubeforge_reconcile_total{kind="TrainingJob",result="success"}' in operator.metrics()


def test_deleted_worker_is_replaced_counted_once_with_an_event(operator: OperatorProcess, namespace: str,
                                                               pool: GpuPool) -> None:
    c = operator.cluster
    for _ in range(2):
        pool.add()
    apply(c, namespace, training_job(pool))
    wait_for("2 running", is_(lambda: len(running_workers(c, namespace)) == 2), 60)
    old = kubectl_json(c, "get", "pod", "llm-worker-1", "-n", namespace)["metadata"]["uid"]
    c.kubectl("delete", "pod", "llm-worker-1", "-n", namespace, "--wait=false")
    wait_for("replacement running", is_(lambda: any(
        p["metadata"]["name"] == "llm-worker-1" and p["metadata"]["uid"] != old
        for p in running_workers(c, namespace))), 60)
    wait_for("Running again", is_(lambda: job_status(c, namespace)["phase"] == "Running"), 30)
    time.sleep(2)
    assert job_status(c, namespace)["restarts"] == {"application": 0, "infrastructure": 1}
    assert events(c, namespace, "WorkerReplaced")
    assert 'kubeforge_worker_replacements_total{reason="PodDeleted"} 1.0' in operator.metrics()


def test_failing_worker_zeros_node_moves_its_worker_within_grace(operator: OperatorProcess, namespace: str,
                                                                 pool: GpuPool) -> None:
    c = operator.cluster
    for _ in range(3):
        pool.add()
    grace = 10
    apply(c, namespace, training_job(pool, failurePolicy={"nodeFailureGraceSeconds": grace}))
    wait_for("2 running", is_(lambda: len(running_workers(c, namespace)) == 2), 60)
    node = kubectl_json(c, "get", "pod", "llm-worker-0", "-n", namespace)["spec"]["nodeName"]
    t0 = time.monotonic()
    c.fail_node(node)
    try:
        moved = wait_for("worker 0 running on another node", is_(lambda: next(
            (p for p in running_workers(c, namespace)
             if p["metadata"]["name"] == "llm-worker-0" and p["spec"]["nodeName"] != node), None)), grace + 15)
        took = time.monotonic() - t0
        assert took >= grace, "force-deleted before the grace expired"
        assert moved["spec"]["nodeName"] in pool.nodes
        st = job_status(c, namespace)
        assert st["restarts"]["infrastructure"] == 1 and st["restarts"]["application"] == 0
        assert any("NodeLost" in e["message"] or "not Ready" in e["message"] for e in events(c, namespace,
                                                                                              "WorkerReplaced"))
        print(f"node_recovery_s={took:.1f}")
    finally:
        c.restore_node(node)


def test_elastic_runs_with_min_and_grows_when_capacity_arrives(operator: OperatorProcess, namespace: str,
                                                               pool: GpuPool) -> None:
    c = operator.cluster
    for _ in range(2):
        pool.add()
    apply(c, namespace, training_job(pool, min_r=2, max_r=4,
                                     failurePolicy={"insufficientCapacityTimeoutSeconds": 600}))
    wait_for("Running with 2", is_(lambda: cond(c, namespace, "Running").get("status") == "True"), 60)
    assert job_status(c, namespace)["workers"] == {"desired": 4, "active": 4, "ready": 2, "failed": 0}
    pool.add(gpus=16)
    wait_for("4 ready", is_(lambda: job_status(c, namespace)["workers"]["ready"] == 4), 60)
    assert job_status(c, namespace)["restarts"] == {"application": 0, "infrastructure": 0}


def test_insufficient_capacity_is_reported(operator: OperatorProcess, namespace: str, pool: GpuPool) -> None:
    c = operator.cluster
    pool.add()
    apply(c, namespace, training_job(pool, min_r=2, max_r=2,
                                     failurePolicy={"insufficientCapacityTimeoutSeconds": 5}))
    wait_for("InsufficientCapacity", is_(lambda: cond(c, namespace, "Running")["reason"] == "InsufficientCapacity"),
             60)
    assert "1 of 2 workers ready" in cond(c, namespace, "Running")["message"]
    assert events(c, namespace, "InsufficientCapacity")


def test_application_failures_beyond_budget_fail_the_job(operator: OperatorProcess, namespace: str,
                                                         pool: GpuPool) -> None:
    c = operator.cluster
    for _ in range(2):
        pool.add()
    apply(c, namespace, training_job(pool, failurePolicy={"maxRestarts": 1, "disruptionWindowSeconds": 0}))
    for n in range(2):
        wait_for("2 running", is_(lambda: len(running_workers(c, namespace)) == 2), 60)
        exit_pod(c, namespace, "llm-worker-1", 1, "RuntimeError: CUDA error: an illegal memory access")
        if n == 0:
            wait_for("restart counted", is_(lambda: job_status(c, namespace)["restarts"]["application"] == 1), 30)
    wait_for("Failed", is_(lambda: cond(c, namespace, "Failed").get("status") == "True"), 30)
    failed = cond(c, namespace, "Failed")
    assert failed["reason"] == "RestartBudgetExhausted" and "illegal memory access" in failed["message"]
    st = job_status(c, namespace)
    assert st["phase"] == "Failed" and st["restarts"]["application"] == 2 and st["completionTime"]
    wait_for("pods removed", is_(lambda: not running_workers(c, namespace)), 30)


def test_configuration_error_fails_at_once(operator: OperatorProcess, namespace: str, pool: GpuPool) -> None:
    c = operator.cluster
    for _ in range(2):
        pool.add()
    apply(c, namespace, training_job(pool, failurePolicy={"maxRestarts": 5}))
    wait_for("2 running", is_(lambda: len(running_workers(c, namespace)) == 2), 60)
    exit_pod(c, namespace, "llm-worker-0", int(ExitCode.CONFIG_ERROR),
             "kubeforge: configuration error: invalid trainer config: train.stepz: unknown key")
    wait_for("Failed", is_(lambda: cond(c, namespace, "Failed").get("status") == "True"), 30)
    failed = cond(c, namespace, "Failed")
    assert failed["reason"] == "ConfigurationError" and "train.stepz: unknown key" in failed["message"]
    assert job_status(c, namespace)["restarts"] == {"application": 0, "infrastructure": 0}


def test_suspend_keeps_status_and_resume_recreates(operator: OperatorProcess, namespace: str, pool: GpuPool) -> None:
    c = operator.cluster
    for _ in range(2):
        pool.add()
    apply(c, namespace, training_job(pool))
    wait_for("2 running", is_(lambda: len(running_workers(c, namespace)) == 2), 60)
    c.kubectl("patch", "trainingjob", "llm", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for("Suspended", is_(lambda: job_status(c, namespace)["phase"] == "Suspended"), 30)
    wait_for("no pods", is_(lambda: not workers(c, namespace) and not kubectl_json(
        c, "get", "pods", "-n", namespace)["items"]), 30)
    assert cond(c, namespace, "Suspended")["status"] == "True"
    c.kubectl("patch", "trainingjob", "llm", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for("Running again", is_(lambda: job_status(c, namespace)["phase"] == "Running"), 60)
    assert cond(c, namespace, "Suspended")["reason"] == "Resumed"
    assert job_status(c, namespace)["restarts"] == {"application": 0, "infrastructure": 0}


def test_active_deadline_then_ttl_deletes_the_job(operator: OperatorProcess, namespace: str, pool: GpuPool) -> None:
    c = operator.cluster
    pool.add()
    apply(c, namespace, training_job(pool, min_r=1, max_r=1, activeDeadlineSeconds=5, ttlSecondsAfterFinished=3))
    wait_for("Failed by deadline", is_(lambda: cond(c, namespace, "Failed").get("reason") == "DeadlineExceeded"), 60)
    wait_for("job deleted by ttl", lambda: c.kubectl("get", "trainingjob", "llm", "-n", namespace,
                                                     check=False).returncode != 0, 30)


def test_success_when_worker_zero_exits_zero(operator: OperatorProcess, namespace: str, pool: GpuPool) -> None:
    c = operator.cluster
    for _ in range(2):
        pool.add()
    apply(c, namespace, training_job(pool))
    wait_for("2 running", is_(lambda: len(running_workers(c, namespace)) == 2), 60)
    exit_pod(c, namespace, "llm-worker-1", 0)
    time.sleep(3)
    assert cond(c, namespace, "Succeeded").get("status") != "True"  # not any worker: worker 0
    exit_pod(c, namespace, "llm-worker-0", 0)
    wait_for("Succeeded", is_(lambda: cond(c, namespace, "Succeeded").get("status") == "True"), 30)
    st = job_status(c, namespace)
    assert st["phase"] == "Succeeded" and st["completionTime"]
    wait_for("store pod removed", lambda: c.kubectl("get", "pod", "llm-rdzv", "-n", namespace,
                                                    check=False).returncode != 0, 30)
