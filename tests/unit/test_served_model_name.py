"""The server's default `model` name: the job's name for a store export, whatever the run."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("uri,name", [
    ("s3://kubeforge/checkpoints/team-a/tiny-llama/runs/0b7c9e2a-uid/export", "tiny-llama"),
    ("s3://kubeforge/checkpoints/team-a/tiny-llama/export", "tiny-llama"),
    ("s3://kubeforge/models/chat-7b/", "chat-7b"),
    ("/models/export", "models"),
])
def test_default_model_name(uri: str, name: str) -> None:
    from kubeforge_runtime.serve.__main__ import default_model_name

    assert default_model_name(uri) == name
