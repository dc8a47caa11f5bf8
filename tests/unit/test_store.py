"""kubeforge.store on both backends: a volume directory and a real S3 server (MinIO)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubeforge.store import (
    CheckpointInfo,
    CommitMarker,
    FileDigest,
    Store,
    StoreError,
    checkpoint_prefix,
    open_store,
    plan_retention,
    step_dir_name,
)
from kubeforge.store.layout import file_digest, parse_step_dir

pytestmark = pytest.mark.unit
NS, JOB = "team-a", "llama"


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'root'}")
    server = request.getfixturevalue("s3_server")
    # a fresh prefix per test: the bucket is shared by the session
    return open_store(server.uri(f"unit/{request.node.name}/{time.monotonic_ns()}"), **server.store_options())


def write_checkpoint(store: Store, tmp_path: Path, step: int, *, commit: bool = True, size: int = 1000,
                     world_size: int = 2) -> CommitMarker | None:
    """A fake two-rank checkpoint: files uploaded first, marker last (as the trainer does)."""
    files = {}
    for rank in range(world_size):
        p = tmp_path / f"src-{step}-{rank}"
        p.write_bytes(bytes([step % 256, rank]) * (size // 2))
        files[f"__{rank}_0.distcp"] = store.upload_checkpoint_file(NS, JOB, step, f"__{rank}_0.distcp", p)
    if not commit:
        return None
    marker = CommitMarker(step=step, time="2026-01-01T00:00:00Z", world_size=world_size,
                          bytes=sum(f.size for f in files.values()), files=files)
    store.write_marker(NS, JOB, marker)
    return marker


def test_layout_names() -> None:
    assert step_dir_name(42) == "step-0000000042"
    assert parse_step_dir("step-0000000042") == 42
    assert parse_step_dir("step-x") is None and parse_step_dir("export") is None
    assert checkpoint_prefix("ns", "job", 7) == "ns/job/checkpoints/step-0000000007"
    # zero padding keeps lexical order (what S3 lists) equal to numeric order
    assert sorted(step_dir_name(s) for s in (100, 9, 10)) == [step_dir_name(s) for s in (9, 10, 100)]
    with pytest.raises(ValueError):
        checkpoint_prefix("ns", "a/b", 1)


def test_open_store_rejects_unknown_schemes() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        open_store("gs://bucket/x")
    with pytest.raises(ValueError, match="absolute"):
        open_store("file://relative/path")


def test_only_checkpoints_with_a_marker_count(store: Store, tmp_path: Path) -> None:
    assert store.newest_committed(NS, JOB) is None
    write_checkpoint(store, tmp_path, 10)
    write_checkpoint(store, tmp_path, 20)
    write_checkpoint(store, tmp_path, 30, commit=False)  # a save that died before its commit
    listed = store.list_checkpoints(NS, JOB)
    assert [(c.step, c.committed) for c in listed] == [(10, True), (20, True), (30, False)]
    newest = store.newest_committed(NS, JOB)
    assert newest is not None and newest.step == 20 and newest.marker is not None
    assert newest.marker.world_size == 2 and newest.bytes == 2000
    summary = store.summary(NS, JOB)
    assert (summary.committed, summary.bytes, summary.newest_step, summary.incomplete) == (2, 4000, 20, 1)
    assert summary.newest_time == "2026-01-01T00:00:00Z"
    # other jobs are not mixed in
    assert store.list_checkpoints(NS, "other") == []


def test_verify_finds_a_changed_file(store: Store, tmp_path: Path) -> None:
    write_checkpoint(store, tmp_path, 5)
    assert store.verify(NS, JOB, 5) == []
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00" * 1000)  # same size, different bytes
    store.backend.put_file(f"{checkpoint_prefix(NS, JOB, 5)}/__1_0.distcp", bad)
    problems = store.verify(NS, JOB, 5)
    assert len(problems) == 1 and "__1_0.distcp" in problems[0]
    assert store.verify(NS, JOB, 6) == ["step 6: no commit marker"]


def test_delete_removes_the_marker_and_files(store: Store, tmp_path: Path) -> None:
    write_checkpoint(store, tmp_path, 1)
    write_checkpoint(store, tmp_path, 2)
    store.delete(NS, JOB, 1)
    assert [c.step for c in store.list_checkpoints(NS, JOB)] == [2]
    assert list(store.backend.list(checkpoint_prefix(NS, JOB, 1))) == []


def test_retention_k2_m10_after_35_saves_keeps_exactly_the_expected_set(store: Store, tmp_path: Path) -> None:
    for step in range(1, 36):
        write_checkpoint(store, tmp_path, step, size=10)
    plan = plan_retention(store.list_checkpoints(NS, JOB), keep_last=2, keep_every=10)
    assert plan.keep == (10, 20, 30, 34, 35)
    deleted = store.apply_retention(NS, JOB, plan)
    assert len(deleted) == 30
    assert [c.step for c in store.list_checkpoints(NS, JOB)] == [10, 20, 30, 34, 35]
    assert all(c.committed for c in store.list_checkpoints(NS, JOB))


def test_incomplete_checkpoints_go_after_the_grace(store: Store, tmp_path: Path) -> None:
    write_checkpoint(store, tmp_path, 1)
    write_checkpoint(store, tmp_path, 2, commit=False)
    listed = store.list_checkpoints(NS, JOB)
    now = dt.datetime.now(dt.UTC)
    assert plan_retention(listed, keep_last=1, incomplete_grace_seconds=3600, now=now).delete_incomplete == ()
    later = now + dt.timedelta(hours=2)
    plan = plan_retention(listed, keep_last=1, incomplete_grace_seconds=3600, now=later)
    assert plan.delete_incomplete == (2,) and plan.delete == ()
    store.apply_retention(NS, JOB, plan)
    assert [(c.step, c.committed) for c in store.list_checkpoints(NS, JOB)] == [(1, True)]


def test_a_fresh_restore_lease_protects_its_step_from_the_operators_retention(store: Store, tmp_path: Path) -> None:
    from kubeforge.store.report import JobRef, protected_steps

    for step in (10, 20, 30):
        write_checkpoint(store, tmp_path, step)
    job = JobRef.from_job({"metadata": {"namespace": NS, "name": JOB}, "status": {"lastCheckpoint": {"step": 30}}})
    assert store.restoring_step(NS, JOB) is None and protected_steps(store, NS, job) == {30}
    store.write_restore_lease(NS, JOB, 10)  # newest was corrupt: rank 0 falls back to step 10
    assert store.restoring_step(NS, JOB) == 10
    assert store.restoring_step(NS, JOB, max_age_s=-1) is None  # a stale lease protects nothing
    plan = plan_retention(store.list_checkpoints(NS, JOB), keep_last=1, protected_steps=protected_steps(store, NS, job))
    assert plan.keep == (10, 30) and plan.delete == (20,)
    assert [c.step for c in store.list_checkpoints(NS, JOB)] == [10, 20, 30]  # the lease is no checkpoint
    store.clear_restore_lease(NS, JOB)
    assert store.restoring_step(NS, JOB) is None


def test_every_reader_of_a_run_has_a_lease_of_its_own_and_retention_keeps_all_of_them(store: Store,
                                                                                      tmp_path: Path) -> None:
    # a job resuming from another job's run wrote that run's restoring.json, then deleted it
    from kubeforge.store.report import JobRef, RetentionRule, inspect_store

    for step in (10, 20, 30, 40):
        write_checkpoint(store, tmp_path, step)
    store.write_restore_lease(NS, JOB, 10)                            # the run's own rank 0
    store.write_restore_lease(NS, JOB, 20, reader="other/runs/uid-1")  # another job resuming from it
    store.write_restore_lease(NS, JOB, 20, reader="llama/runs/uid-2")  # a re-created "llama"
    assert store.restoring_steps(NS, JOB) == {10, 20}
    assert store.restoring_step(NS, JOB) == 10 and store.restoring_step(NS, JOB, reader="other/runs/uid-1") == 20
    store.clear_restore_lease(NS, JOB, reader="other/runs/uid-1")
    assert store.restoring_step(NS, JOB) == 10, "a reader's release leaves the run's own lease"
    assert store.restoring_steps(NS, JOB) == {10, 20}
    assert store.restoring_steps(NS, JOB, max_age_s=-1) == set()
    report = inspect_store(store, NS, [JobRef(JOB, 40)], RetentionRule(1, None, 3600))
    assert report.deleted == {JOB: [30]} and [c.step for c in store.list_checkpoints(NS, JOB)] == [10, 20, 40]
    assert store.runs(NS, JOB) == [JOB], "a lease is no run"


def test_the_issues_example_keeps_a_loadable_step_after_a_fallback(store: Store, tmp_path: Path) -> None:
    # keepLast=1, committed [100, 200 broken], restore 100, commit 150: the operator's retention
    # used to keep only 200 (status.lastCheckpoint, the numerically newest) and delete 100 and 150
    from kubeforge.store.report import JobRef, job_summary, protected_steps

    for step in (100, 200):
        write_checkpoint(store, tmp_path, step)
    broken = store.read_marker(NS, JOB, 200)
    assert broken is not None
    store.mark_unloadable(NS, JOB, 200, broken.time, "rank 0: CorruptCheckpoint: sha256 mismatch")
    store.write_restore_lease(NS, JOB, 100)
    newest = store.newest_committed(NS, JOB)
    assert newest is not None and newest.step == 100  # what lastCheckpoint reports
    write_checkpoint(store, tmp_path, 150)
    newest = store.newest_committed(NS, JOB)
    assert newest is not None and newest.step == 150
    job = JobRef.from_job({"metadata": {"namespace": NS, "name": JOB},
                           "status": {"lastCheckpoint": {"step": newest.step}}})
    plan = plan_retention(store.list_checkpoints(NS, JOB), keep_last=1, protected_steps=protected_steps(store, NS, job))
    assert plan.keep == (100, 150) and plan.delete == () and plan.unloadable == (200,)
    summary = job_summary(store, NS, JOB)
    assert summary["newestStep"] == 150 and summary["unloadable"] == 1


def test_a_step_committed_again_after_it_failed_to_load_counts_again(store: Store, tmp_path: Path) -> None:
    write_checkpoint(store, tmp_path, 5)
    first = store.read_marker(NS, JOB, 5)
    assert first is not None
    store.mark_unloadable(NS, JOB, 5, first.time, "torn")
    assert [c.loadable for c in store.list_checkpoints(NS, JOB)] == [False]
    store.delete(NS, JOB, 5)
    write_checkpoint(store, tmp_path, 5, commit=False)  # a rerun writes step 5 anew
    store.write_marker(NS, JOB, first.model_copy(update={"time": "2026-01-02T00:00:00.000Z"}))
    assert [c.loadable for c in store.list_checkpoints(NS, JOB)] == [True]


def test_a_step_that_loads_after_all_is_loadable_again(store: Store, tmp_path: Path) -> None:
    marker = write_checkpoint(store, tmp_path, 7)
    assert marker is not None
    store.mark_unloadable(NS, JOB, 7, marker.time, "a read timed out")
    assert store.newest_committed(NS, JOB) is None
    store.clear_unloadable(NS, JOB, 7)  # what a restore does when the step loads on a later try
    newest = store.newest_committed(NS, JOB)
    assert newest is not None and newest.step == 7 and store.unloadable_steps(NS, JOB) == {}
    store.backend.put_bytes(f"{NS}/{JOB}/unloadable.json", b"[1, 2]")  # not ours: ignored, not fatal
    assert store.unloadable_steps(NS, JOB) == {}
    store.mark_unloadable(NS, JOB, 7, marker.time, "again")
    assert list(store.unloadable_steps(NS, JOB)) == [7]


def test_export_is_committed_by_its_own_marker(store: Store, tmp_path: Path) -> None:
    assert store.export_marker(NS, JOB) is None
    src = tmp_path / "hf"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "sub" / "model.safetensors").write_bytes(b"x" * 5000)
    marker = store.write_export(NS, JOB, src, step=7)
    assert set(marker.files) == {"config.json", "sub/model.safetensors"} and marker.bytes == 5023
    assert store.export_marker(NS, JOB) == marker
    dest = tmp_path / "dl"
    store.download_export(NS, JOB, dest)
    assert (dest / "sub" / "model.safetensors").read_bytes() == b"x" * 5000
    assert store.export_uri(NS, JOB).endswith("/team-a/llama/export")
    # the export never shows up as a checkpoint
    assert store.list_checkpoints(NS, JOB) == []


def test_large_files_go_up_in_parallel_multipart_parts(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = open_store(s3_server.uri("unit/multipart"), multipart_threshold=5 << 20,
                       multipart_chunksize=5 << 20, **s3_server.store_options())
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * (80 * 1024))  # 20 MiB: four parts
    digest = store.upload_checkpoint_file(NS, JOB, 1, "__0_0.distcp", big)
    head = s3_server.client().head_object(Bucket=s3_server.bucket,
                                          Key=f"unit/multipart/{checkpoint_prefix(NS, JOB, 1)}/__0_0.distcp")
    assert head["ETag"].strip('"').endswith("-4")  # S3's multipart ETag: md5-of-parts "-" part count
    assert digest == file_digest(big)


def test_s3_calls_ride_out_an_outage(s3_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = open_store(s3_server.uri("unit/outage"), **s3_server.store_options())
    src = tmp_path / "f"
    src.write_bytes(b"y" * 1000)
    s3_server.stop()
    restarter = threading.Timer(4.0, s3_server.start)
    restarter.start()
    try:
        t0 = time.monotonic()
        store.upload_checkpoint_file(NS, JOB, 1, "__0_0.distcp", src)
        assert time.monotonic() - t0 >= 3.0  # it really waited for the server
    finally:
        restarter.join()
        s3_server.start()
    assert store.backend.get_bytes(f"{checkpoint_prefix(NS, JOB, 1)}/__0_0.distcp") == b"y" * 1000


def test_s3_gives_up_after_its_deadline_with_a_store_error(s3_server) -> None:  # type: ignore[no-untyped-def]
    store = open_store(s3_server.uri("unit/deadline"), retry_deadline_s=2.0, connect_timeout_s=1.0,
                       **s3_server.store_options())
    s3_server.stop()
    try:
        with pytest.raises(StoreError):
            store.backend.put_bytes("k", b"v")
    finally:
        s3_server.start()


def test_missing_bucket_is_reported_by_check(s3_server) -> None:  # type: ignore[no-untyped-def]
    store = open_store("s3://no-such-bucket-kf/x", **s3_server.store_options())
    with pytest.raises(StoreError):
        store.check()
    open_store(s3_server.uri("x"), **s3_server.store_options()).check()


# ------------------------------------------------------------------ retention, pure

def info(step: int, committed: bool = True, age_s: float = 0.0) -> CheckpointInfo:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return CheckpointInfo(step=step, prefix=f"p/{step}", committed=committed, bytes=1,
                          modified=now - dt.timedelta(seconds=age_s))


NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_retention_never_deletes_the_step_being_restored() -> None:
    listed = [info(s) for s in range(1, 8)]
    plan = plan_retention(listed, keep_last=2, protected_steps={3}, now=NOW)
    assert plan.keep == (3, 6, 7) and 3 not in plan.delete


def test_retention_keeps_an_incomplete_checkpoint_that_is_being_written() -> None:
    listed = [info(1), info(2, committed=False, age_s=10)]
    assert plan_retention(listed, keep_last=1, incomplete_grace_seconds=60, now=NOW).delete_incomplete == ()


@settings(max_examples=200, deadline=None)
@given(steps=st.sets(st.integers(0, 500), max_size=40), incomplete=st.sets(st.integers(0, 500), max_size=5),
       keep_last=st.integers(1, 6), keep_every=st.none() | st.integers(1, 50),
       protected=st.sets(st.integers(0, 500), max_size=3))
def test_retention_properties(steps: set[int], incomplete: set[int], keep_last: int, keep_every: int | None,
                              protected: set[int]) -> None:
    listed = [info(s) for s in steps] + [info(s, committed=False, age_s=1e6) for s in incomplete - steps]
    plan = plan_retention(listed, keep_last=keep_last, keep_every=keep_every, protected_steps=protected, now=NOW)
    committed = sorted(steps)
    assert set(plan.keep) | set(plan.delete) == set(committed) and not set(plan.keep) & set(plan.delete)
    if committed:
        assert committed[-1] in plan.keep  # the newest committed checkpoint always stays
    assert set(committed[-keep_last:]) <= set(plan.keep)
    assert not (protected & (set(plan.delete) | set(plan.delete_incomplete)))
    if keep_every:
        assert all(s % keep_every for s in plan.delete)
    assert set(plan.delete_incomplete) == (incomplete - steps) - protected


def test_marker_round_trips_as_json() -> None:
    m = CommitMarker(step=3, time="t", world_size=4, bytes=9, files={"a": FileDigest(size=9, sha256="ab")},
                     info={"tokens_seen": 123})
    assert CommitMarker.model_validate_json(m.to_json()) == m


def test_deleting_in_a_missing_directory_leaves_its_empty_parents(tmp_path: Path) -> None:
    # rank 0 uncommits a step before any rank wrote it, while rank 1 creates the same tree
    from kubeforge.store.backends import FileBackend

    root = tmp_path / "root"
    (root / NS / JOB / "checkpoints").mkdir(parents=True)
    FileBackend(root).delete([f"{NS}/{JOB}/checkpoints/step-0000000005/commit.json"])
    assert (root / NS / JOB / "checkpoints").is_dir()
    # an emptied directory is removed, and its parents while they are empty
    (root / NS / JOB / "checkpoints" / "step-0000000006").mkdir()
    (root / NS / JOB / "checkpoints" / "step-0000000006" / "a").write_bytes(b"x")
    FileBackend(root).delete([f"{NS}/{JOB}/checkpoints/step-0000000006/a"])
    assert not (root / NS).exists() and root.is_dir()
