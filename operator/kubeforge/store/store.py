"""The checkpoint store: the layout of ``layout.py`` over an object backend.

One class for both sides. The trainer uploads files, writes markers and downloads verified
files; the operator lists, summarises, plans retention and deletes. Nothing here knows about
torch or Kubernetes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubeforge.store import layout
from kubeforge.store.backends import NotFound, ObjectBackend, S3Options, StoreError, open_backend
from kubeforge.store.layout import CheckpointInfo, CommitMarker, ExportMarker, FileDigest
from kubeforge.store.retention import RetentionPlan

log = logging.getLogger(__name__)


class CorruptCheckpoint(StoreError):
    """A committed checkpoint's files do not match its marker (missing, resized or changed)."""


class ResumeSourceError(Exception):
    """``spec.resumeFrom`` names no committed checkpoint (no such run, no such step) or one
    that cannot be loaded. Not a StoreError: retrying cannot help, the spec must change."""


@dataclasses.dataclass(frozen=True)
class ResumeSource:
    """The run a new run starts from and its committed checkpoints (oldest first; only the
    named step when one was asked for)."""

    run: str
    checkpoints: list[CheckpointInfo]


@dataclasses.dataclass(frozen=True)
class CheckpointSummary:
    """What the operator reports per job: committed count and bytes, the newest loadable one."""

    committed: int
    bytes: int
    newest_step: int | None
    newest_time: str | None
    incomplete: int
    #: committed steps a restore could not load (counted in ``committed``)
    unloadable: int = 0


