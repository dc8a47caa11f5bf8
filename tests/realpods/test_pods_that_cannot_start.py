"""Pods that cannot start or run, on real nodes, show as such in the owner's conditions with
the kubelet's reason, never as Running or Ready: a worker image that is not there, a worker
killed for its memory limit, a server image that is not there."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cluster.test_trainingjob_controller import is_, job_status
from tests.fixtures.cluster import kubectl_json, wait_for
from tests.fixtures.realpods import ChartOperator

pytestmark = [pytest.mark.realpods, pytest.mark.timeout(900)]
MISSING = "localhost/kubeforge/missing:0"


def job(name: str, **workers: Any) -> dict[str, Any]:
    return {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
            "spec": {"workers": {"minReplicas": 1, "maxReplicas": 1, "gpusPerWorker": 1, **workers},
                     "failurePolicy": {"maxRestarts": 0},
                     "trainer": {"config": {"model": {"preset": "tiny"}, "data": {"paths": ["builtin:corpus"]},
                                            "train": {"steps": 500, "global_batch": 4, "micro_batch": 2}}}}}


def cond_of(c: Any, ns: str, kind: str, name: str, type_: str) -> dict[str, Any]:
    conds = kubectl_json(c, "get", kind, name, "-n", ns).get("status", {}).get("conditions", [])
    return next((x for x in conds if x["type"] == type_), {})


def test_a_missing_worker_image_shows_the_kubelets_reason(chart_operator: ChartOperator) -> None:
    c, ns = chart_operator.cluster, chart_operator.namespace
    body = job("no-image")
    body["spec"]["trainer"].update(image=MISSING, imagePullPolicy="Never")
    c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    running = wait_for("Running False, WorkersNotStarting", is_(lambda: (r := cond_of(
        c, ns, "trainingjob", "no-image", "Running")).get("reason") == "WorkersNotStarting" and r), 180, interval=2)
    assert running["status"] == "False" and "ErrImageNeverPull" in running["message"], running
    assert job_status(c, ns, "no-image").get("phase") != "Running"


def test_a_worker_killed_for_its_memory_limit_fails_the_job_saying_oomkilled(chart_operator: ChartOperator) -> None:
    c, ns = chart_operator.cluster, chart_operator.namespace
    body = job("oom", resources={"memory": "128Mi"})
    c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    failed = wait_for("the job Failed", is_(lambda: (f := cond_of(c, ns, "trainingjob", "oom", "Failed")).get(
        "status") == "True" and f), 300, interval=2)
    assert "OOMKilled" in failed["message"], failed
    assert cond_of(c, ns, "trainingjob", "oom", "Running").get("status") != "True"


def test_a_missing_server_image_keeps_the_service_not_ready_with_the_reason(chart_operator: ChartOperator) -> None:
    c, ns = chart_operator.cluster, chart_operator.namespace
    isvc = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "no-image"},
            "spec": {"model": {"uri": "s3://kubeforge/models/none", "s3Endpoint": "http://minio.kubeforge-local.svc:9000"},
                     "replicas": 1, "gpus": 1, "image": MISSING, "imagePullPolicy": "Never"}}
    c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(isvc))
    ready = wait_for("Ready False, ReplicasNotStarting", is_(lambda: (r := cond_of(
        c, ns, "inferenceservice", "no-image", "Ready")).get("reason") == "ReplicasNotStarting" and r), 180, interval=2)
    assert ready["status"] == "False" and "ErrImageNeverPull" in ready["message"], ready
