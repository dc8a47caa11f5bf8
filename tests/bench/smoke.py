"""Run a benchmark script's ``--smoke`` and compare what it wrote with the committed full run.

The committed ``bench/results/<name>.json`` is the contract others script against: every key
it has (at any depth of nested objects) must be in the smoke's output, and every figure that is
a number there must be a number here. Lists are compared by their items' kind only, since a
smoke runs fewer rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"


def committed(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESULTS / f"{name}.json").read_text())
    return data


def run_smoke(script: str, out: Path, *extra: str, timeout: float, default_out: bool = False,
              ) -> tuple[dict[str, Any], str]:
    """``python bench/<script> --smoke --out <out>``: its JSON and its output; fails on a non-zero exit,
    and if any committed result changed while it ran. With ``default_out`` no ``--out`` is given and
    the system's tmp is ``out``'s grandparent, where the script's default must put it."""
    before = {p.name: p.read_bytes() for p in RESULTS.glob("*.json")}
    args, env = ["--out", str(out)], None
    if default_out:
        assert out.parent.name == "kubeforge-bench-smoke", out
        args, env = [], {**os.environ, "TMPDIR": str(out.parent.parent)}
    run = subprocess.run([sys.executable, str(REPO / "bench" / script), "--smoke", *args, *extra],
                         cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    output = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, f"{script} --smoke exited {run.returncode}:\n{output}"
    after = {p.name: p.read_bytes() for p in RESULTS.glob("*.json")}
    assert after == before, f"{script} --smoke changed the committed bench/results"
    assert out.is_file(), f"{script} --smoke wrote no {out}:\n{output}"
    data: dict[str, Any] = json.loads(out.read_text())
    assert data.get("smoke") is True, data
    return data, output


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def shape_mismatches(want: Any, got: Any, path: str = "", nullable: frozenset[str] = frozenset(),
                     optional: frozenset[str] = frozenset()) -> list[str]:
    """Where ``got`` lacks a key of ``want`` or has another kind of value; ``nullable`` paths may
    be null in ``got``, ``optional`` ones may be missing (the full run writes them only sometimes)."""
    if want is None or (got is None and path in nullable):
        return []
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{path or '.'}: an object in the committed results, {got!r} here"]
        out = []
        for key, value in want.items():
            sub = f"{path}.{key}" if path else key
            if key not in got:
                if sub not in optional:
                    out.append(f"{sub}: missing")
                continue
            out += shape_mismatches(value, got[key], sub, nullable, optional)
        return out
    if isinstance(want, list):
        if not isinstance(got, list) or not got:
            return [f"{path}: a non-empty list in the committed results, {got!r} here"]
        return [m for item in got for m in shape_mismatches(want[0], item, f"{path}[]", nullable, optional)] if want else []
    if _is_number(want):
        return [] if _is_number(got) else [f"{path}: a number in the committed results, {got!r} here"]
    return [] if isinstance(got, type(want)) else [f"{path}: {type(want).__name__} committed, {got!r} here"]


def positive(data: dict[str, Any], *paths: str) -> list[str]:
    """The dotted ``paths`` of ``data`` that are not numbers > 0."""
    bad = []
    for path in paths:
        value: Any = data
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not (_is_number(value) and value > 0):
            bad.append(f"{path} = {value!r}")
    return bad
