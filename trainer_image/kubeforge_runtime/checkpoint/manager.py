"""CheckpointManager: DCP save and restore of a (possibly FSDP2-sharded) run over the store.

Save. Every rank writes its own shards with ``torch.distributed.checkpoint`` into a local
directory: the checkpoint's own directory when the store is a mounted volume, a per-rank
staging directory on local disk when it is S3 (then uploaded with retries). Each rank hashes
its files as they are written; rank 0 gathers every rank's list and writes the commit marker only when all of
them report their files durable. A rank that dies or fails leaves a directory without a
marker, which restore ignores and retention removes.

Async saves. The loop is blocked only while the state is copied to host memory (into
buffers reused from save to save); writing,
hashing and uploading run in one background thread. That thread talks over its own gloo
process group: DCP's collectives on the default group from a second thread interleave with
the loop's collectives and deadlock. A second small gloo group, used only from the loop's
thread, lets all ranks agree on time-based saves. The next save waits for the previous one.

Restore. Rank 0 lists the run's committed checkpoints and broadcasts the choice, newest first.
A run with none of its own starts from ``spec.resumeFrom`` when the job asks for it
(``KUBEFORGE_RESUME_FROM``): another run's checkpoint (a deleted job's of the same name, or
another job's), read in place there; what the run commits goes into its own directory. A
resume source that is not there, or does not load, raises ``ResumeSourceError`` on every
rank (never a silent start from step 0). Files
are fetched through a DCP reader that verifies each file's sha256 against the marker before
DCP reads it; DCP reshards to the current world size. A corrupt or missing file fails the
load on every rank (DCP gathers errors), and all ranks fall back to the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, cast

import torch
import torch.distributed as dist
from kubeforge.api import contract
from kubeforge.store import (
    CommitMarker,
    CorruptCheckpoint,
    FileDigest,
    NotFound,
    ResumeSourceError,
    Store,
    StoreError,
    open_store,
    plan_retention,
    utc_now,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten, tree_unflatten

log = logging.getLogger(__name__)
#: How often rank 0 renews a restore lease it holds (the store ignores leases older than an hour).
LEASE_REFRESH_S = 600.0


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """When to save and how; mirrors ``CheckpointPolicy.spec.schedule`` plus local knobs."""

    every_steps: int | None = None
    every_seconds: float | None = None
    on_preemption: bool = True
    at_end: bool = True
    async_save: bool = True
    #: local disk for S3 staging and restore downloads (the pod's emptyDir)
    staging_dir: Path = dataclasses.field(default_factory=lambda: Path(tempfile.gettempdir()) / "kubeforge-ckpt")
    #: how long the checkpoint process groups wait for a peer (a dead rank frees the rest)
    group_timeout_s: float = 1800.0
    #: DCP writer threads per rank
    write_threads: int = 1
    #: ``CheckpointPolicy.spec.retention``; None keeps everything
    keep_last: int | None = None
    keep_every: int | None = None
    incomplete_grace_seconds: float = 3600.0
    #: apply retention after each commit. None: only on a volume, which the operator cannot
    #: reach (it enforces retention on S3 itself)
    retention_in_worker: bool | None = None

    @classmethod
    def from_policy(cls, policy: Mapping[str, Any] | None, **overrides: Any) -> CheckpointSettings:
        """Read the ``KUBEFORGE_CHECKPOINT_POLICY`` JSON: ``{"schedule": ..., "retention": ...}`` of
        ``CheckpointPolicy.spec`` (or a bare schedule), camelCase or snake_case."""
        from kubeforge.api.checkpointpolicy import Retention, Schedule

        if not policy:
            return cls(**overrides)
        sched = Schedule.model_validate(policy.get("schedule", {k: v for k, v in policy.items() if k != "retention"}))
        fields: dict[str, Any] = {
            "every_steps": sched.every_steps,
            "every_seconds": float(sched.every_seconds) if sched.every_seconds else None,
            "on_preemption": sched.on_preemption, "at_end": sched.at_end, "async_save": sched.async_save}
        if "retention" in policy:
            ret = Retention.model_validate(policy["retention"])
            fields.update(keep_last=ret.keep_last, keep_every=ret.keep_every,
                          incomplete_grace_seconds=float(ret.incomplete_grace_seconds))
        return cls(**{**fields, **overrides})


@dataclasses.dataclass(frozen=True)
class ResumeRequest:
    """``spec.resumeFrom`` as the pod contract passes it (``KUBEFORGE_RESUME_FROM``)."""

    training_job: str
    #: the named job's run when the operator found that object; None: the newest earlier run
    run: str | None = None
    step: int | None = None

    @classmethod
    def from_json(cls, raw: str | None) -> ResumeRequest | None:
        if not raw:
            return None
        doc = json.loads(raw)
        step = doc.get("step")
        return cls(str(doc["trainingJob"]), doc.get("run") or None, int(step) if step is not None else None)


@dataclasses.dataclass
class _RankResult:
    ok: bool
    files: dict[str, FileDigest]
    error: str = ""


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through it: the marker's sha256 comes for free
    instead of reading every shard back (a third of a save's time on the CPU benchmark)."""

    def __init__(self, raw: IO[bytes], on_close: Callable[[FileDigest], None]) -> None:
        super().__init__()
        self._raw, self._on_close = raw, on_close
        self._sha, self._size = hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = self._raw.write(view)
        self._sha.update(view[:n])
        self._size += n
        return n

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if self.closed:
            return
        super().close()  # flushes through to raw first
        self._raw.close()
        self._on_close(FileDigest(size=self._size, sha256=self._sha.hexdigest()))


