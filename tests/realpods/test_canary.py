"""A canary and a shadow on real pods: the operator starts the candidate's server pods and the
router, switches the ClusterIP Service to the router once it is ready and back when the canary
and shadow go, and a client running through all of it (in a real node's network namespace,
as a pod would) loses no request. Through the Service the canary answers 20 % of keyless
requests (within a point: each router replica splits exactly), a session stays on its
revision, the shadow receives copies whose answers are never returned, and the router's
per-revision metrics count what each revision answered."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from devcluster import Cluster

from tests.fixtures.cluster import kubectl_json, wait_for
from tests.fixtures.realpods import ChartOperator, s3_secret
from tests.realpods.test_scale_down_under_load import upload_model
from tests.realpods.test_train_and_serve import in_node
from tests.runtime.test_serve_api import save_tiny_model

pytestmark = [pytest.mark.realpods, pytest.mark.timeout(1200)]
NAME = "split"

CLIENT = r"""
import json, os, sys, threading, time, urllib.request
url, seconds, threads, stop_file = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
body = json.dumps({"model": "split", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}).encode()
by_rev, counts, failed, errors = {}, {}, [0], []
lock = threading.Lock()
deadline = time.monotonic() + seconds
def loop():
    while time.monotonic() < deadline and not os.path.exists(stop_file):
        try:
            req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                text = json.loads(r.read())["choices"][0]["text"]
                rev = r.headers.get("x-kubeforge-revision") or "direct"
            with lock:
                by_rev.setdefault(rev, set()).add(text)
                counts[rev] = counts.get(rev, 0) + 1
        except Exception as e:
            with lock:
                failed[0] += 1
                errors.append(repr(e)[:200])
        time.sleep(0.02)
ts = [threading.Thread(target=loop) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps({"revisions": {k: sorted(v) for k, v in by_rev.items()}, "counts": counts,
                  "failed": failed[0], "errors": errors[:10]}))
