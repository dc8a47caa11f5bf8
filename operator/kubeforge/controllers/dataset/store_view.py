"""What the Dataset controller reads from its store and deletes there, over a
``kubeforge.store`` backend (no kopf, no Kubernetes client). Runs in a store thread of
``controllers.store_access``, never on a reconcile thread.

- ``read_view``: the committed request and feedback shards of the capture directory (a shard
  counts only with its ``.commit.json``) and the committed versions of the dataset directory
  (only with their ``commit.json``; their ``manifest.json`` gives the counts). Markers are
  written once, so what was read is kept in a ``ViewCache`` and only new ones are fetched.
- ``apply_retention``: the kubeforge.store delete protocol: a version's marker first, then
  its files; a shard's marker first, then the shard. An interrupted delete leaves an
  uncommitted directory or an unmarked shard, never a committed one with missing files.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from pydantic import ValidationError

from kubeforge.controllers.dataset.plan import Retention, Shard, StoreView, Version
from kubeforge.store import MARKER_NAME, NotFound, ObjectInfo
from kubeforge.store.backends import ObjectBackend
from kubeforge.store.flywheel import (
    FEEDBACK,
    MANIFEST_NAME,
    REQUESTS,
    SHARD_MARKER_SUFFIX,
    SHARD_SUFFIX,
    DatasetManifest,
    DatasetMarker,
    ShardMarker,
    parse_version_dir,
    version_dir_name,
)

log = logging.getLogger(__name__)
#: The commit marker of a dataset version (kubeforge.store's name for every directory's marker).
VERSION_MARKER = MARKER_NAME


@dataclasses.dataclass
class ViewCache:
    """Markers already read, by key (a shard's), or by (version, the marker's modification
    time): a marker is written once, so it is not fetched again."""

    shards: dict[str, Shard | None] = dataclasses.field(default_factory=dict)
    versions: dict[tuple[int, dt.datetime], Version | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Deleted:
    """What one retention pass deleted: version numbers and shard keys."""

    versions: tuple[int, ...] = ()
    incomplete: tuple[int, ...] = ()
    shards: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.versions or self.incomplete or self.shards)


def _shard(backend: ObjectBackend, capture: str, marker_key: str) -> Shard | None:
    try:
        marker = ShardMarker.model_validate_json(backend.get_bytes(marker_key))
    except NotFound:
        return None
    except ValidationError as e:
        log.warning("dataset: unreadable shard marker %s/%s: %s", backend.uri, marker_key, e.errors()[0]["msg"])
        return None
    key = marker_key.removesuffix(SHARD_MARKER_SUFFIX) + SHARD_SUFFIX
    return Shard(key=key, rel=key[len(capture) + 1:], records=marker.records, first_time=marker.first_time,
                 last_time=marker.last_time)


def _shards(backend: ObjectBackend, capture: str, kind: str, cache: ViewCache) -> tuple[tuple[Shard, ...], set[str]]:
    """The committed shards of one kind (requests or feedback), and the marker keys listed."""
    markers = sorted(o.key for o in backend.list(f"{capture}/{kind}") if o.key.endswith(SHARD_MARKER_SUFFIX))
    out = []
    for key in markers:
        if key not in cache.shards:
            cache.shards[key] = _shard(backend, capture, key)
        shard = cache.shards[key]
        if shard is not None:
            out.append(shard)
    return tuple(out), set(markers)


def _version(backend: ObjectBackend, output: str, version: int) -> Version | None:
    vdir = f"{output}/{version_dir_name(version)}"
    try:
        marker = DatasetMarker.model_validate_json(backend.get_bytes(f"{vdir}/{VERSION_MARKER}"))
    except NotFound:
        return None
    except ValidationError as e:
        log.warning("dataset: unreadable version marker under %s/%s: %s", backend.uri, vdir, e.errors()[0]["msg"])
        return None
    try:
        manifest: DatasetManifest | None = DatasetManifest.model_validate_json(
            backend.get_bytes(f"{vdir}/{MANIFEST_NAME}"))
    except (NotFound, ValidationError) as e:
        log.warning("dataset: version %d under %s/%s has no readable manifest: %s", version, backend.uri, output, e)
        manifest = None
    if manifest is None:
        return Version(version=version, time=marker.time, records=dict(marker.records))
    seen = frozenset([*manifest.source_shards, *(s.split(": ", 1)[0] for s in manifest.skipped_shards)])
    return Version(version=version, time=marker.time, records=dict(manifest.records or marker.records),
                   dedup_ratio=manifest.dedup_ratio, window_start=manifest.window_start,
                   window_end=manifest.window_end, content_sha256=manifest.content_sha256, seen=seen)


def _version_dirs(backend: ObjectBackend, output: str) -> dict[int, list[ObjectInfo]]:
    found: dict[int, list[ObjectInfo]] = {}
    for obj in backend.list(output):
        head = obj.key[len(output) + 1:].split("/", 1)[0]
        number = parse_version_dir(head)
        if number is not None:
            found.setdefault(number, []).append(obj)
    return found


def read_view(backend: ObjectBackend, capture: str, output: str, cache: ViewCache) -> StoreView:
    """What the store holds for a Dataset (keys relative to ``backend``'s root)."""
    requests, listed = _shards(backend, capture, REQUESTS, cache)
    feedback, listed_feedback = _shards(backend, capture, FEEDBACK, cache)
    listed |= listed_feedback
    for key in [k for k in cache.shards if k not in listed]:
        del cache.shards[key]  # deleted meanwhile
    versions, incomplete = [], []
    dirs = _version_dirs(backend, output)
    for number in sorted(dirs):
        marker = next((o for o in dirs[number] if o.key.endswith(f"/{VERSION_MARKER}")), None)
        if marker is None:
            incomplete.append(number)
            continue
        ck = (number, marker.modified)
        if ck not in cache.versions:
            cache.versions[ck] = _version(backend, output, number)
        v = cache.versions[ck]
        if v is None:
            incomplete.append(number)
        else:
            versions.append(v)
    kept = {(number, o.modified) for number, objs in dirs.items() for o in objs if o.key.endswith(f"/{VERSION_MARKER}")}
    for ck in [k for k in cache.versions if k not in kept]:
        del cache.versions[ck]
    return StoreView(requests=requests, feedback=feedback, versions=tuple(versions), incomplete=tuple(incomplete))


def apply_retention(backend: ObjectBackend, output: str, view: StoreView, retention: Retention) -> Deleted:
    """Delete what ``retention`` names and ``view`` (read just before) still holds, markers first."""
    committed = {v.version for v in view.versions}
    shards = {s.key for s in (*view.requests, *view.feedback)}
    versions = tuple(n for n in retention.versions if n in committed)
    incomplete = tuple(n for n in retention.incomplete if n in view.incomplete)
    gone_shards = tuple(k for k in retention.shards if k in shards)
    for number in versions:
        vdir = f"{output}/{version_dir_name(number)}"
        backend.delete([f"{vdir}/{VERSION_MARKER}"])
        backend.delete([o.key for o in backend.list(vdir)])
    for number in incomplete:
        vdir = f"{output}/{version_dir_name(number)}"
        backend.delete([o.key for o in backend.list(vdir)])
    if gone_shards:
        backend.delete([k.removesuffix(SHARD_SUFFIX) + SHARD_MARKER_SUFFIX for k in gone_shards])
        backend.delete(list(gone_shards))
    return Deleted(versions=versions, incomplete=incomplete, shards=gone_shards)


def without(view: StoreView, deleted: Deleted) -> StoreView:
    """``view`` as it is after ``deleted``."""
    shards = set(deleted.shards)
    return StoreView(requests=tuple(s for s in view.requests if s.key not in shards),
                     feedback=tuple(s for s in view.feedback if s.key not in shards),
                     versions=tuple(v for v in view.versions if v.version not in deleted.versions),
                     incomplete=tuple(n for n in view.incomplete if n not in deleted.incomplete))


def read_and_apply(backend: ObjectBackend, capture: str, output: str, cache: ViewCache,
                   retention: Retention | None) -> tuple[StoreView, Deleted]:
    """One store pass of a Dataset: read, apply the retention its last plan asked for (only to
    what is still there), and the view after it."""
    view = read_view(backend, capture, output, cache)
    if not retention:
        return view, Deleted()
    assert retention is not None
    deleted = apply_retention(backend, output, view, retention)
    return without(view, deleted), deleted
