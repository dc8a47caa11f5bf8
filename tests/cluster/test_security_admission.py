"""hostPath volumes of TrainingJobs are refused at admission by the chart's
ValidatingAdmissionPolicy (issue 16 item 11), bound only to this test's namespace so the
shared cluster's other tenants are untouched; allowed where the chart's setting allows them."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import tools
import yaml
from devcluster import Cluster

from tests.fixtures.cluster import REPO

pytestmark = pytest.mark.cluster
CHART = REPO / "charts" / "kubeforge"
TEMPLATE = "templates/validatingadmissionpolicy.yaml"


def render_policy(cluster: Cluster, release: str, *sets: str) -> list[dict[str, Any]]:
    args = [str(tools.binary("helm")), "--kubeconfig", str(cluster.cfg.kubeconfig), "template", release, str(CHART),
            "--kube-version", tools.versions()["KUBERNETES_VERSION"], "--show-only", TEMPLATE]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if out.returncode != 0 and "could not find template" in out.stderr:
        return []
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def job(volumes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "hp"},
            "spec": {"workers": {"gpusPerWorker": 0}, "pod": {"volumes": volumes}}}


def dry_run(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(obj),
                           check=False)


@pytest.fixture
def host_path_policy(crds: Cluster, namespace: str) -> Iterator[str]:
    docs = render_policy(crds, f"kf-{namespace}", f"watchNamespaces={{{namespace}}}")
    assert [d["kind"] for d in docs] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    crds.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))
    try:
        yield namespace
    finally:
        for d in docs:
            crds.kubectl("delete", d["kind"].lower(), d["metadata"]["name"], "--wait=false", check=False)


def test_host_path_is_refused_at_admission_naming_the_field(crds: Cluster, host_path_policy: str) -> None:
    bad = job([{"name": "node-root", "hostPath": {"path": "/"}}, {"name": "scratch", "emptyDir": {}}])
    deadline = time.monotonic() + 30
    out = dry_run(crds, host_path_policy, bad)
    while out.returncode == 0 and time.monotonic() < deadline:  # the binding takes effect within moments
        time.sleep(0.5)
        out = dry_run(crds, host_path_policy, bad)
    assert out.returncode != 0, "a TrainingJob with a hostPath volume was admitted"
    assert "spec.pod.volumes[].hostPath must not be set (volumes node-root)" in out.stderr, out.stderr
    assert "security.allowHostPathVolumes" in out.stderr
    ok = dry_run(crds, host_path_policy, job([{"name": "scratch", "emptyDir": {}},
                                              {"name": "data", "persistentVolumeClaim": {"claimName": "corpus"}}]))
    assert ok.returncode == 0, ok.stderr


def test_the_chart_setting_drops_the_policy(crds: Cluster) -> None:
    assert render_policy(crds, "kf", "security.allowHostPathVolumes=true") == []
