"""Children deleted by anyone are made again without a spec change: a TrainingJob's headless
Service (its workers' rendezvous DNS) and ConfigMap, an InferenceService's Deployment, Service,
PodDisruptionBudget and HPA."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.test_inferenceservice_controller import apply as apply_isvc
from tests.cluster.test_inferenceservice_controller import isvc, isvc_condition
from tests.cluster.test_trainingjob_controller import GpuPool, apply, cond, is_, pool, training_job
from tests.fixtures.cluster import OperatorProcess, kubectl_json, wait_for

pytestmark = pytest.mark.cluster
__all__ = ["pool"]  # the fixture


def uid(c: Any, ns: str, kind: str, name: str) -> str | None:
    out = c.kubectl("get", kind, name, "-n", ns, "-o", "jsonpath={.metadata.uid}", check=False)
    return out.stdout.strip() or None if out.returncode == 0 else None


def delete_and_wait_back(c: Any, ns: str, kind: str, name: str, timeout: float = 30) -> None:
    before = uid(c, ns, kind, name)
    assert before, f"{kind} {name} does not exist"
    c.kubectl("delete", kind, name, "-n", ns, "--wait=true")
    wait_for(f"{kind} {name} made again", lambda: (u := uid(c, ns, kind, name)) is not None and u != before, timeout)


def test_a_trainingjobs_deleted_service_and_configmap_come_back(operator: OperatorProcess, namespace: str,
                                                               pool: GpuPool) -> None:
    c = operator.cluster
    for _ in range(2):
        pool.add()
    apply(c, namespace, training_job(pool))
    wait_for("Running", is_(lambda: cond(c, namespace, "Running").get("status") == "True"), 60)
    delete_and_wait_back(c, namespace, "service", "llm")
    assert kubectl_json(c, "get", "service", "llm", "-n", namespace)["spec"]["clusterIP"] == "None"
    delete_and_wait_back(c, namespace, "configmap", "llm-config")


def test_an_inferenceservices_deleted_children_come_back(operator: OperatorProcess, namespace: str) -> None:
    c = operator.cluster
    apply_isvc(c, namespace, isvc("chat", resources={"cpu": "1", "memory": "1Gi"},
                                  autoscaling={"minReplicas": 1, "maxReplicas": 2, "metric": "CPU", "target": 80}))
    wait_for("Ready", lambda: (isvc_condition(c, namespace, "chat", "Ready") or {}).get("status") == "True", 90)
    for kind in ("service", "poddisruptionbudget", "horizontalpodautoscaler", "deployment"):
        delete_and_wait_back(c, namespace, kind, "chat-server")
    wait_for("Ready again", lambda: (isvc_condition(c, namespace, "chat", "Ready") or {}).get("status") == "True", 90)
