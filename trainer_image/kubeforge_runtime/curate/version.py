"""Writing a dataset version: ``v-<N>/{train.tar, eval.tar, manifest.json}``, then
``commit.json`` last (the checkpoints' rule: the marker is the commit).

N is one more than the newest *committed* version, so a version a killed run left without its
marker is taken again and overwritten (its leftovers are deleted first), never counted. The
tars are byte-for-byte reproducible: members in the records' order, ``<id>.json`` with sorted
keys, and fixed metadata (mtime 0, uid/gid 0, mode 0644), so the content hash (sha256 over
train.tar, then eval.tar) is the same for the same input.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kubeforge.store.backends import NotFound, ObjectBackend
from kubeforge.store.flywheel import (
    EVAL_SPLIT,
    MANIFEST_NAME,
    TRAIN_SPLIT,
    VERSION_MARKER_NAME,
    DatasetManifest,
    DatasetMarker,
    parse_version_dir,
    version_dir_name,
    version_marker_key,
)
from kubeforge.store.layout import FileDigest, file_digest, utc_now


def committed_versions(backend: ObjectBackend) -> list[int]:
    """Versions whose marker exists, oldest first."""
    out = set()
    for obj in backend.list(""):
        head, _, rest = obj.key.partition("/")
        n = parse_version_dir(head)
        if n is not None and rest == VERSION_MARKER_NAME:
            out.add(n)
    return sorted(out)


def read_manifest(backend: ObjectBackend, version: int) -> DatasetManifest | None:
    try:
        return DatasetManifest.model_validate_json(backend.get_bytes(f"{version_dir_name(version)}/{MANIFEST_NAME}"))
    except NotFound:
        return None


def write_split(path: Path, records: Sequence[dict[str, object]]) -> None:
    """A WebDataset tar of SFT records, one ``<id>.json`` member each, reproducible to the byte."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rec in records:
            data = json.dumps(rec, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
            info = tarfile.TarInfo(f"{rec['id']}.json")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def content_sha256(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def write_version(backend: ObjectBackend, version: int, train: Sequence[dict[str, object]],
                  evals: Sequence[dict[str, object]], manifest_fields: dict[str, object]) -> DatasetManifest:
    """Write version ``version`` whole and commit it; ``manifest_fields`` are the manifest's
    fields other than version, time, records and content hash."""
    vdir = version_dir_name(version)
    leftovers = [o.key for o in backend.list(vdir)]
    if leftovers:  # an earlier run of this version died before its marker
        backend.delete(leftovers)
    with tempfile.TemporaryDirectory(prefix="kubeforge-curate-") as tmp:
        paths = {TRAIN_SPLIT: Path(tmp) / TRAIN_SPLIT, EVAL_SPLIT: Path(tmp) / EVAL_SPLIT}
        write_split(paths[TRAIN_SPLIT], train)
        write_split(paths[EVAL_SPLIT], evals)
        records = {"train": len(train), "eval": len(evals)}
        manifest = DatasetManifest.model_validate({
            **manifest_fields, "version": version, "time": utc_now(), "records": records,
            "content_sha256": content_sha256([paths[TRAIN_SPLIT], paths[EVAL_SPLIT]])})
        files: dict[str, FileDigest] = {}
        for name, path in paths.items():
            files[name] = file_digest(path)
            backend.put_file(f"{vdir}/{name}", path)
    manifest_bytes = manifest.to_json()
    files[MANIFEST_NAME] = FileDigest(size=len(manifest_bytes), sha256=hashlib.sha256(manifest_bytes).hexdigest())
    backend.put_bytes(f"{vdir}/{MANIFEST_NAME}", manifest_bytes)
    marker = DatasetMarker(version=version, time=utc_now(), bytes=sum(d.size for d in files.values()),
                           files=files, records=records)
    backend.put_bytes(version_marker_key(version), marker.to_json())
    return manifest
