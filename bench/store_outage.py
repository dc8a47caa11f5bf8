"""Store-outage benchmark (issue 16 item 4): does a dead S3 endpoint delay pod management?

30 TrainingJobs checkpoint to the private cluster's MinIO; one more job (the victim) has no
checkpoint policy at all. The victim loses a node (heartbeat lost: a dead kubelet) twice: once
with MinIO up, once after MinIO was stopped (its port refuses, as an endpoint that went away),
and each time the bench times how long until the victim's lost workers run on another node.
Both operators run side by side in one run on one private control plane (kwok nodes only, its
own MinIO, loopback ports from 30000, smoke 31000): this tree's, and with ``--before REV`` the
operator of an earlier commit (a detached git worktree used only as its PYTHONPATH).

``make bench-store-outage`` writes bench/results/store_outage.json:

  s3_jobs, grace_s, reconcile_threads      the load and the settings both operators ran with
  node_loss_handled_s.store_up             fail_node -> the victim's lost workers Running elsewhere
  node_loss_handled_s.store_down           the same with MinIO stopped (null: not within the bound)
  before.*                                 the same figures for --before (null without it)
  store_down_over_up                       store_down / store_up for this tree (goal: about 1)

The figures include the node-failure grace (``grace_s``): it is the floor. ``--smoke`` (run by
tests/bench, so the script cannot rot) uses 6 S3 jobs on 2 reconcile threads and no ``--before``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "hack" / "cluster"), str(REPO / "bench")]

import yaml  # noqa: E402
from devcluster import Cluster, ClusterConfig  # noqa: E402
from operator_scale import log, pods, running, wait_for  # noqa: E402

from tests.fixtures.cluster import OperatorProcess  # noqa: E402

RESULTS = REPO / "bench" / "results" / "store_outage.json"
SMOKE_OUT = Path(tempfile.gettempdir()) / "kubeforge-bench-smoke" / "store_outage.json"
#: clear of the shared cluster (26000), tests/cluster's second (27000) and bench-operator's (28000, 29000)
PORT_BASE, SMOKE_PORT_BASE = 30000, 31000
GRACE_S = 10
#: how long after MinIO stops before the node is failed: every S3 job has been looked at by then
OUTAGE_SETTLE_S = 45
RECOVERY_BOUND_S = 300
VICTIM, VICTIM_WORKERS = "victim", 2
WORKER = "kubeforge.dev/role=worker"


def _job(name: str, namespace: str, workers: int, policy: str | None) -> dict[str, Any]:
    job: dict[str, Any] = yaml.safe_load((REPO / "examples/02-trainingjob-tiny.yaml").read_text())
    job["metadata"] = {"name": name, "namespace": namespace}
    spec = job["spec"]
    spec["workers"].update(minReplicas=workers, maxReplicas=workers, gpusPerWorker=1)
    spec["workers"].pop("gpuProduct")
    spec["failurePolicy"]["nodeFailureGraceSeconds"] = GRACE_S
    if policy:
        spec["checkpointPolicyRef"] = {"name": policy}
    else:
        spec.pop("checkpointPolicyRef")
    return job


def _s3_objects(c: Cluster, namespace: str) -> list[dict[str, Any]]:
    env = dict(line.split("=", 1) for line in c.cfg.s3_env.read_text().splitlines() if "=" in line)
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": namespace},
              "data": {k: base64.b64encode(env[k].encode()).decode()
                       for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}
    policy: dict[str, Any] = yaml.safe_load((REPO / "examples/01-checkpointpolicy.yaml").read_text())
    policy["metadata"] = {"name": "s3", "namespace": namespace}
    policy["spec"]["storage"]["s3"].update(endpoint=env["AWS_ENDPOINT_URL"], bucket=env["KUBEFORGE_S3_BUCKET"],
                                           credentialsSecretRef={"name": "s3"})
    return [secret, policy]


def _lose_victim_node(c: Cluster, namespace: str, spare: str) -> tuple[str, float | None]:
    """Fail the node of the victim's worker 0; seconds until every victim worker it held is
    Running on another node (None past the bound). The node stays failed until restored."""
    c.add_node(spare, gpus=c.cfg.gpus_per_node)
    wait_for(f"{spare} Ready", lambda: c.node_ready(spare) == "True", 60)
    rows = pods(c, namespace, f"kubeforge.dev/job-name={VICTIM}")
    node = next(p["node"] for p in rows if p["name"] == f"{VICTIM}-worker-0")
    lost = {p["name"] for p in rows if p["node"] == node}
    t0 = time.monotonic()
    c.fail_node(node)

    def moved() -> bool:
        return lost <= {p["name"] for p in running(pods(c, namespace, f"kubeforge.dev/job-name={VICTIM}"))
                        if p["node"] != node}

    try:
        wait_for("the victim's lost workers Running elsewhere", moved, RECOVERY_BOUND_S)
    except TimeoutError:
        return node, None
    return node, round(time.monotonic() - t0, 1)


def scenario(c: Cluster, work: Path, label: str, s3_jobs: int, env: dict[str, str]) -> dict[str, Any]:
    """One operator: the jobs, a node loss with the store up, the store stopped, another node loss."""
    ns = f"outage-{label}"
    c.kubectl("create", "namespace", ns)
    objects = _s3_objects(c, ns) + [_job(f"s3-{i:03d}", ns, 1, "s3") for i in range(s3_jobs)]
    objects.append(_job(VICTIM, ns, VICTIM_WORKERS, None))
    op = OperatorProcess(c, work / f"operator-{label}.log", extra_env=env, namespaces=(ns,))
    op.start()
    failed: list[str] = []
    try:
        c.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
        total = s3_jobs + VICTIM_WORKERS
        wait_for(f"{total} workers Running", lambda: len(running(pods(c, ns, WORKER))) >= total, 300, 2)
        log(f"{label}: {total} workers Running; node loss with the store up")
        node, up = _lose_victim_node(c, ns, f"spare-{label}-up")
        failed.append(node)
        log(f"{label}: store up: {up}s; stopping MinIO, then {OUTAGE_SETTLE_S}s for every S3 job to hit it")
        c.stop_minio()
        time.sleep(OUTAGE_SETTLE_S)
        node, down = _lose_victim_node(c, ns, f"spare-{label}-down")
        failed.append(node)
        log(f"{label}: store down: {down}s")
    finally:
        op.stop()
        if not c.running().get("minio"):
            c.start_minio()
        for node in failed:
            c.restore_node(node)
        c.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    return {"store_up": up, "store_down": down}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--s3-jobs", type=int, default=30)
    ap.add_argument("--before", help="also run the operator of this git revision, side by side")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--smoke", action="store_true", help="4 S3 jobs, no --before: checks the script runs")
    ap.add_argument("--reconcile-threads", type=int, default=None,
                    help="KUBEFORGE_TRAININGJOB_WORKERS of both operators (default: the shipped 8)")
    if ap.parse_known_args()[0].smoke:
        # more S3 jobs than reconcile threads, so that an operator that waits on the store in
        # its reconcile threads would show it even in the smoke
        ap.set_defaults(s3_jobs=6, reconcile_threads=2, out=str(SMOKE_OUT))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-store-outage-", dir=out.parent if args.smoke else None))
    gpu_nodes = -(-(args.s3_jobs + VICTIM_WORKERS) // 8) + 1
    c = Cluster(ClusterConfig(state_dir=work / "cluster", gpu_nodes=gpu_nodes, cpu_nodes=1, real_nodes=0,
                              port_base=SMOKE_PORT_BASE if args.smoke else PORT_BASE))
    from kubeforge.settings import TrainingJobSettings

    threads = args.reconcile_threads or TrainingJobSettings().workers
    env = {"KUBEFORGE_TRAININGJOB_WORKERS": str(threads)}
    result: dict[str, Any] = {"s3_jobs": args.s3_jobs, "grace_s": GRACE_S, "reconcile_threads": threads,
                              "smoke": args.smoke}
    before_tree = work / "before"
    try:
        c.up()
        c.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
        c.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(REPO / "crds"))
        if args.before:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before_tree), args.before],
                           check=True, capture_output=True)
            path = f"{before_tree / 'operator'}{os.pathsep}{before_tree / 'trainer_image'}"
            result["before_revision"] = args.before
            result["before"] = {"node_loss_handled_s": scenario(c, work, "before", args.s3_jobs,
                                                                {**env, "PYTHONPATH": path})}
        else:
            result["before_revision"] = None
            result["before"] = {"node_loss_handled_s": {"store_up": None, "store_down": None}}
        result["node_loss_handled_s"] = scenario(c, work, "now", args.s3_jobs, env)
    finally:
        c.down()
        if before_tree.exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before_tree)],
                           capture_output=True)
            shutil.rmtree(before_tree, ignore_errors=True)
    now = result["node_loss_handled_s"]
    result["store_down_over_up"] = (round(now["store_down"] / now["store_up"], 2)
                                    if now["store_down"] and now["store_up"] else None)
    result["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}; logs in {work}")


if __name__ == "__main__":
    main()