"""

BATCH = r"""
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
url, n, keyed = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
body = json.dumps({"model": "split", "prompt": "Once upon a time", "max_tokens": 1}).encode()
def one(i):
    headers = {"content-type": "application/json"}
    if keyed:
        headers["x-session-id"] = f"user-{i % 20}"
    req = urllib.request.Request(url, data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        return i % 20, r.headers["x-kubeforge-revision"]
with ThreadPoolExecutor(8) as pool:
    out = list(pool.map(one, range(n)))
print(json.dumps(out))
"""


def status(c: Cluster, ns: str) -> dict[str, object]:
    return dict(kubectl_json(c, "get", "inferenceservice", NAME, "-n", ns).get("status") or {})


def routed(c: Cluster, ns: str) -> bool:
    traffic = status(c, ns).get("traffic") or {}
    return bool(isinstance(traffic, dict) and traffic.get("routed"))


def test_a_canary_and_a_shadow_through_the_service_drop_nothing(chart_operator: ChartOperator,
                                                                 tmp_path: Path) -> None:
    c, ns = chart_operator.cluster, chart_operator.namespace
    s3_secret(c, ns)
    tag = uuid.uuid4().hex[:6]
    stable_uri = upload_model(c, save_tiny_model(tmp_path / "a", seed=7), f"models/stable-{tag}")
    candidate_uri = upload_model(c, save_tiny_model(tmp_path / "b", seed=8), f"models/candidate-{tag}")

    def source(uri: str) -> dict[str, object]:
        return {"uri": uri, "s3Endpoint": "http://minio.kubeforge-local.svc:9000",
                "credentialsSecretRef": {"name": "kubeforge-s3"}}

    isvc = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": NAME},
            "spec": {"model": source(stable_uri), "replicas": 1, "gpus": 1,
                     "engine": {"shutdownTimeoutSeconds": 20}, "lifecycle": {"preStopSleepSeconds": 3}}}
    c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(isvc))
    wait_for("the stable revision Ready", lambda: (status(c, ns).get("readyReplicas") or 0) == 1, 300, interval=2)
    ip = kubectl_json(c, "get", "service", f"{NAME}-server", "-n", ns)["spec"]["clusterIP"]
    url = f"http://{ip}:8000/v1/completions"
    stop = tmp_path / "stop"
    load = subprocess.Popen(["ip", "netns", "exec", c.nodes.net.netns(0), sys.executable, "-c", CLIENT, url, "600",
                             "4", str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        isvc["spec"]["canary"] = {"model": source(candidate_uri), "trafficPercent": 20}
        isvc["spec"]["shadow"] = {"model": source(candidate_uri), "samplePercent": 100}
        c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(isvc))
        try:
            wait_for("the Service routed to a ready router", lambda: routed(c, ns), 300, interval=2)
            wait_for("the canary and the shadow ready", lambda: all(
                (((status(c, ns).get("traffic") or {}).get(r) or {}).get("readyReplicas") or 0) >= 1  # type: ignore[union-attr]
                for r in ("canary", "shadow")), 300, interval=2)
        except AssertionError as e:
            raise AssertionError(f"{status(c, ns)}\noperator:\n{chart_operator.logs()}") from e
        selector = kubectl_json(c, "get", "service", f"{NAME}-server", "-n", ns)["spec"]["selector"]
        assert selector == {"kubeforge.dev/inferenceservice-role": f"{NAME}.router"}, selector

        # keyless requests (the batch and the looping client): the canary's share of everything a
        # router answered is exact per router, so within a request per router in all
        keyless = [rev for _, rev in json.loads(in_node(c, _batch(url, 500, False), timeout=300))]
        assert set(keyless) == {"stable", "canary"}, keyless
        answered = router_totals(c, ns, 'kubeforge:router_requests_total{code="200",revision=')
        # a request the canary could not take yet (its pods were still starting when the load
        # came through the router) was answered by the stable revision: its share counts it
        fell_back = router_totals(c, ns, 'kubeforge:router_fallbacks_total{revision=').get("canary", 0)
        routers = len(router_ips(c, ns))
        total_n = sum(answered.values())
        # off by at most one request per router, and by the looping client's requests in flight (4)
        assert total_n >= 500 and abs(answered.get("canary", 0) + fell_back - 0.2 * total_n) <= routers + 4, (
            answered, fell_back)
        keyed = json.loads(in_node(c, _batch(url, 200, True), timeout=300))
        per_session: dict[int, set[str]] = {}
        for session, rev in keyed:
            per_session.setdefault(session, set()).add(rev)
        assert all(len(v) == 1 for v in per_session.values()), per_session

        # the shadow's first copies may have met it still starting (dropped, or failed to connect
        # in 5 s); once it is ready they are answered
        with contextlib.suppress(AssertionError):  # a failure is explained below
            wait_for("shadow copies answered", lambda: router_totals(
                c, ns, 'kubeforge:shadow_requests_total{outcome="ok",revision=').get("shadow", 0) > 0, 90, interval=3)
        metrics = router_metrics(c, ns)

        def total(prefix: str) -> float:
            return sum(float(ln.split()[-1]) for m in metrics for ln in m.splitlines() if ln.startswith(prefix))
        assert total('kubeforge:router_requests_total{code="200",revision="canary"}') >= keyless.count("canary")
        shadow_lines = [ln for m in metrics for ln in m.splitlines() if ln.startswith("kubeforge:shadow")]
        logs = "\n".join(c.kubectl("logs", "-n", ns, "-l", f"kubeforge.dev/inferenceservice-role={NAME}.router",
                                    "--tail=30", check=False).stdout.splitlines()[-60:])
        if total('kubeforge:shadow_requests_total{outcome="ok",revision="shadow"}') == 0:
            router_pod = kubectl_json(c, "get", "pods", "-n", ns, "-l",
                                      f"kubeforge.dev/inferenceservice-role={NAME}.router")["items"][0]["metadata"]["name"]
            probe = c.kubectl("exec", "-n", ns, router_pod, "--", "python", "-c",
                              "import urllib.request,json;r=urllib.request.urlopen(urllib.request.Request("
                              f"'http://{NAME}-shadow.{ns}.svc.cluster.local:8000/v1/completions',data=json.dumps("
                              "{'model':'split','prompt':'hi','max_tokens':1}).encode(),headers={'content-type':"
                              "'application/json'}),timeout=20);print(r.status)", check=False)
            diag = {
                "probe": (probe.returncode, probe.stdout[-500:], probe.stderr[-1500:]),
                "policies": [(p["metadata"]["name"], p["spec"]) for p in
                             kubectl_json(c, "get", "networkpolicies", "-n", ns)["items"]],
                "endpoints": [(e["metadata"]["name"], e.get("subsets")) for e in
                              kubectl_json(c, "get", "endpoints", "-n", ns)["items"]],
                "shadow_pods": [(p["metadata"]["labels"], p["status"].get("podIP"),
                                 [x.get("ready") for x in p["status"].get("containerStatuses", [])]) for p in
                                kubectl_json(c, "get", "pods", "-n", ns, "-l",
                                             f"kubeforge.dev/inferenceservice-role={NAME}.shadow")["items"]],
                "shadow_logs": c.kubectl("logs", "-n", ns, "-l", f"kubeforge.dev/inferenceservice-role={NAME}.shadow",
                                         "--tail=20", check=False).stdout[-3000:]}
            raise AssertionError(json.dumps(diag, indent=1, default=str) + "\n" + "\n".join(shadow_lines) + logs)

        # the canary and the shadow go: the Service returns to the stable pods, the router leaves
        del isvc["spec"]["canary"], isvc["spec"]["shadow"]
        c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(isvc))
        wait_for("status.traffic gone", lambda: status(c, ns).get("traffic") is None, 120, interval=2)
        wait_for("the router, canary and shadow pods gone", lambda: not [
            p for p in kubectl_json(c, "get", "pods", "-n", ns)["items"]
            if "kubeforge.dev/inferenceservice-role" in p["metadata"].get("labels", {})], 180, interval=2)
        selector = kubectl_json(c, "get", "service", f"{NAME}-server", "-n", ns)["spec"]["selector"]
        assert selector == {"kubeforge.dev/inferenceservice": NAME}, selector
        stop.write_text("")
        out, err = load.communicate(timeout=120)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    result = json.loads(out)
    assert result["failed"] == 0, (result, err[-2000:])
    # every revision answered the load at some point, and the shadow's answers never reached it
    assert {"direct", "stable", "canary"} <= set(result["revisions"]), result
    assert "shadow" not in result["revisions"], result
    events = kubectl_json(c, "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={NAME}")["items"]
    reasons = {e["reason"] for e in events}
    assert {"CanaryStarted", "ShadowStarted", "TrafficRouted", "TrafficUnrouted", "CanaryRemoved",
            "ShadowRemoved"} <= reasons, reasons


def router_ips(c: Cluster, ns: str) -> list[str]:
    return [p["status"]["podIP"] for p in kubectl_json(
        c, "get", "pods", "-n", ns, "-l", f"kubeforge.dev/inferenceservice-role={NAME}.router")["items"]
        if p.get("status", {}).get("podIP") and not p["metadata"].get("deletionTimestamp")]


def router_metrics(c: Cluster, ns: str) -> list[str]:
    return [in_node(c, f"import urllib.request; print(urllib.request.urlopen('http://{ip}:8000/metrics')"
                       ".read().decode())") for ip in router_ips(c, ns)]


def router_totals(c: Cluster, ns: str, prefix: str) -> dict[str, float]:
    """Sum over the routers of the series starting with ``prefix``, by the label value after it."""
    out: dict[str, float] = {}
    for m in router_metrics(c, ns):
        for ln in m.splitlines():
            if ln.startswith(prefix):
                label = ln[len(prefix):].split('"')[1]
                out[label] = out.get(label, 0.0) + float(ln.split()[-1])
    return out


def _batch(url: str, n: int, keyed: bool) -> str:
    """BATCH as one script with its arguments bound (``in_node`` runs code, not argv)."""
    return f"import sys\nsys.argv = ['batch', {url!r}, '{n}', '{int(keyed)}']\n" + BATCH
