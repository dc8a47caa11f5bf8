"""Every parallelism option trains the same model: with one seed and one global batch the
sharding layout (ZeRO-3-like, ZeRO-2-like, hybrid, DDP), CPU offload and activation
checkpointing change where tensors live and what is recomputed, not the losses (on the CPU
cpu_offload is accepted and a no-op: the pinned-memory offload exists only with a GPU). The
warmup-stable-decay schedule is checked on the learning rates the trainer logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.runtime.test_trainer import job_env, losses, run_trainer, write_config

pytestmark = pytest.mark.runtime
STEPS = 6


def _train(tmp: Path, name: str, **sections: Any) -> dict[int, float]:
    cfg = write_config(tmp / f"{name}.yaml", train={"steps": STEPS}, **sections)
    rc, run = run_trainer(tmp, name, cfg, 2, job_env())
    assert rc == 0, run.log.read_text()[-3000:]
    start = run.events("start")[0]
    assert start["world_size"] == 2
    return losses(run)


def test_sharding_offload_and_recompute_give_the_same_losses(tmp_path: Path) -> None:
    reference = _train(tmp_path, "full")
    assert sorted(reference) == list(range(1, STEPS + 1))
    variants: dict[str, dict[str, Any]] = {
        "grad_op": {"parallelism": {"sharding": "grad_op"}},
        "hybrid": {"parallelism": {"sharding": "hybrid", "shard_group_size": 1}},
        "ddp": {"parallelism": {"sharding": "ddp"}},
        "offload": {"parallelism": {"cpu_offload": True}},
        "recompute": {"model": {"preset": "tiny", "activation_checkpointing": True}},
    }
    for name, sections in variants.items():
        got = _train(tmp_path, name, **sections)
        assert got.keys() == reference.keys(), name
        for step, loss in got.items():
            assert loss == pytest.approx(reference[step], abs=2e-4), (name, step)


def test_wsd_schedule_warms_up_holds_then_decays(tmp_path: Path) -> None:
    steps = 10
    cfg = write_config(tmp_path / "wsd.yaml", train={"steps": steps},
                       schedule={"kind": "wsd", "warmup_steps": 2, "decay_fraction": 0.3, "min_lr_ratio": 0.1},
                       optimizer={"lr": 1e-3})
    rc, run = run_trainer(tmp_path, "wsd", cfg, None, job_env())
    assert rc == 0, run.log.read_text()[-3000:]
    lr = {e["step"]: e["lr"] for e in run.events("train_step")}
    assert lr[1] < lr[2] <= 1e-3  # warmup
    stable = [lr[s] for s in range(3, 8)]
    assert stable == pytest.approx([1e-3] * len(stable))  # held at the peak
    assert lr[8] > lr[9] > lr[10] >= 1e-4 - 1e-12  # decays over the last 30 % towards 10 %
