"""Object backends under the store: a mounted volume (``file://``) and S3 (boto3).

Both offer the same few primitives on keys relative to the store root; everything about
the layout lives in ``kubeforge.store.store``. The S3 backend retries every call with
exponential backoff up to a deadline, because an S3 endpoint that is away for a minute must
cost a checkpoint some latency, never the checkpoint itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreError(RuntimeError):
    """A store operation failed for good (after retries, or at once when retrying cannot help)."""


class NotFound(StoreError, FileNotFoundError):
    """The key does not exist."""


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One stored object: key relative to the store root, size, last modification (UTC)."""

    key: str
    size: int
    modified: dt.datetime


class ObjectBackend(Protocol):
    """What the layout needs from a storage system."""

    uri: str

    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...
    def delete(self, keys: Iterable[str]) -> None: ...
    def local_path(self, key: str) -> Path | None: ...
    def check(self) -> None: ...


# ---------------------------------------------------------------------------------- volume


class FileBackend:
    """A directory on a mounted volume. Writes go to a temporary name, are fsynced and renamed,
    so a reader sees a whole file or none, and a crash leaves no half file under a real name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"file://{root}"

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if p != self.root.resolve() and self.root.resolve() not in p.parents:
            raise ValueError(f"key {key!r} leaves the store root")
        return p

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def _write_atomically(self, key: str, write: Callable[[Any], None]) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def put_file(self, key: str, path: Path) -> None:
        if self._path(key) == Path(path).resolve():
            return  # written in place (the checkpoint writer stages straight into the volume)
        with open(path, "rb") as src:
            self._write_atomically(key, lambda f: shutil.copyfileobj(src, f, 16 << 20))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_atomically(key, lambda f: f.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as e:
            raise NotFound(f"{self.uri}/{key}") from e

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(f"{self.uri}/{key}")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in sorted(files):
                if name.endswith(".tmp") and name.startswith("."):
                    continue
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key=str(p.relative_to(self.root)), size=st.st_size,
                                 modified=dt.datetime.fromtimestamp(st.st_mtime, dt.UTC))

    def delete(self, keys: Iterable[str]) -> None:
        parents = set()
        for key in keys:
            p = self._path(key)
            p.unlink(missing_ok=True)
            parents.add(p.parent)
        for d in sorted(parents, key=lambda x: len(x.parts), reverse=True):
            # another deleter (rank 0's retention and a volume inspector pass) may empty or
            # remove the same directories at the same time
            while d != self.root:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    break  # gone already (another deleter): its parents are not ours to judge
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        break  # still holds something: so do its parents
                    raise StoreError(f"{self.uri}: cannot remove {d}: {e}") from e
                d = d.parent

    def check(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"{self.uri}: not a directory")
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"{self.uri}: not writable")


# -------------------------------------------------------------------------------------- S3


@dataclasses.dataclass(frozen=True)
class S3Options:
    """How to reach an S3 or S3-compatible server. Credentials, when not given, come from the
    environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, set from a Secret)."""

    endpoint_url: str | None = None
    region: str | None = None
    force_path_style: bool = True
    access_key_id: str | None = None
    secret_access_key: str | None = None
    #: parts above this size are uploaded as multipart, this many parts in parallel
    multipart_threshold: int = 16 << 20
    multipart_chunksize: int = 16 << 20
    max_concurrency: int = 8
    #: how long one call keeps retrying a reachable-again endpoint before giving up
    retry_deadline_s: float = 600.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    #: without ``endpoint_url``: AWS's own endpoint even where ``AWS_ENDPOINT_URL`` is set (in a
    #: server pod that variable is the model's store, which a capture store need not share)
    ignore_env_endpoint: bool = False


_RETRYABLE_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                    "RequestTimeout", "RequestTimeTooSkewed", "Throttling", "XMinioServerNotInitialized",
                    "XMinioStorageFull"}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


def _is_retryable(exc: BaseException) -> bool:
    """Transient: the endpoint is unreachable, slow or says "try again". Missing credentials,
    access denied or a missing bucket are not: retrying would only hide them."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code in _RETRYABLE_CODES or status in _RETRYABLE_CODES
    if isinstance(exc, S3UploadFailedError):
        # boto3 folds the cause into the message; everything but auth/bucket errors is transient
        msg = str(exc)
        return not any(s in msg for s in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId",
                                          "SignatureDoesNotMatch"))
    return isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError))


