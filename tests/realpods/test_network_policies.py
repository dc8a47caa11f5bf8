"""The workload NetworkPolicies, enforced on the real nodes (kube-router in firewall-only mode
beside the bridge CNI, hack/cluster/nodes.py): a TrainingJob's rendezvous port answers its own
worker pods and no other pod of the namespace, and an InferenceService's port 8000 answers
exactly its allowed clients.

Every denial is checked against a connection that works: the same address and port from an
allowed pod, and the denied pod's own network (the API server's Service) at the same moment,
so a listener that is down or a pod without network cannot pass for a policy. Clients sit on
both real nodes: traffic between pods of one node is bridged, between nodes routed, and the
enforcer must stop both.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devcluster import Cluster
from kubeforge.api.contract import RENDEZVOUS_PORT, SERVING_PORT
from kubeforge.controllers.trainingjob.manifests import network_policy_name, rendezvous_name

from tests.e2e.test_inferenceservice_contract import save_tiny_model
from tests.fixtures.cluster import kubectl_json, wait_for
from tests.fixtures.realpods import REAL, ChartOperator, s3_secret
from tests.realpods.test_real_nodes import restricted_pod
from tests.realpods.test_scale_down_under_load import upload_model
from tests.realpods.test_train_and_serve import JOB, apply_examples, running_workers

pytestmark = [pytest.mark.realpods, pytest.mark.timeout(900)]

#: Connects to each host:port argument; prints what happened to each as JSON.
PROBE = r"""
import json, socket, sys
out = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        out[target] = "connected"
    except OSError as e:
        out[target] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""
API_SERVER = "kubernetes.default.svc:443"
CLIENT_LABEL = "kubeforge.dev/test-client"


def probe(c: Cluster, ns: str, pod: str, *targets: str) -> dict[str, str]:
    out = c.kubectl("exec", "-n", ns, pod, "--", "python", "-c", PROBE, *targets, check=False)
    assert out.returncode == 0, f"probe in {ns}/{pod} failed: {out.stdout}{out.stderr}"
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def enforcer_logs(c: Cluster) -> str:
    return "\n".join(f"== node-{i}-kube-router\n{c._log_tail(f'node-{i}-kube-router', 8)}"
                     for i in range(c.cfg.real_nodes))


def client_pods(c: Cluster, ns: str, image: str, prefix: str, labels: dict[str, str] | None = None) -> list[str]:
    """One idle pod of our image per real node, pinned there; their names once Running."""
    names = []
    for node in c.nodes.names():
        pod = restricted_pod(f"{prefix}-{node}", image, ["python", "-c", "import time; time.sleep(3600)"],
                             limits={"memory": "256Mi"})
        pod["metadata"]["labels"] = labels or {}
        pod["spec"]["nodeName"] = node
        c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pod))
        names.append(pod["metadata"]["name"])
    wait_for(f"pods {names} Running", lambda: all(kubectl_json(c, "get", "pod", n, "-n", ns).get(
        "status", {}).get("phase") == "Running" for n in names), 180, interval=1)
    return names


def pod_ip(c: Cluster, ns: str, name: str) -> str:
    return str(kubectl_json(c, "get", "pod", name, "-n", ns).get("status", {}).get("podIP") or "")


def assert_denied(c: Cluster, ns: str, pods: list[str], targets: list[str], why: str) -> None:
    for pod in pods:
        got = probe(c, ns, pod, API_SERVER, *targets)
        assert got[API_SERVER] == "connected", f"{ns}/{pod} has no network at all, nothing to deny: {got}"
        leaked = {t: r for t, r in got.items() if t != API_SERVER and r == "connected"}
        assert not leaked, (f"{ns}/{pod} connected to {sorted(leaked)} although {why}: the NetworkPolicy is not "
                            f"enforced on the real nodes\n{enforcer_logs(c)}")


def assert_allowed(c: Cluster, ns: str, pods: list[str], targets: list[str]) -> None:
    for pod in pods:
        got = probe(c, ns, pod, *targets)
        assert all(r == "connected" for r in got.values()), f"{ns}/{pod} must reach {targets}: {got}\n{enforcer_logs(c)}"


@pytest.fixture
def other_namespace(real_cluster: Cluster) -> Iterator[str]:
    """A second namespace on the real nodes, without an operator."""
    name = f"r-{uuid.uuid4().hex[:8]}"
    real_cluster.kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "annotations": REAL, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted", "kubeforge.dev/test": "true"}}}))
    yield name
    real_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_every_real_node_runs_the_enforcer(real_cluster: Cluster) -> None:
    running = real_cluster.running()
    for i, name in enumerate(real_cluster.nodes.names()):
        assert running.get(f"node-{i}-kube-router"), f"kube-router is not running on {name}:\n{enforcer_logs(real_cluster)}"
        chains, _ = real_cluster.nodes.enforcer_state(i)
        assert {"KUBE-ROUTER-INPUT", "KUBE-ROUTER-FORWARD", "KUBE-ROUTER-OUTPUT"} <= set(chains), (name, chains)


