"""The local control plane: GPU nodes as the GPU Operator labels them, node failure helpers,
idempotent up, and a down that leaves no process behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from devcluster import Cluster, ClusterConfig

from tests.fixtures.cluster import kubectl_json, wait_for

pytestmark = pytest.mark.cluster


def test_gpu_nodes_have_capacity_labels_and_taints(cluster: Cluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in kubectl_json(cluster, "get", "nodes")["items"]}
    gpu = [n for n in nodes.values() if n["metadata"]["labels"].get("nvidia.com/gpu.present") == "true"]
    assert len([n for n in gpu if n["metadata"]["labels"]["type"] == "kwok"]) >= 4
    for n in gpu:
        count = "8" if n["metadata"]["labels"]["type"] == "kwok" else str(cluster.cfg.real_node_gpus)
        assert n["status"]["allocatable"]["nvidia.com/gpu"] == count
        assert n["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert n["metadata"]["labels"]["nvidia.com/gpu.count"] == count
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in n["spec"]["taints"]
    assert any("nvidia.com/gpu" not in n["status"]["allocatable"] for n in nodes.values()), "no CPU-only node"
    ready = [c["status"] for n in nodes.values() for c in n["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and all(s == "True" for s in ready)


def test_second_up_is_a_noop(cluster: Cluster) -> None:
    pids = {c: cluster._pid(c) for c in cluster.components()}
    assert cluster.up() is False
    assert pids == {c: cluster._pid(c) for c in cluster.components()}


def _hex_ip(ip: str) -> str:
    """An IPv4 address as /proc/net/tcp writes it."""
    return "".join(f"{int(b):02X}" for b in reversed(ip.split(".")))


def _listening(pid: int) -> set[str]:
    """Addresses the process ``pid`` listens on (TCP), read in its own network namespace."""
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                found.add(cols[1].split(":")[0])
    return found


def test_everything_listens_on_loopback_or_the_clusters_own_addresses(cluster: Cluster) -> None:
    """The control plane on loopback and the cluster bridge's address (which only the host and
    the cluster's node namespaces reach); each real node's processes on its own address."""
    loopback = {"0100007F", "00000000000000000000000001000000"}
    allowed = {c: loopback | {_hex_ip(cluster.cfg.address)} for c in cluster.components()}
    for i in range(cluster.cfg.real_nodes if cluster.real_nodes_enabled() else 0):
        for c in allowed:
            if c.startswith(f"node-{i}-"):
                allowed[c] = loopback | {_hex_ip(cluster.nodes.net.node_ip(i))}
    seen = 0
    for component, ok in allowed.items():
        pid = cluster._pid(component)
        assert pid is not None, f"{component} is not running"
        listening = _listening(pid)
        seen += len(listening)
        assert listening <= ok, f"{component} listens beyond its addresses: {listening - ok}"
    assert seen, "found no listening sockets of the control plane"


def test_fail_and_restore_a_node(cluster: Cluster) -> None:
    cluster.add_node("flaky-node", gpus=8)
    try:
        wait_for("flaky-node Ready", lambda: cluster.node_ready("flaky-node") == "True", 30)
        cluster.fail_node("flaky-node")
        assert cluster.node_ready("flaky-node") == "False"
        # heartbeat lost: the node-lifecycle controller marks it Unknown and taints it unreachable
        wait_for("flaky-node Unknown", lambda: cluster.node_ready("flaky-node") == "Unknown", 90)
        taints = kubectl_json(cluster, "get", "node", "flaky-node")["spec"].get("taints", [])
        assert any(t["key"] == "node.kubernetes.io/unreachable" for t in taints), taints
        cluster.restore_node("flaky-node")
        wait_for("flaky-node Ready again", lambda: cluster.node_ready("flaky-node") == "True", 60)
    finally:
        cluster.remove_node("flaky-node")


def _host_changes(c: Cluster) -> dict[str, object]:
    """What a cluster with real nodes changes on the host, as the host shows it."""
    import nodes

    net = c.nodes.net
    return {
        "links": nodes.sh("ip", "-o", "link", "show").stdout.count(f"kf{net.index}"),
        "netns": [n for n in nodes.sh("ip", "netns", "list").stdout.split() if n.startswith(f"kf{net.index}-")],
        "chain": nodes.sh("iptables", "-w", "-S").stdout.count(net.chain),
        "routes": [r for r in nodes.sh("ip", "route", "show").stdout.splitlines() if f"10.{net.index}." in r],
        "cgroups": [str(h) for h in nodes.cgroup_hierarchies() for i in range(c.cfg.real_nodes)
                    if (h / c.nodes.cgroup(i)).exists()],
        "run": c.nodes.run_dir.exists(),
    }


def test_a_second_cluster_does_not_collide_and_down_leaves_nothing_behind(cluster: Cluster, tmp_path: Path) -> None:
    """A second, small cluster on other ports, with its own real node: it comes up beside the
    first on addresses of its own, and its down stops every pid and removes every link,
    namespace, route, chain, cgroup and runtime folder it made."""
    other = Cluster(ClusterConfig(state_dir=tmp_path / "cluster", port_base=cluster.cfg.port_base + 1000,
                                  net_index=cluster.cfg.net_index + 1, gpu_nodes=1, cpu_nodes=0, real_nodes=1,
                                  real_node_gpus=2))
    try:
        assert other.up() is True
        assert other.real_nodes_unavailable() is None and other.cfg.address != cluster.cfg.address
        pids = [other._pid(c) for c in other.components()]
        assert all(pids) and len(pids) > len(other.COMPONENTS), dict(zip(other.components(), pids, strict=True))
        assert other.node_ready("real-node-0") == "True"
        assert cluster.node_ready("real-node-0") == "True"  # the first cluster's node of the same name
        made = _host_changes(other)
        assert made["links"] and made["netns"] and made["chain"] and made["cgroups"], made
    finally:
        other.down()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), pid
    left = _host_changes(other)
    assert left == {"links": 0, "netns": [], "chain": 0, "routes": [], "cgroups": [], "run": False}, left
    assert _host_changes(cluster)["netns"], "the first cluster's nodes must be untouched"
