"""InferenceService spec.logging against the real API server and the cluster's MinIO: the
servers get the capture flags, status and CaptureReady say where traffic goes, the operator's
drift pass reads the servers' profiles and the export's baseline from the store and sets
DriftDetected, status.drift and kubeforge_drift_psi; removing spec.logging takes all of it away."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubeforge.controllers.inferenceservice.plan import DRIFT_INTERVAL_S
from kubeforge.store import flywheel
from kubeforge.store.flywheel import Profile

from tests.cluster.test_inferenceservice_controller import (
    apply,
    cond,
    fake_export,
    get,
    isvc,
    isvc_operator,  # noqa: F401 - the fixture
    job_store,
    s3_objects,
)
from tests.fixtures.cluster import OperatorProcess, kubectl_json, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def prompts(length: int, token: int, n: int) -> Profile:
    p = Profile()
    for _ in range(n):
        p.add([token] * length)
    return p


def drift_series(op: OperatorProcess, namespace: str) -> dict[str, float]:
    out = {}
    for line in op.metrics().splitlines():
        if line.startswith("kubeforge_drift_psi{") and f'namespace="{namespace}"' in line:
            feature = line.split('feature="')[1].split('"')[0]
            out[feature] = float(line.rsplit(" ", 1)[1])
    return out


def test_capture_is_rendered_and_drift_measured_from_the_store(isvc_operator: OperatorProcess,  # noqa: F811
                                                               namespace: str, tmp_path: Path) -> None:
    c = isvc_operator.cluster
    prefix = f"isvc-capture/{uuid.uuid4().hex[:8]}"
    for obj in s3_objects(c, namespace, prefix):
        apply(c, namespace, obj)
    store = job_store(c, prefix)
    run = f"tiny/runs/{(get(c, namespace, 'trainingjob', 'tiny') or {})['metadata']['uid']}"
    export = fake_export(tmp_path / "export", "one")
    (export / flywheel.BASELINE_PROFILE_NAME).write_bytes(prompts(12, 3, 300).to_json())
    store.write_export(namespace, run, export, step=10)
    logging = {"sampleRate": 0.5, "store": {"checkpointPolicyRef": {"name": "ckpt"},
                                            "credentialsSecretRef": {"name": "s3"}},
               "drift": {"minPrompts": 100}}
    apply(c, namespace, isvc("chat", model={"trainingJobRef": {"name": "tiny"}, "credentialsSecretRef": {"name": "s3"}},
                             logging=logging))

    capture_uri = f"s3://{c.s3_settings()['KUBEFORGE_S3_BUCKET']}/{prefix}/{namespace}/chat/capture"
    st = wait_for("CaptureReady", lambda: (x := get(c, namespace, "inferenceservice", "chat")) and
                  (cond(x, "CaptureReady") or {}).get("status") == "True" and x["status"], 60)
    assert st["capture"] == {"uri": capture_uri, "sampleRate": 0.5}
    assert (cond({"status": st}, "DriftDetected") or {}).get("status") == "Unknown"
    dep = wait_for("Deployment", lambda: get(c, namespace, "deployment", "chat-server"), 30)
    ctr = dep["spec"]["template"]["spec"]["containers"][0]
    args = ctr["args"]
    assert args[args.index("--capture-uri") + 1] == capture_uri
    assert args[args.index("--capture-sample-rate") + 1] == "0.5"
    assert args[args.index("--capture-s3-endpoint") + 1] == c.s3_settings()["AWS_ENDPOINT_URL"]
    env = {e["name"]: e for e in ctr["env"]}
    assert env["KUBEFORGE_CAPTURE_AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["KUBEFORGE_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert len(env["KUBEFORGE_FEEDBACK_KEY"]["value"]) == 64

    # two servers' live profiles, far from the baseline: long prompts of other tokens
    capture = flywheel.capture_prefix(namespace, "chat")
    for writer in ("chat-server-a", "chat-server-b"):
        store.backend.put_bytes(flywheel.profile_key(capture, writer), prompts(900, 40, 80).to_json())
    drift = wait_for("DriftDetected True", lambda: (x := get(c, namespace, "inferenceservice", "chat")) and
                     (cond(x, "DriftDetected") or {}).get("status") == "True" and x["status"],
                     DRIFT_INTERVAL_S * 2 + 30, 2)
    assert cond({"status": drift}, "DriftDetected")["reason"] == "MajorDrift"  # type: ignore[index]
    assert drift["drift"]["level"] == "major" and drift["drift"]["prompts"] == 160
    assert drift["drift"]["baseline"] == f"{store.export_uri(namespace, run)}/{flywheel.BASELINE_PROFILE_NAME}"
    series = wait_for("kubeforge_drift_psi", lambda: drift_series(isvc_operator, namespace), 10)
    assert set(series) == {"prompt_length", "token_frequency"} and min(series.values()) > 0.25
    events = kubectl_json(c, "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=chat")
    assert "MajorDrift" in {e["reason"] for e in events["items"]}

    # logging removed: no capture flags, no capture status or conditions, no series
    c.kubectl("patch", "inferenceservice", "chat", "-n", namespace, "--type=json",
              "-p", json.dumps([{"op": "remove", "path": "/spec/logging"}]))

    def gone() -> dict[str, Any] | None:
        x = get(c, namespace, "inferenceservice", "chat")
        if not x or "capture" in x["status"] or "drift" in x["status"] or cond(x, "CaptureReady"):
            return None
        return x

    wait_for("capture gone from status", gone, 30)
    wait_for("no capture flags", lambda: "--capture-uri" not in (
        get(c, namespace, "deployment", "chat-server") or {})["spec"]["template"]["spec"]["containers"][0]["args"], 30)
    assert cond(gone(), "DriftDetected") is None
    wait_for("no drift series", lambda: not drift_series(isvc_operator, namespace), 10)
