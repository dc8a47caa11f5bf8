"""Checkpoint benchmark: a ~100M-parameter Llama, two ranks (FSDP2 over gloo), CPU.

``make bench-checkpoint`` (or ``python bench/checkpoint.py``) starts MinIO on loopback, runs
two torchrun workers (this file with ``--worker``) and writes bench/results/checkpoint.json:

  sync_save_s           blocking save to the local disk (a file:// store): write, fsync, sha256, commit
  async_blocking_s      how long the loop is blocked by an async save (state copied to host memory)
  async_blocking_ratio  async_blocking_s / sync_save_s (goal <= 0.10)
  save_mb_s             checkpoint bytes (both ranks) / sync_save_s
  disk_write_mb_s       the same bytes written raw by two processes at once, fsynced, same disk
  save_vs_disk          save_mb_s / disk_write_mb_s (goal >= 0.5)
  s3_upload_mb_s        checkpoint bytes / the slower rank's upload time to MinIO (parallel multipart)
  restore_s             restore of the S3 checkpoint into fresh ranks: download, sha256 check, load

Each figure is the median of ``--repeat`` runs (default 3), after one warm-up save.

``--smoke`` (run by tests/bench, so the script cannot rot): the same phases with the ``tiny``
model, once, with the same keys, written to ``--out`` (default: a file in the system's tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "checkpoint.json"
#: Where a smoke run writes unless ``--out`` says: never over the committed results.
SMOKE_OUT = Path(tempfile.gettempdir()) / "kubeforge-bench-smoke" / "checkpoint.json"
KEYS = ("sync_save_s", "async_blocking_s", "async_blocking_ratio", "save_mb_s", "disk_write_mb_s",
        "save_vs_disk", "s3_upload_mb_s", "restore_s")
#: What ``--smoke`` changes in the defaults (a flag given on the command line still wins).
SMOKE_DEFAULTS: dict[str, Any] = {"preset": "tiny", "repeat": 1, "out": str(SMOKE_OUT)}


def _raw_write(path: Path, nbytes: int) -> float:
    """Sequential write of ``nbytes`` in 16 MiB blocks with a final fsync: what the disk gives."""
    block = os.urandom(16 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from kubeforge_runtime.checkpoint import CheckpointManager
    from kubeforge_runtime.model import Llama, preset
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    def build() -> tuple[Any, Any]:
        model = Llama(preset(args.preset))
        model.init_weights(0)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens = torch.randint(0, 259, (1, 33), generator=torch.Generator().manual_seed(rank))
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        torch.autograd.backward(loss)
        opt.step()  # optimizer state exists, as in a real run
        opt.zero_grad()
        return model, opt

    model, opt = build()
    n_params = sum(p.numel() for p in model.parameters())  # DTensor numel is the global size
    extra: dict[str, Any] = {"step": 1}
    work = Path(args.workdir)
    local_uri = f"file://{work / 'store'}"
    local = CheckpointManager.from_env(local_uri, {"everySteps": 1}, rank, world, namespace="bench", job="m100",
                                       staging_dir=work / f"staging-{rank}")
    s3 = CheckpointManager.from_env(args.s3_uri, {"everySteps": 1}, rank, world, namespace="bench", job="m100",
                                    staging_dir=work / f"staging-{rank}")
    out: dict[str, list[float]] = {k: [] for k in ("sync", "async_block", "bytes", "s3_upload", "raw", "restore")}
    step = 0

    def quiesce() -> None:
        """Flush what earlier phases left dirty, so no timed phase pays for the one before."""
        os.sync()
        dist.barrier()

    def timed_sync(mgr: CheckpointManager) -> float:
        nonlocal step
        step += 1
        quiesce()
        t0 = time.perf_counter()
        mgr.save(step, model, opt, extra, blocking=True)
        dist.barrier()
        return time.perf_counter() - t0

    timed_sync(local)  # warm-up: first-touch allocations, group creation
    assert local.store is not None  # a file:// URI always opens a store
    marker = local.store.read_marker("bench", "m100", step)
    ckpt_bytes = float(marker.bytes) if marker else 0.0
    shutil.rmtree(work / "store", ignore_errors=True)
    for _ in range(args.repeat):
        # the raw disk figure: each rank writes its share of the same bytes, concurrently
        quiesce()
        t0 = time.perf_counter()
        _raw_write(work / f"raw-{rank}", int(ckpt_bytes / world))
        dist.barrier()
        out["raw"].append(time.perf_counter() - t0)
        (work / f"raw-{rank}").unlink()
        out["sync"].append(timed_sync(local))
        out["bytes"].append(ckpt_bytes)
        step += 1
        quiesce()
        local.save(step, model, opt, extra, blocking=False)
        out["async_block"].append(local.last_save_blocking_s)
        local.wait()
        shutil.rmtree(work / "store", ignore_errors=True)
        timed_sync(s3)
        stats: list[Any] = [None] * world
        dist.all_gather_object(stats, s3.last_save_stats)
        out["s3_upload"].append(max(s["upload_s"] for s in stats))
        fresh_model, fresh_opt = build()
        dist.barrier()
        t0 = time.perf_counter()
        restored = s3.restore(fresh_model, fresh_opt, {})
        dist.barrier()
        out["restore"].append(time.perf_counter() - t0)
        assert restored == step, (restored, step)
        del fresh_model, fresh_opt
    local.close()
    s3.close()
    if rank == 0:
        Path(args.out).write_text(json.dumps({"params": n_params, **out}))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir")
    p.add_argument("--s3-uri")
    p.add_argument("--out", help=f"where the results go (default {RESULTS}, {SMOKE_OUT} with --smoke; "
                                 "a worker's: its raw figures)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--preset", default="100m", help="the model (kubeforge_runtime.model presets)")
    p.add_argument("--smoke", action="store_true", help="checks the script runs (" +
                   ", ".join(f"{k}={v}" for k, v in SMOKE_DEFAULTS.items()) + ")")
    if p.parse_known_args()[0].smoke:
        p.set_defaults(**SMOKE_DEFAULTS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    results = Path(args.out) if args.out else RESULTS

    sys.path[:0] = [str(REPO), str(REPO / "hack" / "cluster")]
    from tests.fixtures.s3 import start_s3_server

    work = Path(tempfile.mkdtemp(prefix="kubeforge-bench-ckpt-", dir=os.environ.get("BENCH_TMPDIR")))
    server = start_s3_server(work / "minio")
    try:
        raw_out = work / "raw.json"
        env = {**os.environ, **server.env(), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
               str(Path(__file__).resolve()), "--worker", "--workdir", str(work), "--s3-uri", server.uri("bench"),
               "--out", str(raw_out), "--repeat", str(args.repeat), "--preset", args.preset]
        subprocess.run(cmd, env=env, check=True)
        raw = json.loads(raw_out.read_text())
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in raw.items() if isinstance(v, list)}
    mb = med["bytes"] / 1e6
    result = {
        "sync_save_s": round(med["sync"], 3),
        "async_blocking_s": round(med["async_block"], 3),
        "async_blocking_ratio": round(med["async_block"] / med["sync"], 4),
        "save_mb_s": round(mb / med["sync"], 1),
        "disk_write_mb_s": round(mb / med["raw"], 1),
        "save_vs_disk": round(med["raw"] / med["sync"], 3),
        "s3_upload_mb_s": round(mb / med["s3_upload"], 1),
        "restore_s": round(med["restore"], 3),
    }
    assert tuple(result) == KEYS
    result |= {"smoke": args.smoke, "preset": args.preset, "params": raw["params"], "repeat": args.repeat}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"checkpoint benchmark: {raw['params'] / 1e6:.1f}M parameters, {mb:.0f} MB per checkpoint "
          f"(model + AdamW state), 2 ranks, CPU, median of {args.repeat}")
    goals = {"async_blocking_ratio": "<= 0.10", "save_vs_disk": ">= 0.5"}
    for key in KEYS:
        print(f"  {key:22s} {result[key]:>10}  {goals.get(key, '')}")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
