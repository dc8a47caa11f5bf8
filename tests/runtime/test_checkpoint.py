"""Checkpoints under faults, for real: torchrun, gloo, FSDP2 on the CPU, MinIO as the store.

This file is also the training worker the tests launch (``python -m torch.distributed.run
... tests/runtime/test_checkpoint.py --store ...``): a minimal loop with the ``tiny`` Llama,
AdamW and a warm-up LR schedule, whose global batch for step s depends only on s, so two
runs can be compared step by step. Rank 0 appends ``{"step", "loss"}`` JSON lines to
``--losses``; JSON floats round-trip exactly, so "equal" means bit for bit.

Faults are injected inside the worker by environment: ``KF_KILL_AFTER_STEP=<step>:<rank>``
(SIGKILL once that step is done) and ``KF_KILL_DURING_SAVE=<step>:<rank>`` (SIGKILL right
after that rank uploaded its first file of that step's checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from kubeforge.store import open_store, plan_retention
from kubeforge.store.layout import checkpoint_prefix

NS, JOB = "ckpt-tests", "tiny"
STEPS = 12
EVERY = 3
GLOBAL_BATCH, SEQ = 4, 32
#: losses after a 2 → 1 world-size change differ only by summation order of fp32 reductions
WORLD_CHANGE_RTOL = 1e-5


# ----------------------------------------------------------------------------------- worker

def global_batch(step: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    return torch.randint(0, 259, (GLOBAL_BATCH, SEQ + 1), generator=g)


def run_training(*, store_uri: str, steps: int, every: int, losses: Path, async_save: bool = True,
                 seed: int = 0, step_sleep: float = 0.0, env: dict[str, str] | None = None) -> int | None:
    """Train ``steps`` steps with checkpoints; returns the step it restored from.

    Runs distributed when launched by torchrun (FSDP2 over gloo), otherwise in this process."""
    from kubeforge_runtime.checkpoint import CheckpointManager
    from kubeforge_runtime.model import Llama, preset

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(seed)
    model = Llama(preset("tiny"))
    model.init_weights(seed)
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    mgr = CheckpointManager.from_env(store_uri, {"everySteps": every, "asyncSave": async_save}, rank, world,
                                     namespace=NS, job=JOB, env=env)
    _install_fault_hooks(mgr, rank)
    extra: dict[str, Any] = {"step": 0, "tokens_seen": 0}
    restored = mgr.restore(model, opt, extra)
    if restored is not None:
        sched.load_state_dict(extra["lr_scheduler"])
        assert extra["step"] == restored
    for step in range(extra["step"] + 1, steps + 1):
        tokens = global_batch(step, seed)[rank::world]
        logits = model(tokens[:, :-1])
        local_sum = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
        n_global = GLOBAL_BATCH * SEQ
        # FSDP averages gradients over ranks; scaling by the world size makes that the global mean
        (local_sum * world / n_global).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        total = local_sum.detach().clone()
        if distributed:
            dist.all_reduce(total)
        if rank == 0:
            with open(losses, "a") as f:
                f.write(json.dumps({"step": step, "loss": (total / n_global).item(), "time": time.time()}) + "\n")
        extra.update(step=step, tokens_seen=extra["tokens_seen"] + n_global, lr_scheduler=sched.state_dict())
        _maybe_die("KF_KILL_AFTER_STEP", step, rank)
        mgr.maybe_save(step, model, opt, extra)
        if step_sleep:
            time.sleep(step_sleep)
    mgr.save(steps, model, opt, extra, blocking=True)
    mgr.close()
    if distributed:
        dist.destroy_process_group()
    return restored


def _maybe_die(var: str, step: int, rank: int) -> None:
    spec = os.environ.get(var)
    if spec and spec == f"{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)


def _install_fault_hooks(mgr: Any, rank: int) -> None:
    """KF_KILL_DURING_SAVE: the rank dies with part of its files uploaded and nothing reported."""
    spec = os.environ.get("KF_KILL_DURING_SAVE")
    if not spec or mgr.store is None:
        return
    upload = mgr.store.upload_checkpoint_file

    def upload_then_die(namespace: str, job: str, step: int, name: str, path: Path, digest: Any = None) -> Any:
        digest = upload(namespace, job, step, name, path, digest)
        _maybe_die("KF_KILL_DURING_SAVE", step, rank)
        return digest
    mgr.store.upload_checkpoint_file = upload_then_die


def worker_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--losses", type=Path, required=True)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--every", type=int, default=EVERY)
    p.add_argument("--sync", action="store_true")
    p.add_argument("--step-sleep", type=float, default=0.0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(message)s")
    run_training(store_uri=a.store, steps=a.steps, every=a.every, losses=a.losses, async_save=not a.sync,
                 step_sleep=a.step_sleep)


if __name__ == "__main__":
    worker_main()


# ------------------------------------------------------------------------------------ tests

pytestmark = pytest.mark.runtime
HERE = Path(__file__).resolve()


def torchrun(world: int, store_uri: str, losses: Path, s3: Any, *, extra_env: dict[str, str] | None = None,
             args: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **s3.env(), **(extra_env or {}), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           f"--nproc-per-node={world}", "--max-restarts=0", str(HERE),
           "--store", store_uri, "--losses", str(losses), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def read_losses(path: Path) -> dict[int, float]:
    """step → loss; a restarted run's later lines win (they are what the run continued with)."""
    out: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out


