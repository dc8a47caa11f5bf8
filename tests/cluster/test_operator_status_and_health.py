"""The operator process: health and metrics endpoints, and a status with observedGeneration
and a Ready condition on every example it is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from devcluster import Cluster

from tests.fixtures.cluster import OperatorProcess, kubectl_json, wait_for

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]


def _status_written(cluster: Cluster, ns: str, kind: str, name: str) -> dict[str, Any] | None:
    obj = kubectl_json(cluster, "get", f"{kind}.kubeforge.dev", name, "-n", ns)
    status = obj.get("status") or {}
    if status.get("observedGeneration") != obj["metadata"]["generation"]:
        return None
    ready = [c for c in status.get("conditions", []) if c["type"] == "Ready"]
    return status if ready else None


def test_operator_writes_status_on_every_example(operator: OperatorProcess, namespace: str) -> None:
    c = operator.cluster
    c.kubectl("create", "secret", "generic", "kubeforge-s3", "-n", namespace,
              "--from-literal=AWS_ACCESS_KEY_ID=x", "--from-literal=AWS_SECRET_ACCESS_KEY=y")
    objects = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        c.kubectl("apply", "-n", namespace, "-f", str(path))
        objects += [(d["kind"].lower(), d["metadata"]["name"]) for d in yaml.safe_load_all(path.read_text()) if d]
    for kind, name in objects:
        status = wait_for(f"status of {kind}/{name}", lambda kind=kind, name=name: _status_written(c, namespace, kind, name), 60)
        ready = next(cond for cond in status["conditions"] if cond["type"] == "Ready")
        assert ready["reason"] and ready["lastTransitionTime"], ready
    metrics = operator.metrics()
    assert 'kubeforge_reconcile_total{kind="TrainingJob",result="success"}' in metrics


def test_operator_health_endpoint_fails_when_stopped(operator: OperatorProcess) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=5) as r:
        assert r.status == 200
    operator.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=2)
