"""The trainer and the server open S3 with the addressing the operator passes
(``KUBEFORGE_S3_FORCE_PATH_STYLE``): a policy with ``forcePathStyle: false`` used to reach only
the operator, so it reported BucketReachable while every save of the workers failed."""

from __future__ import annotations

import pytest
from kubeforge.store.backends import S3Backend
from kubeforge_runtime.checkpoint.manager import CheckpointManager
from kubeforge_runtime.serve import model_source

pytestmark = pytest.mark.runtime
ENV = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}


@pytest.mark.parametrize("value,path_style", [("false", False), ("true", True), (None, True)])
def test_the_trainers_store_uses_the_addressing_it_is_given(value: str | None, path_style: bool) -> None:
    env = {**ENV, **({"KUBEFORGE_S3_FORCE_PATH_STYLE": value} if value else {})}
    manager = CheckpointManager.from_env("s3://bucket/prefix", None, 0, 1, env=env)
    assert manager.store is not None and isinstance(manager.store.backend, S3Backend)
    assert manager.store.backend.options.force_path_style is path_style


def test_the_servers_store_uses_the_addressing_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEFORGE_S3_FORCE_PATH_STYLE", "false")
    assert model_source._s3_options().force_path_style is False
    monkeypatch.delenv("KUBEFORGE_S3_FORCE_PATH_STYLE")
    assert model_source._s3_options().force_path_style is True
