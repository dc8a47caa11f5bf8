"""Trainer throughput on this machine's CPU: bare PyTorch vs our loop vs DDP vs FSDP2.

Same model (the ``tiny`` preset), same data (the bundled corpus, bytes), same global batch
and optimizer in all four; each reports tokens/s over the steps after a warm-up.

- bare: a plain PyTorch loop written here (model, AdamW, accumulation, clipping), no
  kubeforge code besides the model definition;
- single: ``python -m kubeforge_runtime.train`` in one process;
- ddp2 / fsdp2: the trainer under torchrun with two processes (gloo), sharding ``ddp`` /
  ``full``.

Writes bench/results/trainer.json (or ``--out``) and prints a table. Run with ``make bench-trainer``.
``--smoke`` (run by tests/bench, so the script cannot rot): one round of a few steps, same keys,
written to ``--out`` (by default a file in the system's tmp, never over the committed results).
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
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "trainer.json"
#: Where a smoke run writes unless ``--out`` says: never over the committed results.
SMOKE_OUT = Path(tempfile.gettempdir()) / "kubeforge-bench-smoke" / "trainer.json"
SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH, STEPS, WARMUP = 128, 16, 4, 40, 8
#: steps and warm-up steps of a smoke run (one round)
SMOKE_STEPS, SMOKE_WARMUP = 6, 2
LR = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bare(steps: int, warmup: int) -> float:
    """A training loop as one writes it without any framework."""
    from kubeforge_runtime.model.llama import Llama, preset

    text = b"".join(p.read_bytes() for p in sorted((ROOT / "trainer_image/kubeforge_runtime/data/corpus").glob("*.txt")))
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    n = SEQ_LEN + 1
    model = Llama(preset("tiny", vocab_size=259))
    model.init_weights(0)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))
    times = []
    cursor = 0
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(GLOBAL_BATCH // MICRO_BATCH):
            batch = torch.stack([data[(cursor + i) * n:(cursor + i + 1) * n] for i in range(MICRO_BATCH)])
            cursor += MICRO_BATCH
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, 259), batch[:, 1:].reshape(-1), reduction="sum")
            torch.autograd.backward(loss / (GLOBAL_BATCH * SEQ_LEN))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return GLOBAL_BATCH * SEQ_LEN / statistics.median(times[warmup:])


def trainer(nproc: int | None, sharding: str, workdir: Path, steps: int, warmup: int) -> float:
    cfg = {
        "model": {"preset": "tiny"},
        "data": {"seq_len": SEQ_LEN, "shuffle": False},
        "train": {"steps": steps, "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH},
        "optimizer": {"lr": LR},
        "parallelism": {"sharding": sharding},
        "metrics": {"port": 0, "log_every": 1, "peak_flops": 1e11},
        "export": {"enabled": False},
    }
    path = workdir / f"{sharding}-{nproc}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if nproc is None:
        cmd = [sys.executable, "-m", "kubeforge_runtime.train", "--config", str(path)]
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", "-m", "kubeforge_runtime.train", "--config", str(path)]
    env = {k: v for k, v in os.environ.items() if k not in ("KUBEFORGE_CHECKPOINT_URI",)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    logged = [json.loads(line[line.index('{"event"'):]) for line in out.stdout.splitlines() if '"train_step"' in line]
    times: list[float] = [s["step_s"] for s in logged if s["step"] > warmup]
    return GLOBAL_BATCH * SEQ_LEN / statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help=f"one round of {SMOKE_STEPS} steps, to check the script runs")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"default {RESULTS} ({SMOKE_OUT} with --smoke)")
    if ap.parse_known_args(argv)[0].smoke:
        ap.set_defaults(out=SMOKE_OUT)
    args = ap.parse_args(argv)
    rounds = 1 if args.smoke else int(os.environ.get("BENCH_ROUNDS", "5"))
    steps, warmup = (SMOKE_STEPS, SMOKE_WARMUP) if args.smoke else (STEPS, WARMUP)
    # one thread per process everywhere, as torchrun sets it for ddp2/fsdp2: on a shared
    # machine two OpenMP threads per process spin against other load and measure the noise
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # all four alternate, best of ROUNDS each: the machine is shared, and a noisy
        # neighbour during one run must not decide a ratio
        runs: dict[str, list[float]] = {"bare": [], "single": [], "ddp2": [], "fsdp2": []}
        for _ in range(rounds):
            runs["bare"].append(bare(steps, warmup))
            runs["single"].append(trainer(None, "full", work, steps, warmup))
            runs["ddp2"].append(trainer(2, "ddp", work, steps, warmup))
            runs["fsdp2"].append(trainer(2, "full", work, steps, warmup))
        tps = {k: max(v) for k, v in runs.items()}
    result = {
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "runs_tokens_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "trainer_vs_bare": round(tps["single"] / tps["bare"], 3),
        "fsdp2_vs_ddp2": round(tps["fsdp2"] / tps["ddp2"], 3),
        "setup": {"model": "tiny", "seq_len": SEQ_LEN, "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH,
                  "steps": steps, "warmup_steps_excluded": warmup,
                  "statistic": f"median step time, best of {rounds} alternating rounds",
                  "torch": torch.__version__, "cpus": os.cpu_count(), "threads_per_process": 1,
                  "backend": "gloo", "load_average_1m": round(os.getloadavg()[0], 2)},
        "smoke": args.smoke,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'run':<8} {'tokens/s':>10}")
    for k, v in tps.items():
        print(f"{k:<8} {v:>10.0f}")
    print(f"trainer_vs_bare {result['trainer_vs_bare']:.3f} (goal >= 0.95)   fsdp2_vs_ddp2 {result['fsdp2_vs_ddp2']:.3f}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
