"""The operator → serving pod contract, end to end: the operator builds a Deployment for a
TrainingJob's export on the cluster's MinIO; the pod's exact command, arguments and
environment (Secrets resolved as the kubelet would) run here as a local process against a
tiny exported model. It must load the export, turn ready, answer completions and drain on
SIGTERM without cutting off an accepted request.

Only what a container itself provides is substituted: each volumeMount's path becomes a
temporary directory (the emptyDirs), and port 8000 a free local port (the pod's network
namespace)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devcluster import Cluster

from tests.cluster.test_inferenceservice_controller import (
    apply,
    delete_isvc,
    get,
    isvc,
    job_store,
    s3_objects,
)
from tests.fixtures.cluster import OperatorProcess, kubectl_json, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


@pytest.fixture
def isvc_operator(crds: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(crds, tmp_path / "operator.log", namespaces=(namespace,))
    op.start()
    try:
        yield op
    finally:
        for item in kubectl_json(crds, "get", "inferenceservices", "-n", namespace).get("items", []):
            delete_isvc(crds, namespace, item["metadata"]["name"])
        op.stop()


def save_tiny_model(directory: Path) -> Path:
    from kubeforge_runtime.model.hf import save_hf
    from kubeforge_runtime.model.llama import Llama, preset
    from kubeforge_runtime.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    model = Llama(preset("tiny", initializer_range=0.2))
    model.init_weights(7)
    save_hf(model, directory, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def secret_data(cluster: Cluster, ns: str, name: str) -> dict[str, str]:
    obj = get(cluster, ns, "secret", name)
    assert obj is not None, f"Secret {name} the pod needs does not exist"
    return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}


def pod_process(cluster: Cluster, ns: str, deployment: dict[str, Any], root: Path,
                port: int) -> tuple[list[str], dict[str, str]]:
    """The container's argv and environment, as the kubelet would start it."""
    pod = deployment["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    mounts = {m["mountPath"]: root / m["name"] for m in ctr.get("volumeMounts", [])}
    for path in mounts.values():
        path.mkdir(parents=True, exist_ok=True)

    def local(value: str) -> str:
        for mount, path in mounts.items():
            if value == mount or value.startswith(mount + "/"):
                return str(path) + value[len(mount):]
        return value

    env: dict[str, str] = {}
    for source in ctr.get("envFrom", []):
        env.update(secret_data(cluster, ns, source["secretRef"]["name"]))
    for var in ctr.get("env", []):
        if "value" in var:
            env[var["name"]] = local(var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secret_data(cluster, ns, ref["name"])[ref["key"]]
    argv = [local(a) for a in ctr["command"] + ctr["args"]]
    argv[argv.index("--port") + 1] = str(port)
    # the image's PATH: `python` is the interpreter with kubeforge_runtime installed
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return argv, env


def http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 60) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw.startswith(b"{") else raw.decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_pod_command_serves_the_export_and_drains(isvc_operator: OperatorProcess, namespace: str,
                                                       tmp_path: Path) -> None:
    c = isvc_operator.cluster
    prefix = f"isvc-contract/{uuid.uuid4().hex[:8]}"
    for obj in s3_objects(c, namespace, prefix):
        apply(c, namespace, obj)
    run = f"tiny/runs/{(get(c, namespace, 'trainingjob', 'tiny') or {})['metadata']['uid']}"  # the job's own run
    marker = job_store(c, prefix).write_export(namespace, run, save_tiny_model(tmp_path / "export"), step=42)
    apply(c, namespace, isvc("chat", gpus=0, model={"trainingJobRef": {"name": "tiny"},
                                                    "credentialsSecretRef": {"name": "s3"}},
                             engine={"numBlocks": 64, "maxNumSeqs": 8, "shutdownTimeoutSeconds": 20},
                             lifecycle={"preStopSleepSeconds": 1}))
    deployment = wait_for("Deployment", lambda: get(c, namespace, "deployment", "chat-server"), 60)
    assert deployment["spec"]["template"]["metadata"]["annotations"]["kubeforge.dev/model-revision"] == marker.time

    port = free_port()
    argv, env = pod_process(c, namespace, deployment, tmp_path / "pod", port)
    assert argv[:3] == ["python", "-m", "kubeforge_runtime.serve"]
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                return http("GET", f"{base}/health", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for("/health ready", healthy, 120, 0.5)
        # the export was fetched into the model-cache emptyDir, checked against its marker
        assert any((tmp_path / "pod" / "model-cache").rglob("config.json"))
        status, out = http("POST", f"{base}/v1/completions",
                           {"model": "chat", "prompt": "Hello", "max_tokens": 8, "temperature": 0})
        assert status == 200, out
        assert out["choices"][0]["text"] and out["usage"]["completion_tokens"] == 8

        # SIGTERM with a request in flight: it completes, /health and new requests get 503, exit 0
        result: dict[str, Any] = {}
        inflight = threading.Thread(target=lambda: result.update(r=http("POST", f"{base}/v1/completions", {
            "model": "chat", "prompt": "a long answer", "max_tokens": 200, "temperature": 0, "ignore_eos": True})))
        inflight.start()

        def running() -> bool:
            status, text = http("GET", f"{base}/metrics", timeout=5)
            return status == 200 and any(line.startswith("vllm:num_requests_running") and line.endswith(" 1.0")
                                         for line in str(text).splitlines())

        wait_for("the request to be running", running, 30, 0.05)
        proc.send_signal(signal.SIGTERM)
        wait_for("/health 503 while draining", lambda: http("GET", f"{base}/health", timeout=5)[0] == 503, 5, 0.05)
        assert inflight.is_alive(), "the in-flight request ended before the drain could be observed"
        assert http("POST", f"{base}/v1/completions", {"model": "chat", "prompt": "x", "max_tokens": 2},
                    timeout=5)[0] == 503
        inflight.join(60)
        assert proc.wait(60) == 0, (tmp_path / "server.log").read_text()[-3000:]
        status, out = result["r"]
        assert status == 200, out
        assert out["usage"]["completion_tokens"] == 200
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
