"""Operator benchmark: 200 TrainingJobs of 4 workers on 100 fake 8-GPU nodes, and the same
workload as elastic PyTorchJobs under Kubeflow's training operator v1, on one private
local control plane (kwok nodes, its own ports and state, so the shared cluster is untouched).

``make bench-operator`` (or ``python bench/operator_scale.py``) writes bench/results/operator.json:

  all_running_s             apply 200 TrainingJobs at once -> all 800 worker pods Running
  rss_mb                    the operator's peak RSS over the whole run (/proc/<pid>/status VmHWM)
  reconciles_per_s          kubeforge_reconcile_total{kind="TrainingJob"} gained / all_running_s
  node_recovery_s           a node hosting workers goes NotReady and loses its heartbeat -> every
                            worker it held Running on another node (grace: 30 s, the default)
  kubeflow_all_running_s    the same 200 jobs as elastic PyTorchJobs -> 800 worker pods Running
  ratio_vs_kubeflow         all_running_s / kubeflow_all_running_s (goal <= 1.0)
  kubeflow_node_recovery_s  the same node failure under Kubeflow (null if it never recovered
                            within the bound; ``kubeflow_node_recovery_note`` says what was seen)

Each operator runs as a local process with its shipped defaults (kubeforge: 8 reconcile
workers; Kubeflow: its Deployment's flags, i.e. 1 controller thread, controller-runtime's
client rate limits). Both jobs are equivalent: min 2 / max 4 workers, 1 GPU each, c10d
rendezvous, not-ready/unreachable tolerations of 30 s. One spare 8-GPU node is added before
each node failure so that the lost workers have somewhere to go.

``--smoke`` (run by tests/bench, so the script cannot rot) does the same on a smaller private
control plane (kwok only, other ports): 4 jobs on 2 GPU nodes, the node failure included, and
writes every key to ``--out`` (by default a file in the system's tmp, never over the committed
results; the logs go beside it). Kubeflow's half runs in it only when the training operator is
already built (building it from its Go module takes minutes); otherwise its figures are null
and ``kubeflow_skipped`` says why. ``--no-kubeflow`` skips that half in any run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "hack" / "cluster")]

import tools  # noqa: E402
import yaml  # noqa: E402
from devcluster import GPU_TAINT, Cluster, ClusterConfig  # noqa: E402
from kubeforge.api.contract import CONFIG_FILE_NAME, CONFIG_MOUNT_DIR, DEFAULT_WORKLOAD_IMAGE  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.fixtures.cluster import OperatorProcess  # noqa: E402

RESULTS = REPO / "bench" / "results" / "operator.json"
#: Where a smoke run writes unless ``--out`` says: never over the committed results.
SMOKE_OUT = Path(tempfile.gettempdir()) / "kubeforge-bench-smoke" / "operator.json"
#: Loopback port bases of the private control planes: clear of the shared cluster's (26000)
#: and of the second cluster tests/cluster starts beside it (27000); a smoke can run beside a full run.
PORT_BASE, SMOKE_PORT_BASE = 28000, 29000
#: What ``--smoke`` changes in the defaults (a flag given on the command line still wins); Kubeflow
#: never recovers from the node failure (see the note), so its wait is cut short too.
SMOKE_DEFAULTS: dict[str, Any] = {"jobs": 4, "gpu_nodes": 2, "kubeflow_recovery_timeout": 45.0, "out": str(SMOKE_OUT)}
OURS_NS, KUBEFLOW_NS, KUBEFLOW_SYSTEM_NS = "bench-kubeforge", "bench-kubeflow", "kubeflow"
WORKERS, MIN_WORKERS, GRACE_S = 4, 2, 30
RUNNING_TIMEOUT_S = 900
#: Where the training operator's cert rotator expects its webhook certificate (fixed in its code).
KUBEFLOW_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
KEYS = ("all_running_s", "rss_mb", "reconciles_per_s", "node_recovery_s", "kubeflow_all_running_s",
        "ratio_vs_kubeflow", "kubeflow_node_recovery_s")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def pods(c: Cluster, namespace: str, selector: str) -> list[dict[str, str]]:
    """name, phase, node and whether it is being deleted, of the pods matching ``selector``."""
    template = ('{range .items[*]}{.metadata.name}{"\\t"}{.status.phase}{"\\t"}{.spec.nodeName}{"\\t"}'
                '{.metadata.deletionTimestamp}{"\\n"}{end}')
    out = c.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", f"jsonpath={template}").stdout
    rows = []
    for line in out.splitlines():
        name, phase, node, deleting = (line.split("\t") + ["", "", "", ""])[:4]
        rows.append({"name": name, "phase": phase, "node": node, "deleting": deleting})
    return rows


def running(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [p for p in rows if p["phase"] == "Running" and not p["deleting"]]


def tolerations() -> list[dict[str, Any]]:
    gpu = {"key": GPU_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}
    return [gpu] + [{"key": f"node.kubernetes.io/{t}", "operator": "Exists", "effect": "NoExecute",
                     "tolerationSeconds": GRACE_S} for t in ("not-ready", "unreachable")]


def training_job(i: int) -> dict[str, Any]:
    job: dict[str, Any] = yaml.safe_load((REPO / "examples/02-trainingjob-tiny.yaml").read_text())
    job["metadata"] = {"name": f"job-{i:03d}", "namespace": OURS_NS}
    spec = job["spec"]
    spec.pop("checkpointPolicyRef")
    spec["workers"].update(minReplicas=MIN_WORKERS, maxReplicas=WORKERS, gpusPerWorker=1)
    spec["workers"].pop("gpuProduct")
    spec["failurePolicy"]["nodeFailureGraceSeconds"] = GRACE_S
    return job


def pytorch_job(i: int, image: str, command: list[str]) -> dict[str, Any]:
    """The same job for Kubeflow: elastic (c10d, min 2 / max 4), 4 workers of 1 GPU."""
    container = {"name": "pytorch", "image": image, "command": command,
                 "resources": {"limits": {"nvidia.com/gpu": "1"}}}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": f"job-{i:03d}", "namespace": KUBEFLOW_NS},
            "spec": {"elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": MIN_WORKERS, "maxReplicas": WORKERS,
                                       "maxRestarts": 3},
                     "pytorchReplicaSpecs": {"Worker": {
                         "replicas": WORKERS, "restartPolicy": "OnFailure",
                         "template": {"spec": {"containers": [container], "tolerations": tolerations()}}}}}}


def apply_all(c: Cluster, objects: list[dict[str, Any]]) -> None:
    c.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))


def time_all_running(c: Cluster, namespace: str, selector: str, objects: list[dict[str, Any]]) -> float:
    total = len(objects) * WORKERS
    t0 = time.monotonic()
    apply_all(c, objects)
    last = 0
    while True:
        n = len(running(pods(c, namespace, selector)))
        elapsed = time.monotonic() - t0
        if n >= total:
            return elapsed
        if n != last:
            log(f"  {n}/{total} Running after {elapsed:.0f}s")
            last = n
        if elapsed > RUNNING_TIMEOUT_S:
            raise TimeoutError(f"{n}/{total} worker pods Running after {RUNNING_TIMEOUT_S}s")
        time.sleep(1)


def node_recovery(c: Cluster, namespace: str, selector: str, spare: str, timeout: float) -> float | None:
    """Fail the node of job-000's worker 0 (with the heartbeat lost: a dead kubelet) and time
    until every worker it held is Running on another node; None past ``timeout``."""
    c.add_node(spare, gpus=c.cfg.gpus_per_node)
    wait_for(f"{spare} Ready", lambda: c.node_ready(spare) == "True", 60)
    rows = pods(c, namespace, selector)
    node = next(p["node"] for p in rows if p["name"] == "job-000-worker-0")
    lost = {p["name"] for p in rows if p["node"] == node}
    log(f"  failing {node}, which runs {len(lost)} workers")
    t0 = time.monotonic()
    c.fail_node(node)

    def recovered() -> bool:
        moved = {p["name"] for p in running(pods(c, namespace, selector)) if p["node"] != node}
        return lost <= moved

    try:
        wait_for("the lost workers Running elsewhere", recovered, timeout)
    except TimeoutError:
        return None
    return time.monotonic() - t0


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def reconciles(op: OperatorProcess) -> float:
    return sum(s.value for fam in text_string_to_metric_families(op.metrics()) for s in fam.samples
               if s.name == "kubeforge_reconcile_total" and s.labels.get("kind") == "TrainingJob")


def delete_all(c: Cluster, namespace: str, kind: str) -> None:
    c.kubectl("delete", kind, "--all", "-n", namespace, "--wait=false", check=False)
    wait_for(f"{namespace} pods gone", lambda: not c.kubectl("get", "pods", "-n", namespace, "-o", "name").stdout.strip(),
             300, interval=2)


def bench_kubeforge(c: Cluster, work: Path, jobs: int) -> dict[str, Any]:
    c.kubectl("create", "namespace", OURS_NS)
    c.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    c.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(REPO / "crds"))
    op = OperatorProcess(c, work / "kubeforge-operator.log", namespaces=(OURS_NS,))
    op.start()
    try:
        assert op.proc is not None
        before = reconciles(op)
        log(f"kubeforge: applying {jobs} TrainingJobs")
        all_running = time_all_running(c, OURS_NS, "kubeforge.dev/role=worker", [training_job(i) for i in range(jobs)])
        rate = (reconciles(op) - before) / all_running
        log(f"kubeforge: all Running in {all_running:.1f}s; node failure")
        recovery = node_recovery(c, OURS_NS, "kubeforge.dev/role=worker", "spare-kubeforge", GRACE_S + 120)
        rss = peak_rss_mb(op.proc.pid)
        delete_all(c, OURS_NS, "trainingjobs.kubeforge.dev")
    finally:
        op.stop()
    return {"all_running_s": round(all_running, 1), "rss_mb": round(rss, 1), "reconciles_per_s": round(rate, 1),
            "node_recovery_s": None if recovery is None else round(recovery, 1)}


def bench_kubeflow(c: Cluster, work: Path, jobs: int, recovery_timeout: float) -> dict[str, Any]:
    home = tools.kubeflow_training_operator()
    c.kubectl("create", "namespace", KUBEFLOW_NS)
    c.kubectl("create", "namespace", KUBEFLOW_SYSTEM_NS)
    # the cert rotator keeps its webhook certificate in this Secret (the manifests create it empty)
    # and starts the controllers only once it injected its CA into this webhook configuration.
    # Its webhook is matched by nothing: the apiserver could not reach a local webhook server by
    # the Service name the certificate is for, so the PyTorchJobs are not validated by it.
    c.kubectl("create", "secret", "generic", "training-operator-webhook-cert", "-n", KUBEFLOW_SYSTEM_NS)
    c.kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "validator.training-operator.kubeflow.org"},
        "webhooks": [{"name": "unused.training-operator.kubeflow.org", "admissionReviewVersions": ["v1"],
                      "sideEffects": "None", "failurePolicy": "Ignore",
                      "clientConfig": {"service": {"name": "training-operator", "namespace": KUBEFLOW_SYSTEM_NS}},
                      "rules": [{"apiGroups": ["kubeflow.org"], "apiVersions": ["v1"], "operations": ["CREATE"],
                                 "resources": ["unused"]}]}]}))
    crd = home / "kubeflow.org_pytorchjobs.yaml"
    c.kubectl("apply", "--server-side", "-f", str(crd))
    established = 'jsonpath={.status.conditions[?(@.type=="Established")].status}'
    wait_for("the PyTorchJob CRD", lambda: c.kubectl("get", "crd", "pytorchjobs.kubeflow.org", "-o", established,
                                                     check=False).stdout == "True", 60)
    command = ["torchrun", "-m", "kubeforge_runtime.train", "--config", f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}"]
    metrics_port, health_port, webhook_port = free_port(), free_port(), free_port()
    created = False
    log_file = open(work / "kubeflow-operator.log", "ab")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(
        [str(home / "training-operator"), "--enable-scheme=pytorchjob", f"--metrics-bind-address=127.0.0.1:{metrics_port}",
         f"--health-probe-bind-address=127.0.0.1:{health_port}", f"--webhook-server-port={webhook_port}"],
        env={**os.environ, "KUBECONFIG": str(c.cfg.kubeconfig), "MY_POD_NAMESPACE": KUBEFLOW_SYSTEM_NS},
        stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"training-operator exited with {proc.returncode}: "
                                   + (work / "kubeflow-operator.log").read_text(errors="replace")[-2000:])
            lines = (work / "kubeflow-operator.log").read_text(errors="replace").splitlines()
            return any("Starting workers" in line and "pytorchjob" in line.lower() for line in lines)

        # in a pod the kubelet mounts the Secret at the rotator's fixed certificate folder; here we do
        def certificate() -> dict[str, str] | None:
            secret = c.kubectl("get", "secret", "training-operator-webhook-cert", "-n", KUBEFLOW_SYSTEM_NS, "-o", "json")
            data = json.loads(secret.stdout).get("data") or {}
            return data if "tls.crt" in data else None

        data = wait_for("the webhook certificate", certificate, 60)
        created = not KUBEFLOW_CERT_DIR.parent.exists()
        KUBEFLOW_CERT_DIR.mkdir(parents=True, exist_ok=True)
        for key, value in data.items():
            (KUBEFLOW_CERT_DIR / key).write_bytes(base64.b64decode(value))
        wait_for("the training operator's PyTorchJob controller", ready, 180)
        log(f"kubeflow: applying {jobs} PyTorchJobs")
        selector = "training.kubeflow.org/replica-type=worker"
        all_running = time_all_running(c, KUBEFLOW_NS, selector,
                                       [pytorch_job(i, DEFAULT_WORKLOAD_IMAGE, command) for i in range(jobs)])
        log(f"kubeflow: all Running in {all_running:.1f}s; node failure")
        recovery = node_recovery(c, KUBEFLOW_NS, selector, "spare-kubeflow", recovery_timeout)
        note = None
        if recovery is None:
            stuck = [p["name"] for p in pods(c, KUBEFLOW_NS, selector) if p["deleting"]]
            note = (f"not within {recovery_timeout:.0f}s of the node failure: the lost workers were not replaced, "
                    "none was being deleted yet" if not stuck else
                    f"not within {recovery_timeout:.0f}s of the node failure: {len(stuck)} worker pods still "
                    "Terminating on the dead node (deleted gracefully, by the operator's restart or taint eviction, "
                    "but nothing force-deletes a pod whose kubelet is gone, and the operator recreates a worker only "
                    "under the same name; kubeflow/trainer #2072)")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log_file.close()
        if created:
            shutil.rmtree(KUBEFLOW_CERT_DIR.parent, ignore_errors=True)
    out: dict[str, Any] = {"kubeflow_all_running_s": round(all_running, 1),
                           "kubeflow_node_recovery_s": None if recovery is None else round(recovery, 1)}
    if note:
        out["kubeflow_node_recovery_note"] = note
    return out


def kubeflow_skip_reason(args: argparse.Namespace) -> str | None:
    """Why Kubeflow's half does not run (None: it runs, built first where it must be)."""
    if args.no_kubeflow:
        return "--no-kubeflow"
    if args.smoke:
        try:
            tools.kubeflow_training_operator(build=False)
        except FileNotFoundError:
            return ("smoke: Kubeflow's training operator is not built (hack/cluster/build.sh kubeflow, or one "
                    "`make bench-operator`, builds it)")
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--gpu-nodes", type=int, default=100)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--kubeflow-recovery-timeout", type=float, default=240,
                    help="seconds to wait for Kubeflow's node recovery (it may never come)")
    ap.add_argument("--smoke", action="store_true",
                    help="a small private control plane, Kubeflow only if already built: checks the script runs (" +
                         ", ".join(f"{k}={v}" for k, v in SMOKE_DEFAULTS.items()) + ")")
    ap.add_argument("--no-kubeflow", action="store_true", help="skip the Kubeflow half (its figures are null)")
    if ap.parse_known_args()[0].smoke:
        ap.set_defaults(**SMOKE_DEFAULTS)
    args = ap.parse_args()
    skip_kubeflow = kubeflow_skip_reason(args)
    # a SIGTERM (make, timeout) still runs the finally blocks that stop every process started here
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a smoke keeps its logs beside its results (a test's tmp_path), a full run in the system's tmp
    work = Path(tempfile.mkdtemp(prefix="bench-operator-", dir=out.parent if args.smoke else None))
    # the smoke's control plane is kwok only: real nodes would cost their start and stay unused
    # (PodNodeSelector's cluster default sends every pod made here to kwok's nodes)
    # kwok nodes only: PodNodeSelector sends every pod there, so real nodes would only load the CPU
    shape: dict[str, Any] = {"port_base": SMOKE_PORT_BASE if args.smoke else PORT_BASE, "real_nodes": 0}
    cluster = Cluster(ClusterConfig(state_dir=work / "cluster", gpu_nodes=args.gpu_nodes, cpu_nodes=2, **shape))
    result: dict[str, Any] = {"jobs": args.jobs, "workers_per_job": WORKERS, "gpu_nodes": args.gpu_nodes,
                              "kubeflow_version": tools.versions()["KUBEFLOW_TRAINING_OPERATOR_VERSION"],
                              "smoke": args.smoke}
    log(f"starting a private control plane with {args.gpu_nodes} GPU nodes in {work}")
    try:
        cluster.up()
        result.update(bench_kubeforge(cluster, work, args.jobs))
        if skip_kubeflow:
            log(f"kubeflow: skipped ({skip_kubeflow})")
            result.update(kubeflow_all_running_s=None, kubeflow_node_recovery_s=None, kubeflow_skipped=skip_kubeflow)
        else:
            try:
                result.update(bench_kubeflow(cluster, work, args.jobs, args.kubeflow_recovery_timeout))
            except Exception as e:  # noqa: BLE001 (the reason goes into the results)
                result.update(kubeflow_all_running_s=None, kubeflow_node_recovery_s=None,
                              kubeflow_error=f"{type(e).__name__}: {e}")
    finally:
        cluster.down()
    theirs = result.get("kubeflow_all_running_s")
    result["ratio_vs_kubeflow"] = round(result["all_running_s"] / theirs, 3) if theirs else None
    result["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    out.write_text(json.dumps({k: result.get(k) for k in KEYS} | {k: v for k, v in result.items() if k not in KEYS},
                              indent=2) + "\n")
    goals = {"ratio_vs_kubeflow": "goal <= 1.0"}
    print(f"operator benchmark: {args.jobs} jobs x {WORKERS} workers on {args.gpu_nodes} GPU nodes")
    for key in KEYS:
        print(f"  {key:26s} {result.get(key)!s:>10}  {goals.get(key, '')}")
    for key in ("kubeflow_node_recovery_note", "kubeflow_error", "kubeflow_skipped"):
        if key in result:
            print(f"  {key}: {result[key]}")
    print(f"wrote {out}; logs in {work}")


if __name__ == "__main__":
    main()
