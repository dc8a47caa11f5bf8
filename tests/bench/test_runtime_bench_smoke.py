"""The torch benchmarks' ``--smoke`` runs to the end on the CPU and writes every key the committed
full run has, with figures that are measurements (> 0), so `make bench-trainer`,
`bench-checkpoint` and `bench-serving` (and bench/trainer_gpu.py) cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.smoke import committed, positive, run_smoke, shape_mismatches

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(600)]


def test_bench_trainer_smoke_writes_every_figure(tmp_path: Path) -> None:
    result, output = run_smoke("trainer.py", tmp_path / "trainer.json", timeout=540)
    assert not shape_mismatches(committed("trainer"), result), shape_mismatches(committed("trainer"), result)
    runs = ("bare", "single", "ddp2", "fsdp2")
    assert set(result["tokens_per_s"]) == set(runs), result["tokens_per_s"]
    bad = positive(result, *(f"tokens_per_s.{r}" for r in runs), "trainer_vs_bare", "fsdp2_vs_ddp2")
    assert not bad, (bad, output)
    assert result["setup"]["steps"] > result["setup"]["warmup_steps_excluded"], result["setup"]


def test_bench_checkpoint_smoke_writes_every_figure(tmp_path: Path) -> None:
    result, output = run_smoke("checkpoint.py", tmp_path / "checkpoint.json", timeout=540)
    want = committed("checkpoint")
    assert not shape_mismatches(want, result), shape_mismatches(want, result)
    bad = positive(result, *want)
    assert not bad, (bad, output)
    assert result["preset"] == "tiny" and result["params"] > 0, result


def test_bench_serving_smoke_writes_every_figure(tmp_path: Path) -> None:
    result, output = run_smoke("serving.py", tmp_path / "serving.json", timeout=540)
    want = committed("serving")
    assert not shape_mismatches(want, result), shape_mismatches(want, result)
    bad = positive(result, "tok_s.kubeforge", "tok_s.naive", "tok_s.hf_cb", "ratio_vs_naive", "ratio_vs_hf_cb",
                   "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "prefix_ttft_ms.cache_on", "prefix_ttft_ms.cache_off")
    assert not bad, (bad, output)
    # 1 - on/off of two positive times: below 1, and the cache must not make the prefix slower
    assert 0 < result["prefix_ttft_reduction"] < 1, result["prefix_ttft_ms"]
    assert result["ttft_p50_ms"] <= result["ttft_p99_ms"], result
    assert result["setup"]["requests"] < want["setup"]["requests"], "the smoke must be smaller than the full run"


def test_bench_serving_text_smoke_writes_every_figure(tmp_path: Path) -> None:
    result, output = run_smoke("serving_text.py", tmp_path / "serving_text.json", timeout=300)
    want = committed("serving_text")
    assert not shape_mismatches(want, result), shape_mismatches(want, result)
    for tok in ("byte", "bpe"):
        rows = result["per_token_us"][tok]
        assert not positive(rows, "stops_16x256.before", "stops_16x256.after", "stops_16x60k.before",
                            "long_output.before", "long_output.after"), (rows, output)
        assert rows["stops_16x60k"]["after"] is None, "the API refuses 60 KB stops: no after figure"
        assert not positive(result["speedup"][tok], "stops_16x256", "long_output"), result["speedup"]


def test_bench_trainer_gpu_smoke_runs_without_a_gpu(tmp_path: Path) -> None:
    """No trainer_gpu.json is committed (it needs a GPU): the keys are those the script has always
    written. Without CUDA the smoke runs the same trainer on the CPU and says so. No ``--out``
    here: a smoke's default is a file in the system's tmp (the other tests pass one)."""
    import torch

    out = tmp_path / "kubeforge-bench-smoke" / "trainer_gpu.json"
    result, output = run_smoke("trainer_gpu.py", out, timeout=540, default_out=True)
    assert set(result) >= {"results", "setup"}, result
    assert set(result["results"]) == {"tiny"}, result["results"]
    tiny = result["results"]["tiny"]
    assert set(tiny) == {"tokens_per_s", "mfu", "gpus", "device"}, tiny
    assert not positive(tiny, "tokens_per_s", "mfu"), (tiny, output)
    assert tiny["mfu"] < 1, tiny
    cuda = torch.cuda.is_available()
    assert result["setup"]["cuda"] is cuda, result["setup"]
    if cuda:
        assert tiny["gpus"] == torch.cuda.device_count() and tiny["device"] != "cpu", tiny
    else:
        assert tiny["gpus"] == 0 and tiny["device"] == "cpu", tiny
        assert "no CUDA device" in result["note"], result
