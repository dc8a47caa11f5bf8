"""model.init_from names a directory, or an export on the store (what the operator sets from
spec.initFrom): the trainer fetches it like the server, verified against its commit marker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kubeforge.store import begin_local_export, commit_local_export
from kubeforge_runtime.model.hf import load_hf, save_hf
from kubeforge_runtime.model.llama import Llama
from kubeforge_runtime.model.shape import preset
from kubeforge_runtime.serve.model_source import ModelSourceError
from kubeforge_runtime.train.loop import _init_dir

pytestmark = pytest.mark.runtime


def test_an_export_uri_is_fetched_verified_and_loads(tmp_path: Path) -> None:
    export = tmp_path / "export"
    begin_local_export(export)
    m = Llama(preset("tiny"))
    m.init_weights(3)
    save_hf(m, export, bos_token_id=1, eos_token_id=2)
    commit_local_export(export, 5)
    env = {"KUBEFORGE_CHECKPOINT_STAGING_DIR": str(tmp_path / "staging")}
    got = _init_dir(f"file://{export}", env)
    loaded = load_hf(got)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values(), strict=True))
    assert _init_dir(str(export), env) == export  # a plain path as it is
    (export / "export-pending.json").write_text("x")  # an export being rewritten is refused
    with pytest.raises(ModelSourceError):
        _init_dir(f"file://{export}", env)
