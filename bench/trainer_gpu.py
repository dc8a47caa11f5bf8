"""Trainer tokens/s and MFU on a GPU (not run in CI: needs CUDA).

Runs ``python -m kubeforge_runtime.train`` under torchrun on all local GPUs with bf16 and
FSDP2 full sharding, for each model preset given, and reports the median step's tokens/s
and MFU as the trainer itself computes them (peak from the bf16 table in
``kubeforge_runtime.metrics``). Writes bench/results/trainer_gpu.json.

    python bench/trainer_gpu.py --presets small 100m --seq-len 2048 --global-batch 64
"""

from __future__ import annotations

import argparse
import json
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


def run(preset: str, args: argparse.Namespace, gpus: int, work: Path) -> dict[str, Any]:
    cfg = {
        "model": {"preset": preset, "activation_checkpointing": args.activation_checkpointing},
        "data": {"seq_len": args.seq_len},
        "train": {"steps": args.steps, "global_batch": args.global_batch, "micro_batch": args.micro_batch},
        "parallelism": {"sharding": args.sharding, "mixed_precision": "bf16"},
        "metrics": {"port": 0, "log_every": 1},
        "export": {"enabled": False},
    }
    path = work / f"{preset}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc-per-node={gpus}", "--master-addr=127.0.0.1",
           "--master-port=29650", "-m", "kubeforge_runtime.train", "--config", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    steps = [json.loads(line[line.index('{"event"'):]) for line in out.stdout.splitlines() if '"train_step"' in line]
    steady = [s for s in steps if s["step"] > args.warmup]
    return {"tokens_per_s": statistics.median(s["tokens_per_s"] for s in steady),
            "mfu": statistics.median(s["mfu"] for s in steady), "gpus": gpus,
            "device": torch.cuda.get_device_name(0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["small", "100m"])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sharding", default="full", choices=["full", "grad_op", "hybrid", "ddp"])
    ap.add_argument("--activation-checkpointing", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/trainer_gpu.py needs a CUDA GPU")
    gpus = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        results = {p: run(p, args, gpus, Path(tmp)) for p in args.presets}
    RESULTS.write_text(json.dumps({"results": results, "setup": vars(args)}, indent=2) + "\n")
    print(f"{'preset':<10} {'tokens/s':>12} {'MFU':>7}")
    for p, r in results.items():
        print(f"{p:<10} {r['tokens_per_s']:>12.0f} {r['mfu']:>7.1%}")


if __name__ == "__main__":
    main()
