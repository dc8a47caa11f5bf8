"""`bench/store_outage.py --smoke` runs to the end and writes every key of the committed
bench/results/store_outage.json, so `make bench-store-outage` cannot rot; and on its small load
(4 S3 jobs) a node loss of the job without S3 is handled as fast with MinIO stopped as with it up.

Like the operator bench, the script starts a private control plane (kwok only, its own MinIO and
ports) and stops that MinIO, which must not happen to the shared cluster other tests run on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.smoke import committed, positive, run_smoke, shape_mismatches

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]
BEFORE = frozenset({"before_revision", "before.node_loss_handled_s.store_up", "before.node_loss_handled_s.store_down"})


def test_bench_store_outage_smoke_writes_every_figure(tmp_path: Path) -> None:
    result, output = run_smoke("store_outage.py", tmp_path / "store_outage.json", timeout=840)
    mismatches = shape_mismatches(committed("store_outage"), result, nullable=BEFORE)
    assert not mismatches, (mismatches, output)
    bad = positive(result, "node_loss_handled_s.store_up", "node_loss_handled_s.store_down")
    assert not bad, (bad, output)
    now, grace = result["node_loss_handled_s"], result["grace_s"]
    assert now["store_up"] >= grace and now["store_down"] >= grace, "handled before the node-failure grace"
    # the store being down must not delay pod management: a bound well under one store retry
    # deadline per queued job (the old controller took 10-20 s per S3 job reconcile)
    assert now["store_down"] < now["store_up"] + 30, (now, output)
