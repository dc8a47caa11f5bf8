"""Key names and commit markers of the store layout (DESIGN.md, "Store layout").

Every key is relative to the store root (``s3://bucket/prefix`` or ``file:///path``)::

    <namespace>/<run>/checkpoints/step-<0000000042>/<files...>
    <namespace>/<run>/checkpoints/step-<0000000042>/commit.json     written last
    <namespace>/<run>/export/<config.json, *.safetensors, tokenizer.json...>
    <namespace>/<run>/export/commit.json                             written last
    <namespace>/<run>/export/export-pending.json                     while it is written
    <namespace>/<run>/restoring.json, unloadable.json                see below
    <namespace>/<run>/restore-leases/<reader>.json                   another run resuming from it

``<run>`` is one TrainingJob object's run: ``<job>/runs/<uid>`` (its name and its
``metadata.uid``), so a job deleted and created again under the same name starts a run of its
own and never resumes, exports over or serves its predecessor's. A job that started before
runs were keyed by uid keeps the run it has, ``<job>`` (the "legacy" run, the layout of that
time); the operator records which in the job's ``status.run`` and tells the workers
(``KUBEFORGE_JOB_RUN``). Nothing is moved or deleted for this: the runs of one name sit side by
side under ``<namespace>/<job>/`` (``checkpoints/`` and ``export/`` of the legacy run,
``runs/<uid>/...`` of the others), and ``spec.resumeFrom`` starts a run from any of them.

A directory counts only once its ``commit.json`` exists: writers upload every file first and
the marker last, readers never look at a directory without one, and deleters remove the
marker first. An export writer also puts ``export-pending.json`` before anything else and
removes it after the marker, so a reader that sees neither file is looking at a plain model
directory, not at an export on its way (the trainer's local ``export.path`` follows the same
protocol: whether a directory is an export is in its files, never in its name). The marker carries each file's size and sha256 so a reader can prove what it
got is what was written.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import hashlib
import re
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel, ConfigDict, Field

MARKER_NAME = "commit.json"
#: ``<job>/restoring.json``: the step a job's rank 0 is loading right now (retention keeps it)
RESTORE_LEASE_NAME = "restoring.json"
#: ``<job>/unloadable.json``: committed steps a restore could not load, each bound to its
#: marker's time (a step committed again is judged afresh); retention does not count them
UNLOADABLE_NAME = "unloadable.json"
#: ``export/export-pending.json``: an export being written (or one whose writer died midway)
EXPORT_PENDING_NAME = "export-pending.json"
#: ``<job>/runs/<uid>``: the directory of the runs keyed by the TrainingJob's uid
RUNS_DIR = "runs"
#: ``<run>/restore-leases/<reader>.json``: the restore lease of another run that starts from this
#: one (``spec.resumeFrom``). A run writes only its own leases: ``restoring.json`` is the lease of
#: the run's own rank 0, each reader has one of its own, and retention honours all of them.
READER_LEASES_DIR = "restore-leases"
STEP_DIGITS = 10
_STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER_VERSION = 1


class FileDigest(BaseModel):
    """Size and sha256 of one file of a checkpoint or export."""

    model_config = ConfigDict(frozen=True)
    size: int
    sha256: str


class CommitMarker(BaseModel):
    """The commit marker of one checkpoint: its existence is the commit."""

    model_config = ConfigDict(frozen=True)
    version: int = MARKER_VERSION
    step: int
    time: str = Field(description="RFC 3339 UTC time of the commit")
    world_size: int
    bytes: int
    files: dict[str, FileDigest] = Field(description="file name relative to the checkpoint directory")
    info: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    def to_json(self) -> builtins.bytes:
        return self.model_dump_json(indent=1).encode()


class ExportMarker(BaseModel):
    """The commit marker of a job's export (a Hugging Face Llama directory)."""

    model_config = ConfigDict(frozen=True)
    version: int = MARKER_VERSION
    step: int | None
    time: str
    format: str = "hf-llama"
    bytes: int
    files: dict[str, FileDigest]

    def to_json(self) -> builtins.bytes:
        return self.model_dump_json(indent=1).encode()


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_name(value: str, what: str) -> str:
    if not value or "/" in value or value in (".", ".."):
        raise ValueError(f"{what} must be a non-empty name without '/', got {value!r}")
    return value


def run_key(job: str, uid: str | None) -> str:
    """The run of TrainingJob ``job`` with ``metadata.uid`` ``uid``; None: the legacy run ``<job>``."""
    return _check_name(job, "job") if uid is None else f"{_check_name(job, 'job')}/{RUNS_DIR}/{_check_name(uid, 'uid')}"


