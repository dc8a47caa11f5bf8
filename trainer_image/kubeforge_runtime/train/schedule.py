"""Learning rate as a pure function of the step.

A function rather than a stateful scheduler object: resuming needs only the step, which is
saved anyway, and the schedule cannot drift from it.
"""

from __future__ import annotations

import math

from kubeforge_runtime.config import OptimizerConfig, ScheduleConfig


def lr_at(step: int, total_steps: int, opt: OptimizerConfig, sched: ScheduleConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based) of ``total_steps``."""
    peak, floor = opt.lr, opt.lr * sched.min_lr_ratio
    if sched.warmup_steps and step <= sched.warmup_steps:
        return peak * step / sched.warmup_steps
    if sched.kind == "constant":
        return peak
    if sched.kind == "cosine":
        span = max(1, total_steps - sched.warmup_steps)
        progress = min(1.0, (step - sched.warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # warmup-stable-decay: flat at the peak, then a linear decay over the last steps
    decay_steps = max(1, round(total_steps * sched.decay_fraction))
    decay_start = total_steps - decay_steps
    if step <= decay_start:
        return peak
    return peak + (floor - peak) * min(1.0, (step - decay_start) / decay_steps)
