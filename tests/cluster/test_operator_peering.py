"""Two operator processes peering on the local control plane (issue 16 item 1): exactly one
is active (kubeforge_operator_active, the /healthz peering probe), the standby one stays
healthy, and stopping the active one hands the work to the other, which then reconciles."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
import yaml
from devcluster import Cluster

from tests.cluster.test_helm_chart import CHART, KUBE_VERSION, helm
from tests.fixtures.cluster import OperatorProcess, kubectl_json, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]


def active(op: OperatorProcess) -> float | None:
    m = re.search(r"^kubeforge_operator_active (\S+)$", op.metrics(), re.M)
    return float(m[1]) if m else None


def probe(op: OperatorProcess) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{op.health_port}/healthz", timeout=5) as r:
        assert r.status == 200
        return dict(json.loads(r.read())["peering"])


def test_one_of_two_peers_is_active_and_the_other_takes_over(crds: Cluster, namespace: str, tmp_path: Path) -> None:
    c = crds
    crds = helm(c, "template", "r", str(CHART), "--kube-version", KUBE_VERSION, "--set", "replicaCount=2",
                "--show-only", "templates/kopf-peering.yaml").stdout
    c.kubectl("apply", "--server-side", "-f", "-", input=crds)
    for d in yaml.safe_load_all(crds):
        if d and d.get("kind") == "CustomResourceDefinition":
            c.kubectl("wait", "--for=condition=Established", f"crd/{d['metadata']['name']}", "--timeout=60s")
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "kubeforge"}}))
    ops = [OperatorProcess(c, tmp_path / f"op-{i}.log", namespaces=(namespace,), extra_args=("--peering=kubeforge",))
           for i in range(2)]
    try:
        for op in ops:
            op.start()
        def settled() -> bool:
            # both have read the object since both announced themselves: the higher priority is
            # the one active, on the metric and the probe alike
            states = [(int(str(probe(op)["priority"])), probe(op)["state"], active(op)) for op in ops]
            top = max(states)
            return all((st == "active" and a == 1.0) if s is top else (st == "standby" and a == 0.0)
                       for s, (_, st, a) in zip(states, states, strict=True))

        wait_for("exactly one active replica, the one of the higher priority", settled, 60)
        first = max(ops, key=lambda op: int(str(probe(op)["priority"])))
        other = next(op for op in ops if op is not first)
        # a graceful stop (a rolling update, a deleted pod): kopf removes its entry and the other
        # replica's kopf resumes at once, maybe before our own read of the peering object says
        # so; a job created right then must not be lost between the two
        first.stop()
        job = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "after-loss"},
               "spec": {"suspend": True, "trainer": {"config": {"model": {"preset": "tiny"}}}}}
        c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))
        wait_for("reconciled by the new active replica", lambda: (kubectl_json(
            c, "get", "trainingjob", "after-loss", "-n", namespace).get("status") or {}).get("observedGeneration"), 90)
        # kopf's own goodbye can race its last keep-alive, leaving the stopped peer's entry fresh
        # for one lifetime (60 s): kopf then keeps the survivor paused too, and so do we
        wait_for("the standby takes over", lambda: active(other) == 1.0 and probe(other)["state"] == "active",
                 90, interval=1)
        assert "is now active" in other.log_path.read_text()
    finally:
        for op in ops:
            op.stop()
