"""An InferenceService scaled down under load through its ClusterIP Service (kube-proxy on a
real node) drops no request: the leaving pod stops receiving traffic during its preStop
sleep and drains what it accepted before it exits. The client runs in a real node's network
namespace, as a pod would; its loop is bounded in count and time."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from devcluster import Cluster

from tests.e2e.test_inferenceservice_contract import save_tiny_model
from tests.fixtures.cluster import kubectl_json, wait_for
from tests.fixtures.realpods import ChartOperator, s3_secret

pytestmark = [pytest.mark.realpods, pytest.mark.timeout(900)]

CLIENT = r"""
import json, sys, threading, time, urllib.error, urllib.request
url, seconds, threads = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
body = json.dumps({"model": "scaled", "prompt": "Once upon a time", "max_tokens": 24}).encode()
ok, failed, errors = [0], [0], []
stop = time.monotonic() + seconds
lock = threading.Lock()
def loop():
    for _ in range(10000):
        if time.monotonic() > stop:
            return
        try:
            req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                json.loads(r.read())
            with lock:
                ok[0] += 1
        except Exception as e:
            with lock:
                failed[0] += 1
                errors.append(repr(e)[:200])
ts = [threading.Thread(target=loop) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps({"ok": ok[0], "failed": failed[0], "errors": errors[:10]}))
"""


def upload_model(c: Cluster, directory: Path, prefix: str) -> str:
    import boto3

    s3 = c.s3_settings()
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], aws_access_key_id=s3["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=s3["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    for f in directory.iterdir():
        client.upload_file(str(f), s3["KUBEFORGE_S3_BUCKET"], f"{prefix}/{f.name}")
    return f"s3://{s3['KUBEFORGE_S3_BUCKET']}/{prefix}"


def ready_replicas(c: Cluster, ns: str) -> int:
    return int(kubectl_json(c, "get", "inferenceservice", "scaled", "-n", ns).get("status", {}).get("readyReplicas") or 0)


def test_scaling_down_under_load_drops_no_request(chart_operator: ChartOperator, tmp_path: Path) -> None:
    c, ns = chart_operator.cluster, chart_operator.namespace
    s3_secret(c, ns)
    uri = upload_model(c, save_tiny_model(tmp_path / "model"), f"models/scaled-{uuid.uuid4().hex[:6]}")
    isvc = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "scaled"},
            "spec": {"model": {"uri": uri, "s3Endpoint": "http://minio.kubeforge-local.svc:9000",
                               "credentialsSecretRef": {"name": "kubeforge-s3"}},
                     "replicas": 2, "gpus": 1, "engine": {"shutdownTimeoutSeconds": 30},
                     "lifecycle": {"preStopSleepSeconds": 5}}}
    c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(isvc))
    wait_for("2 ready replicas", lambda: ready_replicas(c, ns) == 2, 300, interval=2)
    ip = kubectl_json(c, "get", "service", "scaled-server", "-n", ns)["spec"]["clusterIP"]
    client = subprocess.Popen(["ip", "netns", "exec", c.nodes.net.netns(0), sys.executable, "-c", CLIENT,
                               f"http://{ip}:8000/v1/completions", "40", "8"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(10)
        c.kubectl("scale", "inferenceservice", "scaled", "-n", ns, "--replicas=1")
        wait_for("one server pod left", lambda: len([p for p in kubectl_json(
            c, "get", "pods", "-n", ns, "-l", "kubeforge.dev/inferenceservice=scaled")["items"]]) == 1, 120, interval=1)
        out, err = client.communicate(timeout=180)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 0, err[-2000:]
    result = json.loads(out)
    assert result["failed"] == 0, result
    assert result["ok"] > 20, result
