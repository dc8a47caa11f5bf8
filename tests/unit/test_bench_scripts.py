"""The benchmark scripts run as ``python bench/<name>.py``, which puts bench/ first on sys.path:
a script named like a standard-library module shadows it for every other script (a
bench/operator.py once broke pydantic's ``from operator import attrgetter`` in all of them)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_no_bench_script_shadows_a_standard_module() -> None:
    scripts = sorted((REPO / "bench").glob("*.py"))
    assert scripts
    shadowing = [p.name for p in scripts if p.stem in sys.stdlib_module_names]
    assert not shadowing, f"rename {shadowing}: they shadow the standard library for every bench script"


def test_every_bench_target_runs_an_existing_script() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = re.findall(r"^bench-[\w-]+:.*\n\t\$\(PY\) (bench/\S+\.py)", makefile, re.MULTILINE)
    missing = [t for t in targets if not (REPO / t).is_file()]
    assert targets and not missing, (targets, missing)
    # and every bench script has its target (trainer_gpu.py needs a GPU: run by hand or on a device)
    scripts = {f"bench/{p.name}" for p in (REPO / "bench").glob("*.py")} - {"bench/trainer_gpu.py"}
    assert scripts <= set(targets), f"bench scripts without a make target: {sorted(scripts - set(targets))}"
