"""Where the weights come from: a local directory, ``file://`` or ``s3://``.

Whether a source is an export is in its files, never in its name (``kubeforge.store.layout``):
- ``export-pending.json`` present: an export being written (or whose writer died midway),
  refused (read after the marker: the writer puts it before it removes the marker);
- ``commit.json`` present: an export; a local one must hold every file its marker lists, at
  its size, and from S3 exactly those files are fetched and checked against their sha256;
- neither: a plain Hugging Face directory, served as it is (local) or copied whole (S3).

A TrainingJob's store export and the trainer's local ``export.path`` both follow that
protocol. An S3 prefix is read through ``kubeforge.store``'s backend (same retries, same
credentials from the environment as the trainer).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from kubeforge.api.contract import ENV_S3_FORCE_PATH_STYLE, s3_force_path_style

if TYPE_CHECKING:
    from kubeforge.store import ExportMarker, S3Options

log = logging.getLogger(__name__)


_PENDING = ("{uri}: an export is being written there (export-pending.json, no commit marker yet), or its "
            "writer stopped midway; the next export replaces it")


class ModelSourceError(RuntimeError):
    """The model URI cannot be served (missing, uncommitted, corrupt)."""


def _s3_options() -> S3Options:
    from kubeforge.store import S3Options

    # boto3 reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY itself; the endpoint and region
    # are passed explicitly so older botocore versions honour them too
    return S3Options(endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                     region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
                     force_path_style=s3_force_path_style(os.environ.get(ENV_S3_FORCE_PATH_STYLE)),
                     retry_deadline_s=float(os.environ.get("KUBEFORGE_S3_RETRY_DEADLINE_S", "120")))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_revision(uri: str, marker: ExportMarker | None, expect_revision: str | None) -> None:
    if expect_revision and (marker is None or marker.time != expect_revision):
        found = marker.time if marker else "no commit marker"
        raise ModelSourceError(f"{uri}: export revision is {found}, this server must serve revision "
                               f"{expect_revision} (Pinned, or a rollout still on its way); not serving another")


def fetch_model(uri: str, download_dir: Path, expect_revision: str | None = None,
                options: S3Options | None = None) -> Path:
    """A local directory holding config.json and the safetensors for ``uri``. With
    ``expect_revision``, an export whose commit marker has another time is refused. S3 is
    reached with ``options``, else as the process environment says."""
    from kubeforge.store import EXPORT_PENDING_NAME, MARKER_NAME, ExportMarker, NotFound, open_backend

    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else uri)
        # the marker first, then the pending file: a writer puts the pending file before it
        # removes the marker, so a reader never sees neither while an export is rewritten
        marker_file = path / MARKER_NAME
        local = ExportMarker.model_validate_json(marker_file.read_bytes()) if marker_file.is_file() else None
        if (path / EXPORT_PENDING_NAME).is_file():
            raise ModelSourceError(_PENDING.format(uri=uri))
        _check_revision(uri, local, expect_revision)
        if local is not None:
            # files are checked by size, not re-hashed on every start (a volume is ours)
            bad = [n for n, d in local.files.items() if not (path / n).is_file() or (path / n).stat().st_size != d.size]
            if bad:
                raise ModelSourceError(f"{uri}: the export's commit marker lists {', '.join(sorted(bad)[:3])}, "
                                       "missing or of another size")
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{uri}: no config.json (expected a Hugging Face Llama directory)")
        return path
    if parsed.scheme != "s3":
        raise ModelSourceError(f"unsupported model URI {uri!r}; use a path, file:// or s3://bucket/prefix")
    backend = open_backend(uri, options or _s3_options())
    dest = download_dir / hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    try:
        marker: ExportMarker | None = ExportMarker.model_validate_json(backend.get_bytes(MARKER_NAME))
    except NotFound:
        marker = None
    try:  # after the marker, for the same reason as above
        backend.get_bytes(EXPORT_PENDING_NAME)
    except NotFound:
        pass
    else:
        raise ModelSourceError(_PENDING.format(uri=uri))
    _check_revision(uri, marker, expect_revision)
    if marker is not None:
        for name, digest in marker.files.items():
            target = dest / name
            if not (target.is_file() and target.stat().st_size == digest.size and _sha256(target) == digest.sha256):
                target.parent.mkdir(parents=True, exist_ok=True)
                backend.get_file(name, target)
                if _sha256(target) != digest.sha256:
                    raise ModelSourceError(f"{uri}/{name}: sha256 does not match the export's commit marker")
        log.info("fetched export %s (%d files, %d bytes, step %s)", uri, len(marker.files), marker.bytes,
                 marker.step)
    else:
        n = 0
        for obj in backend.list(""):
            target = dest / obj.key
            target.parent.mkdir(parents=True, exist_ok=True)
            backend.get_file(obj.key, target)
            n += 1
        log.info("fetched %d files from %s", n, uri)
    if not (dest / "config.json").is_file():
        raise ModelSourceError(f"{uri}: no config.json (expected a Hugging Face Llama directory)")
    return dest
