"""The whole loop on real pods, timed: `make bench-e2e` -> bench/results/e2e.json.

On the local cluster's real nodes (hack/cluster/nodes.py), with the operator installed by the
chart from our locally built images:

- ``image_build_s``: {"cold": building the workload image with no layer cache (``--cold``
  only; several minutes), "cached": the same call when nothing changed};
- ``apply_to_first_step_s``: `kubectl apply` of the policy and a 2-worker TrainingJob ->
  rank 0's ``kubeforge_trainer_step`` >= 1 (pods scheduled, images started, rendezvous
  over cluster DNS, the first optimizer step);
- ``train_s``: first step -> the job Succeeded (training, checkpoints and the export to MinIO);
- ``export_to_ready_s``: the export's commit marker -> the InferenceService Ready (the real
  server pod downloaded, loaded, warmed up and passed its probes);
- ``first_answer_s``: Ready -> the first chat completion answered through the ClusterIP Service;
- ``node_loss_to_resumed_s``: a second, elastic (1..2 workers) job's worker node lost (kubelet,
  containerd and its containers stopped) -> the job, shrunk to the worker left, commits a new
  checkpoint; with the graces in effect beside it
  (``node_loss_grace_s``: the node controller's, ``node_failure_grace_s``: the job's).

``--smoke`` (run by `make test`) trains a few steps, skips the node loss and the cold build,
and writes where ``--out`` says (by default a file in the system's tmp, never over the committed
results), so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "hack" / "cluster")]

import images  # noqa: E402
import yaml  # noqa: E402
from devcluster import Cluster  # noqa: E402

from tests.fixtures.realpods import REAL, ChartOperator, s3_secret  # noqa: E402

RESULTS = REPO / "bench" / "results" / "e2e.json"
#: Where a smoke run writes unless ``--out`` says: never over the committed results.
SMOKE_OUT = Path(tempfile.gettempdir()) / "kubeforge-bench-smoke" / "e2e.json"
JOB = "tiny-llama"


def kget(c: Cluster, *args: str) -> Any:
    return json.loads(c.kubectl("get", *args, "-o", "json").stdout)


def wait(what: str, check: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except (RuntimeError, KeyError, ValueError, IndexError):
            value = None
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def in_node(c: Cluster, code: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", c.nodes.net.netns(0), sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return out.stdout


def trainer_step(c: Cluster, ns: str) -> float:
    pod = kget(c, "pod", f"{JOB}-worker-0", "-n", ns)
    ip = pod["status"].get("podIP")
    if not ip:
        return 0.0
    text = in_node(c, f"import urllib.request; print(urllib.request.urlopen('http://{ip}:9400/metrics', timeout=2)"
                      ".read().decode())")
    m = re.search(r"^kubeforge_trainer_step (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def condition(obj: dict[str, Any], type_: str) -> bool:
    return any(x["type"] == type_ and x["status"] == "True" for x in obj.get("status", {}).get("conditions", []))


def apply(c: Cluster, ns: str, name: str, steps: int, every: int, prefix: str, gpus: int = 1,
          min_workers: int = 2) -> None:
    policy = yaml.safe_load((REPO / "examples/01-checkpointpolicy.yaml").read_text())
    policy["spec"]["schedule"] = {"everySteps": every, "asyncSave": True}
    policy["spec"]["storage"]["s3"]["prefix"] = prefix
    job = yaml.safe_load((REPO / "examples/02-trainingjob-tiny.yaml").read_text())
    job["metadata"]["name"] = name
    job["spec"]["workers"].update(minReplicas=min_workers, maxReplicas=2, gpusPerWorker=gpus)
    job["spec"]["trainer"]["config"]["train"].update(steps=steps, global_batch=4 * gpus, micro_batch=2)
    job["spec"]["trainer"]["config"]["data"]["seq_len"] = 64
    c.kubectl("apply", "-n", ns, "-f", "-", input="\n---\n".join(json.dumps(d) for d in (policy, job)))


def export_time(c: Cluster, ns: str, prefix: str, name: str) -> float:
    import datetime as dt

    from kubeforge.store import open_store

    s3 = c.s3_settings()
    store = open_store(f"s3://{s3['KUBEFORGE_S3_BUCKET']}/{prefix}", endpoint_url=s3["AWS_ENDPOINT_URL"],
                       access_key_id=s3["AWS_ACCESS_KEY_ID"], secret_access_key=s3["AWS_SECRET_ACCESS_KEY"])
    run = kget(c, "trainingjob", name, "-n", ns)["status"]["run"]  # the job's own run (keyed by its uid)
    marker = store.export_marker(ns, run)
    assert marker is not None, f"no export marker of run {run}"
    return dt.datetime.fromisoformat(marker.time).timestamp()


def newest_step(c: Cluster, ns: str, name: str) -> int:
    st = kget(c, "trainingjob", name, "-n", ns).get("status", {})
    return int((st.get("lastCheckpoint") or {}).get("step") or 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few steps, no node loss, no cold build")
    p.add_argument("--cold", action="store_true", help="also time a build of the workload image with no cache")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"default {RESULTS} ({SMOKE_OUT} with --smoke)")
    if p.parse_known_args()[0].smoke:
        p.set_defaults(out=SMOKE_OUT)
    args = p.parse_args()
    c = Cluster()
    c.up()
    why = c.real_nodes_unavailable()
    if why:
        print(f"bench-e2e needs the real nodes: {why}", file=sys.stderr)
        return 1
    result: dict[str, Any] = {"real_nodes": c.nodes.names(), "smoke": args.smoke}
    t0 = time.monotonic()
    tags = c.images()
    first = time.monotonic() - t0
    t0 = time.monotonic()
    c.images()
    build: dict[str, float | None] = {"first_call_this_run": round(first, 1), "cached": round(time.monotonic() - t0, 2),
                                      "cold": None}
    if args.cold:
        t0 = time.monotonic()
        images.build(images.TRAINER, cold_tag="localhost/kubeforge/trainer:bench-cold")
        build["cold"] = round(time.monotonic() - t0, 1)
        subprocess.run(images.podman("rmi", "localhost/kubeforge/trainer:bench-cold"), capture_output=True)
    result["image_build_s"] = build

    ns = f"bench-e2e-{uuid.uuid4().hex[:6]}"
    c.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": ns, "annotations": REAL, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}))
    op = ChartOperator(c, ns, tags)
    try:
        op.install()
        s3_secret(c, ns)
        prefix = f"bench-e2e-{uuid.uuid4().hex[:6]}"
        steps = 10 if args.smoke else 60
        t_apply = time.monotonic()
        apply(c, ns, JOB, steps, 5 if args.smoke else 20, prefix)
        wait("the first optimizer step", lambda: trainer_step(c, ns) >= 1, 600, interval=1)
        t_step = time.monotonic()
        result["apply_to_first_step_s"] = round(t_step - t_apply, 1)
        wait("the job Succeeded", lambda: kget(c, "trainingjob", JOB, "-n", ns)["status"]["phase"] == "Succeeded",
             900, interval=1)
        result["train_s"] = round(time.monotonic() - t_step, 1)
        result["train_steps"] = steps
        isvc = yaml.safe_load((REPO / "examples/03-inferenceservice-from-job.yaml").read_text())
        c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(isvc))
        wait("the InferenceService Ready", lambda: condition(kget(c, "inferenceservice", JOB, "-n", ns), "Ready"),
             600, interval=1)
        t_ready = time.time()
        result["export_to_ready_s"] = round(t_ready - export_time(c, ns, prefix, JOB), 1)
        ip = kget(c, "service", f"{JOB}-server", "-n", ns)["spec"]["clusterIP"]
        body = json.dumps({"model": JOB, "messages": [{"role": "user", "content": "Once upon a time"}],
                           "max_tokens": 16})
        answer = json.loads(wait("the first answer", lambda: in_node(c, f"""
