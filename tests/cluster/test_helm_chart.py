"""The Helm chart: lint --strict, and a real install into the local cluster (the pod is
kwok's; the Deployment, RBAC and Service objects are real)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import tools
from devcluster import Cluster
from tests.fixtures.cluster import kubectl_json, wait_for

pytestmark = pytest.mark.cluster
CHART = Path(__file__).resolve().parents[2] / "charts" / "kubeforge"


def helm(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tools.binary("helm")), "--kubeconfig", str(cluster.cfg.kubeconfig), *args],
                          capture_output=True, text=True, check=check)


def test_helm_lint_strict(cluster: Cluster) -> None:
    out = helm(cluster, "lint", "--strict", str(CHART), check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_values_schema_rejects_unknown_and_bad_values(cluster: Cluster) -> None:
    out = helm(cluster, "template", "x", str(CHART), "--set", "logLevel=LOUD", check=False)
    assert out.returncode != 0 and "logLevel" in out.stderr
    out = helm(cluster, "template", "x", str(CHART), "--set", "nosuchkey=1", check=False)
    assert out.returncode != 0 and "nosuchkey" in out.stderr


def test_helm_install_into_local_cluster(crds: Cluster, namespace: str) -> None:
    out = helm(crds, "install", "kf", str(CHART), "-n", namespace, "--wait", "--timeout", "120s",
               "--set", "watchNamespaces={" + namespace + "}", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        deploy = kubectl_json(crds, "get", "deployment", "kf-kubeforge", "-n", namespace)
        pod_spec = deploy["spec"]["template"]["spec"]
        assert pod_spec["securityContext"]["runAsNonRoot"] is True
        assert f"--namespace={namespace}" in pod_spec["containers"][0]["args"]
        wait_for("operator pod Running (kwok)", lambda: kubectl_json(
            crds, "get", "deployment", "kf-kubeforge", "-n", namespace)["status"].get("availableReplicas") == 1, 60)
        role = kubectl_json(crds, "get", "clusterrole", "kf-kubeforge")
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
    finally:
        out = helm(crds, "uninstall", "kf", "-n", namespace, "--wait", check=False)
    assert out.returncode == 0, out.stderr
    left = crds.kubectl("get", "deployment,serviceaccount,service", "-n", namespace, "-l",
                        "app.kubernetes.io/instance=kf", "-o", "json").stdout
    assert json.loads(left)["items"] == []