def committed_steps(store_uri: str, s3: Any) -> list[int]:
    return [c.step for c in open_store(store_uri, **s3.store_options()).committed_checkpoints(NS, JOB)]


@pytest.fixture(scope="module")
def reference(s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[int, float]]]:
    """An uninterrupted two-rank run: its store and its loss curve."""
    tmp = tmp_path_factory.mktemp("reference")
    uri = s3_server.uri(f"runtime/reference-{time.monotonic_ns()}")
    proc = torchrun(2, uri, tmp / "losses.jsonl", s3_server)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = read_losses(tmp / "losses.jsonl")
    assert sorted(losses) == list(range(1, STEPS + 1))
    yield uri, losses


def test_uninterrupted_run_commits_every_interval_and_the_end(reference: tuple[str, dict[int, float]],
                                                              s3_server: Any) -> None:
    uri, losses = reference
    assert committed_steps(uri, s3_server) == [3, 6, 9, 12]
    store = open_store(uri, **s3_server.store_options())
    newest = store.newest_committed(NS, JOB)
    assert newest is not None and newest.marker is not None
    # both ranks wrote shards; rank 0 also the DCP metadata; every file has a checksum
    assert set(newest.marker.files) == {"__0_0.distcp", "__1_0.distcp", ".metadata"}
    assert newest.marker.world_size == 2 and newest.marker.info["tokens_seen"] == STEPS * GLOBAL_BATCH * SEQ
    assert store.verify(NS, JOB, 12) == []
    assert losses[STEPS] < losses[1]  # it trains


def test_kill_at_a_random_step_then_resume_is_bit_for_bit(reference: tuple[str, dict[int, float]],
                                                         s3_server: Any, tmp_path: Path) -> None:
    _, ref = reference
    kill_step = random.Random().randint(4, STEPS - 1)
    kill_rank = random.Random().randint(0, 1)
    uri = s3_server.uri(f"runtime/kill-{time.monotonic_ns()}")
    losses = tmp_path / "losses.jsonl"
    proc = torchrun(2, uri, losses, s3_server, extra_env={"KF_KILL_AFTER_STEP": f"{kill_step}:{kill_rank}"})
    assert proc.returncode != 0, f"the kill at step {kill_step} did not happen"
    before = read_losses(losses)
    assert max(before) == kill_step
    # an async save may still be in flight when the kill comes: then the one before counts
    last_ckpt = max(committed_steps(uri, s3_server), default=0)
    assert last_ckpt <= kill_step and kill_step - last_ckpt <= 2 * EVERY

    resumed_losses = tmp_path / "resumed.jsonl"
    proc = torchrun(2, uri, resumed_losses, s3_server)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = read_losses(resumed_losses)
    assert min(resumed) == last_ckpt + 1, f"resumed from {min(resumed) - 1}, newest committed was {last_ckpt}"
    for step in range(last_ckpt + 1, STEPS + 1):
        assert resumed[step] == ref[step], f"killed at step {kill_step} on rank {kill_rank}: step {step} differs"
    for step in range(1, kill_step + 1):
        assert before[step] == ref[step]


