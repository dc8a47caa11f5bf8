"""Trainer tokens/s and MFU on a GPU (not run in CI: needs CUDA).

Runs ``python -m kubeforge_runtime.train`` under torchrun on all local GPUs with bf16 and
FSDP2 full sharding, for each model preset given, and reports the median step's tokens/s
and MFU as the trainer itself computes them (peak from the bf16 table in
``kubeforge_runtime.metrics``). Writes bench/results/trainer_gpu.json (or ``--out``).

    python bench/trainer_gpu.py --presets small 100m --seq-len 2048 --global-batch 64

``--smoke`` (run by tests/bench, so the script cannot rot): the ``tiny`` preset for a few
steps. With a GPU it takes the same path; without one it runs the trainer on the CPU instead
(two gloo processes, fp32 as the trainer picks it there, MFU against the measured CPU peak),
so everything but CUDA itself is exercised, and says so in ``setup.cuda`` and ``note``. It
writes to ``--out``, by default a file in the system's tmp.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "trainer_gpu.json"
#: Where a smoke run writes unless ``--out`` says: never over the committed results.
SMOKE_OUT = Path(tempfile.gettempdir()) / "kubeforge-bench-smoke" / "trainer_gpu.json"
#: What ``--smoke`` changes in the defaults (a flag given on the command line still wins).
SMOKE_DEFAULTS: dict[str, Any] = {"presets": ["tiny"], "seq_len": 64, "global_batch": 8, "micro_batch": 4,
                                  "steps": 6, "warmup": 2, "out": SMOKE_OUT}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(preset: str, args: argparse.Namespace, nproc: int, cuda: bool, work: Path) -> dict[str, Any]:
    cfg = {
        "model": {"preset": preset, "activation_checkpointing": args.activation_checkpointing},
        "data": {"seq_len": args.seq_len},
        "train": {"steps": args.steps, "global_batch": args.global_batch, "micro_batch": args.micro_batch},
        # bf16 is what the GPU figures are about; on the CPU the trainer's own choice (fp32)
        "parallelism": {"sharding": args.sharding, "mixed_precision": "bf16" if cuda else "auto"},
        "metrics": {"port": 0, "log_every": 1},
        "export": {"enabled": False},
    }
    path = work / f"{preset}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", "-m", "kubeforge_runtime.train", "--config", str(path)]
    env = {k: v for k, v in os.environ.items() if k != "KUBEFORGE_CHECKPOINT_URI"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    steps = [json.loads(line[line.index('{"event"'):]) for line in out.stdout.splitlines() if '"train_step"' in line]
    steady = [s for s in steps if s["step"] > args.warmup]
    return {"tokens_per_s": statistics.median(s["tokens_per_s"] for s in steady),
            "mfu": statistics.median(s["mfu"] for s in steady), "gpus": nproc if cuda else 0,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["small", "100m"])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sharding", default="full", choices=["full", "grad_op", "hybrid", "ddp"])
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true",
                    help="the tiny preset for a few steps, on the CPU when there is no GPU: checks the script runs")
    if ap.parse_known_args(argv)[0].smoke:
        ap.set_defaults(**SMOKE_DEFAULTS)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("bench/trainer_gpu.py needs a CUDA GPU (--smoke runs on the CPU without one)")
    nproc = torch.cuda.device_count() if cuda else min(2, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        results = {p: run(p, args, nproc, cuda, Path(tmp)) for p in args.presets}
    setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report: dict[str, Any] = {"results": results, "setup": {**setup, "cuda": cuda}, "smoke": args.smoke}
    if not cuda:
        report["note"] = f"no CUDA device: the smoke ran on the CPU ({nproc} gloo processes, fp32), not a GPU figure"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'preset':<10} {'tokens/s':>12} {'MFU':>7}")
    for p, r in results.items():
        print(f"{p:<10} {r['tokens_per_s']:>12.0f} {r['mfu']:>7.1%}")
    if not cuda:
        print(report["note"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
