"""Reading a capture directory: committed shards only, each checked against its marker.

A shard is read when its ``.commit.json`` marker exists, parses, and the shard's size and
sha256 match it. Anything else (no marker yet, a marker without its shard, a truncated or
altered shard, a file that is not a tar) is skipped, and named with the reason in
``skipped``: curation never stops for one bad shard, and never reads a half-written one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor

from kubeforge.store.backends import NotFound, ObjectBackend
from kubeforge.store.flywheel import FEEDBACK, REQUESTS, SHARD_MARKER_SUFFIX, SHARD_SUFFIX, ShardMarker
from pydantic import ValidationError

#: shards fetched at once (S3 latency, not bandwidth, bounds a sequential read of many shards)
FETCH_PARALLEL = 8


@dataclasses.dataclass(frozen=True)
class SourceRecords:
    """Decoded records of the committed shards of a capture directory. A member that is not
    JSON is kept as its text, so curation counts it as malformed."""

    requests: list[object]
    feedback: list[object]
    shards: list[str]  # keys (relative to the capture dir) of the shards read
    skipped: list[str]  # "key: why"


def _members(data: bytes) -> list[object]:
    out: list[object] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".json"):
                continue
            f = tar.extractfile(member)
            assert f is not None
            raw = f.read()
            try:
                out.append(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError):
                out.append(raw.decode("utf-8", errors="replace"))
    return out


def _read_shard(backend: ObjectBackend, key: str) -> tuple[list[object] | None, str | None]:
    """(records, None) or (None, why it was skipped). A store that cannot be reached raises
    (StoreError): a version must not silently miss shards because of an outage."""
    marker_key = key.removesuffix(SHARD_SUFFIX) + SHARD_MARKER_SUFFIX
    try:
        marker = ShardMarker.model_validate_json(backend.get_bytes(marker_key))
        data = backend.get_bytes(key)
    except NotFound:
        return None, "deleted while being read"
    except ValidationError as e:
        return None, f"its marker is unreadable: {e.errors()[0]['msg']}"
    if len(data) != marker.bytes:
        return None, f"{len(data)} bytes, its marker says {marker.bytes} (truncated or rewritten)"
    if hashlib.sha256(data).hexdigest() != marker.sha256:
        return None, "its sha256 does not match its marker"
    try:
        return _members(data), None
    except (tarfile.TarError, EOFError) as e:
        return None, f"not a readable tar: {e}"


def read_capture(backend: ObjectBackend) -> SourceRecords:
    """Every committed request and feedback shard under ``backend`` (a capture directory), in
    name order (names sort by time)."""
    records: dict[str, list[object]] = {REQUESTS: [], FEEDBACK: []}
    shards: list[str] = []
    skipped: list[str] = []
    for kind in (REQUESTS, FEEDBACK):
        keys = {o.key for o in backend.list(kind)}
        tars = sorted(k for k in keys if k.endswith(SHARD_SUFFIX))
        for k in sorted(keys):
            if k.endswith(SHARD_MARKER_SUFFIX) and k.removesuffix(SHARD_MARKER_SUFFIX) + SHARD_SUFFIX not in keys:
                skipped.append(f"{k}: a marker without its shard")
        committed = []
        for k in tars:
            if k.removesuffix(SHARD_SUFFIX) + SHARD_MARKER_SUFFIX in keys:
                committed.append(k)
            else:
                skipped.append(f"{k}: no commit marker (being written, or its writer died)")
        with ThreadPoolExecutor(FETCH_PARALLEL) as pool:
            results = list(pool.map(lambda k: _read_shard(backend, k), committed))
        for k, (recs, why) in zip(committed, results, strict=True):
            if recs is None:
                skipped.append(f"{k}: {why}")
            else:
                shards.append(k)
                records[kind].extend(recs)
    return SourceRecords(records[REQUESTS], records[FEEDBACK], shards, sorted(skipped))
