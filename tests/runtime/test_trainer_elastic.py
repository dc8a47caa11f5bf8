"""Elastic training under torchrun ``--nnodes=1:2`` with two (then three) agents on localhost.

The first agent started binds the rendezvous endpoint and so hosts the c10d store; the
test kills the *other* agent (losing the store host ends the job, see docs/trainer.md,
"Findings for the operator"). Each membership change restarts the workers, which restore
the newest committed checkpoint at the new world size.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.runtime.test_trainer import Run, free_port, job_env, write_config

pytestmark = pytest.mark.runtime
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def agent_cmd(port: int, config: Path) -> list[str]:
    return [TORCHRUN, "--nnodes=1:2", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic-test", "--max-restarts=10",
            "--monitor-interval=0.5",
            "--rdzv-conf=join_timeout=60,last_call_timeout=2,close_timeout=10,keep_alive_interval=1,"
            "keep_alive_max_attempt=3",
            "-m", "kubeforge_runtime.train", "--config", str(config)]


def starts(runs: list[Run]) -> list[dict]:
    return sorted((e for r in runs for e in r.events("start")), key=lambda e: e["time"])


def wait_for(what: str, cond: Callable[[], bool], runs: list[Run], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {r.log.name}\n{r.log.read_text()[-2500:]}" for r in runs)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.2)


def worker_pids(agent: Run) -> list[int]:
    pids = []
    for task in Path(f"/proc/{agent.proc.pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def test_elastic_run_survives_losing_a_node_and_takes_in_a_new_one(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", train={"steps": 260, "global_batch": 4, "micro_batch": 2},
                       data={"seq_len": 32}, metrics={"port": 0, "log_every": 5},
                       parallelism={"collective_timeout_s": 20})
    env = job_env(tmp_path / "store", every_steps=5)
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    port = free_port()
    a = Run(agent_cmd(port, cfg), env, tmp_path / "a.log")
    runs = [a]
    try:
        # a alone reaches min nodes and trains; b joining is a scale-up of a running job
        wait_for("agent a to train alone", lambda: bool(a.events("train_step")), runs, 90)
        b = Run(agent_cmd(port, cfg), env, tmp_path / "b.log")
        runs.append(b)
        wait_for("a world of 2", lambda: any(s["world_size"] == 2 for s in starts(runs)), runs, 90)

        n = len(starts(runs))
        for pid in worker_pids(b):  # the worker dies (OOM, segfault): its agent restarts it
            os.kill(pid, signal.SIGKILL)
        wait_for("the workers' restart", lambda: len(starts(runs)) > n, runs, 90)

        n = len(starts(runs))
        # then the node goes, agent and worker (torchrun starts workers in their own session,
        # so killing the agent's process group alone would leave the worker training)
        for pid in worker_pids(b):
            os.kill(pid, signal.SIGKILL)
        b.kill()
        wait_for("a world of 1", lambda: any(s["world_size"] == 1 for s in starts(runs)[n:]), runs, 90)
        alone = next(s for s in starts(runs)[n:] if s["world_size"] == 1)
        assert alone["restored_step"] is not None and alone["restored_step"] > 0

        n = len(starts(runs))
        c = Run(agent_cmd(port, cfg), env, tmp_path / "c.log")
        runs.append(c)  # a new node joins and is taken in
        wait_for("a world of 2 again", lambda: any(s["world_size"] == 2 for s in starts(runs)[n:]), runs, 90)
        rejoined = next(s for s in starts(runs)[n:] if s["world_size"] == 2)
        assert rejoined["restored_step"] >= alone["restored_step"]

        assert a.wait(150) == 0 and c.wait(30) == 0
        finished = [e for r in runs for e in r.events("finished")]
        assert finished and finished[0]["step"] == 260
    finally:
        for r in runs:
            if r.proc.poll() is None:
                for pid in worker_pids(r):
                    os.kill(pid, signal.SIGKILL)
            r.kill()