def test_resume_at_another_world_size_matches_within_tolerance(reference: tuple[str, dict[int, float]],
                                                               s3_server: Any, tmp_path: Path) -> None:
    """Two FSDP ranks saved; one plain process restores (DCP reshards DTensor shards into full
    tensors) and continues from step 6, compared with the two-rank run."""
    ref_uri, ref = reference
    src = open_store(ref_uri, **s3_server.store_options())
    dst_uri = s3_server.uri(f"runtime/world-{time.monotonic_ns()}")
    dst = open_store(dst_uri, **s3_server.store_options())
    # a copy of the reference store's checkpoint 6, so the run restores from the middle
    marker = src.read_marker(NS, JOB, 6)
    assert marker is not None
    for name in marker.files:
        data = src.backend.get_bytes(f"{checkpoint_prefix(NS, JOB, 6)}/{name}")
        dst.backend.put_bytes(f"{checkpoint_prefix(NS, JOB, 6)}/{name}", data)
    dst.write_marker(NS, JOB, marker)
    losses = tmp_path / "losses.jsonl"
    restored = run_training(store_uri=dst_uri, steps=STEPS, every=EVERY, losses=losses, env=s3_server.env())
    assert restored == 6
    resumed = read_losses(losses)
    assert sorted(resumed) == list(range(7, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(ref[step], rel=WORLD_CHANGE_RTOL), step


def test_resume_on_more_ranks_reshards_into_fsdp(reference: tuple[str, dict[int, float]], s3_server: Any,
                                                  tmp_path: Path) -> None:
    """One plain process trains 6 steps and saves; two FSDP ranks restore (full tensors become
    DTensor shards) and finish; both parts match the two-rank reference within tolerance."""
    _, ref = reference
    uri = s3_server.uri(f"runtime/grow-{time.monotonic_ns()}")
    first = tmp_path / "first.jsonl"
    assert run_training(store_uri=uri, steps=6, every=EVERY, losses=first, env=s3_server.env()) is None
    proc = torchrun(2, uri, tmp_path / "second.jsonl", s3_server)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = {**read_losses(first), **read_losses(tmp_path / "second.jsonl")}
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(ref[step], rel=WORLD_CHANGE_RTOL), step


def test_a_corrupt_shard_falls_back_to_the_previous_checkpoint_with_a_warning(
        reference: tuple[str, dict[int, float]], s3_server: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    from kubeforge_runtime.checkpoint import CheckpointManager
    from kubeforge_runtime.model import Llama, preset

    ref_uri, _ = reference
    uri = s3_server.uri(f"runtime/corrupt-{time.monotonic_ns()}")
    src = open_store(ref_uri, **s3_server.store_options())
    dst = open_store(uri, **s3_server.store_options())
    for step in (9, 12):
        marker = src.read_marker(NS, JOB, step)
        assert marker is not None
        for name in marker.files:
            data = src.backend.get_bytes(f"{checkpoint_prefix(NS, JOB, step)}/{name}")
            if step == 12 and name == "__1_0.distcp":
                data = data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]  # one flipped byte
            dst.backend.put_bytes(f"{checkpoint_prefix(NS, JOB, step)}/{name}", data)
        dst.write_marker(NS, JOB, marker)
    model = Llama(preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    extra: dict[str, Any] = {}
    mgr = CheckpointManager.from_env(uri, None, 0, 1, namespace=NS, job=JOB, env=s3_server.env())
    leased: list[int | None] = []  # what retention would see while each candidate loads
    load = mgr._load

    def spy(*args: Any) -> str | None:
        leased.append(dst.restoring_step(NS, JOB))
        return load(*args)

    mgr._load = spy  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        assert mgr.restore(model, opt, extra) == 9
    assert extra["step"] == 9
    # leased while each candidate loads; after a fallback the lease stays for the whole run
    assert leased == [12, 9] and dst.restoring_step(NS, JOB) == 9
    # 12 is recorded as unloadable: lastCheckpoint names 9, and retention does not count 12
    listed = {c.step: c for c in dst.list_checkpoints(NS, JOB)}
    assert listed[12].committed and not listed[12].loadable and "__1_0.distcp" in str(listed[12].unloadable)
    newest = dst.newest_committed(NS, JOB)
    assert newest is not None and newest.step == 9
    mgr.save(13, model, opt, {**extra, "step": 13}, blocking=True)
    assert mgr.last_committed_step == 13 and dst.restoring_step(NS, JOB) == 9
    # the operator's retention with keepLast=1 (issue 16 item 3: it used to keep only 12)
    plan = plan_retention(dst.list_checkpoints(NS, JOB), keep_last=1,
                          protected_steps={dst.restoring_step(NS, JOB) or -1})
    assert plan.keep == (9, 13) and plan.delete == () and plan.unloadable == (12,)
    mgr.close()
    assert dst.restoring_step(NS, JOB) is None
    plan = plan_retention(dst.list_checkpoints(NS, JOB), keep_last=1)
    assert plan.keep == (13,) and plan.delete == (9,) and plan.unloadable == (12,)
    # a later run resumes from 13 first, never from the step that failed
    again = CheckpointManager.from_env(uri, None, 0, 1, namespace=NS, job=JOB, env=s3_server.env())
    fresh = Llama(preset("tiny"))
    assert again.restore(fresh, torch.optim.AdamW(fresh.parameters(), lr=3e-3), {}) == 13
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 12" in w and "__1_0.distcp" in w and "falling back" in w for w in warnings), warnings


def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint_newest(
        reference: tuple[str, dict[int, float]], s3_server: Any, tmp_path: Path) -> None:
    _, ref = reference
    uri = s3_server.uri(f"runtime/killsave-{time.monotonic_ns()}")
    losses = tmp_path / "losses.jsonl"
    proc = torchrun(2, uri, losses, s3_server, extra_env={"KF_KILL_DURING_SAVE": "6:1"})
    assert proc.returncode != 0
    store = open_store(uri, **s3_server.store_options())
    listed = {c.step: c.committed for c in store.list_checkpoints(NS, JOB)}
    # rank 1 uploaded its shard of step 6 and died: the directory exists, uncommitted
    assert listed == {3: True, 6: False}, listed
    assert store.newest_committed(NS, JOB).step == 3  # type: ignore[union-attr]

    resumed_losses = tmp_path / "resumed.jsonl"
    proc = torchrun(2, uri, resumed_losses, s3_server)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = read_losses(resumed_losses)
    assert min(resumed) == 4
    assert all(resumed[s] == ref[s] for s in range(4, STEPS + 1))
    # the rewritten step 6 is committed now, with both ranks' files
    marker = store.read_marker(NS, JOB, 6)
    assert marker is not None and set(marker.files) == {"__0_0.distcp", "__1_0.distcp", ".metadata"}


def test_s3_down_for_30s_training_goes_on_and_the_save_commits_later(s3_server: Any, tmp_path: Path) -> None:
    uri = s3_server.uri(f"runtime/outage-{time.monotonic_ns()}")
    losses = tmp_path / "losses.jsonl"
    steps, every = 40, 20
    env = {**os.environ, **s3_server.env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
           "--max-restarts=0", str(HERE), "--store", uri, "--losses", str(losses), "--steps", str(steps),
           "--every", str(every), "--step-sleep", "0.25"]
    with open(tmp_path / "worker.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while max(read_losses(losses), default=0) < every - 2:  # S3 goes away just before the save at step 20
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.1)
        s3_server.stop()
        down_at = time.time()
        time.sleep(30)
        steps_while_down = [s for s, t in _loss_times(losses) if down_at < t < down_at + 30]
        s3_server.start()
        up_at = time.time()
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        s3_server.start()
    output = (tmp_path / "worker.log").read_text()
    assert rc == 0, output[-4000:]
    # the loop kept stepping while the store was away (until the next save had to wait for step 20's)
    assert len(steps_while_down) >= 10, steps_while_down
    assert "retrying" in output
    assert committed_steps(uri, s3_server) == [20, 40]
    marker = open_store(uri, **s3_server.store_options()).read_marker(NS, JOB, 20)
    assert marker is not None and _rfc3339(marker.time) >= up_at - 1  # committed after the restart


def _loss_times(path: Path) -> list[tuple[int, float]]:
    return [(json.loads(line)["step"], json.loads(line)["time"]) for line in path.read_text().splitlines()]


def _rfc3339(value: str) -> float:
    import datetime as dt
    return dt.datetime.fromisoformat(value).timestamp()


def test_policy_json_of_the_custom_resource_drives_the_schedule() -> None:
    from kubeforge_runtime.checkpoint import CheckpointSettings

    spec = {"schedule": {"everySteps": 50, "everySeconds": 600, "asyncSave": False},
            "retention": {"keepLast": 2}, "storage": {"volume": {"claimName": "ckpt"}}}
    s = CheckpointSettings.from_policy(spec)
    assert (s.every_steps, s.every_seconds, s.async_save, s.at_end) == (50, 600.0, False, True)
    assert CheckpointSettings.from_policy({"everySteps": 5}).every_steps == 5
    assert CheckpointSettings.from_policy(None).every_steps is None


def test_the_pods_staging_volume_is_where_s3_checkpoints_are_staged(tmp_path: Path) -> None:
    from kubeforge.api.contract import ENV_CHECKPOINT_STAGING_DIR
    from kubeforge_runtime.checkpoint import CheckpointManager

    mgr = CheckpointManager.from_env(f"file://{tmp_path / 'store'}", None, 0, 1, namespace=NS, job=JOB,
                                     env={ENV_CHECKPOINT_STAGING_DIR: str(tmp_path / "staging")})
    assert mgr.settings.staging_dir == tmp_path / "staging"
    default = CheckpointManager.from_env(f"file://{tmp_path / 'store'}", None, 0, 1, namespace=NS, job=JOB, env={})
    assert default.settings.staging_dir != tmp_path / "staging"


def test_without_a_uri_checkpointing_is_a_no_op() -> None:
    from kubeforge_runtime.checkpoint import CheckpointManager
    from kubeforge_runtime.model import Llama, preset

    mgr = CheckpointManager.from_env(None, {"everySteps": 1}, 0, 1, env={})
    model = Llama(preset("tiny"))
    assert not mgr.enabled and mgr.export_uri is None and mgr.store is None
    assert mgr.restore(model, None, {}) is None
    assert mgr.maybe_save(1, model, None, {}) is False
    mgr.save(1, model, None, {})
    assert mgr.wait() is None and mgr.last_committed_step is None


def test_async_save_on_a_volume_blocks_only_for_the_copy_and_restores_exactly(tmp_path: Path) -> None:
    """One process, a file:// store: shards are written in place, the marker names them, and an
    update made to the live model right after an async save does not leak into the checkpoint."""
    from kubeforge_runtime.checkpoint import CheckpointManager
    from kubeforge_runtime.model import Llama, preset

    uri = f"file://{tmp_path / 'store'}"
    model = Llama(preset("tiny"))
    model.init_weights(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = global_batch(1, 0)
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    opt.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = CheckpointManager.from_env(uri, {"everySteps": 1, "asyncSave": True}, 0, 1, namespace=NS, job=JOB,
                                     env={})
    assert mgr.maybe_save(1, model, opt, {"step": 1, "cursor": {"sample": 4}})
    with torch.no_grad():  # the loop moves on while the write is in flight
        for p in model.parameters():
            p.add_(1.0)
    assert mgr.wait() is True and mgr.last_committed_step == 1
    step_dir = tmp_path / "store" / NS / JOB / "checkpoints" / "step-0000000001"
    marker = json.loads((step_dir / "commit.json").read_text())
    assert set(marker["files"]) == {"__0_0.distcp", ".metadata"} and marker["world_size"] == 1
    assert not mgr.maybe_save(1, model, opt, {"step": 1})  # the same step is never saved twice
    # the second async save refills the first one's host buffers; the same isolation must hold
    saved_2 = {k: v.clone() for k, v in model.state_dict().items()}
    assert mgr.maybe_save(2, model, opt, {"step": 2})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    assert mgr.wait() is True

    for step, expected in ((1, saved), (2, saved_2)):
        fresh = Llama(preset("tiny"))
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        extra: dict[str, Any] = {}
        other = CheckpointManager.from_env(uri, None, 0, 1, namespace=NS, job=JOB, env={})
        assert other.restore(fresh, fresh_opt, extra, step=step) == step
        assert extra == ({"step": 1, "cursor": {"sample": 4}} if step == 1 else {"step": 2})
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, expected[k]), (step, k)
        assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_on_a_volume_the_worker_applies_retention_and_keeps_what_it_restored(tmp_path: Path) -> None:
    """K=2, M=10 after saves at steps 1..35: 10, 20, 30, 34, 35 stay, plus step 3 this run restored from
    (the operator cannot reach a PVC, so the workers apply retention there)."""
    from kubeforge_runtime.checkpoint import CheckpointManager
    from kubeforge_runtime.model import Llama, preset

    uri = f"file://{tmp_path / 'store'}"
    policy = {"schedule": {"everySteps": 1, "asyncSave": False}, "retention": {"keepLast": 2, "keepEvery": 10}}
    model = Llama(preset("tiny", num_hidden_layers=1, hidden_size=32, intermediate_size=64))
    first = CheckpointManager.from_env(uri, {"everySteps": 1, "asyncSave": False}, 0, 1, namespace=NS, job=JOB,
                                       env={})
    for step in (1, 2, 3):
        first.save(step, model, None, {"step": step})
    mgr = CheckpointManager.from_env(uri, policy, 0, 1, namespace=NS, job=JOB, env={})
    assert mgr.restore(model, None, {}) == 3
    for step in range(4, 36):
        mgr.maybe_save(step, model, None, {"step": step})
    mgr.close()
    assert mgr.store is not None
    assert [c.step for c in mgr.store.list_checkpoints(NS, JOB)] == [3, 10, 20, 30, 34, 35]


def test_a_restarted_worker_clears_what_a_killed_one_left_in_staging(tmp_path: Path) -> None:
    from kubeforge_runtime.checkpoint import CheckpointManager

    staging = tmp_path / "staging"
    mine = staging / "save" / NS / JOB / "step-7" / "rank-0"
    other_rank = staging / "save" / NS / JOB / "step-7" / "rank-1"
    for d in (mine, other_rank):
        d.mkdir(parents=True)
        (d / "__0_0.distcp").write_bytes(b"half a shard")
    mgr = CheckpointManager.from_env(f"file://{tmp_path / 'store'}", None, 0, 1, namespace=NS, job=JOB, env={},
                                     staging_dir=staging)
    assert mgr.restore(torch.nn.Linear(2, 2), None, {}) is None
    assert not mine.exists() and other_rank.exists()  # a rank only touches its own leftovers


def _save_run(uri: str, run: str, steps: tuple[int, ...], seed: int) -> dict[int, dict[str, torch.Tensor]]:
    """Commit ``steps`` of a tiny model into run ``run``; the weights saved at each step."""
    from kubeforge_runtime.checkpoint import CheckpointManager
    from kubeforge_runtime.model import Llama, preset

    model = Llama(preset("tiny", num_hidden_layers=1, hidden_size=32, intermediate_size=64))
    mgr = CheckpointManager.from_env(uri, {"everySteps": 1, "asyncSave": False}, 0, 1, namespace=NS, job=run, env={})
    saved = {}
    for step in steps:
        model.init_weights(seed + step)
        mgr.save(step, model, None, {"step": step})
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    mgr.close()
    return saved


def _manager_of(uri: str, run: str, resume: dict[str, Any] | None = None) -> Any:
    """The manager a worker of run ``run`` gets from the pod contract (KUBEFORGE_JOB_RUN and, for
    spec.resumeFrom, KUBEFORGE_RESUME_FROM)."""
    from kubeforge.api import contract
    from kubeforge_runtime.checkpoint import CheckpointManager

    env = {contract.ENV_JOB_NAMESPACE: NS, contract.ENV_JOB_NAME: JOB, contract.ENV_JOB_RUN: run}
    if resume is not None:
        env[contract.ENV_RESUME_FROM] = json.dumps(resume)
    return CheckpointManager.from_env(uri, {"everySteps": 1, "asyncSave": False}, 0, 1, env=env)


def test_a_job_created_again_under_an_old_name_starts_fresh_unless_it_resumes(tmp_path: Path) -> None:
    """Issue 16 item 9: the deleted job's run (legacy layout <job>/, and a uid run) stays as it
    is; the new object's run has none of its checkpoints; spec.resumeFrom starts it from the
    predecessor's newest (or named) step, and what it commits goes to its own run."""
    from kubeforge.store import ResumeSourceError
    from kubeforge_runtime.model import Llama, preset

    uri = f"file://{tmp_path / 'store'}"
    legacy = _save_run(uri, JOB, (5, 10), seed=1)             # a job of before runs had uids
    previous = _save_run(uri, f"{JOB}/runs/uid-1", (3, 6), seed=7)  # then a job deleted since
    model = Llama(preset("tiny", num_hidden_layers=1, hidden_size=32, intermediate_size=64))

    fresh = _manager_of(uri, f"{JOB}/runs/uid-2")
    assert fresh.restore(model, None, {}) is None  # the old code resumed step 10 of the legacy run

    extra: dict[str, Any] = {}
    newest = _manager_of(uri, f"{JOB}/runs/uid-3", {"trainingJob": JOB, "run": None, "step": None})
    assert newest.restore(model, None, extra) == 6 and extra == {"step": 6}  # the newest run's newest step
    assert all(torch.equal(v, previous[6][k]) for k, v in model.state_dict().items())
    newest.save(7, model, None, {"step": 7})
    newest.close()
    assert newest.store is not None
    assert [c.step for c in newest.store.list_checkpoints(NS, f"{JOB}/runs/uid-3")] == [7]
    assert [c.step for c in newest.store.list_checkpoints(NS, f"{JOB}/runs/uid-1")] == [3, 6]
    assert [c.step for c in newest.store.list_checkpoints(NS, JOB)] == [5, 10]
    # restarted after its own first commit: its own checkpoint, not the source again
    assert _manager_of(uri, f"{JOB}/runs/uid-3", {"trainingJob": JOB}).restore(model, None, {}) == 7

    named = _manager_of(uri, f"{JOB}/runs/uid-4", {"trainingJob": JOB, "run": JOB, "step": 5})
    assert named.restore(model, None, {}) == 5
    assert all(torch.equal(v, legacy[5][k]) for k, v in model.state_dict().items())

    by_step = _manager_of(uri, f"{JOB}/runs/uid-5", {"trainingJob": JOB, "step": 10})  # the run that has it
    assert by_step.restore(model, None, {}) == 10

    with pytest.raises(ResumeSourceError, match=r"spec\.resumeFrom\.step: no committed checkpoint.* at step 4"):
        _manager_of(uri, f"{JOB}/runs/uid-6", {"trainingJob": JOB, "step": 4}).restore(model, None, {})
    with pytest.raises(ResumeSourceError, match=r"spec\.resumeFrom\.trainingJob: no committed checkpoint"):
        _manager_of(uri, f"{JOB}/runs/uid-6", {"trainingJob": "never-ran"}).restore(model, None, {})

    step_dir = tmp_path / "store" / NS / JOB / "runs" / "uid-1" / "checkpoints" / "step-0000000003"
    (step_dir / "__0_0.distcp").write_bytes(b"corrupt")
    with pytest.raises(ResumeSourceError, match=r"spec\.resumeFrom\.step: no checkpoint of run .*uid-1 could be"):
        _manager_of(uri, f"{JOB}/runs/uid-7", {"trainingJob": JOB, "step": 3}).restore(model, None, {})


SOURCE = "base/runs/uid-s"  # a live TrainingJob "base": spec.resumeFrom.trainingJob names it


def test_resuming_from_another_jobs_run_neither_takes_its_lease_nor_marks_its_steps(tmp_path: Path) -> None:
    """A reader of a run that is not its own leases the step it loads under a name of its own
    (the source's fallback lease stays), and a load that fails for the reader's own reasons (its
    model's shapes) marks nothing there: the source's checkpoints stay loadable for the source."""
    from kubeforge.store import ResumeSourceError
    from kubeforge_runtime.model import Llama, preset

    uri = f"file://{tmp_path / 'store'}"
    _save_run(uri, SOURCE, (3, 6), seed=5)
    store = open_store(uri)
    store.write_restore_lease(NS, SOURCE, 3)  # base's rank 0 fell back to 3 and holds it
    model = Llama(preset("tiny", num_hidden_layers=1, hidden_size=32, intermediate_size=64))
    reader = _manager_of(uri, f"{JOB}/runs/uid-r", {"trainingJob": "base", "run": SOURCE})
    leased_while_loading: list[set[int]] = []
    load = reader._load

    def spying_load(*args: Any) -> Any:
        leased_while_loading.append(store.restoring_steps(NS, SOURCE))
        return load(*args)

    reader._load = spying_load
    assert reader.restore(model, None, {}) == 6
    assert leased_while_loading == [{3, 6}], "the reader's lease is its own, next to the source's"
    assert store.restoring_step(NS, SOURCE) == 3, "the source's own lease is neither overwritten nor deleted"
    assert store.restoring_steps(NS, SOURCE) == {3}, "the reader's lease is gone once it loaded"

    other_shape = Llama(preset("tiny", num_hidden_layers=1, hidden_size=64, intermediate_size=128))
    with pytest.raises(ResumeSourceError, match=r"spec\.resumeFrom\.trainingJob: no checkpoint of run base/runs/uid-s"):
        _manager_of(uri, f"{JOB}/runs/uid-q", {"trainingJob": "base", "run": SOURCE}).restore(other_shape, None, {})
    assert [(c.step, c.loadable) for c in store.list_checkpoints(NS, SOURCE)] == [(3, True), (6, True)]
    assert store.restoring_step(NS, SOURCE) == 3


def test_a_transient_store_error_while_resuming_is_retried_not_a_bad_source(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreachable store is not "the named step cannot be loaded": StoreError (a restart
    retries it) instead of ResumeSourceError (exit 79, the job Failed), and no fallback to an
    older step, no mark on the source run."""
    from kubeforge.store import ResumeSourceError, Store, StoreError
    from kubeforge_runtime.model import Llama, preset

    uri = f"file://{tmp_path / 'store'}"
    _save_run(uri, SOURCE, (3, 6), seed=5)
    model = Llama(preset("tiny", num_hidden_layers=1, hidden_size=32, intermediate_size=64))

    def unreachable(self: Store, *args: Any) -> Path:
        raise StoreError("s3://ckpt: could not connect to the endpoint (after retries)")

    monkeypatch.setattr(Store, "fetch_verified", unreachable)
    with pytest.raises(StoreError, match="step 6 of run base/runs/uid-s could not be read") as raised:
        _manager_of(uri, f"{JOB}/runs/uid-r", {"trainingJob": "base", "run": SOURCE}).restore(model, None, {})
    assert not isinstance(raised.value, ResumeSourceError)
    store = open_store(uri)
    assert [(c.step, c.loadable) for c in store.list_checkpoints(NS, SOURCE)] == [(3, True), (6, True)]
    assert store.restoring_steps(NS, SOURCE) == set()


def test_the_source_jobs_worker_retention_keeps_a_step_another_run_resumes_from(tmp_path: Path) -> None:
    """Retention in the worker (a volume store) honours the readers' leases as the operator's does."""
    from kubeforge_runtime.checkpoint import CheckpointManager
    from kubeforge_runtime.model import Llama, preset

    uri = f"file://{tmp_path / 'store'}"
    store = open_store(uri)
    model = Llama(preset("tiny", num_hidden_layers=1, hidden_size=32, intermediate_size=64))
    source = CheckpointManager.from_env(uri, {"schedule": {"everySteps": 1, "asyncSave": False},
                                              "retention": {"keepLast": 1}}, 0, 1, namespace=NS, job=SOURCE, env={})
    source.save(3, model, None, {"step": 3})
    store.write_restore_lease(NS, SOURCE, 3, reader=f"{JOB}/runs/uid-r")  # a reader is loading step 3
    source.save(6, model, None, {"step": 6})
    source.save(9, model, None, {"step": 9})
    source.close()
    assert [c.step for c in store.list_checkpoints(NS, SOURCE)] == [3, 9]
