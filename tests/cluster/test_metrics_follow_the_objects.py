"""The operator's gauges describe the objects that exist and what they do now: a deleted
InferenceService stops counting as Ready, and a TrainingJob that writes no checkpoint (suspended,
finished) has no checkpoint gauges, so KubeforgeCheckpointStale cannot fire for it."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
from kubeforge.store import open_store

from tests.cluster.test_checkpointpolicy import _commit, policy
from tests.cluster.test_inferenceservice_controller import apply, delete_isvc, isvc, isvc_condition
from tests.fixtures.cluster import OperatorProcess, kubectl_json, wait_for

pytestmark = pytest.mark.cluster


def sample(op: OperatorProcess, name: str, **labels: str) -> float | None:
    """The value of one series on the operator's /metrics, None when it is not exported."""
    for line in op.metrics().splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m[1] or "") for k, v in labels.items()):
            return float(m[2])
    return None


def test_a_deleted_inferenceservice_stops_counting_as_ready(operator: OperatorProcess, namespace: str) -> None:
    # the per-object series: the total also counts the services of other tests sharing this operator
    c = operator.cluster
    labels = {"namespace": namespace, "inferenceservice": "served"}
    apply(c, namespace, isvc("served"))
    wait_for("Ready", lambda: (isvc_condition(c, namespace, "served", "Ready") or {}).get("status") == "True", 90)
    wait_for("counted as Ready", lambda: sample(operator, "kubeforge_inferenceservice_ready", **labels), 30)
    assert (sample(operator, "kubeforge_inferenceservices_ready") or 0) >= 1.0
    delete_isvc(c, namespace, "served")
    wait_for("its series gone", lambda: sample(operator, "kubeforge_inferenceservice_ready", **labels) is None, 30)


def test_checkpoint_gauges_exist_only_while_the_job_checkpoints(operator: OperatorProcess, namespace: str,
                                                               tmp_path: Path) -> None:
    c = operator.cluster
    s3 = c.s3_settings()
    prefix = f"gauges-{uuid.uuid4().hex[:6]}"
    c.kubectl("create", "secret", "generic", "s3-creds", "-n", namespace,
              f"--from-literal=AWS_ACCESS_KEY_ID={s3['AWS_ACCESS_KEY_ID']}",
              f"--from-literal=AWS_SECRET_ACCESS_KEY={s3['AWS_SECRET_ACCESS_KEY']}")
    store = open_store(f"s3://kubeforge/{prefix}", endpoint_url=s3["AWS_ENDPOINT_URL"],
                       access_key_id=s3["AWS_ACCESS_KEY_ID"], secret_access_key=s3["AWS_SECRET_ACCESS_KEY"])
    pol = policy("p", s3["AWS_ENDPOINT_URL"], prefix)
    pol["spec"]["schedule"] = {"everySeconds": 600}
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pol))
    job = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "gauged"},
           "spec": {"checkpointPolicyRef": {"name": "p"},
                    "trainer": {"config": {"model": {"preset": "tiny"}, "train": {"steps": 20}}}}}
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))
    uid = kubectl_json(c, "get", "trainingjob", "gauged", "-n", namespace)["metadata"]["uid"]
    _commit(store, namespace, f"gauged/runs/{uid}", 10, tmp_path)  # the job's own run
    labels = {"namespace": namespace, "trainingjob": "gauged"}
    wait_for("checkpoint gauges while it runs", lambda: sample(
        operator, "kubeforge_trainingjob_last_checkpoint_timestamp_seconds", **labels) and sample(
        operator, "kubeforge_trainingjob_checkpoint_interval_seconds", **labels) == 600.0, 60)
    c.kubectl("patch", "trainingjob", "gauged", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for("no checkpoint gauges while suspended", lambda: sample(
        operator, "kubeforge_trainingjob_last_checkpoint_timestamp_seconds", **labels) is None and sample(
        operator, "kubeforge_trainingjob_checkpoint_interval_seconds", **labels) is None, 60)
