"""The project's helm is stamped with its Kubernetes version the way helm's own build stamps
it; unstamped it reports v1.20 and refuses our chart (kubeVersion >=1.30) without --kube-version."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import tools

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_helm_kube_version_is_its_client_gos() -> None:
    go_mod = (REPO / "hack" / "cluster" / "helm" / "go.mod").read_text()
    client_go = re.search(r"^\s*k8s\.io/client-go v0\.(\d+)\.", go_mod, re.MULTILINE)
    assert client_go, "hack/cluster/helm/go.mod pins no k8s.io/client-go"
    assert tools.versions()["HELM_KUBE_VERSION"].startswith(f"v1.{client_go[1]}."), (
        "HELM_KUBE_VERSION must follow the client-go minor of helm's module (as helm's Makefile does)")


def test_helm_renders_the_chart_without_a_kube_version() -> None:
    helm = tools.binary("helm")
    out = subprocess.run([str(helm), "template", "kf", str(REPO / "charts" / "kubeforge")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kind: Deployment" in out.stdout
    version = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, timeout=30)
    assert version.stdout.startswith("v3."), version.stdout
