"""Every metric the Grafana dashboard and the PrometheusRule query is exported by the component
that should export it:

- ``kubeforge_*`` (not ``kubeforge_trainer_*``): the operator. Scraped from the real
  ``kubeforge-operator`` /metrics after it reconciled a CheckpointPolicy.
- ``kubeforge_trainer_*``: rank 0 of the trainer. Scraped over HTTP from a small process that
  serves the trainer's own registry (``TrainerMetrics.serve``, what rank 0 runs), without
  training: a training run costs far more than the names need.
- ``vllm:*``: the inference server. Likewise from ``ServingMetrics``, the registry the
  server's /metrics exposes.
- ``up``: Prometheus' own.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
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


def exported(text: str) -> set[str]:
    """Names a Prometheus text exposition offers to queries (histograms as _bucket/_sum/_count)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if kind == "counter":
                names |= {name if name.endswith("_total") else f"{name}_total"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def scrape_registry(code: str) -> str:
    """Start a process serving a registry on a free port, scrape /metrics once, stop it by pid."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code).format(port=port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    return str(r.read().decode())
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    raise AssertionError(f"metrics process did not serve: {out}") from None
                time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()


TRAINER = """
    import time
    from kubeforge_runtime.metrics import TrainerMetrics
    TrainerMetrics().serve({port})
    time.sleep(120)
"""
SERVER = """
    import time
    from prometheus_client import start_http_server
    from kubeforge_runtime.serve.metrics import ServingMetrics
    m = ServingMetrics("tiny")
    m.request_success_for("stop").inc()
    start_http_server({port}, addr="127.0.0.1", registry=m.registry)
    time.sleep(120)
"""


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


def test_dashboard_and_alerts_query_only_exported_metrics(crds: Cluster, operator_metrics: str) -> None:
    wanted = set().union(*map(metric_names, dashboard_queries() + alert_queries(crds)))
    assert {"kubeforge_trainer_loss", "vllm:time_to_first_token_seconds_bucket",
            "kubeforge_reconcile_duration_seconds_bucket", "up"} <= wanted, "the parser lost the queries"
    sources = {
        "operator": exported(operator_metrics),
        "trainer": exported(scrape_registry(TRAINER)),
        "server": exported(scrape_registry(SERVER)),
        "prometheus": {"up"},
    }
    missing = []
    for name in sorted(wanted):
        owner = ("prometheus" if name == "up" else "trainer" if name.startswith("kubeforge_trainer_")
                 else "server" if name.startswith("vllm:") else "operator" if name.startswith("kubeforge_") else None)
        if owner is None or name not in sources[owner]:
            missing.append(f"{name} (expected from {owner})")
    assert not missing, "queried but not exported: " + ", ".join(missing)
