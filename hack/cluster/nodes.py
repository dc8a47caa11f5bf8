"""Real nodes of the local cluster: each one a kubelet with its own containerd, kube-proxy and
fake-GPU device plugin, in a network namespace and a mount namespace of its own, so that
pods run for real (runc) on this machine's CPU.

The network (all of it made here, and removed by ``teardown``)::

    host netns                                   node netns kf<N>-node-<i>
    bridge kf<N>br  10.<N>.0.1/24  <-- veth -->  eth0 10.<N>.0.<10+i>/24
      apiserver, MinIO, CoreDNS bind here        cni0 10.<N>.<128+i>.1/24 (the pods' bridge)
      route 10.<N>.<128+i>.0/24 via the node     routes to the other nodes' pod subnets only

N is derived from KUBEFORGE_CLUSTER_PORT_BASE (or set by KUBEFORGE_CLUSTER_NET_INDEX), so two
clusters on one machine never share an address, a bridge or an iptables chain. A node netns
has no default route and the host drops whatever the bridge forwards elsewhere: no pod
traffic leaves the machine. Services are kube-proxy's iptables rules inside each node netns;
cluster DNS is CoreDNS on the bridge address, serving ``cluster.local`` only.

Each node's processes run in a cgroup of its own (``/kubeforge-<port base>-node-<i>/node``
in every v1 hierarchy) and the kubelet puts its pods under the same root, so stopping a node
(``fail``) kills exactly its processes and containers, found by pid in that cgroup.
The kubelet's device-plugin socket folder is fixed (/var/lib/kubelet/device-plugins): each
node's mount namespace binds its own folder there.

NetworkPolicy is enforced on each node by kube-router in firewall-only mode (no routing, no
service proxy: the bridge CNI and kube-proxy keep those jobs), in the node's network
namespace: its iptables chains and ipsets live there and go with it. It runs under an
identity of its own (``ENFORCER_USER``) that may only read pods, namespaces, nodes,
services, endpoints and NetworkPolicies.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import tools

if TYPE_CHECKING:
    from devcluster import Cluster

#: The NVIDIA GPU Operator's taint and labels, which the examples' GPU requests expect.
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
#: Label that tells real nodes (``real``) from kwok's (``kwok``); namespaces pick one through
#: the PodNodeSelector annotation ``scheduler.alpha.kubernetes.io/node-selector: type=...``.
NODE_TYPE_LABEL = "type"
DEVICE_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")
#: Host paths the kubelet, containerd and the CNI plugins use whatever they are told (the
#: device-plugin socket folder, container log links, libcni's cache, the shims' sockets):
#: inside each node's mount namespace a folder of the node's own is bound over each, so two
#: nodes never share one and nothing is left in them on the host.
NODE_PRIVATE_DIRS = (Path("/var/lib/kubelet"), Path("/var/log/containers"), Path("/var/lib/cni"),
                     Path("/run/containerd"))
#: The kubelet tunes these sysctls at start (protectKernelDefaults false); teardown puts back
#: the values they had.
KERNEL_TUNABLES = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
PROCESSES = ("containerd", "gpu-plugin", "kubelet", "kube-proxy", "kube-router")
#: kube-router's client identity and what it may read (its informers watch all of these, even
#: in firewall-only mode).
ENFORCER_USER = "system:kubeforge:kube-router"
ENFORCER_RULES = [
    {"apiGroups": [""], "resources": ["pods", "namespaces", "nodes", "services", "endpoints"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
]
#: Name prefixes of what kube-router's network policy controller makes in a node's netns:
#: filter chains and ipsets (its own Cleanup uses the same prefixes).
ENFORCER_CHAIN_PREFIXES = ("KUBE-ROUTER-", "KUBE-POD-FW-", "KUBE-NWPLCY-")
ENFORCER_IPSET_PREFIXES = ("KUBE-SRC-", "KUBE-DST-")
#: The apiserver's --service-cluster-ip-range.
SERVICE_CIDR = "10.96.0.0/16"


@dataclasses.dataclass(frozen=True)
class Network:
    """Addresses of one cluster's real nodes (see the module docstring)."""

    index: int

    @property
    def host_ip(self) -> str:
        return f"10.{self.index}.0.1"

    @property
    def cluster_cidr(self) -> str:
        return f"10.{self.index}.0.0/16"

    @property
    def nodes_cidr(self) -> str:
        """The bridge's network: the host's address and every node's."""
        return f"10.{self.index}.0.0/24"

    @property
    def pods_cidr(self) -> str:
        return f"10.{self.index}.128.0/17"

    @property
    def bridge(self) -> str:
        return f"kf{self.index}br"

    @property
    def chain(self) -> str:
        return f"KUBEFORGE-{self.index}"

    def node_ip(self, i: int) -> str:
        return f"10.{self.index}.0.{10 + i}"

    def pod_cidr(self, i: int) -> str:
        return f"10.{self.index}.{128 + i}.0/24"

    def netns(self, i: int) -> str:
        return f"kf{self.index}-node-{i}"

    def veth(self, i: int) -> str:
        return f"kf{self.index}n{i}"