def test_only_the_jobs_own_pods_reach_its_rendezvous_port(chart_operator: ChartOperator) -> None:
    op = chart_operator
    c, ns = op.cluster, op.namespace
    apply_examples(c, ns, steps=100000, every=100000, prefix=f"netpol-{uuid.uuid4().hex[:6]}", services=False)
    rdzv = rendezvous_name(JOB)
    wait_for("two worker containers running", lambda: len(running_workers(c, ns)) == 2, 300, interval=2)
    policy = kubectl_json(c, "get", "networkpolicy", network_policy_name(JOB), "-n", ns)
    assert policy["spec"]["podSelector"] == {"matchLabels": {"kubeforge.dev/job-name": JOB}}, policy["spec"]
    target = f"{pod_ip(c, ns, rdzv)}:{RENDEZVOUS_PORT}"
    outsiders = client_pods(c, ns, op.images["trainer"], "outsider")

    workers = [p["metadata"]["name"] for p in running_workers(c, ns)]
    # the store pod imports torch before it listens: wait until it does, as a worker sees it
    wait_for("the rendezvous store listening", lambda: probe(c, ns, workers[0], target)[target] == "connected",
             180, interval=2)
    assert_allowed(c, ns, workers, [target, f"{rdzv}.{JOB}.{ns}.svc:{RENDEZVOUS_PORT}"])
    assert_denied(c, ns, outsiders, [target, f"{rdzv}.{JOB}.{ns}.svc:{RENDEZVOUS_PORT}"],
                  f"it lacks the label kubeforge.dev/job-name={JOB}")
    # and the workers still rendezvous with each other: the denial was the outsiders' alone
    assert_allowed(c, ns, workers, [target])


def isvc_pod(c: Cluster, ns: str, name: str) -> str:
    pods = kubectl_json(c, "get", "pods", "-n", ns, "-l", f"kubeforge.dev/inferenceservice={name}")["items"]
    ready = [p["metadata"]["name"] for p in pods if any(
        x["type"] == "Ready" and x["status"] == "True" for x in p.get("status", {}).get("conditions", []))]
    return ready[0] if ready else ""


def test_an_inference_services_port_answers_only_its_allowed_clients(
        chart_operator: ChartOperator, other_namespace: str, tmp_path: Path) -> None:
    op = chart_operator
    c, ns = op.cluster, op.namespace
    s3_secret(c, ns)
    uri = upload_model(c, save_tiny_model(tmp_path / "model"), f"models/netpol-{uuid.uuid4().hex[:6]}")
    isvc: dict[str, Any] = {
        "apiVersion": "kubeforge.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "guarded"},
        "spec": {"model": {"uri": uri, "s3Endpoint": "http://minio.kubeforge-local.svc:9000",
                           "credentialsSecretRef": {"name": "kubeforge-s3"}}, "replicas": 1, "gpus": 1}}
    c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(isvc))
    image = op.images["trainer"]
    same_ns = client_pods(c, ns, image, "neighbour")
    labelled = client_pods(c, ns, image, "client", labels={CLIENT_LABEL: "true"})
    foreign = client_pods(c, other_namespace, image, "foreign", labels={CLIENT_LABEL: "true"})
    wait_for("the server pod Ready", lambda: isvc_pod(c, ns, "guarded"), 300, interval=2)
    server = isvc_pod(c, ns, "guarded")
    targets = [f"{pod_ip(c, ns, server)}:{SERVING_PORT}", f"guarded-server.{ns}.svc:{SERVING_PORT}"]

    # the default: every pod of the namespace, no pod of another
    assert_allowed(c, ns, same_ns + labelled, targets)
    assert_denied(c, other_namespace, foreign, targets, f"it is not in {ns}, the default clients' namespace")

    # allowedClients replaces the default: only the labelled pods of the namespace
    c.kubectl("patch", "inferenceservice", "guarded", "-n", ns, "--type=merge", "-p", json.dumps(
        {"spec": {"network": {"allowedClients": [{"podSelector": {"matchLabels": {CLIENT_LABEL: "true"}}}]}}}))
    wait_for("the NetworkPolicy to name the allowed clients", lambda: any(
        peer.get("podSelector") == {"matchLabels": {CLIENT_LABEL: "true"}}
        for rule in kubectl_json(c, "get", "networkpolicy", "guarded-server", "-n", ns)["spec"]["ingress"]
        for peer in rule.get("from", [])), 60, interval=1)

    def neighbours_denied() -> bool:
        return all(r != "connected" for pod in same_ns for t, r in probe(c, ns, pod, *targets).items())

    # the enforcer applies a changed policy within its sync: allow it a few seconds, never more
    wait_for("the unlabelled neighbours denied", neighbours_denied, 30, interval=1)
    assert_denied(c, ns, same_ns, targets, f"it lacks the label {CLIENT_LABEL}=true")
    assert_allowed(c, ns, labelled, targets)
    assert_denied(c, other_namespace, foreign, targets, "a podSelector peer admits its own namespace's pods only")
