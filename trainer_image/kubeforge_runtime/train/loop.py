"""The training loop that torchrun starts in every worker.

Order matters and is deliberate: the config is validated, the tokenizer loaded and the
machine checked before any process group exists, so a bad config costs no rendezvous and
exits with ``CONFIG_ERROR``. Then: process group, model (same seed on every rank, then
sharded), optimizer, restore of the newest committed checkpoint (at any world size), data
positioned at the restored cursor, and the steps.

Loss scaling keeps the global batch independent of the world size: a rank's loss is the
sum of its token losses divided by the global token count, times the world size, because
the data-parallel gradient reduction averages over ranks. Ranks with fewer samples (a
batch that does not divide evenly) run filler micro-batches with weight 0 so that every
rank enters the same collectives.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from kubeforge.api.contract import (
    ENV_CHECKPOINT_POLICY,
    ENV_CHECKPOINT_URI,
    ENV_METRICS_PORT,
    TRAINER_METRICS_PORT,
    ExitCode,
)
from torch import nn

from kubeforge_runtime.config import TrainerConfig, check_runtime
from kubeforge_runtime.data import BatchLoader, DataState, SourceFile, TokenStream, list_files
from kubeforge_runtime.metrics import TrainerMetrics, log_event, peak_flops
from kubeforge_runtime.model.hf import load_hf, save_hf
from kubeforge_runtime.model.llama import Llama
from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from kubeforge_runtime.train.parallel import (
    Topology,
    init_process_group,
    pick_device,
    set_gradient_sync,
    unwrap,
    wrap_model,
)
from kubeforge_runtime.train.schedule import lr_at

log = logging.getLogger("kubeforge.train")


class StopFlag:
    """Set by SIGTERM; read between steps. The handler only sets a flag: the step in flight
    finishes, then all ranks agree (any rank's flag stops all) and save together."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.event.set()

        signal.signal(signal.SIGTERM, handler)

    @property
    def set(self) -> bool:
        return self.event.is_set()


def step_seed(seed: int, step: int) -> int:
    """The RNG seed of one step: a function of (seed, step) only, so a resumed run draws the
    same numbers without saved RNG streams."""
    return (seed * 1_000_003 + step) % (2**63 - 1)


def build_optimizer(model: nn.Module, cfg: TrainerConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm gains must not be pulled towards zero)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    o = cfg.optimizer
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = {"fused": True} if device.type == "cuda" and not cfg.parallelism.cpu_offload else {}
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **kwargs)