def sh(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(cmd), text=True, capture_output=True, input=input)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out


def missing_capabilities() -> list[str]:
    """What this host lacks to run real nodes (empty when it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, bridges, cgroups and mounts need it)")
    for cmd in ("ip", "iptables", "iptables-save", "iptables-restore", "ipset", "nsenter", "unshare", "runc",
                "podman", "debootstrap"):
        if shutil.which(cmd) is None:
            missing.append(f"the command {cmd!r} (hack/cluster/host-packages.sh installs it)")
    for plugin in ("bridge", "host-local", "loopback", "portmap"):
        if not (Path("/usr/lib/cni") / plugin).exists():
            missing.append(f"the CNI plugin /usr/lib/cni/{plugin} (package containernetworking-plugins)")
    if not Path("/sys/fs/cgroup/memory").is_dir() or not Path("/sys/fs/cgroup/cpu").is_dir():
        missing.append("cgroup v1 hierarchies cpu and memory under /sys/fs/cgroup")
    if "overlay" not in Path("/proc/filesystems").read_text():
        missing.append("the overlay filesystem")
    return missing


def cgroup_hierarchies() -> list[Path]:
    """The v1 hierarchies (and systemd's named one): where each node's cgroup is made."""
    root = Path("/sys/fs/cgroup")
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != "unified" and (p / "cgroup.procs").exists())


class RealNodes:
    """Set up, start, stop and fail the real nodes of ``cluster``."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.cfg = cluster.cfg
        self.net = Network(self.cfg.net_index)
        self.dir = cluster.dir / "nodes"
        #: Sockets and runtime state: short paths (a unix socket path has 108 bytes at most).
        self.run_dir = Path(f"/run/kubeforge-{self.cfg.port_base}")
        #: Per node: containerd's root (the imported images), which survives cluster-down so that
        #: images are imported once, and the node's state (node_dir), which does not.
        self.persist_dir = tools.cache_root() / "nodes" / str(self.cfg.port_base)

    # ---- names ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [self.node_name(i) for i in range(self.cfg.real_nodes)]

    @staticmethod
    def node_name(i: int) -> str:
        return f"real-node-{i}"

    def cgroup(self, i: int) -> str:
        return f"kubeforge-{self.cfg.port_base}-node-{i}"

    def socket(self, i: int) -> Path:
        return self.run_dir / f"node-{i}" / "containerd.sock"

    def node_dir(self, i: int) -> Path:
        """Node ``i``'s state (configs, the kubelet's root, CNI, logs): removed by teardown. Under
        the cache, not the repo: the kubelet's unix sockets need a short path."""
        return self.persist_dir / f"node-{i}" / "state"

    def mntns(self, i: int) -> Path:
        return self.node_dir(i) / "mntns"

    # ---- the host network ------------------------------------------------------------------
    def leftovers(self) -> bool:
        """Whether an earlier run's nodes left state on the host (its processes were killed
        without a cluster-down)."""
        netns = sh("ip", "netns", "list", check=False).stdout
        return self.run_dir.exists() or any(self.net.netns(i) in netns for i in range(self.cfg.real_nodes))

    def setup_network(self) -> None:
        """The bridge and the host's firewall chain; before the apiserver, which binds the
        bridge's address."""
        n = self.net
        if sh("ip", "link", "show", n.bridge, check=False).returncode:
            sh("ip", "link", "add", n.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{n.host_ip}/24", "dev", n.bridge)
        sh("ip", "link", "set", n.bridge, "up")
        if sh("iptables", "-w", "-n", "-L", n.chain, check=False).returncode:
            sh("iptables", "-w", "-N", n.chain)
            # the bridge may talk to itself (node to node) and to the host's bridge address only
            for rule in (["-i", n.bridge, "-o", n.bridge, "-j", "ACCEPT"], ["-i", n.bridge, "-j", "DROP"],
                         ["-o", n.bridge, "-j", "DROP"]):
                sh("iptables", "-w", "-A", n.chain, *rule)
            sh("iptables", "-w", "-I", "FORWARD", "1", "-j", n.chain)
            sh("iptables", "-w", "-I", "INPUT", "1", "-i", n.bridge, "!", "-d", n.host_ip, "-j", "DROP")
        self._save_kernel_tunables()
        self._write_chart_values()

    @property
    def chart_values(self) -> Path:
        """Helm values the chart needs on this cluster (``helm install -f``), written by ``up``."""
        return self.dir / "chart-values.yaml"

    def _write_chart_values(self) -> None:
        """With NetworkPolicy enforced, the chart's defaults do not fit this cluster: the
        operator's egress policy names the API server's and S3's usual ports (443, 6443, 9000)
        and the routers' (8000), but here the first two listen on the port base's (a Service's policy sees the endpoint's port,
        after kube-proxy's DNAT); and the tests' and benchmarks' HTTP clients run in a real
        node's network namespace, which kube-router lets reach only that node's own pods, so
        the nodes' network may reach the workloads' metrics (and server) ports as a node-local
        Prometheus would."""
        c = self.cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        self.chart_values.write_text(json.dumps({
            # 8000: the InferenceService routers' /metrics, which a Flywheel's guard rails read
            "networkPolicy": {"egressPorts": [443, 6443, 9000, 8000, c.apiserver_port, c.minio_port]},
            "workloadNetworkPolicies": {"scrapeFrom": [{"ipBlock": {"cidr": self.net.nodes_cidr}}]},
        }, indent=1))

    def _save_kernel_tunables(self) -> None:
        saved = self.dir / "kernel-tunables.json"
        if saved.exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        values = {t: (Path("/proc/sys") / t).read_text().strip() for t in KERNEL_TUNABLES
                  if (Path("/proc/sys") / t).exists()}
        saved.write_text(json.dumps(values))

    def _restore_kernel_tunables(self) -> None:
        saved = self.dir / "kernel-tunables.json"
        if not saved.exists():
            return
        for t, v in json.loads(saved.read_text()).items():
            try:
                (Path("/proc/sys") / t).write_text(v)
            except OSError:
                pass
        saved.unlink()

    # ---- one node ------------------------------------------------------------------------------
    def _setup_node_network(self, i: int) -> None:
        n, ns = self.net, self.net.netns(i)
        if sh("ip", "netns", "pids", ns, check=False).returncode == 0:
            return
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", n.veth(i), "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", n.veth(i), "master", n.bridge, "up")

        def in_ns(*cmd: str) -> None:
            sh("ip", "netns", "exec", ns, *cmd)

        in_ns("ip", "link", "set", "lo", "up")
        in_ns("ip", "addr", "add", f"{n.node_ip(i)}/24", "dev", "eth0")
        in_ns("ip", "link", "set", "eth0", "up")
        for j in range(self.cfg.real_nodes):
            if j != i:
                in_ns("ip", "route", "add", n.pod_cidr(j), "via", n.node_ip(j))
        # Services are DNATed by kube-proxy in this netns; a route lets the node's own
        # processes (and tests run here) reach them
        in_ns("ip", "route", "add", SERVICE_CIDR, "via", n.host_ip)
        in_ns("sysctl", "-qw", "net.ipv4.ip_forward=1")
        # Service replies between two pods on one bridge pass kube-proxy's conntrack only with
        # bridged traffic seen by iptables (per network namespace on recent kernels)
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1", check=False)
        sh("ip", "route", "replace", n.pod_cidr(i), "via", n.node_ip(i))

    def _setup_cgroup(self, i: int) -> None:
        for h in cgroup_hierarchies():
            node = h / self.cgroup(i) / "node"
            node.mkdir(parents=True, exist_ok=True)
            if h.name == "cpuset":
                for d in (h / self.cgroup(i), node):
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        if not (d / f).read_text().strip():
                            (d / f).write_text((h / f).read_text())

    def _setup_mount_ns(self, i: int) -> None:
        f = self.mntns(i)
        if f.exists() and sh("nsenter", f"--mount={f}", "true", check=False).returncode == 0:
            return
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
        sh("unshare", f"--mount={f}", "--propagation", "private", "true")
        made = self.dir / "made-host-dirs.json"
        created: list[str] = json.loads(made.read_text()) if made.exists() else []
        for host in NODE_PRIVATE_DIRS:
            if not host.exists():
                host.mkdir(parents=True)  # a mount point only: empty on the host, removed by teardown
                created.append(str(host))
            own = self.node_dir(i) / "host" / host.relative_to("/")
            own.mkdir(parents=True, exist_ok=True)
            sh("nsenter", f"--mount={f}", "mount", "--bind", str(own), str(host))
        (self.node_dir(i) / "host" / DEVICE_PLUGIN_DIR.relative_to("/")).mkdir(parents=True, exist_ok=True)
        made.write_text(json.dumps(created))

    def _write_configs(self, i: int, pause_image: str) -> dict[str, Path]:
        d, run = self.node_dir(i), self.run_dir / f"node-{i}"
        d.mkdir(parents=True, exist_ok=True)
        run.mkdir(parents=True, exist_ok=True)
        pki, n, name = self.cluster.pki, self.net, self.node_name(i)
        (d / "cni").mkdir(exist_ok=True)
        (d / "cni" / "10-kubeforge.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "kubeforge",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": n.pod_cidr(i)}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(d / "cni-ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}, indent=1))
        root = self.persist_dir / f"node-{i}" / "containerd"
        root.mkdir(parents=True, exist_ok=True)
        cri_rt, cri_img = "plugins.'io.containerd.cri.v1.runtime'", "plugins.'io.containerd.cri.v1.images'"
        (d / "containerd.toml").write_text(f"""version = 3
root = "{root}"
state = "{run / 'containerd'}"
[grpc]
  address = "{self.socket(i)}"
[ttrpc]
  address = "{self.socket(i)}.ttrpc"
[debug]
  level = "warn"
[{cri_img}]
  snapshotter = "overlayfs"
  [{cri_img}.pinned_images]
    sandbox = "{pause_image}"
[{cri_rt}]
  # root lacks CAP_SYS_RESOURCE here: without this every sandbox fails to start
  restrict_oom_score_adj = true
  # the pods' network namespaces under the state dir, not the host's /run/netns
  netns_mounts_under_state_dir = true
  [{cri_rt}.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{d / 'cni'}"
  [{cri_rt}.containerd]
    default_runtime_name = "runc"
    [{cri_rt}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri_rt}.containerd.runtimes.runc.options]
        BinaryName = "{shutil.which('runc') or 'runc'}"
        Root = "{run / 'runc'}"
        SystemdCgroup = false
""")
        self.cluster._cert(f"node-{i}", f"/O=system:nodes/CN=system:node:{name}")
        self.cluster._kubeconfig(d / "kubelet.kubeconfig", f"node-{i}")
        if not (pki / "kube-proxy.crt").exists():
            self.cluster._cert("kube-proxy", "/CN=system:kube-proxy")
        self.cluster._kubeconfig(d / "kube-proxy.kubeconfig", "kube-proxy")
        if not (pki / "kube-router.crt").exists():
            self.cluster._cert("kube-router", f"/CN={ENFORCER_USER}")
        self.cluster._kubeconfig(d / "kube-router.kubeconfig", "kube-router")
        (d / "resolv.conf").write_text("")  # pods get cluster DNS only: no resolver of the host
        (d / "kubelet.yaml").write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # this machine has cgroup v1, which 1.35 refuses unless told
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{self.cgroup(i)}",
            "containerRuntimeEndpoint": f"unix://{self.socket(i)}",
            "address": n.node_ip(i), "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(pki / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "clusterDNS": [n.host_ip], "clusterDomain": "cluster.local", "resolvConf": str(d / "resolv.conf"),
            "failSwapOn": False, "serializeImagePulls": False,
            # one disk for everything here: never garbage-collect our imported images, evict late
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "200Mi", "nodefs.available": "2%", "imagefs.available": "2%",
                             "nodefs.inodesFree": "2%"},
            "registerWithTaints": [GPU_TAINT] if self.cfg.real_node_gpus else [],
            "nodeStatusUpdateFrequency": "5s", "nodeStatusReportFrequency": "10s",
            "shutdownGracePeriod": "0s", "containerLogMaxSize": "10Mi", "maxPods": 110,
            "podLogsDir": str(d / "pod-logs"),
        }, indent=1))
        (d / "kube-proxy.yaml").write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "mode": "iptables", "clientConnection": {"kubeconfig": str(d / "kube-proxy.kubeconfig")},
            "hostnameOverride": name, "bindAddress": n.node_ip(i), "clusterCIDR": n.pods_cidr,
            "metricsBindAddress": "127.0.0.1:10249", "healthzBindAddress": "127.0.0.1:10256",
            # leave the host's (global) conntrack sysctls alone
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"syncPeriod": "10s", "minSyncPeriod": "0s"},
        }, indent=1))
        return {"dir": d}

    def _labels(self, i: int) -> str:
        labels = {NODE_TYPE_LABEL: "real", "kubeforge.dev/real-node": "true"}
        if self.cfg.real_node_gpus:
            labels.update({"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": self.cfg.gpu_product,
                           "nvidia.com/gpu.count": str(self.cfg.real_node_gpus)})
        return ",".join(f"{k}={v}" for k, v in labels.items())

    def _start_in_node(self, i: int, what: str, cmd: list[str]) -> None:
        """Start ``cmd`` inside node ``i``'s namespaces and cgroup, with containerd's folder
        first on PATH (containerd finds its runc shim there)."""
        procs = [h / self.cgroup(i) / "node" / "cgroup.procs" for h in cgroup_hierarchies()]

        def enter_cgroup() -> None:
            for p in procs:
                p.write_text(str(os.getpid()))

        wrapped = ["nsenter", f"--net=/run/netns/{self.net.netns(i)}", f"--mount={self.mntns(i)}", "--", *cmd]
        path = f"{tools.binary('containerd').parent}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        self.cluster._start(f"node-{i}-{what}", wrapped, exe=cmd[0], preexec=enter_cgroup, env={"PATH": path})

    def start_node(self, i: int, pause_image: str) -> None:
        self._setup_node_network(i)
        self._setup_cgroup(i)
        self._setup_mount_ns(i)
        d = self._write_configs(i, pause_image)["dir"]
        bins = {b: str(tools.binary(b)) for b in ("containerd", "kubelet", "kube-proxy", "fake-gpu-plugin")}
        self.socket(i).unlink(missing_ok=True)  # a socket left by a node killed earlier answers nothing
        self._start_in_node(i, "containerd", [bins["containerd"], "--config", str(d / "containerd.toml")])
        self.cluster._wait(f"containerd of {self.node_name(i)}", lambda: self.socket(i).exists(), 30,
                           f"node-{i}-containerd")
        self.import_image(i, pause_image)
        self._start_in_node(i, "kubelet", [
            bins["kubelet"], "--config", str(d / "kubelet.yaml"), "--kubeconfig", str(d / "kubelet.kubeconfig"),
            "--root-dir", str(d / "kubelet"), "--cert-dir", str(d / "kubelet-pki"),
            "--hostname-override", self.node_name(i), "--node-ip", self.net.node_ip(i),
            "--node-labels", self._labels(i), "--v=1"])
        if self.cfg.real_node_gpus:
            self._start_in_node(i, "gpu-plugin", [bins["fake-gpu-plugin"], "--count", str(self.cfg.real_node_gpus),
                                                  "--plugin-dir", str(DEVICE_PLUGIN_DIR)])
        self._start_in_node(i, "kube-proxy", [bins["kube-proxy"], "--config", str(d / "kube-proxy.yaml"), "--v=1"])
        self._start_enforcer(i, d)

    def _grant_enforcer(self) -> None:
        objs = [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": "kubeforge-local:kube-router"}, "rules": ENFORCER_RULES},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "kubeforge-local:kube-router"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": "kubeforge-local:kube-router"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": ENFORCER_USER}]},
        ]
        self.cluster.kubectl("apply", "--server-side", "-f", "-", input="\n---\n".join(json.dumps(o) for o in objs))

    def _start_enforcer(self, i: int, d: Path) -> None:
        """kube-router, firewall only, once the kubelet has registered the Node (kube-router
        reads its InternalIP at start and exits without it); waits for its chains, so a node
        is not up while NetworkPolicies go unenforced."""
        name = self.node_name(i)
        self._grant_enforcer()
        self.cluster._wait(f"{name} registered", lambda: self.cluster.kubectl(
            "get", "node", name, "-o", "jsonpath={.status.addresses}", check=False).stdout.strip() != "", 60,
                           f"node-{i}-kubelet")
        self._start_in_node(i, "kube-router", [
            str(tools.binary("kube-router")), "--run-firewall=true", "--run-router=false",
            "--run-service-proxy=false", "--kubeconfig", str(d / "kube-router.kubeconfig"),
            "--hostname-override", name, f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--health-port=0", "--metrics-port=0", "--v=0"])
        self.cluster._wait(f"kube-router's chains on {name}", lambda: sh(
            "ip", "netns", "exec", self.net.netns(i), "iptables", "-w", "-n", "-L", "KUBE-ROUTER-FORWARD",
            check=False).returncode == 0, 60, f"node-{i}-kube-router")

    def enforcer_state(self, i: int) -> tuple[list[str], list[str]]:
        """kube-router's filter chains and ipsets in node ``i``'s network namespace."""
        ns = self.net.netns(i)
        saved = sh("ip", "netns", "exec", ns, "iptables-save", "-t", "filter", check=False).stdout
        chains = [line.split()[0][1:] for line in saved.splitlines()
                  if line.startswith(":") and line[1:].startswith(ENFORCER_CHAIN_PREFIXES)]
        sets = sh("ip", "netns", "exec", ns, "ipset", "list", "-n", check=False).stdout.split()
        return chains, [s for s in sets if s.startswith(ENFORCER_IPSET_PREFIXES)]

    def _remove_enforcer_state(self, i: int) -> None:
        """Remove kube-router's chains, the jumps to them and its ipsets from node ``i``'s netns
        (kube-router stopped first: it would make them again)."""
        ns = self.net.netns(i)
        if sh("ip", "netns", "pids", ns, check=False).returncode or shutil.which("ipset") is None:
            return
        saved = sh("ip", "netns", "exec", ns, "iptables-save", "-t", "filter", check=False).stdout

        def enforcers(line: str) -> bool:
            words = line.split()
            if line.startswith(":"):
                return words[0][1:].startswith(ENFORCER_CHAIN_PREFIXES)
            if not line.startswith("-A "):
                return False
            targets = [words[k + 1] for k, w in enumerate(words[:-1]) if w in ("-j", "-g")]
            return any(w.startswith(ENFORCER_CHAIN_PREFIXES) for w in [words[1], *targets])

        kept = [line for line in saved.splitlines() if not enforcers(line)]
        if len(kept) != len(saved.splitlines()):
            sh("ip", "netns", "exec", ns, "iptables-restore", input="\n".join(kept) + "\n")
        for name in self.enforcer_state(i)[1]:
            sh("ip", "netns", "exec", ns, "ipset", "destroy", name, check=False)

    def ctr(self, i: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(str(tools.binary("ctr")), "--address", str(self.socket(i)), "-n", "k8s.io", *args, check=check)

    def has_image(self, i: int, tag: str) -> bool:
        return tag in self.ctr(i, "images", "ls", "-q").stdout.split()

    def import_image(self, i: int, tag: str) -> bool:
        """Import ``tag`` from podman into node ``i``'s containerd unless it is there already."""
        import images

        if self.has_image(i, tag):
            return False
        # streamed from podman (no archive on disk), and the layer blobs dropped once unpacked:
        # containers run from the snapshots, and the workload image's blobs are gigabytes
        save = subprocess.Popen(images.podman("save", "--format", "docker-archive", tag), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        imported = subprocess.run([str(tools.binary("ctr")), "--address", str(self.socket(i)), "-n", "k8s.io",
                                   "images", "import", "--snapshotter", "overlayfs", "--local",
                                   "--discard-unpacked-layers", "-"], stdin=save.stdout, capture_output=True, text=True)
        assert save.stdout is not None and save.stderr is not None
        save.stdout.close()
        save_err = save.stderr.read().decode(errors="replace")
        if save.wait() or imported.returncode:
            self.ctr(i, "images", "rm", tag, check=False)  # a failed import may leave the name behind
            raise RuntimeError(f"importing {tag} into {self.node_name(i)} failed: {save_err.strip()} "
                               f"{imported.stderr.strip()}")
        return True

    def remove_images_except(self, i: int, keep: set[str]) -> None:
        """Drop older builds of our images from node ``i``, waiting until containerd has
        collected their snapshots (``--sync``)."""
        for tag in self.ctr(i, "images", "ls", "-q").stdout.split():
            repo = tag.rsplit(":", 1)[0]
            if repo in {k.rsplit(":", 1)[0] for k in keep} and tag not in keep:
                self.ctr(i, "images", "rm", "--sync", tag, check=False)

    def space_for(self, i: int, size: int) -> bool:
        """Whether node ``i``'s disk can take an import of ``size`` bytes (unpacked): the import
        holds the layer blobs until they are unpacked, so about twice the size (an upper bound:
        layers the node has already are not unpacked again)."""
        return shutil.disk_usage(self.persist_dir).free >= 2 * size + (1 << 30)

    def check_space_for(self, i: int, tag: str, size: int) -> None:
        """Fail before importing ``tag`` into node ``i`` when the disk cannot hold it: a full
        disk midway fails every later test with ENOSPC, far from the cause."""
        need = 2 * size + (1 << 30)
        free = shutil.disk_usage(self.persist_dir).free
        if free < need:
            raise RuntimeError(f"importing {tag} into {self.node_name(i)} needs about {need / 2**30:.1f} GiB free on "
                               f"the disk of {self.persist_dir}, which has {free / 2**30:.1f} GiB; "
                               f"{tools.disk_report()}")

    def running(self) -> dict[str, bool]:
        return {f"node-{i}-{p}": self.cluster._pid(f"node-{i}-{p}") is not None
                for i in range(self.cfg.real_nodes) for p in PROCESSES
                if p != "gpu-plugin" or self.cfg.real_node_gpus}

    # ---- stopping --------------------------------------------------------------------------------
    def cgroup_pids(self, i: int) -> set[int]:
        pids: set[int] = set()
        for h in cgroup_hierarchies():
            base = h / self.cgroup(i)
            if base.exists():
                for procs in base.rglob("cgroup.procs"):
                    try:
                        pids |= {int(p) for p in procs.read_text().split()}
                    except OSError:
                        pass
        return pids

    def kill_node(self, i: int, timeout: float = 15) -> None:
        """Stop every process of node ``i``: the kubelet and kube-proxy by their pid files,
        then everything left in the node's cgroup (containerd, shims, containers)."""
        for p in ("kube-router", "kubelet", "kube-proxy", "gpu-plugin"):
            self.cluster._stop(f"node-{i}-{p}", timeout=5)
        deadline = time.monotonic() + timeout
        sig = signal.SIGTERM
        while (pids := self.cgroup_pids(i)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
            sig = signal.SIGKILL
        self.cluster._stop(f"node-{i}-containerd", timeout=1)

    def _remove_cgroup(self, i: int) -> None:
        for h in cgroup_hierarchies():
            base = h / self.cgroup(i)
            if not base.exists():
                continue
            for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                base.rmdir()
            except OSError:
                pass

    def teardown(self) -> None:
        """Remove everything the real nodes changed on the host (processes, mounts, cgroups,
        namespaces, links, routes, chains and ipsets, sysctls); the images in containerd's root
        stay."""
        for i in range(self.cfg.real_nodes):
            self.kill_node(i)
            self._remove_enforcer_state(i)
            self._remove_cgroup(i)
            f = self.mntns(i)
            if f.exists():
                sh("umount", str(f), check=False)
            sh("ip", "netns", "del", self.net.netns(i), check=False)
            sh("ip", "link", "del", self.net.veth(i), check=False)
            sh("ip", "route", "del", self.net.pod_cidr(i), check=False)
            shutil.rmtree(self.node_dir(i), ignore_errors=True)
        n = self.net
        sh("ip", "link", "del", n.bridge, check=False)
        while sh("iptables", "-w", "-D", "FORWARD", "-j", n.chain, check=False).returncode == 0:
            pass
        while sh("iptables", "-w", "-D", "INPUT", "-i", n.bridge, "!", "-d", n.host_ip, "-j", "DROP",
                 check=False).returncode == 0:
            pass
        sh("iptables", "-w", "-F", n.chain, check=False)
        sh("iptables", "-w", "-X", n.chain, check=False)
        self._restore_kernel_tunables()
        made = self.dir / "made-host-dirs.json"
        for host in reversed(json.loads(made.read_text()) if made.exists() else []):
            try:
                Path(host).rmdir()
            except OSError:
                pass
        shutil.rmtree(self.run_dir, ignore_errors=True)
