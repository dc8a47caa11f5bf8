"""The local control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
kwok (fake GPU nodes and pod lifecycles), MinIO, CoreDNS and real nodes (kubelet +
containerd + runc + kube-proxy + a fake-GPU device plugin, see nodes.py), as local processes.

    python hack/cluster/devcluster.py up|down|status
    python hack/cluster/devcluster.py images          # build our images, import them into the real nodes
    python hack/cluster/devcluster.py node fail|restore|add|remove NAME [--gpus N]

With real nodes the apiserver, MinIO and CoreDNS listen on the cluster bridge's address
(10.<N>.0.1, nodes.py), which the pods reach; without them (KUBEFORGE_REAL_NODES=0, or a host
that lacks what they need: ``status`` says what) everything listens on 127.0.0.1.

State lives in ``.dev/cluster`` (git-ignored): pki, data, logs, one pid file per process,
``kubeconfig`` and ``s3.env``. ``up`` is a no-op when everything runs; ``down`` stops by pid
(checking that the pid still is the binary we started) and removes the state except logs.
The tests import this module (``Cluster``) so they start and stop the same way.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nodes
import tools

STAGES_DIR = "kustomize/stage"
#: The label that puts a node under kwok's management; changing its value makes kwok's
#: label-filtered watch see the node leave, so kwok stops renewing its lease.
MANAGED = "kwok.x-k8s.io/node"
#: kwok's stages, loaded from its module (kwok v0.8.0 ships none built in).
STAGE_FILES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "node/chaos/node-not-ready.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
)
NOT_READY_LABEL = "node-not-ready.stage.kwok.x-k8s.io"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
S3_USER, S3_PASSWORD, S3_BUCKET = "kubeforge", "kubeforge-local-secret", "kubeforge"


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Shape and ports of the local cluster; environment variables override the defaults."""

    #: Folder holding all state; inside the repo but git-ignored.
    state_dir: Path = tools.REPO / ".dev" / "cluster"
    #: First of the loopback ports used (etcd, apiserver, minio, ... are offsets from it).
    port_base: int = int(os.environ.get("KUBEFORGE_CLUSTER_PORT_BASE", "26000"))
    #: GPU nodes and their shape (as the NVIDIA GPU Operator labels them).
    gpu_nodes: int = int(os.environ.get("KUBEFORGE_GPU_NODES", "4"))
    gpus_per_node: int = int(os.environ.get("KUBEFORGE_GPUS_PER_NODE", "8"))
    gpu_product: str = os.environ.get("KUBEFORGE_GPU_PRODUCT", "NVIDIA-H100-80GB-HBM3")
    node_cpu: str = "96"
    node_memory: str = "1Ti"
    cpu_nodes: int = int(os.environ.get("KUBEFORGE_CPU_NODES", "1"))
    #: Real nodes (kubelet + containerd) and the fake GPUs each advertises.
    real_nodes: int = int(os.environ.get("KUBEFORGE_REAL_NODES", "2"))
    real_node_gpus: int = int(os.environ.get("KUBEFORGE_REAL_NODE_GPUS", "4"))
    #: N of the real nodes' addresses 10.N.0.0/16 (nodes.Network); by default from the port base,
    #: so clusters with different port bases never share addresses.
    net_index: int = int(os.environ.get("KUBEFORGE_CLUSTER_NET_INDEX",
                                        str(200 + int(os.environ.get("KUBEFORGE_CLUSTER_PORT_BASE", "26000")) // 1000 % 50)))
    #: How long a node may miss heartbeats before the node-lifecycle controller marks it Unknown.
    node_monitor_grace_seconds: int = 20

    @property
    def etcd_port(self) -> int:
        return self.port_base + 379

    @property
    def apiserver_port(self) -> int:
        return self.port_base + 443

    @property
    def minio_port(self) -> int:
        return self.port_base + 900

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def s3_env(self) -> Path:
        return self.state_dir / "s3.env"

    @property
    def address_file(self) -> Path:
        """Where ``up`` records the address it chose (the bridge's, or loopback)."""
        return self.state_dir / "address.json"

    @property
    def address(self) -> str:
        """The address the apiserver, MinIO and CoreDNS listen on."""
        try:
            return str(json.loads(self.address_file.read_text())["address"])
        except (OSError, ValueError, KeyError):
            return "127.0.0.1"

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.apiserver_port}"


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


class Cluster:
    """Start, stop and poke the local control plane."""

    def __init__(self, cfg: ClusterConfig | None = None) -> None:
        self.cfg = cfg or ClusterConfig()
        self.dir = self.cfg.state_dir
        self.pki = self.dir / "pki"
        self.pids = self.dir / "pids"
        self.logs = self.dir / "logs"

    # ---- processes -------------------------------------------------------------------
    def _pid(self, name: str) -> int | None:
        f = self.pids / f"{name}.pid"
        if not f.exists():
            return None
        pid_s, _, exe = f.read_text().partition(" ")
        pid = int(pid_s)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            return None
        return pid if cmdline == exe.strip() else None

    def _start(self, name: str, cmd: list[str], env: dict[str, str] | None = None, exe: str | None = None,
               preexec: Any = None) -> None:
        """Start ``cmd`` in its own session, its pid recorded with the binary it must be
        (``exe``, when ``cmd`` execs into another program, as nsenter does)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pids.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})}, preexec_fn=preexec)
        (self.pids / f"{name}.pid").write_text(f"{proc.pid} {exe or cmd[0]}")
        # right after the fork /proc/<pid>/cmdline can still show the parent's; wait for the exec
        deadline = time.monotonic() + 5
        while self._pid(name) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)

    def _stop(self, name: str, timeout: float = 15) -> None:
        pid = self._pid(name)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._pid(name) is not None:
                time.sleep(0.1)
            if self._pid(name) is not None:
                os.kill(pid, signal.SIGKILL)
            try:  # reap if it was our child (tests start the cluster in-process)
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        (self.pids / f"{name}.pid").unlink(missing_ok=True)

    COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "minio")

    @property
    def nodes(self) -> nodes.RealNodes:
        return nodes.RealNodes(self)

    def real_nodes_enabled(self) -> bool:
        return self.cfg.address != "127.0.0.1"

    def real_nodes_unavailable(self) -> str | None:
        """Why this cluster has no real nodes (None when it has them)."""
        try:
            info = json.loads(self.cfg.address_file.read_text())
        except (OSError, ValueError):
            return "the local cluster is not up"
        return None if info.get("address") != "127.0.0.1" else str(info.get("why"))

    def components(self) -> tuple[str, ...]:
        if not self.real_nodes_enabled():
            return self.COMPONENTS
        return (*self.COMPONENTS, "coredns", *self.nodes.running())

    def running(self) -> dict[str, bool]:
        return {c: self._pid(c) is not None for c in self.components()}

    def _log_tail(self, name: str, lines: int = 15) -> str:
        f = self.logs / f"{name}.log"
        return "\n".join(f.read_text(errors="replace").splitlines()[-lines:]) if f.exists() else "(no log)"

    def _wait(self, what: str, check: Any, timeout: float, component: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._pid(component) is None:
                raise RuntimeError(f"{component} exited while waiting for {what}:\n{self._log_tail(component)}")
            try:
                if check():
                    return
            except (OSError, urllib.error.URLError, RuntimeError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}; {component} log:\n{self._log_tail(component)}")

    # ---- credentials -----------------------------------------------------------------
    def _openssl(self, *args: str) -> None:
        _run(["openssl", *args], cwd=self.pki)

    def _cert(self, name: str, subject: str, server: bool = False) -> None:
        self._openssl("genrsa", "-out", f"{name}.key", "2048")
        self._openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr")
        ext = self.pki / f"{name}.ext"
        if server:
            ext.write_text(f"subjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:{self.cfg.address},DNS:localhost,"
                           "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
                           "DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n")
        else:
            ext.write_text("extendedKeyUsage=clientAuth\n")
        self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                      "-days", "3650", "-out", f"{name}.crt", "-extfile", ext.name)

    def _kubeconfig(self, path: Path, user: str) -> None:
        def b64(name: str) -> str:
            return base64.b64encode((self.pki / name).read_bytes()).decode()

        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "kubeforge-local",
            "clusters": [{"name": "kubeforge-local",
                          "cluster": {"server": self.cfg.server, "certificate-authority-data": b64("ca.crt")}}],
            "users": [{"name": user, "user": {"client-certificate-data": b64(f"{user}.crt"),
                                              "client-key-data": b64(f"{user}.key")}}],
            "contexts": [{"name": "kubeforge-local", "context": {"cluster": "kubeforge-local", "user": user,
                                                                  "namespace": "default"}}],
        }
        path.write_text(json.dumps(cfg, indent=1))
        path.chmod(0o600)

    def _make_pki(self) -> None:
        if (self.pki / "done").exists():
            return
        shutil.rmtree(self.pki, ignore_errors=True)
        self.pki.mkdir(parents=True)
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
                      "-days", "3650", "-subj", "/CN=kubeforge-local-ca")
        self._cert("apiserver", "/CN=kube-apiserver", server=True)
        self._cert("admin", "/O=system:masters/CN=kubeforge-admin")
        self._cert("controller-manager", "/CN=system:kube-controller-manager")
        self._cert("scheduler", "/CN=system:kube-scheduler")
        # the apiserver's client identity towards the kubelets (logs, exec, port-forward)
        self._cert("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client")
        self._openssl("genrsa", "-out", "sa.key", "2048")
        self._openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        for user in ("controller-manager", "scheduler"):
            self._kubeconfig(self.pki / f"{user}.kubeconfig", user)
        (self.pki / "done").touch()

    # ---- lifecycle -------------------------------------------------------------------
    def _apiserver_ready(self) -> bool:
        out = self.kubectl("get", "--raw", "/readyz", check=False)
        return out.returncode == 0 and out.stdout.strip() == "ok"

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([str(tools.binary("kubectl")), "--kubeconfig", str(self.cfg.kubeconfig), *args],
                             input=input, text=True, capture_output=True)
        if check and out.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def is_up(self) -> bool:
        return all(self.running().values()) and self._apiserver_ready()

    def up(self) -> bool:
        """Start everything; returns False when it was already running (a no-op)."""
        if self.is_up():
            print(f"local cluster already running; KUBECONFIG={self.cfg.kubeconfig}")
            return False
        if any(self.running().values()):
            self.down(keep_state=True)
        bins = {n: str(tools.binary(n)) for n in ("etcd", "kube-apiserver", "kube-controller-manager",
                                                 "kube-scheduler", "kwok", "kubectl", "minio")}
        self.dir.mkdir(parents=True, exist_ok=True)
        real = self._choose_address()
        self._make_pki()
        self._kubeconfig(self.cfg.kubeconfig, "admin")
        c, pki = self.cfg, self.pki
        t0 = time.monotonic()
        etcd_url = f"http://127.0.0.1:{c.etcd_port}"
        self._start("etcd", [bins["etcd"], "--name", "kubeforge", "--data-dir", str(self.dir / "etcd"),
                             "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                             "--listen-peer-urls", f"http://127.0.0.1:{c.etcd_port + 1}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{c.etcd_port + 1}",
                             "--initial-cluster", f"kubeforge=http://127.0.0.1:{c.etcd_port + 1}",
                             "--listen-metrics-urls", f"http://127.0.0.1:{c.etcd_port + 2}",
                             "--unsafe-no-fsync", "--log-level", "warn"])
        self._wait("etcd", lambda: urllib.request.urlopen(f"{etcd_url}/health", timeout=2).status == 200, 30, "etcd")
        self._start("kube-apiserver", [
            bins["kube-apiserver"], "--etcd-servers", etcd_url,
            "--bind-address", c.address, "--advertise-address", c.address,
            "--secure-port", str(c.apiserver_port),
            "--tls-cert-file", str(pki / "apiserver.crt"), "--tls-private-key-file", str(pki / "apiserver.key"),
            "--client-ca-file", str(pki / "ca.crt"),
            "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins", "NamespaceLifecycle,LimitRanger,ServiceAccount,PodSecurity,"
                                          "DefaultTolerationSeconds,ResourceQuota,Priority,OwnerReferencesPermissionEnforcement,"
                                          "NodeRestriction,PodNodeSelector",
            "--admission-control-config-file", str(self._admission_config()),
            "--kubelet-preferred-address-types", "InternalIP,Hostname",
            "--kubelet-client-certificate", str(pki / "apiserver-kubelet-client.crt"),
            "--kubelet-client-key", str(pki / "apiserver-kubelet-client.key"),
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range", nodes.SERVICE_CIDR,
            "--profiling=false", "--v=1"])
        self._wait("kube-apiserver /readyz", self._apiserver_ready, 90, "kube-apiserver")
        self._start("kube-controller-manager", [
            bins["kube-controller-manager"], "--kubeconfig", str(pki / "controller-manager.kubeconfig"),
            "--authentication-kubeconfig", str(pki / "controller-manager.kubeconfig"),
            "--authorization-kubeconfig", str(pki / "controller-manager.kubeconfig"),
            "--bind-address", "127.0.0.1", "--secure-port", str(c.port_base + 257),
            "--leader-elect=false", "--controllers", "*",
            "--use-service-account-credentials",
            "--service-account-private-key-file", str(pki / "sa.key"), "--root-ca-file", str(pki / "ca.crt"),
            "--cluster-signing-cert-file", str(pki / "ca.crt"), "--cluster-signing-key-file", str(pki / "ca.key"),
            "--node-monitor-period", "2s", "--node-monitor-grace-period", f"{c.node_monitor_grace_seconds}s",
            "--horizontal-pod-autoscaler-sync-period", "5s",
            "--concurrent-deployment-syncs", "10", "--kube-api-qps", "200", "--kube-api-burst", "400",
            "--v=1"])
        self._start("kube-scheduler", [
            bins["kube-scheduler"], "--kubeconfig", str(pki / "scheduler.kubeconfig"),
            "--authentication-kubeconfig", str(pki / "scheduler.kubeconfig"),
            "--authorization-kubeconfig", str(pki / "scheduler.kubeconfig"),
            "--bind-address", "127.0.0.1", "--secure-port", str(c.port_base + 259),
            "--leader-elect=false", "--kube-api-qps", "200", "--kube-api-burst", "400", "--v=1"])
        stages = self.dir / "kwok-stages.yaml"
        root = _kwok_stages()
        stages.write_text("\n---\n".join((root / f).read_text() for f in STAGE_FILES))
        self._start("kwok", [
            bins["kwok"], "--kubeconfig", str(c.kubeconfig), "--config", str(stages),
            f"--manage-nodes-with-label-selector={MANAGED}=fake",
            "--node-lease-duration-seconds", "40", "--cidr", "10.244.0.1/16", "--node-ip", "127.0.0.1",
            "--server-address", f"127.0.0.1:{c.port_base + 250}"])
        self.start_minio(bins["minio"])
        self._make_bucket()
        self._wait("default ServiceAccount", lambda: self.kubectl("get", "serviceaccount", "default").returncode == 0,
                   60, "kube-controller-manager")
        for i in range(c.gpu_nodes):
            self.add_node(f"gpu-node-{i}", gpus=c.gpus_per_node)
        for i in range(c.cpu_nodes):
            self.add_node(f"cpu-node-{i}", gpus=0)
        names = [f"gpu-node-{i}" for i in range(c.gpu_nodes)] + [f"cpu-node-{i}" for i in range(c.cpu_nodes)]
        self._wait("nodes Ready", lambda: all(self.node_ready(n) == "True" for n in names), 60, "kwok")
        if real:
            self._start_real_nodes()
        print(f"local cluster up in {time.monotonic() - t0:.1f}s; export KUBECONFIG={c.kubeconfig}")
        return True

    def _admission_config(self) -> Path:
        """PodNodeSelector's cluster default: pods of a namespace without its own
        ``scheduler.alpha.kubernetes.io/node-selector`` go to kwok's simulated nodes; a namespace
        annotated ``type=real`` (the demo's, the real-pod tests') runs its pods for real."""
        f = self.dir / "admission.yaml"
        f.write_text(json.dumps({
            "apiVersion": "apiserver.config.k8s.io/v1", "kind": "AdmissionConfiguration",
            "plugins": [{"name": "PodNodeSelector", "configuration": {
                "podNodeSelectorPluginConfig": {"clusterDefaultNodeSelector": f"{nodes.NODE_TYPE_LABEL}=kwok"}}}]}))
        return f

    def _choose_address(self) -> bool:
        """The bridge's address when real nodes are wanted and the host can run them (its
        network made now, as the apiserver binds it), else loopback; recorded with the reason."""
        why = "KUBEFORGE_REAL_NODES=0" if self.cfg.real_nodes <= 0 else "; ".join(nodes.missing_capabilities())
        if not why:
            if self.nodes.leftovers():
                print("local cluster: removing what an earlier run's real nodes left behind", file=sys.stderr)
                self.nodes.teardown()
            self.nodes.setup_network()
        address = self.nodes.net.host_ip if not why else "127.0.0.1"
        self.cfg.address_file.write_text(json.dumps({"address": address, "why": why or None}))
        if why:
            print(f"local cluster without real nodes: {why}", file=sys.stderr)
        return not why

    def _start_real_nodes(self) -> None:
        """CoreDNS, the MinIO Service, then each real node; waits until they are Ready."""
        import images

        c = self.cfg
        corefile = self.dir / "Corefile"
        # cluster.local only, no forwarder: pods resolve cluster names and nothing else
        corefile.write_text(f"""cluster.local:53 in-addr.arpa:53 {{
    bind {c.address}
    errors
    kubernetes cluster.local in-addr.arpa {{
        kubeconfig {c.kubeconfig} kubeforge-local
        pods insecure
        fallthrough in-addr.arpa
    }}
    cache 5
}}
""")
        self._start("coredns", [str(tools.binary("coredns")), "-conf", str(corefile)])
        self._minio_service()
        t0 = time.monotonic()
        pause = images.pause_image()
        for i in range(c.real_nodes):
            self.nodes.start_node(i, pause)
        self._wait("real nodes Ready with their GPUs", lambda: all(
            self.node_ready(n) == "True" and self._allocatable_gpus(n) == c.real_node_gpus for n in self.nodes.names()),
                   120, "node-0-kubelet")
        print(f"real nodes {', '.join(self.nodes.names())} Ready in {time.monotonic() - t0:.1f}s")

    def _allocatable_gpus(self, name: str) -> int:
        out = self.kubectl("get", "node", name, "-o", "jsonpath={.status.allocatable.nvidia\\.com/gpu}", check=False)
        return int(out.stdout or 0) if out.returncode == 0 else -1

    #: The namespace of the cluster's own services (MinIO's).
    SYSTEM_NAMESPACE = "kubeforge-local"

    def _minio_service(self) -> None:
        """``minio.kubeforge-local.svc:9000``: a Service without selector whose EndpointSlice
        is MinIO on the bridge address, so pods reach the store by a cluster DNS name."""
        c, ns = self.cfg, self.SYSTEM_NAMESPACE
        objs = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {
                "name": ns, "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
                "annotations": {"scheduler.alpha.kubernetes.io/node-selector": f"{nodes.NODE_TYPE_LABEL}=real"}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "minio", "namespace": ns},
             "spec": {"ports": [{"name": "s3", "port": 9000, "targetPort": c.minio_port}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "minio-host", "namespace": ns, "labels": {"kubernetes.io/service-name": "minio"}},
             "addressType": "IPv4", "ports": [{"name": "s3", "port": c.minio_port, "protocol": "TCP"}],
             "endpoints": [{"addresses": [c.address], "conditions": {"ready": True}}]},
        ]
        self.kubectl("apply", "--server-side", "-f", "-", input="\n---\n".join(json.dumps(o) for o in objs))

    def images(self) -> dict[str, str]:
        """Build our images (cached) and import them into every running real node; returns name → tag."""
        import images

        tags = {spec.name: images.build(spec) for spec in images.ALL}
        images.prune(set(tags.values()))  # older builds: several GB each
        keep = set(tags.values())
        for i in range(self.cfg.real_nodes):
            if self._pid(f"node-{i}-containerd") is None:  # `make images` before `make cluster-up`
                print(f">> images: {self.nodes.node_name(i)} is not running: built only; "
                      "`make demo` and the tests import them once it runs", file=sys.stderr, flush=True)
                continue
            for tag in tags.values():
                if self.nodes.has_image(i, tag):
                    continue
                size = images.size(tag)
                # older builds go after the import, so the layers they share with it (torch)
                # are not unpacked again; first only when the disk cannot hold both
                if not self.nodes.space_for(i, size):
                    self.nodes.remove_images_except(i, keep)
                self.nodes.check_space_for(i, tag, size)
                t0 = time.monotonic()
                self.nodes.import_image(i, tag)
                print(f">> images: {tag} imported into {self.nodes.node_name(i)} in {time.monotonic() - t0:.0f}s",
                      file=sys.stderr, flush=True)
            self.nodes.remove_images_except(i, keep)
        return tags

    def start_minio(self, binary: str | None = None) -> None:
        """MinIO on its port, its data kept in the state dir (a restart serves what was stored)."""
        c = self.cfg
        self._start("minio", [str(binary or tools.binary("minio")), "server", str(self.dir / "minio"),
                              "--address", f"{c.address}:{c.minio_port}",
                              "--console-address", f"{c.address}:{c.minio_port + 1}", "--quiet"],
                    env={"MINIO_ROOT_USER": S3_USER, "MINIO_ROOT_PASSWORD": S3_PASSWORD,
                         "MINIO_BROWSER": "off", "MINIO_UPDATE": "off"})
        self._wait("MinIO", lambda: urllib.request.urlopen(
            f"http://{c.address}:{c.minio_port}/minio/health/ready", timeout=2).status == 200, 60, "minio")

    def stop_minio(self) -> None:
        """MinIO stopped (by its pid), as an S3 endpoint that went away: its port refuses."""
        self._stop("minio")

    def _make_bucket(self) -> None:
        import boto3  # the cluster's users are the operator and tests; both have boto3

        s3 = boto3.client("s3", endpoint_url=f"http://{self.cfg.address}:{self.cfg.minio_port}", aws_access_key_id=S3_USER,
                          aws_secret_access_key=S3_PASSWORD, region_name="us-east-1")
        if S3_BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=S3_BUCKET)
        self.cfg.s3_env.write_text(
            f"AWS_ENDPOINT_URL=http://{self.cfg.address}:{self.cfg.minio_port}\nAWS_ACCESS_KEY_ID={S3_USER}\n"
            f"AWS_SECRET_ACCESS_KEY={S3_PASSWORD}\nAWS_REGION=us-east-1\nKUBEFORGE_S3_BUCKET={S3_BUCKET}\n")

    def down(self, keep_state: bool = False) -> None:
        if self.real_nodes_enabled() or (self.dir / "nodes").exists():
            self.nodes.teardown()
            self._stop("coredns")
        for name in reversed(self.COMPONENTS):
            self._stop(name)
        if not keep_state and self.dir.exists():
            for child in self.dir.iterdir():
                if child.name != "logs":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()

    def s3_settings(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.cfg.s3_env.read_text().splitlines() if "=" in line)

    # ---- nodes -----------------------------------------------------------------------
    def node_ready(self, name: str) -> str | None:
        out = self.kubectl("get", "node", name, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                           check=False)
        return out.stdout.strip() or None if out.returncode == 0 else None

    def add_node(self, name: str, gpus: int = 8) -> None:
        c = self.cfg
        labels = {MANAGED: "fake", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  "type": "kwok"}
        capacity = {"cpu": c.node_cpu, "memory": c.node_memory, "pods": "110", "ephemeral-storage": "1Ti"}
        taints = []
        if gpus:
            labels.update({"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": c.gpu_product,
                           "nvidia.com/gpu.count": str(gpus)})
            capacity["nvidia.com/gpu"] = str(gpus)
            taints.append(GPU_TAINT)
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels},
                "spec": {"taints": taints},
                "status": {"capacity": capacity, "allocatable": capacity}}
        out = self.kubectl("create", "-f", "-", input=json.dumps(node), check=False)
        if out.returncode and "AlreadyExists" not in out.stderr:  # a restart on kept state finds it there
            raise RuntimeError(f"adding node {name} failed: {out.stderr.strip()}")

    def remove_node(self, name: str) -> None:
        self.kubectl("delete", "node", name, "--wait=false")

    def fail_node(self, name: str, heartbeat_lost: bool = True) -> None:
        """A real node: ``lose_real_node``. A kwok node: make a node NotReady (kwok's node-not-ready stage); with ``heartbeat_lost`` also
        stop managing it, so its lease expires, the node goes Unknown and its pods are
        stranded as on a dead kubelet."""
        if name in self.nodes.names():
            self.lose_real_node(name)
            return
        self.kubectl("label", "node", name, f"{NOT_READY_LABEL}=true", "--overwrite")
        deadline = time.monotonic() + 30
        while self.node_ready(name) == "True":
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {name} did not turn NotReady")
            time.sleep(0.3)
        if heartbeat_lost:
            self.kubectl("label", "node", name, f"{MANAGED}=lost", "--overwrite")

    def restore_node(self, name: str) -> None:
        if name in self.nodes.names():
            self.nodes.start_node(self.nodes.names().index(name), __import__("images").pause_image())
            return
        self.kubectl("label", "node", name, f"{MANAGED}=fake", f"{NOT_READY_LABEL}-", "--overwrite")

    def lose_real_node(self, name: str) -> None:
        """A real node lost: its kubelet, containerd, kube-proxy and every container on it
        stopped at once (killed by pid from the node's cgroup); ``restore_node`` restarts it."""
        self.nodes.kill_node(self.nodes.names().index(name), timeout=5)


def _kwok_stages() -> Path:
    """kwok's stage files of the pinned version, kept beside its binary: fetched once from its
    module into a throw-away module cache (build.sh drops Go's caches after a build)."""
    version = tools.versions()["KWOK_VERSION"]
    dest = tools.cache_root() / "bin" / f"kwok-{version}" / "stages"
    if all((dest / f).is_file() for f in STAGE_FILES):
        return dest
    with tempfile.TemporaryDirectory(prefix="kwok-mod-") as mod:
        env = {**os.environ, "GOMODCACHE": mod, "GOFLAGS": "-modcacherw"}
        out = subprocess.run(["go", "mod", "download", "-json", f"sigs.k8s.io/kwok@{version}"], check=True,
                             capture_output=True, text=True, cwd=tools.HERE / "kwok", env=env)
        src = Path(json.loads(out.stdout)["Dir"]) / STAGES_DIR
        for f in STAGE_FILES:
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f, dest / f)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up")
    sub.add_parser("down")
    sub.add_parser("status")
    sub.add_parser("images")
    node = sub.add_parser("node")
    node.add_argument("action", choices=["fail", "restore", "add", "remove"])
    node.add_argument("name")
    node.add_argument("--gpus", type=int, default=8)
    node.add_argument("--keep-heartbeat", action="store_true", help="fail: NotReady only, heartbeat continues")
    args = ap.parse_args(argv)
    cluster = Cluster()
    if args.cmd == "up":
        try:
            cluster.up()
        except Exception as e:  # say why and leave nothing half-started behind
            print(f"cluster-up failed: {e}", file=sys.stderr)
            cluster.down(keep_state=True)
            return 1
    elif args.cmd == "down":
        cluster.down()
        print("local cluster stopped")
    elif args.cmd == "status":
        for name, ok in cluster.running().items():
            print(f"{name:26} {'running' if ok else 'stopped'}")
        why = cluster.real_nodes_unavailable()
        if why:
            print(f"real nodes: none ({why})")
        return 0 if cluster.is_up() else 3
    elif args.cmd == "images":
        for name, tag in cluster.images().items():
            print(f"{name}={tag}")
    else:
        {"fail": lambda: cluster.fail_node(args.name, heartbeat_lost=not args.keep_heartbeat),
         "restore": lambda: cluster.restore_node(args.name),
         "add": lambda: cluster.add_node(args.name, gpus=args.gpus),
         "remove": lambda: cluster.remove_node(args.name)}[args.action]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
