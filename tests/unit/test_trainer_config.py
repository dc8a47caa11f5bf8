"""Bad trainer configs fail before any process group, naming the key, with CONFIG_ERROR."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeforge.api.contract import ExitCode
from kubeforge_runtime.config import ConfigError, check_runtime, parse_config

pytestmark = pytest.mark.unit

BAD: list[tuple[dict[str, Any], str]] = [
    ({"train": {"steps": 5, "globl_batch": 8}}, "train.globl_batch: unknown key"),
    ({"optimiser": {"lr": 1e-3}}, "optimiser: unknown key"),
    ({"optimizer": {"lr": -1e-3}}, "optimizer.lr: Input should be greater than 0"),
    ({"train": {"global_batch": 10, "micro_batch": 4}}, "global_batch (10) must be divisible by micro_batch (4)"),
    ({"model": {"preset": "gpt5"}}, "model.preset"),
    ({"model": {"overrides": {"hidden_size": 130}}}, "hidden_size must be divisible by num_attention_heads"),
    ({"data": {"seq_len": 4096}}, "data.seq_len (4096) must not exceed"),
    ({"parallelism": {"sharding": "zero3"}}, "parallelism.sharding"),
    ({"schedule": {"warmup_steps": 500}, "train": {"steps": 10}}, "schedule.warmup_steps"),
]


@pytest.mark.parametrize(("raw", "message"), BAD, ids=[m.split(":")[0][:30] for _, m in BAD])
def test_bad_config_names_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert message in str(e.value)


def test_defaults_are_valid_and_sections_are_typed() -> None:
    cfg = parse_config({"train": {"steps": 3}, "optimizer": {"betas": [0.9, 0.99]}})
    assert cfg.train.steps == 3 and cfg.optimizer.betas == (0.9, 0.99) and cfg.model.preset == "tiny"
    assert parse_config(None).data.paths == ["builtin:corpus"]


def test_model_larger_than_cpu_memory_is_a_config_error() -> None:
    cfg = parse_config({"model": {"preset": "llama3-70b"}, "data": {"seq_len": 128}})
    with pytest.raises(ConfigError, match=r"model: preset 'llama3-70b' \(6\d\.\d+B parameters\) needs about"):
        check_runtime(cfg, world_size=2, local_world_size=2, on_gpu=False, vocab_size=259)
    small = parse_config({})
    check_runtime(small, world_size=2, local_world_size=2, on_gpu=False, vocab_size=259)
    with pytest.raises(ConfigError, match="model: preset 'tiny'"):
        check_runtime(small, world_size=1, local_world_size=1, on_gpu=False, vocab_size=259, memory_bytes=1 << 20)


@pytest.mark.parametrize("entry", ["kubeforge_runtime.train", "kubeforge_runtime.train.launch"])
def test_cli_exits_with_config_error_before_any_rendezvous(tmp_path: Path, entry: str) -> None:
    cases = [{"train": {"stpes": 3}}, {"optimizer": {"lr": -0.1}}, {"train": {"global_batch": 9, "micro_batch": 2}},
             {"model": {"preset": "llama3-70b"}}, {"data": {"paths": [str(tmp_path / "missing")]}}]
    for i, raw in enumerate(cases):
        cfg = tmp_path / f"bad{i}.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        if entry.endswith("launch"):
            # a rendezvous endpoint nobody serves: reaching torchrun would hang, not fail fast
            args = ["--nnodes=1:2", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:9",
                    "-m", "kubeforge_runtime.train", "--config", str(cfg)]
        else:
            args = ["--config", str(cfg)]
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", entry, *args], capture_output=True, text=True, timeout=60)
        assert p.returncode == ExitCode.CONFIG_ERROR, (raw, p.stderr[-2000:])
        assert "configuration error" in p.stderr and time.monotonic() - t0 < 30, raw
        if i == 0:
            assert "train.stpes: unknown key" in p.stderr


def test_the_config_module_imports_without_torch() -> None:
    """The operator renders the CRD's `spec.trainer.config` from these models, and its image has no torch."""
    code = ("import sys; import kubeforge_runtime.config, kubeforge_runtime.model; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_overrides_are_exactly_the_model_shape_fields() -> None:
    import dataclasses

    from kubeforge_runtime.config import ModelOverrides
    from kubeforge_runtime.model.shape import LlamaConfig

    assert set(ModelOverrides.model_fields) == {f.name for f in dataclasses.fields(LlamaConfig)}
    with pytest.raises(ConfigError, match="model.overrides.hiden_size: unknown key"):
        parse_config({"model": {"overrides": {"hiden_size": 64}}})
    cfg = parse_config({"model": {"preset": "small", "overrides": {"num_hidden_layers": 3}}})
    assert cfg.model.llama().num_hidden_layers == 3 and cfg.model.llama().hidden_size == 512
