"""The rendezvous design, proven with real processes on 127.0.0.1: losing worker 0's node
costs one restart, not the job.

Two agents run the worker pods' exact command (``build_worker_pod``'s, rewritten only as the
contract test rewrites it: the rendezvous endpoint → 127.0.0.1, the config mount and the
checkpoint volume → temp dirs) with ``--nnodes=1:2``, training ``tiny`` with checkpoints.
Agent 0 starts first, so under plain c10d it is the one that hosts the store. Its agent and
worker are SIGKILLed (its node is gone) once the 2-node world has committed a checkpoint.

- With the store pod's process (``python -m kubeforge_runtime.rendezvous``) and every agent
  a client (``is_host=false``): the other agent re-rendezvouses, resumes from the newest
  committed checkpoint as a 1-node world, once, and finishes with exit 0.
- Without it (plain c10d, the store inside agent 0): the other agent exits non-zero. This
  is why the store pod exists (docs/trainer.md, finding 2).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeforge.api import CheckpointPolicySpec, TrainingJobSpec
from kubeforge.api.contract import CHECKPOINT_MOUNT_DIR, CONFIG_FILE_NAME, ENV_METRICS_PORT
from kubeforge.controllers.trainingjob.manifests import Owner, build_rendezvous_pod, build_worker_pod, trainer_config
from kubeforge.store import open_store

from tests.e2e.test_trainingjob_contract import _local_command, _local_env
from tests.runtime.test_trainer import Run, free_port

pytestmark = pytest.mark.runtime
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NAMESPACE, JOB = "ns", "tiny-llama"
STEPS, EVERY_STEPS = 150, 5
#: Bounds of each phase (the machine is small and shared).
START_TIMEOUT_S, RECOVERY_TIMEOUT_S, FINISH_TIMEOUT_S, EXIT_TIMEOUT_S = 180, 240, 300, 180


def job_spec() -> tuple[TrainingJobSpec, CheckpointPolicySpec]:
    """examples/02 on two CPU workers (one process each), a few short steps, a checkpoint
    every EVERY_STEPS steps on a volume (a temp dir here)."""
    job = yaml.safe_load((EXAMPLES / "02-trainingjob-tiny.yaml").read_text())["spec"]
    job["workers"].update(minReplicas=1, maxReplicas=2, gpusPerWorker=0)
    job["workers"].pop("gpuProduct")
    config = job["trainer"]["config"]
    config["train"].update(steps=STEPS, global_batch=4, micro_batch=2)
    config["data"]["seq_len"] = 32
    config["schedule"]["warmup_steps"] = 2
    config["parallelism"] = {"collective_timeout_s": 20}
    policy = {"schedule": {"everySteps": EVERY_STEPS, "asyncSave": False},
              "storage": {"volume": {"claimName": "checkpoints"}}}
    return TrainingJobSpec.model_validate(job), CheckpointPolicySpec.model_validate(policy)


def kill_node(run: Run) -> None:
    """SIGKILL an agent and its workers by pid, as a lost node takes them all at once."""
    run.kill()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def events(runs: list[Run], name: str, after: float = 0.0) -> list[dict[str, Any]]:
    return sorted((e for r in runs for e in r.events(name) if e["time"] > after), key=lambda e: e["time"])


def wait_for(what: str, cond: Callable[[], Any], runs: list[Run], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    logs = "\n".join(f"--- {r.log.name}\n{r.log.read_text(errors='replace')[-3000:]}" for r in runs)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")


class Node:
    """Where the 'pods' of one scenario run: temp dirs for the mounts, a local port for the store."""

    def __init__(self, tmp: Path, separate_store: bool) -> None:
        self.tmp = tmp
        self.spec, self.policy = job_spec()
        self.owner = Owner(JOB, NAMESPACE, f"uid-{tmp.name}")
        self.config_dir = tmp / "config"
        self.config_dir.mkdir()
        (self.config_dir / CONFIG_FILE_NAME).write_text(yaml.safe_dump(trainer_config(self.spec)))
        self.checkpoints = tmp / "checkpoints"
        self.port = free_port()
        self.separate_store = separate_store
        self.store = open_store(self.checkpoints.as_uri())

    def store_command(self) -> list[str]:
        command = build_rendezvous_pod(self.owner, self.spec)["spec"]["containers"][0]["command"]
        assert command[:3] == ["python", "-m", "kubeforge_runtime.rendezvous"] and command[-2] == "--port"
        return [sys.executable, *command[1:-1], str(self.port), "--host", "127.0.0.1"]

    def agent(self, index: int) -> Run:
        pod = build_worker_pod(self.owner, self.spec, self.policy, index, attempt=0)
        command = _local_command(pod["spec"]["containers"][0]["command"], f"127.0.0.1:{self.port}", self.config_dir)
        assert "--rdzv-conf=is_host=false" in command and "--nnodes=1:2" in command
        if not self.separate_store:  # plain c10d: the agent bound to the endpoint hosts the store
            command.remove("--rdzv-conf=is_host=false")
        env = {k: v.replace(CHECKPOINT_MOUNT_DIR, str(self.checkpoints))
               for k, v in _local_env(None, NAMESPACE, pod, self.config_dir).items()}
        assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
        env.update(PATH=os.environ["PATH"], HOME=str(self.tmp), OMP_NUM_THREADS="1")
        env[ENV_METRICS_PORT] = str(free_port())  # two "pods" share this host's ports
        return Run(command, env, self.tmp / f"worker-{index}.log")

    def newest_step(self) -> int:
        newest = self.store.newest_committed(NAMESPACE, JOB)
        return newest.step if newest is not None else 0

    def train_on_two_then_lose_worker_0(self, runs: list[Run]) -> tuple[Run, float, int]:
        """Start both agents (0 first, bound to the endpoint), wait for the 2-node world to
        commit a checkpoint, kill node 0; return the survivor, the kill time and the newest
        committed step at that moment."""
        if self.separate_store:
            store = Run(self.store_command(), {**os.environ}, self.tmp / "rdzv.log")
            runs.append(store)
            wait_for("the rendezvous store to listen", lambda: listening(self.port), runs, 60)
        agent0 = self.agent(0)
        runs.append(agent0)
        if not self.separate_store:
            wait_for("agent 0 to host the c10d store", lambda: listening(self.port), runs, START_TIMEOUT_S)
        agent1 = self.agent(1)
        runs.append(agent1)
        start2 = wait_for("a world of 2", lambda: next((s for s in events(runs, "start") if s["world_size"] == 2),
                                                       None), runs, START_TIMEOUT_S)
        wait_for("a checkpoint of the 2-node world",
                 lambda: self.newest_step() > (start2["restored_step"] or 0), runs, START_TIMEOUT_S)
        assert not events(runs, "finished"), "the run finished before node 0 was lost: give it more steps"
        t_kill = time.time()
        kill_node(agent0)
        time.sleep(1)  # a checkpoint of the dead world cannot commit any more (rank 0 gathers all)
        return agent1, t_kill, self.newest_step()


def stop_all(runs: list[Run]) -> None:
    for r in runs:
        if r.proc.poll() is None:
            kill_node(r)


def test_with_the_store_pod_losing_worker_0s_node_costs_one_restart(tmp_path: Path) -> None:
    node = Node(tmp_path, separate_store=True)
    runs: list[Run] = []
    try:
        survivor, t_kill, committed = node.train_on_two_then_lose_worker_0(runs)
        assert committed > 0
        restart = wait_for("the survivor's restart", lambda: events(runs, "start", after=t_kill), runs,
                           RECOVERY_TIMEOUT_S)[0]
        # it re-rendezvoused alone through the store and resumed from the newest committed checkpoint
        assert restart["world_size"] == 1 and restart["restored_step"] == committed
        assert survivor.wait(FINISH_TIMEOUT_S) == 0
        assert [e["step"] for e in events(runs, "finished", after=t_kill)] == [STEPS]
        assert len(events(runs, "start", after=t_kill)) == 1, "more than one restart"
        assert runs[0].proc.poll() is None, "the rendezvous store did not outlive the node"
        assert node.newest_step() == STEPS
    finally:
        stop_all(runs)


def test_without_the_store_pod_losing_worker_0s_node_ends_the_job(tmp_path: Path) -> None:
    node = Node(tmp_path, separate_store=False)
    runs: list[Run] = []
    try:
        survivor, t_kill, committed = node.train_on_two_then_lose_worker_0(runs)
        rc = survivor.wait(EXIT_TIMEOUT_S)
        log = survivor.log.read_text(errors="replace")
        assert rc != 0, f"the survivor finished without the store host:\n{log[-3000:]}"
        assert not events(runs, "start", after=t_kill), "the survivor re-rendezvoused without the store host"
        assert not events(runs, "finished") and node.newest_step() == committed
    finally:
        stop_all(runs)
