"""Trainer observability: Prometheus gauges on rank 0, MFU, and one structured log line
every N steps.

MFU is achieved model FLOP/s over the hardware's peak. The peak comes from a table of dense
bf16 figures for datacenter GPUs (vendor datasheets, without sparsity) and, on the CPU,
from a short fp32 matmul measured at start-up: there is no datasheet number for "whatever
cores this pod got", and a measured figure keeps CPU MFU meaningful for comparing runs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger("kubeforge.train")

#: Dense bf16 peak FLOP/s per device, matched against ``torch.cuda.get_device_name()``
#: (first match wins, so longer names come first).
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}

_cpu_peak_cache: float | None = None


def measure_cpu_peak_flops(seconds: float = 0.3, n: int = 512) -> float:
    """fp32 matmul FLOP/s of this process with its current thread count (cached)."""
    global _cpu_peak_cache
    if _cpu_peak_cache is None:
        a = torch.randn(n, n)
        b = torch.randn(n, n)
        torch.mm(a, b)  # warm-up: first call pays for thread pool start and allocation
        iters, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            torch.mm(a, b)
            iters += 1
        _cpu_peak_cache = 2.0 * n**3 * iters / elapsed
    return _cpu_peak_cache


def peak_flops(device: torch.device) -> float:
    """Per-device peak FLOP/s for MFU: the table on a known GPU, a measurement on the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16_FLOPS.items():
            if key in name:
                return value
        log.warning("no peak FLOP/s known for %r; MFU assumes an H100 (set metrics.peak_flops)", name)
        return PEAK_BF16_FLOPS["H100"]
    return measure_cpu_peak_flops()


class TrainerMetrics:
    """The gauges rank 0 serves; names carry the ``kubeforge_trainer_`` prefix."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.step = Gauge("kubeforge_trainer_step", "Optimizer steps completed", registry=r)
        self.loss = Gauge("kubeforge_trainer_loss", "Training loss of the last step (mean over the global batch)",
                          registry=r)
        self.lr = Gauge("kubeforge_trainer_learning_rate", "Learning rate of the last step", registry=r)
        self.grad_norm = Gauge("kubeforge_trainer_grad_norm", "Global gradient norm before clipping", registry=r)
        self.step_seconds = Gauge("kubeforge_trainer_step_seconds", "Wall time of the last step", registry=r)
        self.tokens_per_second = Gauge("kubeforge_trainer_tokens_per_second",
                                       "Global training throughput of the last step", registry=r)
        self.mfu = Gauge("kubeforge_trainer_mfu", "Model FLOPs utilisation of the last step (0..1)", registry=r)
        self.checkpoint_save_seconds = Gauge("kubeforge_trainer_checkpoint_save_seconds",
                                             "Time the loop was blocked by the last checkpoint save", registry=r)
        self.tokens = Counter("kubeforge_trainer_tokens", "Tokens trained on since this process started",
                              registry=r)
        self.world_size = Gauge("kubeforge_trainer_world_size", "Ranks in the current process group", registry=r)

    def serve(self, port: int) -> None:
        """Serve /metrics on ``port`` (all interfaces, as a pod's metrics endpoint must)."""
        start_http_server(port, registry=self.registry)


def log_event(event: str, **fields: Any) -> None:
    """One JSON object per line on stdout: what log collectors and the tests parse."""
    sys.stdout.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
    sys.stdout.flush()