class _HashingFiles(FileSystem):
    """DCP's local filesystem, recording size and sha256 of each file written (by final name:
    DCP writes ``.metadata`` under a temporary name and renames it)."""

    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[str, FileDigest] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = Path(path).name

        def record(digest: FileDigest) -> None:
            with self._lock:
                self.digests[name] = digest
        with open(path, mode) as raw, _HashingWriter(raw, record) as stream:
            yield stream

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        super().rename(path, new_path)
        with self._lock:
            if Path(path).name in self.digests:
                self.digests[Path(new_path).name] = self.digests.pop(Path(path).name)


class _DigestingWriter(FileSystemWriter):
    """DCP's FileSystemWriter over ``_HashingFiles``: ``digests`` lists what this rank wrote."""

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.fs = self.hashing = _HashingFiles()


class _VerifiedFiles(FileSystem):
    """DCP's local filesystem, except that opening a checkpoint file for reading first fetches
    it from the store (S3) or locates it (volume) and checks it against the commit marker."""

    def __init__(self, store: Store, prefix: str, files: Mapping[str, FileDigest], cache: Path) -> None:
        super().__init__()
        self.store, self.prefix, self.files, self.cache = store, prefix, files, cache
        self._ready: dict[str, Path] = {}
        self._lock = threading.Lock()
        #: what fetching raised: DCP may report it only as text, inside errors of its own
        self.failures: list[BaseException] = []

    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Any:
        if "r" not in mode:
            raise PermissionError("a checkpoint being restored is read-only")
        name = Path(path).relative_to(self.cache).as_posix()
        with self._lock:
            if name not in self._ready:
                digest = self.files.get(name)
                try:
                    if digest is None:
                        raise CorruptCheckpoint(f"{self.prefix}/{name}: not in the commit marker")
                    self._ready[name] = self.store.fetch_verified(self.prefix, name, digest, self.cache / name)
                except Exception as exc:
                    self.failures.append(exc)
                    raise
        return super().create_stream(self._ready[name], mode)