def parse_run_key(run: str) -> tuple[str, str | None]:
    """(job name, uid or None for the legacy run) of a run key; ValueError for anything else."""
    parts = run.split("/")
    if len(parts) == 1:
        return _check_name(parts[0], "job"), None
    if len(parts) == 3 and parts[1] == RUNS_DIR:
        return _check_name(parts[0], "job"), _check_name(parts[2], "uid")
    raise ValueError(f"run must be <job> or <job>/{RUNS_DIR}/<uid>, got {run!r}")


def job_prefix(namespace: str, job: str) -> str:
    """``<namespace>/<run>``: ``job`` is a run key (``run_key``), a plain job name being the legacy run."""
    parse_run_key(job)
    return f"{_check_name(namespace, 'namespace')}/{job}"


def checkpoints_prefix(namespace: str, job: str) -> str:
    return f"{job_prefix(namespace, job)}/checkpoints"


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:0{STEP_DIGITS}d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a ``step-<digits>`` directory name, None for anything else."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def checkpoint_prefix(namespace: str, job: str, step: int) -> str:
    return f"{checkpoints_prefix(namespace, job)}/{step_dir_name(step)}"


def restore_lease_key(namespace: str, job: str, reader: str | None = None) -> str:
    """The restore lease of run ``job`` held by its own rank 0, or by run ``reader`` (another
    run resuming from it: ``restore-leases/<reader run key, '/' as '.'>.json``)."""
    if reader is None:
        return f"{job_prefix(namespace, job)}/{RESTORE_LEASE_NAME}"
    parse_run_key(reader)
    return f"{reader_leases_prefix(namespace, job)}/{reader.replace('/', '.')}.json"


def reader_leases_prefix(namespace: str, job: str) -> str:
    return f"{job_prefix(namespace, job)}/{READER_LEASES_DIR}"


def unloadable_key(namespace: str, job: str) -> str:
    return f"{job_prefix(namespace, job)}/{UNLOADABLE_NAME}"


def export_prefix(namespace: str, job: str) -> str:
    return f"{job_prefix(namespace, job)}/export"


def sha256_stream(stream: BinaryIO, chunk: int = 8 << 20) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    while True:
        buf = stream.read(chunk)
        if not buf:
            return h.hexdigest(), n
        h.update(buf)
        n += len(buf)


def file_digest(path: Path) -> FileDigest:
    with open(path, "rb") as f:
        sha, size = sha256_stream(f)
    return FileDigest(size=size, sha256=sha)


def model_files(local_dir: Path) -> dict[str, FileDigest]:
    """The files of a model directory by relative name, the export protocol's own files left out."""
    return {p.relative_to(local_dir).as_posix(): file_digest(p) for p in sorted(Path(local_dir).rglob("*"))
            if p.is_file() and p.relative_to(local_dir).as_posix() not in (MARKER_NAME, EXPORT_PENDING_NAME,
                                                                            f".{MARKER_NAME}.tmp")}


def begin_local_export(out: Path) -> None:
    """Before writing a model into ``out``: mark it pending, un-commit an earlier export."""
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPORT_PENDING_NAME).write_text(utc_now() + "\n")
    (out / MARKER_NAME).unlink(missing_ok=True)


def commit_local_export(out: Path, step: int | None) -> ExportMarker:
    """After writing a model into ``out``: its marker (written whole, then renamed), then the
    pending file removed."""
    files = model_files(out)
    marker = ExportMarker(step=step, time=utc_now(), bytes=sum(f.size for f in files.values()), files=files)
    tmp = out / f".{MARKER_NAME}.tmp"
    tmp.write_bytes(marker.to_json())
    tmp.replace(out / MARKER_NAME)
    (out / EXPORT_PENDING_NAME).unlink(missing_ok=True)
    return marker


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One ``step-N`` directory as listed: committed when its marker exists and parses.

    ``bytes`` is what the listing found (for an incomplete checkpoint, what was written so
    far); ``modified`` is its newest object's time, which dates incomplete leftovers."""

    step: int
    prefix: str
    committed: bool
    bytes: int
    modified: dt.datetime
    marker: CommitMarker | None = None
    #: why a restore could not load this committed step (None: never failed to load)
    unloadable: str | None = None

    @property
    def loadable(self) -> bool:
        """Committed, and no restore has failed on it: what retention counts and a job resumes from."""
        return self.committed and self.unloadable is None
