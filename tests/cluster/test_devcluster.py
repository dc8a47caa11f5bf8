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
    assert len(gpu) >= 4
    for n in gpu:
        assert n["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert n["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert n["metadata"]["labels"]["nvidia.com/gpu.count"] == "8"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in n["spec"]["taints"]
    assert any("nvidia.com/gpu" not in n["status"]["allocatable"] for n in nodes.values()), "no CPU-only node"
    ready = [c["status"] for n in nodes.values() for c in n["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and all(s == "True" for s in ready)


def test_second_up_is_a_noop(cluster: Cluster) -> None:
    pids = {c: cluster._pid(c) for c in cluster.COMPONENTS}
    assert cluster.up() is False
    assert pids == {c: cluster._pid(c) for c in cluster.COMPONENTS}


def test_everything_listens_on_loopback_only(cluster: Cluster) -> None:
    pids = {str(cluster._pid(c)) for c in cluster.COMPONENTS}
    inodes: set[str] = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                listening.append(cols[1].split(":")[0])
    assert listening, "found no listening sockets of the control plane"
    loopback = {"0100007F", "00000000000000000000000001000000"}
    assert set(listening) <= loopback, f"sockets bound beyond loopback: {set(listening) - loopback}"


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


def test_down_leaves_no_process_behind(cluster: Cluster, tmp_path: Path) -> None:
    """A second, small cluster on other ports: up, then down, and every pid is gone."""
    other = Cluster(ClusterConfig(state_dir=tmp_path / "cluster", port_base=cluster.cfg.port_base + 1000,
                                  gpu_nodes=1, cpu_nodes=0))
    try:
        assert other.up() is True
        pids = [other._pid(c) for c in other.COMPONENTS]
        assert all(pids), pids
    finally:
        other.down()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), pid