class _VerifiedReader(FileSystemReader):
    def __init__(self, store: Store, prefix: str, files: Mapping[str, FileDigest], cache: Path) -> None:
        super().__init__(cache)
        self.fs = self.verified = _VerifiedFiles(store, prefix, files, cache)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A private copy in host memory (DTensors stay DTensors, their local shard copied)."""
    return t.detach().to("cpu", copy=True)


class _HostStaging:
    """Host buffers for async saves, allocated once and refilled by later saves.

    A fresh copy of the state pays for page faults on every byte; refilling the same buffers
    is a plain memcpy, which is what the loop then waits for. Buffers are reused only while the
    state's structure, shapes and dtypes stay the same; the previous save has finished with
    them because every save waits for the one before."""

    def __init__(self) -> None:
        self._spec: Any = None
        self._leaves: list[Any] = []

    def stage(self, state: dict[str, Any]) -> dict[str, Any]:
        leaves, spec = tree_flatten(state)
        if spec != self._spec or not all(_same_buffer(a, b) for a, b in zip(self._leaves, leaves, strict=True)):
            staged = [_host_copy(x) if isinstance(x, torch.Tensor) else x for x in leaves]
            self._spec, self._leaves = spec, staged
            return cast(dict[str, Any], tree_unflatten(staged, spec))
        out = []
        with torch.no_grad():
            for buf, x in zip(self._leaves, leaves, strict=True):
                if isinstance(x, torch.Tensor):
                    _local(buf).copy_(_local(x.detach()))
                    out.append(buf)
                else:
                    out.append(x)
        return cast(dict[str, Any], tree_unflatten(out, spec))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _same_buffer(buf: Any, x: Any) -> bool:
    if not isinstance(x, torch.Tensor):
        return not isinstance(buf, torch.Tensor)
    if not isinstance(buf, torch.Tensor) or type(buf) is not type(x):
        return False
    return _local(buf).shape == _local(x).shape and buf.dtype == x.dtype


class CheckpointManager:
    """Saves and restores one job's training state; see the package docstring for the calls."""

    def __init__(self, store: Store | None, namespace: str, job: str, rank: int, world_size: int,
                 settings: CheckpointSettings | None = None, resume_from: ResumeRequest | None = None) -> None:
        self.store = store
        #: ``job`` is the run's store key (``<job>/runs/<uid>``, or a plain name: the legacy run)
        self.namespace, self.job = namespace, job
        self.resume_from = resume_from
        self.rank, self.world_size = rank, world_size
        self.settings = settings or CheckpointSettings()
        self.last_committed_step: int | None = None
        self.last_save_blocking_s: float = 0.0
        #: this rank's timings of the last save: write_s (DCP to local disk), upload_s (hash +
        #: upload, or hash only on a volume), bytes written by this rank
        self.last_save_stats: dict[str, float] = {}
        self._last_saved_step: int | None = None
        self._restored_step: int | None = None
        #: rank 0 holds the restore lease of a fallback restore until its first commit, so no
        #: retention (operator or volume inspector) deletes the only loadable checkpoint meanwhile
        self._lease_written: float | None = None
        self._staging = _HostStaging()
        self._staging_cleaned = False
        self._last_save_time = time.monotonic()
        self._pending: Future[bool] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._io_group: Any = None
        self._control_group: Any = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_env(cls, root_uri: str | None, policy: Mapping[str, Any] | None, rank: int, world_size: int, *,
                 namespace: str | None = None, job: str | None = None,
                 env: Mapping[str, str] | None = None, **settings: Any) -> CheckpointManager:
        """The manager of the pod contract; ``root_uri`` None (or empty) disables checkpointing.

        S3 endpoint, region and credentials come from boto3's environment (``AWS_*``)."""
        env = os.environ if env is None else env
        namespace = namespace or env.get(contract.ENV_JOB_NAMESPACE) or "default"
        job = job or env.get(contract.ENV_JOB_RUN) or env.get(contract.ENV_JOB_NAME) or "local"
        store = open_store(root_uri, endpoint_url=env.get(contract.ENV_S3_ENDPOINT) or None,
                           region=env.get(contract.ENV_S3_REGION) or None,
                           access_key_id=env.get(contract.ENV_S3_ACCESS_KEY_ID) or None,
                           secret_access_key=env.get(contract.ENV_S3_SECRET_ACCESS_KEY) or None,
                           force_path_style=contract.s3_force_path_style(env.get(contract.ENV_S3_FORCE_PATH_STYLE)),
                           ) if root_uri else None
        staging = env.get(contract.ENV_CHECKPOINT_STAGING_DIR)
        if staging and "staging_dir" not in settings:  # the pod's sized emptyDir
            settings["staging_dir"] = Path(staging)
        return cls(store, namespace, job, rank, world_size, CheckpointSettings.from_policy(policy, **settings),
                   ResumeRequest.from_json(env.get(contract.ENV_RESUME_FROM)))

    @property
    def enabled(self) -> bool:
        return self.store is not None

    @property
    def export_uri(self) -> str | None:
        return self.store.export_uri(self.namespace, self.job) if self.store else None

    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _ensure_groups(self) -> None:
        """Create the two gloo groups; a collective call, so every rank reaches it in the same
        order (the first restore/save/maybe_save call). Also the first-call moment to drop what
        a killed predecessor on this node left in the staging directory (torchrun restarts
        workers in the same container, so the emptyDir is not fresh)."""
        if not self._staging_cleaned:
            self._staging_cleaned = True
            base = self.settings.staging_dir
            for leftover in [*base.glob(f"save/{self.namespace}/{self.job}/*/rank-{self.rank}"),
                             *base.glob(f"restore/{self.namespace}/{self.job}/*/rank-{self.rank}")]:
                shutil.rmtree(leftover, ignore_errors=True)
        if self._io_group is None and self._distributed():
            timeout = dt.timedelta(seconds=self.settings.group_timeout_s)
            self._io_group = dist.new_group(backend="gloo", timeout=timeout)
            self._control_group = dist.new_group(backend="gloo", timeout=timeout)

    # ------------------------------------------------------------------ save

    def maybe_save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                   extra: dict[str, Any], force: bool = False) -> bool:
        """Save when the policy says so (every N steps, every T seconds) or ``force``; True if a
        save started. Must be called by every rank at every step."""
        if not self.enabled:
            return False
        s = self.settings
        due = force or bool(s.every_steps and step % s.every_steps == 0)
        if not due and s.every_seconds:
            elapsed = time.monotonic() - self._last_save_time >= s.every_seconds
            due = self._agree(elapsed)
        if self._lease_written is not None and time.monotonic() - self._lease_written > LEASE_REFRESH_S:
            self._refresh_lease()
        if not due or step == self._last_saved_step:
            return False
        self.save(step, model, optimizer, extra, blocking=not s.async_save)
        return True

    def _refresh_lease(self) -> None:
        """Rank 0: the lease's time is renewed well within the hour after which retention takes
        it for one left by a dead process."""
        assert self.store is not None and self._restored_step is not None
        try:
            self.store.write_restore_lease(self.namespace, self.job, self._restored_step)
            self._lease_written = time.monotonic()
        except StoreError as exc:
            log.warning("checkpoint: could not renew the restore lease of step %d: %s", self._restored_step, exc)

    def _release_lease(self) -> None:
        assert self.store is not None
        try:
            self.store.clear_restore_lease(self.namespace, self.job)
            self._lease_written = None
        except StoreError as exc:
            log.warning("checkpoint: could not clear the restore lease (next commit retries): %s", exc)

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is on any: clocks differ, the decision must not."""
        self._ensure_groups()
        if self._control_group is None:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control_group)
        return bool(t.item())

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             extra: dict[str, Any], blocking: bool = True) -> None:
        """Save now. Waits for the previous save first; with ``blocking`` False returns once the
        state is in host memory. ``last_committed_step`` tells what made it."""
        if not self.enabled:
            return
        self._ensure_groups()
        self.wait()
        if step == self.last_committed_step:
            return  # already committed (an async save of this step, or the step restored from)
        t0 = time.perf_counter()
        state = self._state_dict(model, optimizer)
        state["extra"] = pickle.dumps(dict(extra))
        info = {k: v for k, v in extra.items() if isinstance(v, (int, float, str, bool))}  # shown in the marker
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        if blocking:
            self._write_and_commit(step, state, info)
            self.last_save_blocking_s = time.perf_counter() - t0
            return
        staged = self._staging.stage(state)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kubeforge-ckpt")
        self._pending = self._pool.submit(self._write_and_commit, step, staged, info)
        self.last_save_blocking_s = time.perf_counter() - t0

    def wait(self) -> bool | None:
        """Wait for the in-flight save; its outcome (True committed), None when there was none."""
        if self._pending is None:
            return None
        fut, self._pending = self._pending, None
        return fut.result()

    def close(self) -> None:
        self.wait()
        if self._lease_written is not None:
            self._release_lease()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _state_dict(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        if optimizer is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict
            return {"model": get_model_state_dict(model)}
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def _local_dir(self, step: int) -> tuple[Path, bool]:
        """Where this rank's DCP files go, and whether that is already the store (a volume)."""
        assert self.store is not None
        in_place = self.store.local_checkpoint_dir(self.namespace, self.job, step)
        if in_place is not None:
            return in_place, True
        return (self.settings.staging_dir / "save" / self.namespace / self.job / f"step-{step}"
                / f"rank-{self.rank}"), False

    def _write_and_commit(self, step: int, state: dict[str, Any], info: dict[str, Any]) -> bool:
        """Write, make durable, report to rank 0, commit. Never raises: a failed save is logged
        and leaves no marker; training goes on and the next save tries again."""
        assert self.store is not None
        t0 = time.perf_counter()
        local, in_place = self._local_dir(step)
        result = _RankResult(ok=False, files={})
        try:
            if self.rank == 0:
                # a step written again (after a fallback restore) must not look committed while
                # its files change; DCP's planning collective orders this before any rank writes
                self.store.uncommit(self.namespace, self.job, step)
            if not in_place and local.exists():
                shutil.rmtree(local)
            local.mkdir(parents=True, exist_ok=True)
            writer = _DigestingWriter(local, single_file_per_rank=True, sync_files=in_place, overwrite=True,
                                      thread_count=self.settings.write_threads)
            if self._io_group is not None:
                dcp_save(state, storage_writer=writer, process_group=self._io_group)
            else:
                with _single_process():
                    dcp_save(state, storage_writer=writer, no_dist=True)
            t_written = time.perf_counter()
            for name, digest in sorted(writer.hashing.digests.items()):
                if not in_place:
                    self.store.upload_checkpoint_file(self.namespace, self.job, step, name, local / name, digest)
                result.files[name] = digest
            result.ok = True
            self.last_save_stats = {"write_s": t_written - t0, "upload_s": time.perf_counter() - t_written,
                                    "bytes": float(sum(f.size for f in result.files.values()))}
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - reported to rank 0, which does not commit
            result.error = _describe(exc)
            log.error("checkpoint: rank %d failed to write step %d: %s", self.rank, step, result.error)
        finally:
            if not in_place:
                shutil.rmtree(local, ignore_errors=True)
        committed = self._commit(step, result, info, time.perf_counter() - t0)
        if committed:
            self.last_committed_step = step
        return committed

    def _commit(self, step: int, mine: _RankResult, info: dict[str, Any], elapsed: float) -> bool:
        assert self.store is not None
        results: list[Any] = [mine]
        if self._io_group is not None:
            results = [None] * self.world_size if self.rank == 0 else []
            dist.gather_object(mine, results if self.rank == 0 else None, dst=0, group=self._io_group)
        decision = [False]
        if self.rank == 0:
            failed = [f"rank {r}: {res.error}" for r, res in enumerate(results) if not res.ok]
            if failed:
                log.error("checkpoint: step %d not committed: %s", step, "; ".join(failed))
            else:
                files: dict[str, FileDigest] = {}
                for res in results:
                    files.update(res.files)
                marker = CommitMarker(step=step, time=utc_now(), world_size=self.world_size,
                                      bytes=sum(f.size for f in files.values()), files=files, info=info)
                try:
                    self.store.write_marker(self.namespace, self.job, marker)
                    decision[0] = True
                    log.info("checkpoint: committed step %d (%.1f MB, %d files) in %.2fs to %s", step,
                             marker.bytes / 1e6, len(files), elapsed,
                             self.store.checkpoint_uri(self.namespace, self.job, step))
                except StoreError as exc:
                    log.error("checkpoint: step %d not committed, marker write failed: %s", step, exc)
                if decision[0]:
                    self._apply_retention(step)
        if self._io_group is not None:
            dist.broadcast_object_list(decision, src=0, group=self._io_group)
        return bool(decision[0])

    def _apply_retention(self, committed_step: int) -> None:
        """Rank 0, after a commit, when the policy asks for it here (see ``retention_in_worker``).
        The step this run restored from stays, whatever the numbers say."""
        assert self.store is not None
        s = self.settings
        in_worker = s.retention_in_worker
        if in_worker is None:
            in_worker = self.store.local_checkpoint_dir(self.namespace, self.job, committed_step) is not None
        if not in_worker or s.keep_last is None:
            return
        protected = {committed_step} | ({self._restored_step} if self._restored_step is not None else set())
        try:  # and the steps other runs resume from (their leases: spec.resumeFrom of another job)
            protected |= self.store.restoring_steps(self.namespace, self.job)
            plan = plan_retention(self.store.list_checkpoints(self.namespace, self.job), keep_last=s.keep_last,
                                  keep_every=s.keep_every, protected_steps=protected,
                                  incomplete_grace_seconds=s.incomplete_grace_seconds)
            deleted = self.store.apply_retention(self.namespace, self.job, plan)
        except (StoreError, OSError) as exc:
            log.warning("checkpoint: retention failed (next commit retries): %s", exc)
            return
        if deleted:
            log.info("checkpoint: retention deleted steps %s", deleted)

    # ------------------------------------------------------------------ restore

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, extra: dict[str, Any],
                step: int | None = None) -> int | None:
        """Load the newest committed checkpoint (or ``step``) into ``model``/``optimizer`` in place
        and update ``extra``; returns the step, or None when there is nothing to restore.

        A run with no committed checkpoint of its own starts from ``resume_from`` when set
        (another run, read in place and never written: its lease is this run's own, a step that
        fails to load is not marked there); ResumeSourceError when that names nothing committed
        or nothing there loads for a reason a retry cannot change, StoreError (retried by a
        restart, as any failure) when the store could not be read. A checkpoint whose files do
        not match their marker is skipped with a warning and the previous one is tried; raises
        StoreError when committed checkpoints exist and none loads."""
        if not self.enabled:
            return None
        assert self.store is not None
        self._ensure_groups()
        self.wait()  # a save in flight would share the checkpoint group with the load
        candidates: list[Any] = [None]
        if self.rank == 0:
            candidates[0] = self._restore_candidates(step)
        if self._control_group is not None:
            dist.broadcast_object_list(candidates, src=0, group=self._control_group)
        if isinstance(candidates[0], ResumeSourceError):
            raise ResumeSourceError(str(candidates[0]))
        if isinstance(candidates[0], str):
            raise StoreError(candidates[0])
        run, resuming, ordered = candidates[0]
        reader = self.job if resuming else None  # another run's lease is never written or deleted
        tried: list[str] = []
        for ckpt_step, prefix, marker, was_unloadable in ordered:
            if self.rank == 0:  # retention (operator or worker) keeps the step while it loads
                self.store.write_restore_lease(self.namespace, run, ckpt_step, reader=reader)
            failure: _LoadFailure | None = _LoadFailure("the load raised", transient=False)
            try:
                failure = self._load(prefix, marker, model, optimizer, extra)
            finally:
                # kept after a fallback, for the whole run: the step loaded is what this run can
                # go back to while its own newer commits are unproven (close() clears it)
                if self.rank == 0 and (failure is not None or not tried or resuming):
                    self.store.clear_restore_lease(self.namespace, run, reader=reader)
            if failure is None:
                if self.rank == 0 and was_unloadable and resuming:
                    log.info("checkpoint: step %d of run %s loaded though marked unloadable there; the mark is "
                             "left to that run", ckpt_step, run)
                elif self.rank == 0 and was_unloadable:  # the earlier failure was transient
                    try:
                        self.store.clear_unloadable(self.namespace, run, ckpt_step)
                    except StoreError as exc:
                        log.warning("checkpoint: could not clear step %d from the unloadable ones: %s",
                                    ckpt_step, exc)
                if self.rank == 0 and tried and not resuming:
                    self._lease_written = time.monotonic()
                if resuming:
                    log.warning("checkpoint: this run (%s) starts from spec.resumeFrom: step %d of run %s%s",
                                self.job, ckpt_step, run, f" after skipping {', '.join(tried)}" if tried else "")
                elif tried:
                    log.warning("checkpoint: restored step %d after skipping %s", ckpt_step, ", ".join(tried))
                else:
                    log.info("checkpoint: restored step %d (saved by %d ranks, now %d)", ckpt_step,
                             marker.world_size, self.world_size)
                # from another run: nothing of this run is committed yet (the end of training saves)
                self.last_committed_step = None if resuming else ckpt_step
                self._last_saved_step = self._restored_step = ckpt_step
                return cast(int, ckpt_step)
            error = failure.message
            if resuming and failure.transient:  # the source is not at fault: a restart tries again
                raise StoreError(f"spec.resumeFrom: step {ckpt_step} of run {run} could not be read from the "
                                 f"store ({error}); retried")
            log.warning("checkpoint: step %d of run %s cannot be restored (%s); falling back to the previous one",
                        ckpt_step, run, error)
            tried.append(f"step {ckpt_step}")
            if self.rank == 0 and resuming:  # another job's run: its checkpoints may load for it
                log.warning("checkpoint: step %d of run %s not marked unloadable there: that run is not this "
                            "job's (%s)", ckpt_step, run, self.job)
            elif self.rank == 0:  # retention stops counting it; lastCheckpoint stops naming it
                try:
                    self.store.mark_unloadable(self.namespace, run, ckpt_step, marker.time, error)
                except StoreError as exc:
                    log.warning("checkpoint: could not record step %d as unloadable: %s", ckpt_step, exc)
        if resuming:
            field = "spec.resumeFrom.step" if self.resume_from and self.resume_from.step is not None \
                else "spec.resumeFrom.trainingJob"
            raise ResumeSourceError(f"{field}: no checkpoint of run {run} could be loaded "
                                    f"({', '.join(tried)} failed)")
        if tried:
            raise StoreError(f"no committed checkpoint could be restored ({', '.join(tried)} failed)")
        return None

    def _restore_candidates(self, step: int | None) -> Any:
        """Rank 0: (run, from another run?, [(step, prefix, marker, was unloadable)] to try in
        order), or the error every rank raises (a message: StoreError; a ResumeSourceError)."""
        assert self.store is not None
        run, resuming = self.job, False
        try:
            committed = self.store.committed_checkpoints(self.namespace, run)
            if step is not None:
                committed = [c for c in committed if c.step == step]
                if not committed:
                    return f"step {step} has no committed checkpoint under {self.store.uri}/{self.namespace}/{run}"
            elif not committed and self.resume_from is not None:
                r = self.resume_from
                source = self.store.resume_source(self.namespace, r.training_job, run=r.run, step=r.step,
                                                  exclude=self.job)
                run, resuming, committed = source.run, True, source.checkpoints
        except ResumeSourceError as exc:
            return exc
        except StoreError as exc:  # unreachable: every rank fails the same, and a restart retries
            return f"the store could not be listed: {exc}"
        # the loadable ones newest first; the ones a restore failed on last (a read error may
        # have been transient)
        ordered = [c for c in reversed(committed) if c.loadable] + [c for c in reversed(committed) if not c.loadable]
        return run, resuming, [(c.step, c.prefix, c.marker, c.unloadable is not None) for c in ordered]

    def _load(self, prefix: str, marker: CommitMarker, model: torch.nn.Module,
              optimizer: torch.optim.Optimizer | None, extra: dict[str, Any]) -> _LoadFailure | None:
        """Load one checkpoint on every rank; why it failed (agreed by all ranks: transient when
        it was on any) or None."""
        assert self.store is not None
        cache = (self.settings.staging_dir / "restore" / self.namespace / self.job
                 / f"step-{marker.step}" / f"rank-{self.rank}")
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        failure: _LoadFailure | None = None
        state = self._state_dict(model, optimizer)
        state["extra"] = b""
        reader = _VerifiedReader(self.store, prefix, marker.files, cache)
        try:
            if self._io_group is not None:
                dcp_load(state, storage_reader=reader, process_group=self._io_group)
            else:
                with _single_process():
                    dcp_load(state, storage_reader=reader, no_dist=True)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - agreed below, then fallback
            failure = _LoadFailure(_describe(exc), any(_transient(e) for e in (exc, *reader.verified.failures)))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if self._control_group is not None:
            failures: list[Any] = [None] * self.world_size
            dist.all_gather_object(failures, failure, group=self._control_group)
            failed = [f for f in failures if f is not None]
            failure = _LoadFailure(failed[0].message, any(f.transient for f in failed)) if failed else None
        if failure is not None:
            return failure
        if optimizer is None:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra.update(pickle.loads(state["extra"]) if isinstance(state["extra"], bytes)
                     else pickle.load(cast(io.BytesIO, state["extra"])))
        return None

    # ------------------------------------------------------------------ export

    def export(self, local_dir: Path, step: int | None) -> None:
        """Upload a finished model directory as the job's export (rank 0 only; others return)."""
        if self.store is not None and self.rank == 0:
            marker = self.store.write_export(self.namespace, self.job, local_dir, step)
            log.info("checkpoint: exported %.1f MB to %s", marker.bytes / 1e6, self.export_uri)


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """DCP warns on every single-process call that it assumes one process; we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@dataclasses.dataclass(frozen=True)
class _LoadFailure:
    """Why a checkpoint did not load: the message, and whether a retry may load it."""

    message: str
    transient: bool


def _transient(exc: BaseException) -> bool:
    """A failure a retry may not meet again: the store unreachable or refusing (StoreError), the
    local disk. Not a file missing or unlike its marker, nor a state that does not fit the model
    (another config's shapes): those stay whatever the retry."""
    if isinstance(exc, CheckpointException):
        return any(_transient(e) for e, _tb in exc.failures.values())
    if isinstance(exc, (CorruptCheckpoint, NotFound)):
        return False
    return isinstance(exc, (StoreError, OSError))


def _describe(exc: BaseException) -> str:
    """One line per failing rank: DCP's CheckpointException wraps the real errors with tracebacks."""
    if isinstance(exc, CheckpointException):
        return "; ".join(f"rank {r}: {_describe(e)}" for r, (e, _tb) in sorted(exc.failures.items()))
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
