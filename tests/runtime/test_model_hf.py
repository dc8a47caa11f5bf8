"""Checkpoints written by transformers itself load into our Llama with the same logits, and
configurations we do not implement are refused by name instead of served wrongly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kubeforge_runtime.model.hf import load_hf

pytestmark = pytest.mark.runtime


def _save_transformers_llama(directory: Path, **config: object) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **config)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(directory))
    return model


def test_a_transformers_checkpoint_with_a_large_rope_theta_gives_the_same_logits(tmp_path: Path) -> None:
    theirs = _save_transformers_llama(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    ours = load_hf(tmp_path)
    assert ours.cfg.rope_theta == 500000.0
    ids = torch.arange(3, 203).unsqueeze(0)  # long enough that theta matters
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


def test_scaled_rope_and_other_unsupported_settings_are_refused_naming_the_key(tmp_path: Path) -> None:
    _save_transformers_llama(tmp_path)
    path = tmp_path / "config.json"
    base = json.loads(path.read_text())
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for change, words in (({"rope_parameters": llama3}, "rope_type 'llama3'"),
                          ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"attention_bias": True}, "attention_bias"),
                          ({"head_dim": 32}, "head_dim")):
        path.write_text(json.dumps({**base, **change}))
        with pytest.raises(ValueError, match=words):
            load_hf(tmp_path)
