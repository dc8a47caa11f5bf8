"""`bench/e2e.py --smoke` runs to the end on the real nodes and writes every key the
benchmark promises, so `make bench-e2e` cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from devcluster import Cluster

from tests.fixtures.cluster import REPO

pytestmark = [pytest.mark.realpods, pytest.mark.timeout(1500)]
KEYS = ("apply_to_first_step_s", "train_s", "export_to_ready_s", "first_answer_s", "image_build_s")


def test_bench_e2e_smoke_writes_its_figures(real_cluster: Cluster, local_images: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "e2e.py"), "--smoke", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=1400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    missing = [k for k in KEYS if k not in result]
    assert not missing, result
    for k in KEYS[:4]:
        assert isinstance(result[k], float) and result[k] > 0, (k, result[k])
    assert result["image_build_s"]["cached"] < 60, result["image_build_s"]
