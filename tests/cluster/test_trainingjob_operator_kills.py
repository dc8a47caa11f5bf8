"""Kill the operator (SIGKILL) 20 times at random moments of a job's life, while workers
are deleted and fail around it: at the end there are no duplicate or orphaned pods, the
restart counters equal what was done to the pods exactly, and the job still succeeds."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from tests.cluster.test_trainingjob_controller import (
    GpuPool,
    apply,
    cond,
    exit_pod,
    is_,
    job_status,
    pool,
    running_workers,
    training_job,
    workers,
)
from tests.fixtures.cluster import OperatorProcess, kubectl_json, wait_for

pytestmark = pytest.mark.cluster
__all__ = ["pool"]  # the fixture, shared with the controller tests


def recorded_running(c: Any, ns: str) -> list[dict[str, Any]]:
    """Running workers whose uid the job's status already records (a pod the operator
    created and was killed before recording is adopted uncounted; see docs/trainingjob.md)."""
    uids = {r.get("uid") for r in job_status(c, ns).get("workerPods", [])}
    return [p for p in running_workers(c, ns) if p["metadata"]["uid"] in uids]


def test_kill_the_operator_20_times(operator: OperatorProcess, namespace: str, pool: GpuPool) -> None:
    c = operator.cluster
    rng = random.Random(20)
    for _ in range(3):
        pool.add()
    apply(c, namespace, training_job(pool, failurePolicy={"maxRestarts": 100, "disruptionWindowSeconds": 0}))
    wait_for("2 running", is_(lambda: len(recorded_running(c, namespace)) == 2), 60)
    expected = {"application": 0, "infrastructure": 0}

    def disturb() -> None:
        if rng.random() < 0.2:
            return
        deadline = time.monotonic() + 4
        while not (pods := recorded_running(c, namespace)) and time.monotonic() < deadline:
            time.sleep(0.3)
        if not pods:
            return
        victim = rng.choice(pods)["metadata"]["name"]
        if rng.random() < 0.5:
            exit_pod(c, namespace, victim, 1, "RuntimeError: boom")
            expected["application"] += 1
        else:
            c.kubectl("delete", "pod", victim, "-n", namespace, "--wait=false")
            expected["infrastructure"] += 1

    for _ in range(20):
        disturb()
        time.sleep(rng.uniform(0.0, 2.0))
        operator.stop(kill=True)
        disturb()  # while the operator is down
        operator.start()
        time.sleep(rng.uniform(0.0, 1.5))

    def settled() -> bool:
        st = job_status(c, namespace)
        pods = kubectl_json(c, "get", "pods", "-n", namespace)["items"]
        return (st.get("restarts") == expected and len(running_workers(c, namespace)) == 2
                and len(pods) == 3 and st.get("phase") == "Running")

    wait_for(f"restarts == {expected}, 2 workers + store, Running", is_(settled), 90)
    time.sleep(3)
    assert settled(), job_status(c, namespace)
    names = sorted(p["metadata"]["name"] for p in kubectl_json(c, "get", "pods", "-n", namespace)["items"])
    assert names == ["llm-rdzv", "llm-worker-0", "llm-worker-1"]
    assert sum(expected.values()) >= 15, expected  # the run really disturbed the job
    exit_pod(c, namespace, "llm-worker-1", 0)
    exit_pod(c, namespace, "llm-worker-0", 0)
    wait_for("Succeeded", is_(lambda: cond(c, namespace, "Succeeded").get("status") == "True"), 30)
    assert job_status(c, namespace)["restarts"] == expected
    assert len(workers(c, namespace)) == 2