def with_retries(what: str, fn: Callable[[], T], deadline_s: float, *, base_s: float = 0.5,
                 max_sleep_s: float = 10.0) -> T:
    """Call ``fn`` until it succeeds, a non-retryable error, or ``deadline_s`` has passed.
    Full-jitter exponential backoff keeps many ranks from hammering a recovering server in step."""
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            attempt += 1
            elapsed = time.monotonic() - start
            if not _is_retryable(exc) or elapsed >= deadline_s:
                raise
            sleep = min(max_sleep_s, base_s * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
            sleep = min(sleep, max(0.0, deadline_s - elapsed))
            log.warning("store: %s failed (attempt %d, %.0fs so far): %s; retrying in %.1fs",
                        what, attempt, elapsed, exc, sleep)
            time.sleep(sleep)


class S3Backend:
    """A bucket and key prefix on S3 or an S3-compatible server (MinIO, Ceph)."""

    def __init__(self, bucket: str, prefix: str, options: S3Options) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.options = options
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        config = Config(
            region_name=options.region,
            s3={"addressing_style": "path" if options.force_path_style else "auto"},
            # botocore's own retries are short; ours (with_retries) ride out longer outages
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=options.connect_timeout_s,
            read_timeout=options.read_timeout_s,
            max_pool_connections=max(10, options.max_concurrency * 2),
            # None leaves botocore's own setting (AWS_IGNORE_CONFIGURED_ENDPOINT_URLS) in force
            ignore_configured_endpoint_urls=True if options.ignore_env_endpoint and not options.endpoint_url else None,
        )
        session = boto3.session.Session(
            aws_access_key_id=options.access_key_id, aws_secret_access_key=options.secret_access_key,
            region_name=options.region)
        self.client = session.client("s3", endpoint_url=options.endpoint_url, config=config)
        self.transfer = TransferConfig(
            multipart_threshold=options.multipart_threshold, multipart_chunksize=options.multipart_chunksize,
            max_concurrency=options.max_concurrency, use_threads=True)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return with_retries(what, fn, self.options.retry_deadline_s)
        except Exception as exc:
            if _missing(exc):
                raise NotFound(f"{self.uri}/{what}") from exc
            raise StoreError(f"{self.uri}: {what}: {exc}") from exc

    def local_path(self, key: str) -> Path | None:
        return None

    def put_file(self, key: str, path: Path) -> None:
        self._retry(f"upload {key}", lambda: self.client.upload_file(
            str(path), self.bucket, self._key(key), Config=self.transfer))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._retry(f"put {key}", lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def get_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            return body
        return self._retry(f"get {key}", get)

    def get_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._retry(f"download {key}", lambda: self.client.download_file(
            self.bucket, self._key(key), str(path), Config=self.transfer))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        full = self._key(prefix).rstrip("/") + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0

        def pages() -> list[dict[str, Any]]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                out.extend(page.get("Contents", []))
            return out

        for obj in self._retry(f"list {prefix}", pages):
            yield ObjectInfo(key=obj["Key"][strip:], size=int(obj["Size"]), modified=obj["LastModified"])

    def delete(self, keys: Iterable[str]) -> None:
        batch = [{"Key": self._key(k)} for k in keys]
        for i in range(0, len(batch), 1000):
            chunk = batch[i:i + 1000]

            def delete_chunk(chunk: list[dict[str, str]] = chunk) -> None:
                resp = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})
                if resp.get("Errors"):
                    raise StoreError(f"delete failed for {resp['Errors'][:3]}")
            self._retry(f"delete {len(chunk)} objects", delete_chunk)

    def check(self) -> None:
        self._retry("head bucket", lambda: self.client.head_bucket(Bucket=self.bucket))


def _missing(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ClientError):
            err = cause.response.get("Error", {})
            return str(err.get("Code", "")) in _MISSING_CODES
        cause = cause.__cause__
    return False


def open_backend(uri: str, options: S3Options | None = None) -> ObjectBackend:
    """``file:///abs/path`` (or a bare absolute path) → FileBackend; ``s3://bucket/prefix`` → S3Backend."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else uri)
        if parsed.netloc not in ("", "localhost") or not path.is_absolute():
            raise ValueError(f"a volume store needs an absolute path, got {uri!r}")
        path.mkdir(parents=True, exist_ok=True)
        return FileBackend(path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"s3 URI without a bucket: {uri!r}")
        return S3Backend(parsed.netloc, parsed.path.strip("/"), options or S3Options())
    raise ValueError(f"unsupported store URI scheme {parsed.scheme!r} in {uri!r}; use s3:// or file://")