class Store:
    """A store root (``s3://bucket/prefix`` or ``file:///path``) holding many jobs."""

    def __init__(self, backend: ObjectBackend) -> None:
        self.backend = backend
        self.uri = backend.uri

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # ------------------------------------------------------------------ addresses

    def checkpoint_uri(self, namespace: str, job: str, step: int) -> str:
        return f"{self.uri}/{layout.checkpoint_prefix(namespace, job, step)}"

    def export_uri(self, namespace: str, job: str) -> str:
        return f"{self.uri}/{layout.export_prefix(namespace, job)}"

    # ------------------------------------------------------------------ checkpoints

    def list_checkpoints(self, namespace: str, job: str) -> list[CheckpointInfo]:
        """Every ``step-N`` directory of the job, committed or not, oldest first."""
        base = layout.checkpoints_prefix(namespace, job)
        found: dict[int, list[Any]] = {}
        for obj in self.backend.list(base):
            rel = obj.key[len(base) + 1:]
            step_dir, _, _name = rel.partition("/")
            step = layout.parse_step_dir(step_dir)
            if step is not None:
                found.setdefault(step, []).append(obj)
        out = []
        for step in sorted(found):
            objs = found[step]
            prefix = layout.checkpoint_prefix(namespace, job, step)
            marker = None
            if any(o.key == f"{prefix}/{layout.MARKER_NAME}" for o in objs):
                marker = self._read_commit_marker(prefix)
            out.append(CheckpointInfo(step=step, prefix=prefix, committed=marker is not None,
                                      bytes=marker.bytes if marker else sum(o.size for o in objs),
                                      modified=max(o.modified for o in objs), marker=marker))
        failed = self.unloadable_steps(namespace, job) if out else {}
        return [dataclasses.replace(c, unloadable=failed[c.step][1]) if c.marker is not None and c.step in failed
                and failed[c.step][0] == c.marker.time else c for c in out]

    def committed_checkpoints(self, namespace: str, job: str) -> list[CheckpointInfo]:
        return [c for c in self.list_checkpoints(namespace, job) if c.committed]

    def newest_committed(self, namespace: str, job: str) -> CheckpointInfo | None:
        """The newest committed step a restore has not failed on (what the job resumes from)."""
        loadable = [c for c in self.list_checkpoints(namespace, job) if c.loadable]
        return loadable[-1] if loadable else None

    # ------------------------------------------------------------------ runs

    def runs(self, namespace: str, job: str) -> list[str]:
        """The run keys of every TrainingJob object named ``job`` that left anything in the
        store (the legacy run ``<job>`` included), in no particular order."""
        base = layout.job_prefix(namespace, job)
        found: set[str] = set()
        for obj in self.backend.list(base):
            parts = obj.key[len(base) + 1:].split("/")
            if parts[0] == layout.RUNS_DIR and len(parts) > 2:
                found.add(layout.run_key(job, parts[1]))
            elif parts[0] != layout.RUNS_DIR:
                found.add(job)
        return sorted(found)

    def resume_source(self, namespace: str, job: str, *, run: str | None = None, step: int | None = None,
                      exclude: str | None = None) -> ResumeSource:
        """Where ``spec.resumeFrom`` points: ``run`` when the operator knows it (the named job
        exists), else the run of an earlier object named ``job`` (not ``exclude``, the asking
        run) whose newest committed checkpoint (at ``step``, when given) is the newest. Raises
        ResumeSourceError naming the field when there is none."""
        what = f"TrainingJob {job}" + (f" at step {step}" if step is not None else "")
        field = "spec.resumeFrom.step" if step is not None else "spec.resumeFrom.trainingJob"
        candidates = [run] if run is not None else [r for r in self.runs(namespace, job) if r != exclude]
        best: tuple[str, ResumeSource] | None = None
        for key in candidates:
            committed = self.committed_checkpoints(namespace, key)
            if step is not None:
                committed = [c for c in committed if c.step == step]
            if not committed:
                continue
            newest = max((c.marker.time for c in committed if c.marker is not None), default="")
            if best is None or newest > best[0]:
                best = (newest, ResumeSource(key, committed))
        if best is None:
            where = f"{self.uri}/{layout.job_prefix(namespace, run)}" if run is not None else \
                f"{self.uri}/{namespace}/{job} (runs: {', '.join(candidates) or 'none'})"
            raise ResumeSourceError(f"{field}: no committed checkpoint of {what} under {where}")
        return best[1]

    # ------------------------------------------------------------------ unloadable steps

    def mark_unloadable(self, namespace: str, job: str, step: int, marker_time: str, reason: str) -> None:
        """Record that committed ``step`` (its marker written at ``marker_time``) failed to load."""
        steps = self._unloadable_doc(namespace, job)
        steps[str(step)] = {"markerTime": marker_time, "reason": reason[:500], "time": layout.utc_now()}
        self.backend.put_bytes(layout.unloadable_key(namespace, job), json.dumps({"steps": steps}, indent=1).encode())

    def clear_unloadable(self, namespace: str, job: str, step: int) -> None:
        """A step recorded as unloadable loaded after all (the failure was transient)."""
        steps = self._unloadable_doc(namespace, job)
        if steps.pop(str(step), None) is not None:
            self.backend.put_bytes(layout.unloadable_key(namespace, job),
                                   json.dumps({"steps": steps}, indent=1).encode())

    def _unloadable_doc(self, namespace: str, job: str) -> dict[str, Any]:
        try:
            doc = json.loads(self.backend.get_bytes(layout.unloadable_key(namespace, job)))
        except (NotFound, ValueError):
            return {}
        steps = doc.get("steps") if isinstance(doc, dict) else None
        return dict(steps) if isinstance(steps, dict) else {}

    def unloadable_steps(self, namespace: str, job: str) -> dict[int, tuple[str, str]]:
        """step → (marker time, reason) of the steps a restore could not load; entries that do
        not parse are left out (and logged)."""
        out: dict[int, tuple[str, str]] = {}
        for key, entry in self._unloadable_doc(namespace, job).items():
            try:
                out[int(key)] = (str(entry["markerTime"]), str(entry.get("reason", "")))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                log.warning("store: unreadable entry %r in %s of %s/%s: %s", key, layout.UNLOADABLE_NAME,
                            namespace, job, e)
        return out

    def _read_commit_marker(self, prefix: str) -> CommitMarker | None:
        try:
            return CommitMarker.model_validate_json(self.backend.get_bytes(f"{prefix}/{layout.MARKER_NAME}"))
        except NotFound:
            return None
        except ValidationError as e:
            log.warning("store: unreadable commit marker under %s/%s: %s", self.uri, prefix, e)
            return None

    def read_marker(self, namespace: str, job: str, step: int) -> CommitMarker | None:
        return self._read_commit_marker(layout.checkpoint_prefix(namespace, job, step))

    def write_marker(self, namespace: str, job: str, marker: CommitMarker) -> None:
        """Commit: callers must have made every file of ``marker.files`` durable before."""
        prefix = layout.checkpoint_prefix(namespace, job, marker.step)
        self.backend.put_bytes(f"{prefix}/{layout.MARKER_NAME}", marker.to_json())

    def uncommit(self, namespace: str, job: str, step: int) -> None:
        """Remove a checkpoint's marker (if any) before its files are written again."""
        self.backend.delete([f"{layout.checkpoint_prefix(namespace, job, step)}/{layout.MARKER_NAME}"])

    def upload_checkpoint_file(self, namespace: str, job: str, step: int, name: str, path: Path,
                               digest: FileDigest | None = None) -> FileDigest:
        """Upload one local file into a checkpoint; returns the digest for the marker (computed
        here unless the writer hashed the file as it wrote it)."""
        digest = digest or layout.file_digest(path)
        self.backend.put_file(f"{layout.checkpoint_prefix(namespace, job, step)}/{name}", path)
        return digest

    def local_checkpoint_dir(self, namespace: str, job: str, step: int) -> Path | None:
        """The checkpoint's directory when the store is a mounted volume (write in place), else None."""
        return self.backend.local_path(layout.checkpoint_prefix(namespace, job, step))

    def fetch_verified(self, key_prefix: str, name: str, digest: FileDigest, dest: Path) -> Path:
        """A file of a committed directory, checked against its digest.

        On a volume the file is read where it is (returned path is the store's own); from S3
        it is downloaded to ``dest``. Raises CorruptCheckpoint on any mismatch."""
        key = f"{key_prefix}/{name}"
        local = self.backend.local_path(key)
        if local is None:
            try:
                self.backend.get_file(key, dest)
            except NotFound as e:
                raise CorruptCheckpoint(f"{self.uri}/{key}: missing") from e
            local = dest
        elif not local.is_file():
            raise CorruptCheckpoint(f"{self.uri}/{key}: missing")
        got = layout.file_digest(local)
        if got != digest:
            raise CorruptCheckpoint(
                f"{self.uri}/{key}: expected {digest.size} bytes sha256 {digest.sha256[:12]}, "
                f"found {got.size} bytes sha256 {got.sha256[:12]}")
        return local

    def verify(self, namespace: str, job: str, step: int, *, parallel: int = 4) -> list[str]:
        """Problems of one committed checkpoint (empty list: every file matches its marker).
        Streams every file once; meant for audits, the trainer verifies what it reads."""
        prefix = layout.checkpoint_prefix(namespace, job, step)
        marker = self._read_commit_marker(prefix)
        if marker is None:
            return [f"step {step}: no commit marker"]
        return self._verify_files(prefix, marker.files, parallel)

    def _verify_files(self, prefix: str, files: Mapping[str, FileDigest], parallel: int) -> list[str]:
        with tempfile.TemporaryDirectory(prefix="kubeforge-verify-") as tmp:
            def check(item: tuple[str, FileDigest]) -> str | None:
                name, digest = item
                dest = Path(tmp) / name
                try:
                    self.fetch_verified(prefix, name, digest, dest)
                except CorruptCheckpoint as e:
                    return str(e)
                finally:
                    if self.backend.local_path(f"{prefix}/{name}") is None:
                        dest.unlink(missing_ok=True)
                return None
            with ThreadPoolExecutor(parallel) as pool:
                return [p for p in pool.map(check, sorted(files.items())) if p]

    def delete(self, namespace: str, job: str, step: int) -> None:
        """Remove a checkpoint, marker first: an interrupted delete leaves an incomplete
        directory (cleaned later), never a committed one with missing files."""
        prefix = layout.checkpoint_prefix(namespace, job, step)
        self.backend.delete([f"{prefix}/{layout.MARKER_NAME}"])
        self.backend.delete([o.key for o in self.backend.list(prefix)])

    # ------------------------------------------------------------------ restore lease

    def write_restore_lease(self, namespace: str, job: str, step: int, reader: str | None = None) -> None:
        """Say that ``step`` of run ``job`` is being restored: retention keeps it while the lease
        is fresh. ``reader``: the run that restores it when that is not ``job`` itself (a resume
        from another run), whose lease is its own and never touches the run's."""
        body = json.dumps({"step": step, "time": layout.utc_now()}).encode()
        self.backend.put_bytes(layout.restore_lease_key(namespace, job, reader), body)

    def clear_restore_lease(self, namespace: str, job: str, reader: str | None = None) -> None:
        self.backend.delete([layout.restore_lease_key(namespace, job, reader)])

    def restoring_step(self, namespace: str, job: str, max_age_s: float = 3600.0,
                       reader: str | None = None) -> int | None:
        """The step under a fresh restore lease of run ``job``'s own rank 0 (or of ``reader``);
        one older than ``max_age_s`` was left by a process that died while loading and
        protects nothing."""
        return self._lease_step(layout.restore_lease_key(namespace, job, reader), max_age_s)

    def restoring_steps(self, namespace: str, job: str, max_age_s: float = 3600.0) -> set[int]:
        """Every step of run ``job`` under a fresh restore lease: its own rank 0's and those of
        the runs resuming from it. What retention must keep."""
        keys = [layout.restore_lease_key(namespace, job)]
        keys += [o.key for o in self.backend.list(layout.reader_leases_prefix(namespace, job))
                 if o.key.endswith(".json")]
        return {step for step in (self._lease_step(k, max_age_s) for k in keys) if step is not None}

    def _lease_step(self, key: str, max_age_s: float) -> int | None:
        try:
            raw = json.loads(self.backend.get_bytes(key))
            age = dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(raw["time"])
            step = int(raw["step"])
        except NotFound:
            return None
        except (ValueError, KeyError, TypeError) as e:
            log.warning("store: unreadable restore lease %s: %s", key, e)
            return None
        return step if age.total_seconds() <= max_age_s else None

    def summary(self, namespace: str, job: str) -> CheckpointSummary:
        listed = self.list_checkpoints(namespace, job)
        committed = [c for c in listed if c.committed]
        loadable = [c for c in committed if c.loadable]
        newest = loadable[-1] if loadable else None
        return CheckpointSummary(
            committed=len(committed), bytes=sum(c.bytes for c in committed),
            newest_step=newest.step if newest else None,
            newest_time=newest.marker.time if newest and newest.marker else None,
            incomplete=len(listed) - len(committed), unloadable=len(committed) - len(loadable))

    def apply_retention(self, namespace: str, job: str, plan: RetentionPlan) -> list[int]:
        """Delete what a ``RetentionPlan`` says; returns the deleted steps."""
        steps = list(plan.delete) + list(plan.delete_incomplete)
        for step in steps:
            self.delete(namespace, job, step)
        return steps

    # ------------------------------------------------------------------ export

    def export_marker(self, namespace: str, job: str) -> ExportMarker | None:
        try:
            raw = self.backend.get_bytes(f"{layout.export_prefix(namespace, job)}/{layout.MARKER_NAME}")
        except NotFound:
            return None
        try:
            return ExportMarker.model_validate_json(raw)
        except ValidationError as e:
            log.warning("store: unreadable export marker for %s/%s: %s", namespace, job, e)
            return None

    def write_export(self, namespace: str, job: str, local_dir: Path, step: int | None) -> ExportMarker:
        """Upload a model directory as the job's export: the pending file first, then the
        earlier export un-committed (a reader never pairs the old marker with new files), the
        files, the marker, and the pending file removed."""
        prefix = layout.export_prefix(namespace, job)
        pending, marker_key = f"{prefix}/{layout.EXPORT_PENDING_NAME}", f"{prefix}/{layout.MARKER_NAME}"
        self.backend.put_bytes(pending, layout.utc_now().encode())
        self.backend.delete([marker_key])
        files = layout.model_files(Path(local_dir))
        for name in files:
            self.backend.put_file(f"{prefix}/{name}", Path(local_dir) / name)
        stale = [o.key for o in self.backend.list(prefix) if o.key[len(prefix) + 1:] not in files
                 and o.key not in (marker_key, pending)]
        self.backend.delete(stale)
        marker = ExportMarker(step=step, time=layout.utc_now(), bytes=sum(f.size for f in files.values()),
                              files=files)
        self.backend.put_bytes(marker_key, marker.to_json())
        self.backend.delete([pending])
        return marker

    def download_export(self, namespace: str, job: str, dest: Path) -> ExportMarker:
        """Fetch a committed export into ``dest``, every file verified."""
        marker = self.export_marker(namespace, job)
        if marker is None:
            raise NotFound(f"{self.export_uri(namespace, job)}: no committed export")
        prefix = layout.export_prefix(namespace, job)
        for name, digest in marker.files.items():
            got = self.fetch_verified(prefix, name, digest, dest / name)
            if got != dest / name:
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                (dest / name).write_bytes(got.read_bytes())
        return marker

    # ------------------------------------------------------------------ health

    def check(self) -> None:
        """Raise StoreError when the root cannot be reached or written (bucket missing, no access)."""
        self.backend.check()


def open_store(uri: str, *, endpoint_url: str | None = None, region: str | None = None,
               force_path_style: bool = True, access_key_id: str | None = None,
               secret_access_key: str | None = None, **s3_options: Any) -> Store:
    """Open ``s3://bucket/prefix`` or ``file:///path``. S3 options not given fall back to boto3's
    environment (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``...)."""
    options = S3Options(endpoint_url=endpoint_url, region=region, force_path_style=force_path_style,
                        access_key_id=access_key_id, secret_access_key=secret_access_key, **s3_options)
    return Store(open_backend(uri, options))

