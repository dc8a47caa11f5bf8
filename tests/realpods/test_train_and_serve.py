"""The loop on real pods: the operator installed by the chart (local images, its own
ServiceAccount, the in-cluster API) runs examples/01..03 with two real worker pods that
rendezvous over cluster DNS, checkpoint to MinIO through its Service name and export; the
InferenceService that follows the job turns Ready only when its real server pod passes its
probes, and answers an OpenAI chat completion through its ClusterIP Service.

Then the faults, each on its own job: a worker's container killed with SIGKILL is replaced
and training resumes from the checkpoint; a real node lost (kubelet, containerd and every
container on it stopped) is noticed, its worker force-deleted after the grace and
rescheduled on the other node, counted as an infrastructure restart, not an application one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
import yaml
from devcluster import Cluster
from kubeforge.store import open_store

from tests.cluster.test_trainingjob_controller import is_, job_status, workers
from tests.fixtures.cluster import REPO, kubectl_json, wait_for
from tests.fixtures.realpods import ChartOperator, s3_secret

pytestmark = [pytest.mark.realpods, pytest.mark.timeout(1500)]
JOB = "tiny-llama"


def apply_examples(c: Cluster, ns: str, steps: int, every: int, prefix: str, services: bool = True) -> None:
    s3_secret(c, ns)
    policy = yaml.safe_load((REPO / "examples/01-checkpointpolicy.yaml").read_text())
    policy["spec"]["schedule"] = {"everySteps": every, "asyncSave": True}
    policy["spec"]["storage"]["s3"]["prefix"] = prefix
    job = yaml.safe_load((REPO / "examples/02-trainingjob-tiny.yaml").read_text())
    job["spec"]["workers"].update(minReplicas=2, maxReplicas=2, gpusPerWorker=1)
    job["spec"]["trainer"]["config"]["train"].update(steps=steps, global_batch=4, micro_batch=2)
    job["spec"]["trainer"]["config"]["data"]["seq_len"] = 64
    job["spec"]["trainer"]["config"]["schedule"]["warmup_steps"] = 2
    docs = [policy, job]
    if services:
        docs.append(yaml.safe_load((REPO / "examples/03-inferenceservice-from-job.yaml").read_text()))
    c.kubectl("apply", "-n", ns, "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))


def store_of(c: Cluster, prefix: str) -> Any:
    s3 = c.s3_settings()
    return open_store(f"s3://{s3['KUBEFORGE_S3_BUCKET']}/{prefix}", endpoint_url=s3["AWS_ENDPOINT_URL"],
                      access_key_id=s3["AWS_ACCESS_KEY_ID"], secret_access_key=s3["AWS_SECRET_ACCESS_KEY"])


def running_workers(c: Cluster, ns: str) -> list[dict[str, Any]]:
    out = []
    for p in workers(c, ns, JOB):
        statuses = p.get("status", {}).get("containerStatuses") or []
        if p.get("metadata", {}).get("deletionTimestamp") is None and statuses and "running" in statuses[0]["state"]:
            out.append(p)
    return out


def worker_log(c: Cluster, ns: str, name: str, previous: bool = False) -> str:
    args = ["logs", "-n", ns, name, "--tail=400", *(["--previous"] if previous else [])]
    out = c.kubectl(*args, check=False)
    return out.stdout + out.stderr


def wait_succeeded(c: Cluster, op: ChartOperator, ns: str, timeout: float) -> dict[str, Any]:
    def done() -> bool | None:
        st = job_status(c, ns, JOB)
        if st.get("phase") == "Failed":
            raise AssertionError(f"the job failed: {json.dumps(st)[:3000]}\noperator:\n{op.logs()}")
        return st.get("phase") == "Succeeded"

    try:
        wait_for("the TrainingJob to succeed on real pods", is_(done), timeout, interval=3)
    except AssertionError as timed_out:
        logs = "\n".join(f"== {p['metadata']['name']}\n{worker_log(c, ns, p['metadata']['name'])[-2500:]}"
                         for p in workers(c, ns, JOB))
        raise AssertionError(f"status {json.dumps(job_status(c, ns, JOB))[:3000]}\n{logs}\n"
                             f"operator:\n{op.logs()}") from timed_out
    return job_status(c, ns, JOB)


def in_node(c: Cluster, code: str, timeout: float = 60) -> str:
    """Run Python in real node 0's network namespace: a client that reaches ClusterIP
    Services as a pod would (kube-proxy's rules live there)."""
    out = subprocess.run(["ip", "netns", "exec", c.nodes.net.netns(0), sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_the_chart_operator_trains_on_real_pods_and_serves_the_export(chart_operator: ChartOperator) -> None:
    op = chart_operator
    c, ns = op.cluster, op.namespace
    prefix = f"realpods-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    apply_examples(c, ns, steps=30, every=10, prefix=prefix)
    wait_for("the policy Ready", is_(lambda: any(
        x["type"] == "Ready" and x["status"] == "True" for x in kubectl_json(
            c, "get", "checkpointpolicy", "every-50-steps", "-n", ns).get("status", {}).get("conditions", []))), 120)
    wait_for("two worker containers running", lambda: len(running_workers(c, ns)) == 2, 300, interval=2)
    st = wait_succeeded(c, op, ns, 600)
    train_s = time.monotonic() - t0
    assert st["lastCheckpoint"]["step"] == 30, st
    store, run = store_of(c, prefix), st["run"]  # the store keys the job's own run (its uid)
    assert run.startswith(f"{JOB}/runs/"), run
    assert store.newest_committed(ns, run).step == 30
    assert store.export_marker(ns, run) is not None
    # both workers ran for real: each pod's container exited 0 on a real node
    for p in workers(c, ns, JOB):
        assert p["spec"]["nodeName"] in c.nodes.names(), p["spec"]["nodeName"]
        term = p["status"]["containerStatuses"][0]["state"]["terminated"]
        assert term["exitCode"] == 0, term

    def served() -> Any:
        isvc = kubectl_json(c, "get", "inferenceservice", JOB, "-n", ns)
        ready = [x for x in isvc.get("status", {}).get("conditions", []) if x["type"] == "Ready"]
        return ready and ready[0]["status"] == "True"

    wait_for("the InferenceService Ready on a real server pod", is_(served), 300, interval=3)
    pods = kubectl_json(c, "get", "pods", "-n", ns, "-l", "kubeforge.dev/inferenceservice=" + JOB)["items"]
    assert pods and all(p["spec"]["nodeName"] in c.nodes.names() for p in pods), [p["spec"].get("nodeName") for p in pods]
    cluster_ip = kubectl_json(c, "get", "service", f"{JOB}-server", "-n", ns)["spec"]["clusterIP"]
    body = json.dumps({"model": JOB, "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 16})
    answer = json.loads(in_node(c, f"""
import urllib.request
req = urllib.request.Request("http://{cluster_ip}:8000/v1/chat/completions", data={body!r}.encode(),
                             headers={{"content-type": "application/json"}})
print(urllib.request.urlopen(req, timeout=60).read().decode())
"""))
    assert answer["choices"][0]["message"]["content"], answer
    assert answer["usage"]["completion_tokens"] > 0
    metrics = in_node(c, f"import urllib.request; print(urllib.request.urlopen('http://{cluster_ip}:8000/metrics').read().decode())")
    assert "vllm:generation_tokens_total" in metrics
    print(f"train to Succeeded on real pods: {train_s:.0f}s")


def training_past_a_checkpoint(op: ChartOperator) -> tuple[Any, str]:
    """A 60-step job of two workers, once its first checkpoint is committed; its store and run."""
    c, ns = op.cluster, op.namespace
    prefix = f"realpods-{uuid.uuid4().hex[:6]}"
    apply_examples(c, ns, steps=60, every=10, prefix=prefix, services=False)
    store = store_of(c, prefix)
    # the run is in status before any worker starts
    run = wait_for("the job's run", lambda: kubectl_json(c, "get", "trainingjob", JOB, "-n", ns)
                   .get("status", {}).get("run"), 120, interval=1)
    wait_for("a first committed checkpoint", is_(lambda: store.newest_committed(ns, run)), 400, interval=2)
    return store, run


def _kill_container(c: Cluster, pod: dict[str, Any]) -> None:
    node = c.nodes.names().index(pod["spec"]["nodeName"])
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    c.nodes.ctr(node, "tasks", "kill", "--signal", "SIGKILL", container_id)


def test_a_worker_killed_with_sigkill_is_replaced_and_training_resumes(chart_operator: ChartOperator) -> None:
    op = chart_operator
    c, ns = op.cluster, op.namespace
    training_past_a_checkpoint(op)
    victim = running_workers(c, ns)[-1]
    _kill_container(c, victim)
    wait_for("the killed worker replaced", lambda: any(
        int(p["metadata"]["labels"]["kubeforge.dev/attempt"]) > int(victim["metadata"]["labels"]["kubeforge.dev/attempt"])
        for p in workers(c, ns, JOB)), 120, interval=2)
    st = wait_succeeded(c, op, ns, 600)
    assert st["lastCheckpoint"]["step"] == 60
    logs = "".join(worker_log(c, ns, p["metadata"]["name"]) for p in workers(c, ns, JOB))
    assert "checkpoint: restored step" in logs, logs[-3000:]


def test_a_lost_real_node_is_noticed_and_its_worker_moves_to_the_other_node(chart_operator: ChartOperator) -> None:
    op = chart_operator
    c, ns = op.cluster, op.namespace
    store, run = training_past_a_checkpoint(op)
    operator_nodes = {p["spec"].get("nodeName") for p in op.pods()}
    candidates = [p for p in running_workers(c, ns) if p["spec"]["nodeName"] not in operator_nodes]
    assert candidates, "both workers share the operator's node: nothing to lose without the operator"
    victim = candidates[0]
    lost = victim["spec"]["nodeName"]
    before = store.newest_committed(ns, run).step
    t0 = time.monotonic()
    c.lose_real_node(lost)
    try:
        wait_for(f"{lost} NotReady", lambda: c.node_ready(lost) != "True", 90, interval=1)
        wait_for("the lost worker rescheduled on the other node", lambda: any(
            p["metadata"]["name"] == victim["metadata"]["name"] and p["metadata"]["uid"] != victim["metadata"]["uid"]
            and p["spec"].get("nodeName") not in (None, lost) for p in workers(c, ns, JOB)), 240, interval=2)
        moved_s = time.monotonic() - t0
        st = wait_succeeded(c, op, ns, 600)
    finally:
        c.restore_node(lost)
    restarts = st.get("restarts") or {}
    events = c.kubectl("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={JOB}",
                       "-o", "custom-columns=TIME:.lastTimestamp,REASON:.reason,MESSAGE:.message").stdout
    assert restarts.get("infrastructure", 0) >= 1 and restarts.get("application", 0) == 0, f"{restarts}\n{events}"
    after = [s.step for s in store.committed_checkpoints(ns, run)]
    assert st["lastCheckpoint"]["step"] == 60 and before <= 60, (st, after)
    print(f"node loss to worker rescheduled: {moved_s:.0f}s")
