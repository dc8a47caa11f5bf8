"""The chart's prometheus-adapter rules: rendered only on request, and exactly the rule
docs/autoscaling.md documents, publishing the metric names the operator's HPAs ask for."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tools
import yaml
from kubeforge.controllers.inferenceservice.manifests import POD_METRICS

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubeforge"
TEMPLATE = "templates/prometheus-adapter-rules.yaml"


def render(*sets: str) -> subprocess.CompletedProcess[str]:
    args = [str(tools.binary("helm")), "template", "kf", str(CHART), "--kube-version", "1.35.0",
            "--show-only", TEMPLATE]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, check=False, capture_output=True, text=True)


def documented_rules() -> dict[str, Any]:
    text = (REPO / "docs" / "autoscaling.md").read_text()
    blocks = re.findall(r"```yaml\n(rules:\n.*?)```", text, re.DOTALL)
    assert len(blocks) == 1, "docs/autoscaling.md must show the adapter rules once"
    return yaml.safe_load(blocks[0])  # type: ignore[no-any-return]


def test_rules_render_only_when_enabled() -> None:
    off = render()
    assert off.returncode != 0 and "could not find template" in off.stderr
    assert render("prometheusAdapter.rules.enabled=notabool").returncode != 0


def test_rendered_rules_equal_the_documented_ones_and_publish_the_hpa_metric_names() -> None:
    out = render("prometheusAdapter.rules.enabled=true")
    assert out.returncode == 0, out.stderr
    cm = yaml.safe_load(out.stdout)
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "kf-kubeforge-prometheus-adapter-rules"
    rules = yaml.safe_load(cm["data"]["config.yaml"])
    assert rules == documented_rules()
    assert {r["name"]["as"] for r in rules["rules"]} == set(POD_METRICS.values())
