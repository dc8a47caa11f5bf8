"""Every metric the Grafana dashboard and the PrometheusRule query is exported by the component
that should export it:

- ``kubeforge_*`` (not ``kubeforge_trainer_*``): the operator. Scraped from the real
  ``kubeforge-operator`` /metrics after it reconciled a CheckpointPolicy.
- ``kubeforge_trainer_*``: rank 0 of the trainer, scraped from a real ``kubeforge_runtime.train``
  run (tiny model, one process, checkpointing to a volume store) while it trains.
- ``vllm:*``: the inference server, scraped from a real ``kubeforge_runtime.serve`` after it
  answered a completion.

For those two a name counts only when a sample line carries it (a ``# TYPE`` line alone is a
series that was never produced), for the trainer only with a value other than 0.
- ``up``: Prometheus' own.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tools
import yaml
from devcluster import Cluster

from tests.fixtures.cluster import REPO, OperatorProcess, free_port, kubectl_json, wait_for

pytestmark = pytest.mark.cluster
DASHBOARD = REPO / "charts" / "kubeforge" / "dashboards" / "kubeforge.json"
PROMQL_WORDS = {
    "sum", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "rate", "irate",
    "increase", "deriv", "delta", "histogram_quantile", "time", "absent", "max", "min", "avg", "count",
    "label_values", "offset", "bool", "topk", "bottomk", "clamp_min", "clamp_max", "abs", "vector", "scalar",
}
def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers, groupings, strings, numbers and
    functions removed)."""
    expr = re.sub(r"label_values\((.*),\s*\w+\)\s*$", r"\1", expr)  # Grafana's: (metric, label)
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", expr):
        name, call = m.group(1), m.group(2)
        if call or name in PROMQL_WORDS:
            continue
        names.add(name)
    return names


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_queries(cluster: Cluster) -> list[str]:
    out = subprocess.run([str(tools.binary("helm")), "template", "x", str(REPO / "charts" / "kubeforge"),
                          "--kube-version", tools.versions()["KUBERNETES_VERSION"],
                          "--set", "metrics.prometheusRule.enabled=true", "--set", "metrics.serviceMonitor.enabled=true",
                          "-s", "templates/prometheusrule.yaml"],
                         capture_output=True, text=True, check=True)
    rule = yaml.safe_load(out.stdout)
    return [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]


def exported(text: str, samples_only: bool = False, nonzero: bool = False) -> set[str]:
    """Names a Prometheus text exposition offers to queries (histograms as _bucket/_sum/_count);
    ``samples_only``: only names with a sample line; ``nonzero``: only with a sample that is not 0
    (an unlabelled gauge shows 0 before anything set it)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE ") and not (samples_only or nonzero):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if kind == "counter":
                names |= {name if name.endswith("_total") else f"{name}_total"}
        elif line and not line.startswith("#"):
            if nonzero and float(line.rsplit(" ", 1)[1]) == 0:
                continue
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def scrape(url: str, proc: subprocess.Popen[bytes], log: Path, until: str, timeout: float = 120) -> str:
    """/metrics of a running process once the series ``until`` is produced (not 0)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = str(r.read().decode())
            if until in exported(text, nonzero=True):
                return text
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {until} at {url}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def trainer_metrics(tmp_path: Path) -> Iterator[str]:
    from tests.runtime.test_trainer import job_env, trainer_cmd, write_config

    port = free_port()
    cfg = write_config(tmp_path / "c.yaml", train={"steps": 2000}, metrics={"port": port, "log_every": 1})
    log = tmp_path / "trainer.log"
    with log.open("w") as out:
        proc = subprocess.Popen(trainer_cmd(cfg, None), env=job_env(tmp_path / "store", every_steps=2),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield scrape(f"http://127.0.0.1:{port}/metrics", proc, log, "kubeforge_trainer_checkpoint_save_seconds")
    finally:
        stop(proc)


@pytest.fixture
def server_metrics(tmp_path: Path) -> Iterator[str]:
    from tests.runtime.test_serve_api import Server, save_tiny_model

    server = Server(save_tiny_model(tmp_path / "model"), tmp_path / "server.log")
    try:
        server.wait_ready(120)
        status, _ = server.post("/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 4})
        assert status == 200
        status, _, body = server.request("GET", "/metrics")
        assert status == 200
        yield body.decode()
    finally:
        server.stop()


def test_metric_name_parser() -> None:
    assert metric_names('histogram_quantile(0.9, sum by (le, kind) (rate(a_bucket{x="y"}[5m])))') == {"a_bucket"}
    assert metric_names("(time() - b) > on (namespace, trainingjob) (3 * c)") == {"b", "c"}
    assert metric_names('absent(up{job="x"} == 1)') == {"up"}
    assert metric_names("label_values(vllm:num_requests_running{namespace=~\"$namespace\"}, inferenceservice)") == {
        "vllm:num_requests_running"}


@pytest.fixture
def operator_metrics(crds: Cluster, namespace: str, tmp_path: Path) -> str:
    op = OperatorProcess(crds, tmp_path / "operator.log", namespaces=(namespace,))
    op.start()
    try:
        crds.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "01-checkpointpolicy.yaml"))
        wait_for("CheckpointPolicy reconciled", lambda: (kubectl_json(
            crds, "get", "checkpointpolicy.kubeforge.dev/every-50-steps", "-n", namespace).get("status") or {}
        ).get("observedGeneration"), 60)
        return wait_for("reconcile counted", lambda: "kubeforge_reconcile_total{" in (m := op.metrics()) and m, 30)
    finally:
        crds.kubectl("delete", "kubeforge", "--all", "-n", namespace, "--timeout=60s", check=False)
        op.stop()


def test_dashboard_and_alerts_query_only_exported_metrics(crds: Cluster, operator_metrics: str, trainer_metrics: str,
                                                        server_metrics: str) -> None:
    wanted = set().union(*map(metric_names, dashboard_queries() + alert_queries(crds)))
    assert {"kubeforge_trainer_loss", "vllm:time_to_first_token_seconds_bucket",
            "kubeforge_reconcile_duration_seconds_bucket", "up"} <= wanted, "the parser lost the queries"
    sources = {
        "operator": exported(operator_metrics),
        "trainer": exported(trainer_metrics, nonzero=True),
        "server": exported(server_metrics, samples_only=True),
        "prometheus": {"up"},
    }
    missing = []
    for name in sorted(wanted):
        owner = ("prometheus" if name == "up" else "trainer" if name.startswith("kubeforge_trainer_")
                 else "server" if name.startswith("vllm:") else "operator" if name.startswith("kubeforge_") else None)
        if owner is None or name not in sources[owner]:
            missing.append(f"{name} (expected from {owner})")
    assert not missing, "queried but not exported: " + ", ".join(missing)
