"""`make lint` is part of the suite, so it cannot rot: ruff on every Python folder, mypy
--strict on both packages, shellcheck on the scripts (the same commands as the Makefile's)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def lint_commands() -> list[str]:
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^lint:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe, "the Makefile has no lint target"
    return [line.strip() for line in recipe[1].splitlines()]


@pytest.mark.parametrize("command", lint_commands(), ids=lambda c: c.split()[0].rsplit("/", 1)[-1] + " " + c.split()[1])
def test_lint_is_clean(command: str) -> None:
    venv_bin = Path(sys.executable).parent
    argv = [str(venv_bin / a.removeprefix("$(VENV)/bin/")) if a.startswith("$(VENV)/bin/") else
            sys.executable if a == "$(PY)" else a for a in shlex.split(command)]
    argv = [g for a in argv for g in (sorted(str(p) for p in REPO.glob(a)) if "*" in a else [a])]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{command}\n{out.stdout[-4000:]}{out.stderr[-2000:]}"
