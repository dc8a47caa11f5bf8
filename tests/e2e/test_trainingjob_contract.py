"""The operator and the trainer agree: the pods the operator creates for a 2-worker `tiny`
job (examples/02), run as local processes with their exact command and environment,
train to completion against the cluster's MinIO, checkpoint and export; fed the processes'
real exit codes, the operator marks the job Succeeded.

Rewritten, and only these: the rendezvous host (the store pod's DNS name → 127.0.0.1, on a
free port), the config mount (/etc/kubeforge → a temp dir), ``python`` → this venv's
interpreter. The rendezvous store pod's own command runs locally too.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeforge.api.contract import CHECKPOINT_STAGING_DIR, CONFIG_MOUNT_DIR, RENDEZVOUS_PORT
from kubeforge.store import open_store
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.test_trainingjob_controller import cond, exit_pod, is_, job_status
from tests.fixtures.cluster import REPO, OperatorProcess, free_port, kubectl_json, wait_for

pytestmark = pytest.mark.cluster
TRAIN_TIMEOUT_S = 420


def _local_env(c: Any, ns: str, pod: dict[str, Any], config_dir: Path) -> dict[str, str]:
    container = pod["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        secret = kubectl_json(c, "get", "secret", source["secretRef"]["name"], "-n", ns)
        env.update({k: base64.b64decode(v).decode() for k, v in secret["data"].items()})
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            raise AssertionError(f"unexpected env source {e}")
    # the pod's mounts → temp dirs: the config, and the checkpoint staging emptyDir
    staging = str(config_dir.parent / "staging")
    return {k: v.replace(CONFIG_MOUNT_DIR, str(config_dir)).replace(CHECKPOINT_STAGING_DIR, staging)
            for k, v in env.items()}


def _local_command(command: list[str], endpoint: str, config_dir: Path) -> list[str]:
    out = [sys.executable if command[0] == "python" else command[0]]
    for arg in command[1:]:
        arg = arg.replace(CONFIG_MOUNT_DIR, str(config_dir))
        if arg.startswith("--rdzv-endpoint="):
            arg = f"--rdzv-endpoint={endpoint}"
        out.append(arg)
    return out


@pytest.mark.parametrize("async_save", [False, True], ids=["sync-save", "async-save"])
def test_operator_pods_train_tiny_to_completion_and_the_job_succeeds(operator: OperatorProcess, namespace: str,
                                                                     tmp_path: Path, async_save: bool) -> None:
    c = operator.cluster
    s3 = c.s3_settings()
    prefix = f"contract-{uuid.uuid4().hex[:6]}"
    c.kubectl("create", "secret", "generic", "s3-creds", "-n", namespace,
              f"--from-literal=AWS_ACCESS_KEY_ID={s3['AWS_ACCESS_KEY_ID']}",
              f"--from-literal=AWS_SECRET_ACCESS_KEY={s3['AWS_SECRET_ACCESS_KEY']}")
    policy = yaml.safe_load((REPO / "examples/01-checkpointpolicy.yaml").read_text())
    policy["spec"]["schedule"] = {"everySteps": 10, "asyncSave": async_save}
    policy["spec"]["storage"]["s3"].update(endpoint=s3["AWS_ENDPOINT_URL"], prefix=prefix,
                                           bucket=s3["KUBEFORGE_S3_BUCKET"], credentialsSecretRef={"name": "s3-creds"})
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(policy))
    job = yaml.safe_load((REPO / "examples/02-trainingjob-tiny.yaml").read_text())
    name = job["metadata"]["name"]
    spec = job["spec"]
    # CPU workers (one process each) so the exact command runs here; two of them
    spec["workers"].update(minReplicas=2, maxReplicas=2, gpusPerWorker=0)
    spec["workers"].pop("gpuProduct")
    spec["trainer"]["config"]["train"].update(steps=24, global_batch=4, micro_batch=2)
    spec["trainer"]["config"]["data"]["seq_len"] = 64
    spec["trainer"]["config"]["schedule"]["warmup_steps"] = 2
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))

    def pods_created() -> list[dict[str, Any]] | None:
        items = kubectl_json(c, "get", "pods", "-n", namespace, "-l", f"kubeforge.dev/job-name={name}")["items"]
        return items if len(items) == 3 else None

    pods = {p["metadata"]["name"]: p for p in wait_for("store and 2 worker pods", is_(pods_created), 60)}
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    cm = kubectl_json(c, "get", "configmap", f"{name}-config", "-n", namespace)
    for file, text in cm["data"].items():
        (config_dir / file).write_text(text)
    port = free_port()
    rdzv_cmd = pods[f"{name}-rdzv"]["spec"]["containers"][0]["command"]
    assert rdzv_cmd[-2:] == ["--port", str(RENDEZVOUS_PORT)]
    procs: list[subprocess.Popen[bytes]] = []
    logs = {n: open(tmp_path / f"{n}.log", "wb") for n in pods}  # noqa: SIM115 (closed in finally)
    try:
        procs.append(subprocess.Popen([sys.executable, *rdzv_cmd[1:-1], str(port)], stdout=logs[f"{name}-rdzv"],
                                      stderr=subprocess.STDOUT, start_new_session=True))
        time.sleep(3)
        workers = {}
        for i in range(2):
            pod = pods[f"{name}-worker-{i}"]
            env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **_local_env(c, namespace, pod, config_dir)}
            env["KUBEFORGE_METRICS_PORT"] = str(free_port())  # two "pods" share this host's ports
            cmd = _local_command(pod["spec"]["containers"][0]["command"], f"127.0.0.1:{port}", config_dir)
            workers[i] = subprocess.Popen(cmd, env=env, stdout=logs[pod["metadata"]["name"]], stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=tmp_path)
            procs.append(workers[i])
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        codes: dict[int, int] = {}
        while len(codes) < 2 and time.monotonic() < deadline:
            for i, p in workers.items():
                if i not in codes and p.poll() is not None:
                    codes[i] = p.returncode
            time.sleep(1)
        tails = {n: (tmp_path / f"{n}.log").read_text(errors="replace")[-3000:] for n in pods}
        assert codes == {0: 0, 1: 0}, f"exit codes {codes}; logs:\n" + "\n".join(f"== {k}\n{v}" for k, v in tails.items())
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        for f in logs.values():
            f.close()

    store = open_store(f"s3://{s3['KUBEFORGE_S3_BUCKET']}/{prefix}", endpoint_url=s3["AWS_ENDPOINT_URL"],
                       access_key_id=s3["AWS_ACCESS_KEY_ID"], secret_access_key=s3["AWS_SECRET_ACCESS_KEY"])
    run = job_status(c, namespace, name)["run"]  # the job's own run in the store (keyed by its uid)
    assert run.startswith(f"{name}/runs/"), run
    newest = store.newest_committed(namespace, run)
    assert newest is not None and newest.step == 24
    assert store.export_marker(namespace, run) is not None

    # the kubelet would now report the containers' real exit codes
    exit_pod(c, namespace, f"{name}-worker-1", codes[1])
    exit_pod(c, namespace, f"{name}-worker-0", codes[0])
    wait_for("Succeeded", is_(lambda: cond(c, namespace, "Succeeded", name).get("status") == "True"), 60)
    st = job_status(c, namespace, name)
    assert st["phase"] == "Succeeded" and st["lastCheckpoint"]["step"] == 24
    assert st["exportUri"] == store.export_uri(namespace, run)
    # the checkpoint-age alert's input exists only while a job checkpoints: a finished job has
    # none, so KubeforgeCheckpointStale cannot fire for it (issue 16 item 12; while it runs the
    # gauge is checked by tests/cluster/test_metrics_follow_the_objects.py)
    assert newest.marker is not None and dt.datetime.fromisoformat(newest.marker.time)

    def gauge() -> float | None:
        return {(smp.name, smp.labels.get("namespace"), smp.labels.get("trainingjob")): smp.value
                for fam in text_string_to_metric_families(operator.metrics()) for smp in fam.samples}.get(
            ("kubeforge_trainingjob_last_checkpoint_timestamp_seconds", namespace, name))
    wait_for("no checkpoint gauge once Succeeded", lambda: gauge() is None, 30)
