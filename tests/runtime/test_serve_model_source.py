"""Model URIs: an S3 export is fetched file by file from a real S3 server (MinIO) against its
commit marker, a corrupt or half-written export is refused; a volume export (``file://``) is
used in place once its marker exists (its files are not re-hashed on every start). Export-ness
is in the files (marker, pending file), never in the folder's name: a plain model directory
named ``export`` is served, and so is the trainer's own local export."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
from kubeforge.store import Store, open_store
from kubeforge_runtime.model.hf import load_hf, save_hf
from kubeforge_runtime.model.llama import Llama, preset
from kubeforge_runtime.serve.model_source import ModelSourceError, fetch_model
from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

from tests.fixtures.s3 import S3Server

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(120)]
EXPORT = "team-a/ft/export"


@dataclasses.dataclass
class Exported:
    s3: Store  # the export on MinIO
    uri: str  # its s3:// URI, as an InferenceService names it
    root: Path  # the same export on a volume store root


@pytest.fixture
def exported(tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Exported:
    """A committed export on MinIO (credentials and endpoint from the environment, as a server
    pod gets them) and on a volume directory."""
    model_dir = tmp_path / "model"
    m = Llama(preset("tiny"))
    m.init_weights(0)
    tok = ByteTokenizer()
    save_hf(m, model_dir, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(model_dir)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    prefix = f"serve/{uuid.uuid4().hex[:8]}"
    s3 = open_store(s3_server.uri(prefix), **s3_server.store_options())
    s3.write_export("team-a", "ft", model_dir, step=42)
    root = tmp_path / "store"
    open_store(f"file://{root}").write_export("team-a", "ft", model_dir, step=42)
    return Exported(s3, f"{s3_server.uri(prefix)}/{EXPORT}", root)


def test_s3_export_is_fetched_and_verified(exported: Exported, tmp_path: Path) -> None:
    uri = exported.uri
    local = fetch_model(uri, tmp_path / "dl")
    assert isinstance(load_tokenizer(local), HFTokenizer)  # the export's tokenizer came along
    model = load_hf(local)
    assert model.cfg.hidden_size == preset("tiny").hidden_size
    # a second start reuses what is already there and still matches
    assert fetch_model(uri, tmp_path / "dl") == local


def test_corrupt_export_is_refused(exported: Exported, tmp_path: Path) -> None:
    key = f"{EXPORT}/model.safetensors"
    exported.s3.backend.put_bytes(key, exported.s3.backend.get_bytes(key)[:-8] + b"garbage!")
    with pytest.raises(ModelSourceError, match="sha256"):
        fetch_model(exported.uri, tmp_path / "dl")


def test_an_export_whose_writer_died_midway_is_refused_until_the_next_export(
        exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tmp_path / "model"
    volume = open_store(f"file://{exported.root}")
    for store, uri in ((exported.s3, exported.uri), (volume, f"file://{exported.root}/{EXPORT}")):
        put_file, calls = store.backend.put_file, []

        def dies_after_one(key: str, path: Path, put_file=put_file, calls=calls) -> None:  # type: ignore[no-untyped-def]
            if calls:
                raise OSError("the writer's pod was killed")
            calls.append(key)
            put_file(key, path)

        monkeypatch.setattr(store.backend, "put_file", dies_after_one)
        with pytest.raises(OSError, match="killed"):
            store.write_export("team-a", "ft", model_dir, step=43)
        with pytest.raises(ModelSourceError, match="being written"):
            fetch_model(uri, tmp_path / "dl")
        monkeypatch.setattr(store.backend, "put_file", put_file)
        store.write_export("team-a", "ft", model_dir, step=44)
        assert (fetch_model(uri, tmp_path / "dl") / "config.json").is_file()


def test_a_pending_file_refuses_even_beside_a_marker(exported: Exported, tmp_path: Path) -> None:
    # the moment a writer has put the pending file and not yet removed the old marker
    (exported.root / EXPORT / "export-pending.json").write_text("2026-01-01T00:00:00Z")
    exported.s3.backend.put_bytes(f"{EXPORT}/export-pending.json", b"2026-01-01T00:00:00Z")
    for uri in (exported.uri, f"file://{exported.root}/{EXPORT}"):
        with pytest.raises(ModelSourceError, match="being written"):
            fetch_model(uri, tmp_path / "dl")


def test_a_local_export_missing_a_listed_file_is_refused(exported: Exported, tmp_path: Path) -> None:
    (exported.root / EXPORT / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="model.safetensors"):
        fetch_model(f"file://{exported.root}/{EXPORT}", tmp_path / "dl")


def test_a_plain_model_directory_named_export_is_served(tmp_path: Path) -> None:
    # meaning comes from the files: no marker and no pending file is a Hugging Face directory
    plain = tmp_path / "export"
    m = Llama(preset("tiny"))
    m.init_weights(0)
    save_hf(m, plain, bos_token_id=1, eos_token_id=2)
    assert fetch_model(str(plain), tmp_path / "dl") == plain


def test_plain_directory_and_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="config.json"):
        fetch_model(str(tmp_path), tmp_path / "dl")
    with pytest.raises(ModelSourceError, match="unsupported"):
        fetch_model("gs://bucket/x", tmp_path / "dl")


def test_only_the_expected_export_revision_is_served(exported: Exported, tmp_path: Path) -> None:
    volume = open_store(f"file://{exported.root}")
    for n, (store, source) in enumerate(((exported.s3, exported.uri), (volume, f"file://{exported.root}/{EXPORT}"))):
        first = store.export_marker("team-a", "ft")
        assert first is not None
        local = fetch_model(source, tmp_path / f"dl{n}", expect_revision=first.time)
        # the job exported again (a restarted or re-run job): a Pinned server must not take it
        newer = store.write_export("team-a", "ft", local, step=43)
        assert newer.time != first.time
        with pytest.raises(ModelSourceError, match=f"must serve revision {first.time}"):
            fetch_model(source, tmp_path / f"again{n}", expect_revision=first.time)
        assert fetch_model(source, tmp_path / f"again{n}", expect_revision=newer.time).is_dir()
