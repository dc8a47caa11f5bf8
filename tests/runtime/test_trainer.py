"""The trainer as torchrun runs it: real processes, gloo on 127.0.0.1, the tiny preset."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeforge.api.contract import (
    ENV_CHECKPOINT_POLICY,
    ENV_CHECKPOINT_URI,
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ExitCode,
)

pytestmark = pytest.mark.runtime
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, **sections: Any) -> Path:
    cfg: dict[str, Any] = {
        "model": {"preset": "tiny"},
        "data": {"seq_len": 64, "prefetch": 2},
        "train": {"steps": 10, "global_batch": 8, "micro_batch": 2, "seed": 3},
        "schedule": {"warmup_steps": 2},
        "optimizer": {"lr": 3e-3},
        "metrics": {"port": 0, "log_every": 1},
        "export": {"enabled": False},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path.write_text(yaml.safe_dump(cfg))
    return path


def trainer_cmd(config: Path, nproc: int | None) -> list[str]:
    if nproc is None:
        return [sys.executable, "-m", "kubeforge_runtime.train", "--config", str(config)]
    # the launcher is what the pod runs: it validates, then runs torchrun and keeps our exit codes
    return [sys.executable, "-m", "kubeforge_runtime.train.launch", f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "kubeforge_runtime.train",
            "--config", str(config)]


def job_env(store: Path | None = None, every_steps: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    if store is not None:
        env[ENV_CHECKPOINT_URI] = store.as_uri()
        env[ENV_JOB_NAMESPACE], env[ENV_JOB_NAME] = "ns", "job"
        env[ENV_CHECKPOINT_POLICY] = json.dumps({"everySteps": every_steps} if every_steps else {})
    return env


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it, parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # gone meanwhile
            pass
    return out


class Run:
    """A trainer process group started in its own session, ended by its pid."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = log.open("w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"trainer still running after {timeout}s:\n{self.log.read_text()[-3000:]}") from None
        finally:
            self._fh.close()

    def kill(self) -> None:
        """SIGKILL the process and everything under it, by pid (torchrun's workers run in
        sessions of their own: killing the launcher's process group would leave them training)."""
        for pid in descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def wait_for_step(self, step: int = 1, timeout: float = 60) -> None:
        """Until a train_step event at ``step`` or later is logged; fails if the run ends first."""
        deadline = time.monotonic() + timeout
        while not any(e["step"] >= step for e in self.events("train_step")):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.1)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            i = line.find('{"event"')
            if i < 0:
                continue
            try:
                ev = json.loads(line[i:])
            except json.JSONDecodeError:  # the line being written right now
                continue
            if name is None or ev["event"] == name:
                out.append(ev)
        return out


def run_trainer(tmp: Path, name: str, config: Path, nproc: int | None, env: dict[str, str],
                timeout: float = 90) -> tuple[int, Run]:
    run = Run(trainer_cmd(config, nproc), env, tmp / f"{name}.log")
    rc = run.wait(timeout)
    return rc, run


def losses(run: Run) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in run.events("train_step")}


def test_tiny_fsdp2_on_two_ranks_learns_reproducibly_and_matches_one_rank(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml")
    rc1, a = run_trainer(tmp_path, "a", cfg, 2, job_env())
    assert rc1 == 0, a.log.read_text()[-3000:]
    assert a.events("start")[0]["sharding"] == "full" and a.events("start")[0]["world_size"] == 2
    la = losses(a)
    assert sorted(la) == list(range(1, 11))
    assert la[10] < la[1] - 0.5, la  # it learns
    rc2, b = run_trainer(tmp_path, "b", cfg, 2, job_env())
    assert rc2 == 0 and losses(b) == la  # same seed, same losses, bit for bit in the log
    # the global batch does not depend on the world size: one process sees the same losses
    rc3, c = run_trainer(tmp_path, "c", cfg, None, job_env())
    assert rc3 == 0
    for step, loss in losses(c).items():
        assert loss == pytest.approx(la[step], abs=2e-4), step


def test_sigterm_checkpoints_exits_preempted_and_resumes_exactly_at_another_world_size(tmp_path: Path) -> None:
    steps = 14
    cfg = write_config(tmp_path / "c.yaml", train={"steps": steps})
    rc, full = run_trainer(tmp_path, "full", cfg, None, job_env())
    assert rc == 0
    reference = losses(full)

    store = tmp_path / "store"
    run = Run(trainer_cmd(cfg, 2), job_env(store, every_steps=100), tmp_path / "pre.log")
    run.wait_for_step(4)
    os.kill(run.proc.pid, signal.SIGTERM)  # launcher → torchrun → both workers
    assert run.wait(60) == ExitCode.PREEMPTED
    pre = run.events("preempted")
    assert pre and pre[0]["checkpoint_step"] == pre[0]["step"], run.log.read_text()[-3000:]
    stopped_at = pre[0]["step"]
    assert 4 <= stopped_at < steps

    # resumed on one rank: same samples, same schedule, so the same losses as the uninterrupted run
    rc, resumed = run_trainer(tmp_path, "resumed", cfg, None, job_env(store, every_steps=100))
    assert rc == 0, resumed.log.read_text()[-3000:]
    start = resumed.events("start")[0]
    assert start["restored_step"] == stopped_at and start["data_sample"] == stopped_at * 8
    after = losses(resumed)
    assert sorted(after) == list(range(stopped_at + 1, steps + 1))
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], abs=2e-4), step


