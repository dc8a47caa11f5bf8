"""The trainer's export loads in transformers' LlamaForCausalLM with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kubeforge_runtime.model.hf import load_hf

from tests.runtime.test_trainer import job_env, run_trainer, write_config

pytestmark = pytest.mark.runtime


def test_export_of_a_two_rank_fsdp_run_loads_in_transformers_with_equal_logits(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "export"
    cfg = write_config(tmp_path / "c.yaml", train={"steps": 3}, export={"enabled": True, "path": str(out)})
    rc, run = run_trainer(tmp_path, "export", cfg, 2, job_env())
    assert rc == 0, run.log.read_text()[-3000:]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}

    ours = load_hf(out)
    theirs = LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([tok("The lighthouse keeper lights the lamp at dusk.")["input_ids"]])
    with torch.no_grad():
        a = ours(ids)
        b = theirs(ids).logits
    assert a.shape == b.shape == (1, ids.shape[1], 259)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # trained, not the initial weights: export happened after the optimizer steps
    fresh = type(ours)(ours.cfg)
    fresh.init_weights(3)
    assert not torch.equal(fresh.embed_tokens.weight, ours.embed_tokens.weight)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 257


def test_export_goes_to_the_store_export_location(tmp_path: Path) -> None:
    store = tmp_path / "store"
    cfg = write_config(tmp_path / "c.yaml", train={"steps": 2}, export={"enabled": True})
    rc, run = run_trainer(tmp_path, "store", cfg, None, job_env(store, every_steps=100))
    assert rc == 0, run.log.read_text()[-3000:]
    export = store / "ns" / "job" / "export"
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    assert run.events("exported")[0]["uri"].rstrip("/").endswith("ns/job/export")
    assert load_hf(export).cfg.vocab_size == 259