import urllib.request
req = urllib.request.Request("http://{ip}:8000/v1/chat/completions", data={body!r}.encode(),
                             headers={{"content-type": "application/json"}})
print(urllib.request.urlopen(req, timeout=60).read().decode())
"""), 120))
        result["first_answer_s"] = round(time.time() - t_ready, 1)
        result["first_answer_tokens"] = answer["usage"]["completion_tokens"]

        if not args.smoke:
            name = "tiny-llama-loss"
            # long enough to lose a node in the middle; 3 of a node's 4 GPUs each, so the two
            # workers are on different nodes and one is off the operator's; elastic 1..2, so
            # the job goes on with the worker left (the lost one has nowhere to go)
            apply(c, ns, name, 3000, 20, prefix, gpus=3, min_workers=1)
            wait("a first checkpoint", lambda: newest_step(c, ns, name) > 0, 600, interval=1)
            operator_nodes = {pp["spec"].get("nodeName") for pp in op.pods()}
            victim = next(pp for pp in kget(c, "pods", "-n", ns, "-l", f"kubeforge.dev/job-name={name},"
                                                                       "kubeforge.dev/role=worker")["items"]
                          if pp["spec"].get("nodeName") not in operator_nodes)
            lost = victim["spec"]["nodeName"]
            before = newest_step(c, ns, name)
            t_loss = time.monotonic()
            c.lose_real_node(lost)
            try:
                wait("a checkpoint after the node loss", lambda: newest_step(c, ns, name) > before, 900, interval=1)
                result["node_loss_to_resumed_s"] = round(time.monotonic() - t_loss, 1)
            finally:
                c.restore_node(lost)
            job = yaml.safe_load((REPO / "examples/02-trainingjob-tiny.yaml").read_text())
            result["node_loss_grace_s"] = c.cfg.node_monitor_grace_seconds
            result["node_failure_grace_s"] = job["spec"]["failurePolicy"]["nodeFailureGraceSeconds"]
            result["node_loss_checkpoint_every_steps"] = 20
    finally:
        c.kubectl("delete", "kubeforge", "--all", "-n", ns, "--wait=true", "--timeout=90s", check=False)
        op.uninstall()
        c.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
