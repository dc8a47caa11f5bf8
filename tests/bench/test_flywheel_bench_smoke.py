"""`make bench-flywheel`'s ``--smoke`` runs every part to the end (two real servers with and
without capture, the router's split and shadow in front of real servers, the dedup accuracy
on a planted corpus, the curate CLI on captured shards, PSI) and writes every key of the committed full run, so the benchmark cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.smoke import committed, positive, run_smoke, shape_mismatches

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(600)]


def test_bench_flywheel_smoke_writes_every_figure(tmp_path: Path) -> None:
    result, output = run_smoke("flywheel.py", tmp_path / "flywheel.json", timeout=540)
    want = committed("flywheel")
    assert not shape_mismatches(want, result), shape_mismatches(want, result)
    bad = positive(result, "capture_overhead", "dedup_docs_s", "curate_s")
    assert not bad, (bad, output)
    assert 0 <= result["dedup_precision"] <= 1 and 0 <= result["dedup_recall"] <= 1, result
    assert result["psi_detects_shift"]["detected"] is True, result["psi_detects_shift"]
    assert result["curate"]["records_out"]["train"] > 0, result["curate"]
    # keyless requests are split exactly: within one request of the set share
    assert result["split_error_points"] <= 100 / result["setup"]["split_requests"], result["split"]
    assert result["split"]["shadow_ok"] > 0 and result["split"]["p50_plain_s"] > 0, result["split"]
    assert result["setup"]["curate_records"] < want["setup"]["curate_records"], "the smoke must be smaller"
