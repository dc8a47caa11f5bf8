"""The local cluster's real nodes, as a workload sees them: Ready kubelets advertising fake
GPUs through the device-plugin API with the GPU Operator's labels and taint; a pod of our
image, admitted under PodSecurity ``restricted``, that resolves cluster DNS names, reaches
the API server through the ``kubernetes`` Service and MinIO through its Service name; its
logs through the API; a memory limit enforced (OOMKilled); and a node network namespace
with no way off the machine."""

from __future__ import annotations

import json
from typing import Any

import pytest
from devcluster import Cluster

from tests.fixtures.cluster import kubectl_json, wait_for

pytestmark = [pytest.mark.realpods, pytest.mark.timeout(600)]

PROBE = r"""
import json, socket, urllib.request
out = {}
out["kubernetes"] = socket.gethostbyname("kubernetes.default.svc.cluster.local")
out["minio"] = socket.gethostbyname("minio.kubeforge-local.svc.cluster.local")
with urllib.request.urlopen("http://minio.kubeforge-local.svc:9000/minio/health/ready", timeout=10) as r:
    out["minio_status"] = r.status
s = socket.create_connection(("kubernetes.default.svc", 443), timeout=10)
out["apiserver_tcp"] = True
s.close()
try:
    socket.gethostbyname("example.com")
    out["outside_name"] = "resolved"
except OSError as e:
    out["outside_name"] = type(e).__name__
import torch
out["torch"] = torch.__version__
out["cuda"] = torch.cuda.is_available()
import os
out["visible_gpus"] = os.environ.get("NVIDIA_VISIBLE_DEVICES", "")
print("PROBE " + json.dumps(out))
"""


def restricted_pod(name: str, image: str, command: list[str], limits: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
        "restartPolicy": "Never", "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{"name": "c", "image": image, "imagePullPolicy": "IfNotPresent", "command": command,
                        "resources": {"limits": limits or {"nvidia.com/gpu": "1", "memory": "2Gi"}},
                        "securityContext": {"allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"]}}}]}}


def pod_phase(c: Cluster, ns: str, name: str) -> str:
    return str(kubectl_json(c, "get", "pod", name, "-n", ns).get("status", {}).get("phase", ""))


def test_real_nodes_are_ready_with_fake_gpus_labels_and_taint(real_cluster: Cluster) -> None:
    for name in real_cluster.nodes.names():
        node = kubectl_json(real_cluster, "get", "node", name)
        labels, status = node["metadata"]["labels"], node["status"]
        assert labels["type"] == "real" and labels["nvidia.com/gpu.present"] == "true", labels
        assert status["allocatable"]["nvidia.com/gpu"] == str(real_cluster.cfg.real_node_gpus), status["allocatable"]
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]
        addresses = {a["type"]: a["address"] for a in status["addresses"]}
        assert addresses["InternalIP"] == real_cluster.nodes.net.node_ip(real_cluster.nodes.names().index(name))
        assert status["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://2.")


def test_a_restricted_pod_of_our_image_reaches_dns_the_apiserver_and_minio(
        real_cluster: Cluster, real_namespace: str, local_images: dict[str, str]) -> None:
    c, ns = real_cluster, real_namespace
    pod = restricted_pod("probe", local_images["trainer"], ["python", "-c", PROBE])
    c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pod))
    wait_for("the probe pod to finish", lambda: pod_phase(c, ns, "probe") in ("Succeeded", "Failed"), 180)
    logs = c.kubectl("logs", "-n", ns, "probe").stdout
    assert pod_phase(c, ns, "probe") == "Succeeded", logs
    result = json.loads(logs.split("PROBE ", 1)[1])
    assert result["kubernetes"] == "10.96.0.1"
    assert result["minio"].startswith("10.96.") and result["minio_status"] == 200
    assert result["apiserver_tcp"] is True
    assert result["outside_name"] != "resolved", "cluster DNS must not forward names outside cluster.local"
    assert result["cuda"] is False and result["visible_gpus"].startswith("fake-gpu-"), result
    node = kubectl_json(c, "get", "pod", "probe", "-n", ns)["spec"]["nodeName"]
    assert node in c.nodes.names()


def test_a_memory_limit_is_enforced_and_shows_as_oomkilled(
        real_cluster: Cluster, real_namespace: str, local_images: dict[str, str]) -> None:
    c, ns = real_cluster, real_namespace
    hog = "x = []\nwhile True:\n    x.append(bytearray(16 << 20))\n"
    pod = restricted_pod("hog", local_images["trainer"], ["python", "-c", hog], limits={"memory": "96Mi"})
    c.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pod))
    wait_for("the hog pod to fail", lambda: pod_phase(c, ns, "hog") == "Failed", 180)
    state = kubectl_json(c, "get", "pod", "hog", "-n", ns)["status"]["containerStatuses"][0]["state"]
    assert state["terminated"]["reason"] == "OOMKilled", state


def test_a_node_network_namespace_has_no_route_off_the_machine(real_cluster: Cluster) -> None:
    import nodes

    net = real_cluster.nodes.net
    for i in range(real_cluster.cfg.real_nodes):
        routes = nodes.sh("ip", "netns", "exec", net.netns(i), "ip", "route", "show").stdout
        assert "default" not in routes, routes
        # a route lookup sends nothing: an address outside the cluster has no route at all
        out = nodes.sh("ip", "netns", "exec", net.netns(i), "ip", "route", "get", "192.0.2.1", check=False)
        assert out.returncode != 0 and "unreachable" in out.stderr.lower(), out.stdout + out.stderr
