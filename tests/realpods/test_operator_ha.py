"""The chart's operator with 2 replicas (kopf peering) on real pods: exactly one replica
handles resources, and deleting it hands the work to the other, which reconciles a job
created after the loss."""

from __future__ import annotations

import json
import re

import pytest

from tests.fixtures.cluster import kubectl_json, wait_for
from tests.fixtures.realpods import ChartOperator

pytestmark = [pytest.mark.realpods, pytest.mark.timeout(900)]


def job(name: str) -> dict[str, object]:
    return {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
            "spec": {"workers": {"minReplicas": 1, "maxReplicas": 1, "gpusPerWorker": 1}, "suspend": True,
                     "trainer": {"config": {"model": {"preset": "tiny"}, "data": {"paths": ["builtin:corpus"]},
                                            "train": {"steps": 10, "global_batch": 4, "micro_batch": 2}}}}}


def observed(op: ChartOperator, name: str) -> bool:
    obj = kubectl_json(op.cluster, "get", "trainingjob", name, "-n", op.namespace)
    return bool(obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"])


def pod_log(op: ChartOperator, pod: str) -> str:
    out = op.cluster.kubectl("logs", "-n", op.namespace, pod, check=False)
    return out.stdout + out.stderr


def test_two_replicas_one_active_survive_deleting_the_active_one(chart_operator: ChartOperator) -> None:
    op = chart_operator
    op.install("--set", "replicaCount=2")
    wait_for("two operator pods Ready", lambda: sum(
        1 for p in op.pods() if p["metadata"].get("deletionTimestamp") is None
        and all(c.get("ready") for c in p.get("status", {}).get("containerStatuses") or [{}])) == 2, 180, interval=2)
    op.cluster.kubectl("apply", "-n", op.namespace, "-f", "-", input=json.dumps(job("first")))
    wait_for("the first job reconciled by the active replica", lambda: observed(op, "first"), 120, interval=2)
    pods = [p["metadata"]["name"] for p in op.pods() if p["metadata"].get("deletionTimestamp") is None]
    logs = {p: pod_log(op, p) for p in pods}
    priority = {p: int(m[1]) for p, text in logs.items() if (m := re.search(r"with priority (\d+)", text))}
    assert len(priority) == 2 and len(set(priority.values())) == 2, {p: t[-1500:] for p, t in logs.items()}
    active = max(priority, key=priority.__getitem__)
    standby = min(priority, key=priority.__getitem__)
    # the standby knows it is one: kopf paused it in favour of the active replica
    wait_for("the standby paused", lambda: "Pausing" in pod_log(op, standby), 60, interval=2)
    op.cluster.kubectl("delete", "pod", "-n", op.namespace, active, "--wait=false")
    op.cluster.kubectl("apply", "-n", op.namespace, "-f", "-", input=json.dumps(job("second")))
    wait_for("the second job reconciled by the standby", lambda: observed(op, "second"), 240, interval=2)
