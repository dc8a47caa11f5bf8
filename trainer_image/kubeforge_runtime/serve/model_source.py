"""Where the weights come from: a local directory, ``file://`` or ``s3://``.

A local export (a directory named ``export``) is served only once its commit marker exists.
An S3 prefix is read through ``kubeforge.store``'s backend (same retries, same credentials
from the environment as the trainer). When the prefix holds an export commit marker
(``commit.json``, what a TrainingJob writes last), exactly the files it lists are fetched and
checked against their sha256; a prefix named ``export`` without a marker is an export still
being written and is refused. Any other prefix is taken as a plain Hugging Face directory and
copied whole.
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


def fetch_model(uri: str, download_dir: Path, expect_revision: str | None = None) -> Path:
    """A local directory holding config.json and the safetensors for ``uri``. With
    ``expect_revision``, an export whose commit marker has another time is refused."""
    from kubeforge.store import ExportMarker, NotFound, open_backend

    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else uri)
        if path.name == "export" and not (path / "commit.json").is_file():
            # a volume-backed store: same rule as S3 (files are not re-hashed on every start)
            raise ModelSourceError(f"{uri}: export has no commit marker yet (still being written?)")
        if expect_revision:
            marker_file = path / "commit.json"
            _check_revision(uri, ExportMarker.model_validate_json(marker_file.read_bytes())
                            if marker_file.is_file() else None, expect_revision)
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{uri}: no config.json (expected a Hugging Face Llama directory)")
        return path
    if parsed.scheme != "s3":
        raise ModelSourceError(f"unsupported model URI {uri!r}; use a path, file:// or s3://bucket/prefix")
    backend = open_backend(uri, _s3_options())
    dest = download_dir / hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    try:
        marker: ExportMarker | None = ExportMarker.model_validate_json(backend.get_bytes("commit.json"))
    except NotFound:
        marker = None
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
    elif parsed.path.rstrip("/").endswith("/export"):
        raise ModelSourceError(f"{uri}: export has no commit marker yet (still being written?)")
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
