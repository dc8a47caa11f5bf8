"""``python -m kubeforge_runtime.train.launch [torchrun args] -m kubeforge_runtime.train --config FILE``

A thin parent for torchrun that keeps the pod contract's exit codes. Measured on torch
2.15: torchrun turns every worker exit into its own code 1 (a ``ChildFailedError``, or a
``SignalException`` on SIGTERM), so a pod running torchrun as its main process can never
exit with ``PREEMPTED`` (75) or ``CONFIG_ERROR`` (78), and torchrun even restarts workers
that failed on a bad config ``--max-restarts`` times. This launcher

1. validates the config (and the checks that need the machine) before torchrun starts:
   a bad config exits 78 at once, without a rendezvous;
2. runs torchrun as a child and forwards SIGTERM/SIGINT to it (torchrun forwards to the
   workers, which finish the step and checkpoint);
3. exits 75 when it was told to stop, whatever torchrun returned; else the code a worker left
   in ``KUBEFORGE_FATAL_FILE`` (a failure retrying cannot fix, e.g. 79: ``spec.resumeFrom``
   names no loadable checkpoint), its message printed last for the termination message;
   else torchrun's code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from kubeforge.api.contract import CONFIG_FILE_NAME, CONFIG_MOUNT_DIR, ENV_CONFIG_FILE, ENV_FATAL_FILE, ExitCode


def _arg_value(args: Sequence[str], *names: str) -> str | None:
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def _min_nodes(args: Sequence[str]) -> int:
    nnodes = _arg_value(args, "--nnodes") or "1"
    return int(nnodes.split(":")[0])


def validate(args: Sequence[str]) -> str | None:
    """The configuration error of this launch, or None."""
    from kubeforge_runtime.config import ConfigError, load_config

    try:
        module_at = list(args).index("kubeforge_runtime.train")
    except ValueError:
        module_at = len(args)
    config = _arg_value(args[module_at:], "--config") or os.environ.get(
        ENV_CONFIG_FILE, f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}")
    try:
        cfg = load_config(config)
        import torch

        from kubeforge_runtime.train.loop import preflight
        from kubeforge_runtime.train.parallel import Topology

        nproc = _arg_value(args, "--nproc-per-node", "--nproc_per_node") or "1"
        per_node = torch.cuda.device_count() if nproc in ("gpu", "auto") else int(nproc)
        per_node = max(1, per_node)
        preflight(cfg, Topology(0, per_node * _min_nodes(args), 0, per_node, True),
                  on_gpu=torch.cuda.is_available())
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return str(e)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    error = validate(args)
    if error is not None:
        print(f"kubeforge: configuration error: {error}", file=sys.stderr, flush=True)
        return int(ExitCode.CONFIG_ERROR)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    with tempfile.TemporaryDirectory(prefix="kubeforge-launch-") as tmp:
        fatal_file = Path(tmp) / "fatal.json"
        rc = _run_torchrun([torchrun if os.path.exists(torchrun) else "torchrun", *args], fatal_file)
        if rc < 0:
            return int(ExitCode.PREEMPTED)
        if rc != 0 and fatal_file.exists():
            try:
                doc = json.loads(fatal_file.read_text())
                code, message = int(doc["code"]), str(doc["message"])
            except (ValueError, KeyError, TypeError):
                return rc
            print(message, file=sys.stderr, flush=True)
            return code
    return rc


def _run_torchrun(command: list[str], fatal_file: Path) -> int:
    """torchrun's exit code (a killed one: 128 + signal); -1 when this launcher was told to stop."""
    child = subprocess.Popen(command, env={**os.environ, ENV_FATAL_FILE: str(fatal_file)})
    stopping: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = child.wait()
    if stopping:
        return -1
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