def test_preempted_exit_code_without_torchrun(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", train={"steps": 400})
    run = Run(trainer_cmd(cfg, None), job_env(), tmp_path / "p.log")
    run.wait_for_step()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(30) == ExitCode.PREEMPTED
    assert run.events("preempted")[0]["step"] < 400


def test_policy_without_at_end_or_on_preemption_saves_neither(tmp_path: Path) -> None:
    from kubeforge.store import open_store

    store = tmp_path / "store"
    env = job_env(store)
    env[ENV_CHECKPOINT_POLICY] = json.dumps({"everySteps": 100, "atEnd": False, "onPreemption": False})
    rc, done = run_trainer(tmp_path, "no-end", write_config(tmp_path / "a.yaml", train={"steps": 3}), None, env)
    assert rc == 0, done.log.read_text()[-3000:]
    assert open_store(store.as_uri()).committed_checkpoints("ns", "job") == []

    run = Run(trainer_cmd(write_config(tmp_path / "b.yaml", train={"steps": 400}), None), env, tmp_path / "p.log")
    run.wait_for_step()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(30) == ExitCode.PREEMPTED
    assert run.events("preempted")[0]["checkpoint_step"] is None
    assert open_store(store.as_uri()).committed_checkpoints("ns", "job") == []

    # the defaults (both on) do save at the end
    env[ENV_CHECKPOINT_POLICY] = json.dumps({"everySteps": 100})
    rc, done = run_trainer(tmp_path, "end", write_config(tmp_path / "a.yaml", train={"steps": 3}), None, env)
    assert rc == 0 and [c.step for c in open_store(store.as_uri()).committed_checkpoints("ns", "job")] == [3]


def test_time_based_saves_are_agreed_by_every_rank(tmp_path: Path) -> None:
    """everySeconds alone: each rank's clock is its own, the save decision is one (an
    all-reduce), so every rank writes its shards and the checkpoint commits mid-run."""
    from kubeforge.store import open_store

    store = tmp_path / "store"
    env = job_env(store)
    env[ENV_CHECKPOINT_POLICY] = json.dumps({"everySeconds": 10, "atEnd": False})
    run = Run(trainer_cmd(write_config(tmp_path / "t.yaml", train={"steps": 100000}), 2), env, tmp_path / "t.log")
    try:
        deadline = time.monotonic() + 120
        while not open_store(store.as_uri()).committed_checkpoints("ns", "job"):
            assert run.proc.poll() is None and time.monotonic() < deadline, run.log.read_text()[-3000:]
            time.sleep(0.5)
        (first,) = open_store(store.as_uri()).committed_checkpoints("ns", "job")
        assert first.marker is not None and first.marker.world_size == 2
        assert 0 < first.step < 100000
    finally:
        # SIGTERM to the launcher reaches torchrun and its workers (their own process groups:
        # killing the launcher's group would leave them training)
        os.kill(run.proc.pid, signal.SIGTERM)
        assert run.wait(60) == ExitCode.PREEMPTED


def test_a_local_export_is_servable_as_it_is(tmp_path: Path) -> None:
    # `export.path` follows the store's protocol (marker last), so the server takes the folder
    # whatever its name, and it holds the trained weights
    from kubeforge_runtime.model.hf import load_hf
    from kubeforge_runtime.serve.model_source import fetch_model

    out = tmp_path / "export"
    cfg = write_config(tmp_path / "c.yaml", train={"steps": 3}, export={"enabled": True, "path": str(out)})
    subprocess.run(trainer_cmd(cfg, None), env=job_env(), check=True, timeout=240, capture_output=True)
    marker = json.loads((out / "commit.json").read_text())
    assert marker["step"] == 3 and "model.safetensors" in marker["files"]
    assert not (out / "export-pending.json").exists()
    assert fetch_model(str(out), tmp_path / "dl") == out
    assert load_hf(out) is not None
