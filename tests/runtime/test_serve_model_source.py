"""Model URIs: an S3 export is fetched file by file against its commit marker, a corrupt or
uncommitted export is refused. S3 is stood in for by the store's volume backend behind the
same interface (the S3 backend itself is exercised against MinIO by the store's tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubeforge.store import open_store
from kubeforge.store.backends import FileBackend
from kubeforge_runtime.model.hf import load_hf, save_hf
from kubeforge_runtime.model.llama import Llama, preset
from kubeforge_runtime.serve.model_source import ModelSourceError, fetch_model
from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(60)]


@pytest.fixture
def exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A committed export under a volume store root; ``s3://bucket/<key>`` maps onto it."""
    model_dir = tmp_path / "model"
    m = Llama(preset("tiny"))
    m.init_weights(0)
    tok = ByteTokenizer()
    save_hf(m, model_dir, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(model_dir)
    root = tmp_path / "store"
    open_store(f"file://{root}").write_export("team-a", "ft", model_dir, step=42)

    import kubeforge.store

    def fake_open_backend(uri: str, options: object = None) -> FileBackend:
        assert uri.startswith("s3://bucket/")
        return FileBackend(root / uri.removeprefix("s3://bucket/"))

    monkeypatch.setattr(kubeforge.store, "open_backend", fake_open_backend)
    return root, "s3://bucket/team-a/ft/export"


def test_s3_export_is_fetched_and_verified(exported: tuple[Path, str], tmp_path: Path) -> None:
    _, uri = exported
    local = fetch_model(uri, tmp_path / "dl")
    assert isinstance(load_tokenizer(local), HFTokenizer)  # the export's tokenizer came along
    model = load_hf(local)
    assert model.cfg.hidden_size == preset("tiny").hidden_size
    # a second start reuses what is already there and still matches
    assert fetch_model(uri, tmp_path / "dl") == local


def test_corrupt_export_is_refused(exported: tuple[Path, str], tmp_path: Path) -> None:
    root, uri = exported
    weights = root / "team-a" / "ft" / "export" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    with pytest.raises(ModelSourceError, match="sha256"):
        fetch_model(uri, tmp_path / "dl")


def test_uncommitted_export_is_refused(exported: tuple[Path, str], tmp_path: Path) -> None:
    root, uri = exported
    (root / "team-a" / "ft" / "export" / "commit.json").unlink()
    with pytest.raises(ModelSourceError, match="commit marker"):
        fetch_model(uri, tmp_path / "dl")
    with pytest.raises(ModelSourceError, match="commit marker"):
        fetch_model(f"file://{root}/team-a/ft/export", tmp_path / "dl")


def test_plain_directory_and_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="config.json"):
        fetch_model(str(tmp_path), tmp_path / "dl")
    with pytest.raises(ModelSourceError, match="unsupported"):
        fetch_model("gs://bucket/x", tmp_path / "dl")


def test_only_the_expected_export_revision_is_served(exported: tuple[Path, str], tmp_path: Path) -> None:
    root, uri = exported
    store = open_store(f"file://{root}")
    first = store.export_marker("team-a", "ft")
    assert first is not None
    assert fetch_model(uri, tmp_path / "dl", expect_revision=first.time).is_dir()
    # the job exported again (a restarted or re-run job): a Pinned server must not take it
    store.write_export("team-a", "ft", tmp_path / "dl" / next((tmp_path / "dl").iterdir()).name, step=43)
    newer = store.export_marker("team-a", "ft")
    assert newer is not None and newer.time != first.time
    for source in (uri, f"file://{root}/team-a/ft/export"):
        with pytest.raises(ModelSourceError, match=f"must serve revision {first.time}"):
            fetch_model(source, tmp_path / "dl2", expect_revision=first.time)
        assert fetch_model(source, tmp_path / "dl2", expect_revision=newer.time).is_dir()