def param_dtype_for(cfg: TrainerConfig, device: torch.device) -> torch.dtype:
    mp = cfg.parallelism.mixed_precision
    if mp == "bf16" or (mp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def _checkpoint_manager(topo: Topology, env: Mapping[str, str]) -> Any:
    """The checkpoint module's manager from the pod contract (disabled without a URI)."""
    import json

    from kubeforge_runtime.checkpoint import CheckpointManager

    uri = env.get(ENV_CHECKPOINT_URI) or None
    raw_policy = env.get(ENV_CHECKPOINT_POLICY)
    policy = json.loads(raw_policy) if raw_policy else None
    return CheckpointManager.from_env(uri, policy, topo.rank, topo.world_size)


def _metrics_port(cfg: TrainerConfig, env: Mapping[str, str]) -> int:
    if cfg.metrics.port is not None:
        return cfg.metrics.port
    return int(env.get(ENV_METRICS_PORT) or TRAINER_METRICS_PORT)


def preflight(cfg: TrainerConfig, topo: Topology, on_gpu: bool) -> tuple[ByteTokenizer | HFTokenizer,
                                                                         list[SourceFile]]:
    """The checks that need the machine but no process group: tokenizer, input files, memory.
    Raises ConfigError, ValueError or FileNotFoundError (all configuration errors)."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_runtime(cfg, world_size=topo.world_size, local_world_size=topo.local_world_size, on_gpu=on_gpu,
                  vocab_size=tokenizer.vocab_size)
    return tokenizer, list_files(cfg.data.paths, cfg.data.format)


class Trainer:
    """One worker's run; ``run()`` returns the exit code."""

    def __init__(self, cfg: TrainerConfig, env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self.env = dict(os.environ if env is None else env)
        self.topo = Topology.from_env(self.env)
        self.device = pick_device(self.topo)
        # everything that can be wrong with the config fails here, before any rendezvous
        self.tokenizer, self.files = preflight(cfg, self.topo, on_gpu=self.device.type == "cuda")
        self.stop = StopFlag()

    def _build_model(self) -> tuple[nn.Module, Llama]:
        cfg = self.cfg
        if cfg.model.init_from:
            llama = load_hf(cfg.model.init_from)
        else:
            llama = Llama(cfg.model.llama(self.tokenizer.vocab_size))
            llama.init_weights(cfg.train.seed)
        llama.activation_checkpointing = cfg.model.activation_checkpointing
        llama.to(self.device)
        model = wrap_model(llama, cfg.parallelism, self.topo, self.device, param_dtype_for(cfg, self.device))
        return model, llama

    def run(self) -> ExitCode:
        cfg, topo = self.cfg, self.topo
        self.stop.install()
        init_process_group(topo, self.device, cfg.parallelism.collective_timeout_s)
        distributed = dist.is_initialized() and topo.world_size > 1
        model, llama = self._build_model()
        optimizer = build_optimizer(model, cfg, self.device)
        ckpt = _checkpoint_manager(topo, self.env)

        extra: dict[str, Any] = {}
        restored = ckpt.restore(model, optimizer, extra)
        step = int(extra.get("step", 0)) if restored is not None else 0
        tokens_seen = int(extra.get("tokens_seen", 0)) if restored is not None else 0
        data_state = DataState.from_dict(extra["data"]) if restored is not None else DataState()

        seq_len, G = cfg.data.seq_len, cfg.train.global_batch
        tokens_per_step = G * seq_len
        stream = TokenStream(self.files, self.tokenizer, seq_len + 1, cfg.train.seed, cfg.data.shuffle,
                             cfg.data.text_field, data_state)
        loader = BatchLoader(stream, global_batch=G, micro_batch=cfg.train.micro_batch, rank=topo.rank,
                             world_size=topo.world_size, prefetch=cfg.data.prefetch,
                             pin_memory=self.device.type == "cuda")

        metrics = TrainerMetrics() if topo.rank == 0 else None
        port = _metrics_port(cfg, self.env)
        if metrics is not None and port:
            metrics.serve(port)
        flops_per_token = llama.cfg.flops_per_token(seq_len)
        peak = (cfg.metrics.peak_flops or peak_flops(self.device)) * topo.world_size if metrics else 1.0
        if metrics is not None:
            metrics.world_size.set(topo.world_size)
            log_event("start", rank=topo.rank, world_size=topo.world_size, restored_step=restored, step=step,
                      data_sample=data_state.sample, params=llama.cfg.num_params(), device=str(self.device),
                      sharding=cfg.parallelism.sharding if distributed else "none")

        loss_scale = topo.world_size / (tokens_per_step)
        amp = (torch.autocast(self.device.type, dtype=torch.bfloat16)
               if param_dtype_for(cfg, self.device) == torch.bfloat16 and not distributed_fsdp(cfg, distributed)
               else None)
        params = [p for p in model.parameters()]
        clip = cfg.train.grad_clip if cfg.train.grad_clip is not None else math.inf
        preempted = False
        try:
            while step < cfg.train.steps:
                t0 = time.perf_counter()
                batch = next(loader)
                step += 1
                torch.manual_seed(step_seed(cfg.train.seed, step))
                lr = lr_at(step, cfg.train.steps, cfg.optimizer, cfg.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                local_loss = torch.zeros((), device=self.device)
                n_micro = len(batch.micro_batches)
                for i, mb in enumerate(batch.micro_batches):
                    tokens = mb.tokens.to(self.device, non_blocking=True)
                    inputs, targets = tokens[:, :-1], tokens[:, 1:]
                    set_gradient_sync(model, i == n_micro - 1)
                    if amp is not None:
                        with amp:
                            logits = model(inputs)
                    else:
                        logits = model(inputs)
                    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               reduction="sum") * mb.weight
                    (loss_sum * loss_scale).backward()
                    local_loss += loss_sum.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                # one collective per step: the global loss and whether any rank was told to stop
                report = torch.stack([local_loss / tokens_per_step,
                                      torch.tensor(float(self.stop.set), device=self.device)])
                if distributed:
                    dist.all_reduce(report)
                loss, stop_votes = report.tolist()
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                tokens_seen += tokens_per_step
                extra = {"step": step, "tokens_seen": tokens_seen, "data": batch.state_after.as_dict(),
                         "schedule": {"kind": cfg.schedule.kind, "step": step}, "seed": cfg.train.seed}
                if stop_votes > 0:
                    preempted = True
                    break
                ckpt.maybe_save(step, model, optimizer, extra)
                dt_step = time.perf_counter() - t0
                if metrics is not None:
                    self._report(metrics, step, loss, lr, float(grad_norm), dt_step, tokens_per_step,
                                 flops_per_token, peak, ckpt)
            if preempted:
                t_save = time.perf_counter()
                if ckpt.settings.on_preemption:  # the policy's schedule.onPreemption
                    ckpt.save(step, model, optimizer, extra, blocking=True)
                ckpt.close()
                if metrics is not None:
                    log_event("preempted", step=step, checkpoint_step=ckpt.last_committed_step,
                              save_s=round(time.perf_counter() - t_save, 3))
                return ExitCode.PREEMPTED
            if step and ckpt.enabled and ckpt.settings.at_end and ckpt.last_committed_step != step:
                ckpt.save(step, model, optimizer, extra, blocking=True)
            ckpt.close()
            self._export(model, llama, ckpt, step)
            if metrics is not None:
                log_event("finished", step=step, tokens_seen=tokens_seen)
            return ExitCode.SUCCESS
        finally:
            loader.close()
            if dist.is_initialized():
                dist.destroy_process_group()

    def _report(self, m: TrainerMetrics, step: int, loss: float, lr: float, grad_norm: float, dt_step: float,
                tokens: int, flops_per_token: float, peak: float, ckpt: Any) -> None:
        tps = tokens / dt_step
        mfu = tps * flops_per_token / peak
        m.step.set(step)
        m.loss.set(loss)
        m.lr.set(lr)
        m.grad_norm.set(grad_norm)
        m.step_seconds.set(dt_step)
        m.tokens_per_second.set(tps)
        m.mfu.set(mfu)
        m.tokens.inc(tokens)
        m.checkpoint_save_seconds.set(getattr(ckpt, "last_save_blocking_s", 0.0))
        if step % self.cfg.metrics.log_every == 0 or step == self.cfg.train.steps:
            log_event("train_step", step=step, loss=round(loss, 6), lr=lr, grad_norm=round(grad_norm, 6),
                      step_s=round(dt_step, 4), tokens_per_s=round(tps, 1), mfu=round(mfu, 6))

    def _export(self, model: nn.Module, llama: Llama, ckpt: Any, step: int) -> None:
        """Rank 0 writes the Hugging Face layout: to ``export.path`` when set, else to the
        checkpoint store's export location. Gathering the full state dict is a collective,
        so every rank takes part."""
        cfg = self.cfg
        if not cfg.export.enabled or (cfg.export.path is None and not ckpt.enabled):
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.topo.rank != 0:
            return
        t0 = time.perf_counter()
        if cfg.export.path is not None:
            out = Path(cfg.export.path)
            self._write_export(llama, full, out)
            where = str(out)
        else:
            with tempfile.TemporaryDirectory(prefix="kubeforge-export-") as tmp:
                self._write_export(llama, full, Path(tmp))
                ckpt.export(Path(tmp), step)
            where = str(ckpt.export_uri)
        log_event("exported", step=step, uri=where, seconds=round(time.perf_counter() - t0, 3))

    def _write_export(self, llama: Llama, state: dict[str, torch.Tensor], out: Path) -> None:
        save_hf(unwrap(llama), out, bos_token_id=self.tokenizer.bos_id, eos_token_id=self.tokenizer.eos_id,
                state_dict={k: v.float() for k, v in state.items()})
        self.tokenizer.save(out)


def distributed_fsdp(cfg: TrainerConfig, distributed: bool) -> bool:
    """FSDP2 casts parameters itself (its mixed-precision policy); other paths use autocast."""
    return distributed and cfg.parallelism.sharding != "ddp"
