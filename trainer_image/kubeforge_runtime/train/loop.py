"""The training loop that torchrun starts in every worker.

Order matters and is deliberate: the config is validated, the tokenizer loaded and the
machine checked before any process group exists, so a bad config costs no rendezvous and
exits with ``CONFIG_ERROR``. Then: process group, model (same seed on every rank, then
sharded), optimizer, restore of the newest committed checkpoint (at any world size), data
positioned at the restored cursor, and the steps.

Loss scaling keeps the global batch independent of the world size: a rank's loss is the
sum of its token losses divided by the global token count, times the world size, because
the data-parallel gradient reduction averages over ranks. For SFT data only target tokens
count, and the global count of those varies per step: the loader knows it (every rank reads
the whole global batch), so the same rule holds with no extra collective. Ranks with fewer
samples (a batch that does not divide evenly) run filler micro-batches with weight 0 so that
every rank enters the same collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from kubeforge.api.contract import (
    ENV_CHECKPOINT_POLICY,
    ENV_CHECKPOINT_STAGING_DIR,
    ENV_CHECKPOINT_URI,
    ENV_METRICS_PORT,
    TRAINER_METRICS_PORT,
    ExitCode,
)
from kubeforge.store.flywheel import BASELINE_PROFILE_NAME
from torch import nn

from kubeforge_runtime.config import TrainerConfig, check_runtime
from kubeforge_runtime.data import BatchLoader, DataState, SFTStream, SourceFile, StepBatch, TokenStream, list_files
from kubeforge_runtime.data.profile import baseline_profile
from kubeforge_runtime.data.sft import first_record
from kubeforge_runtime.metrics import TrainerMetrics, log_event, peak_flops
from kubeforge_runtime.model.hf import load_hf, save_hf
from kubeforge_runtime.model.llama import Llama
from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from kubeforge_runtime.train.parallel import (
    Topology,
    init_process_group,
    pick_device,
    set_gradient_sync,
    wrap_model,
)
from kubeforge_runtime.train.schedule import lr_at

if TYPE_CHECKING:  # imported at run time: the launcher imports this module for preflight, without DCP
    from kubeforge_runtime.checkpoint import CheckpointManager

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


def _checkpoint_manager(topo: Topology, env: Mapping[str, str]) -> CheckpointManager:
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
    files = list_files(cfg.data.paths, cfg.data.format)
    if cfg.data.format == "sft" and first_record(files) is None:
        raise ValueError(f"data.paths: no SFT records in {len(files)} input file(s)")
    return tokenizer, files


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports to the driver."""

    loss: float  # the global mean token loss
    lr: float
    grad_norm: torch.Tensor  # read on rank 0 only (a device sync)
    stop: bool  # any rank was told to stop (SIGTERM)


class Trainer:
    """One worker's run; ``run()`` returns the exit code.

    The constructor does what can fail on a bad config; ``run()`` creates the process group
    and everything that needs it, so those attributes exist only from then on."""

    distributed: bool
    model: nn.Module  # the wrapped model that steps run (DDP, FSDP2 or the Llama itself)
    llama: Llama  # the Llama inside it (the same object under FSDP2), for its config and the export
    params: list[nn.Parameter]
    amp: torch.autocast | None
    optimizer: torch.optim.Optimizer
    ckpt: CheckpointManager
    metrics: TrainerMetrics | None  # rank 0 only
    flops_per_token: float
    peak: float
    #: the last completed step, the tokens trained on so far and the checkpoint ``extra`` of that step
    step: int
    tokens_seen: int
    extra: dict[str, Any]

    def __init__(self, cfg: TrainerConfig, env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self.env = dict(os.environ if env is None else env)
        self.topo = Topology.from_env(self.env)
        self.device = pick_device(self.topo)
        # everything that can be wrong with the config fails here, before any rendezvous
        self.tokenizer, self.files = preflight(cfg, self.topo, on_gpu=self.device.type == "cuda")
        self.stop = StopFlag()
        self.tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
        self.clip = cfg.train.grad_clip if cfg.train.grad_clip is not None else math.inf

    def run(self) -> ExitCode:
        self.stop.install()
        self._setup()
        restored_step, data_state = self.restore()
        loader = self._build_loader(data_state)
        self.metrics = self._start_metrics(restored_step, data_state)
        try:
            while self.step < self.cfg.train.steps:
                t0 = time.perf_counter()
                result = self.train_step(next(loader))
                if result.stop:
                    return self._stop_preempted()
                self.ckpt.maybe_save(self.step, self.model, self.optimizer, self.extra)
                if self.metrics is not None:
                    self._report(self.metrics, result, time.perf_counter() - t0)
            self.save()
            self.export()
            if self.metrics is not None:
                log_event("finished", step=self.step, tokens_seen=self.tokens_seen)
            return ExitCode.SUCCESS
        finally:
            loader.close()
            if dist.is_initialized():
                dist.destroy_process_group()

    def _setup(self) -> None:
        """Process group, model (same seed on every rank, then sharded), optimizer, checkpoints."""
        cfg = self.cfg
        init_process_group(self.topo, self.device, cfg.parallelism.collective_timeout_s)
        self.distributed = dist.is_initialized() and self.topo.world_size > 1
        self.model, self.llama = self._build_model()
        self.params = list(self.model.parameters())
        self.amp = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                    if param_dtype_for(cfg, self.device) == torch.bfloat16
                    and not distributed_fsdp(cfg, self.distributed) else None)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.ckpt = _checkpoint_manager(self.topo, self.env)

    def _build_model(self) -> tuple[nn.Module, Llama]:
        cfg = self.cfg
        if cfg.model.init_from:
            llama = load_hf(_init_dir(cfg.model.init_from, self.env))
        else:
            llama = Llama(cfg.model.llama(self.tokenizer.vocab_size))
            llama.init_weights(cfg.train.seed)
        llama.activation_checkpointing = cfg.model.activation_checkpointing
        llama.to(self.device)
        model = wrap_model(llama, cfg.parallelism, self.topo, self.device, param_dtype_for(cfg, self.device))
        return model, llama

    def restore(self) -> tuple[int | None, DataState]:
        """Load the newest committed checkpoint (at any world size) into the model and the
        optimizer; returns its step (None when starting fresh) and the data cursor to resume at."""
        self.extra = {}
        restored = self.ckpt.restore(self.model, self.optimizer, self.extra)
        if restored is None:
            self.step = self.tokens_seen = 0
            return None, DataState()
        self.step = int(self.extra.get("step", 0))
        self.tokens_seen = int(self.extra.get("tokens_seen", 0))
        return restored, DataState.from_dict(self.extra["data"])

    def _build_loader(self, data_state: DataState) -> BatchLoader:
        cfg = self.cfg
        stream: TokenStream | SFTStream
        if cfg.data.format == "sft":
            stream = SFTStream(self.files, self.tokenizer, cfg.data.seq_len + 1, cfg.train.seed, cfg.data.shuffle,
                               data_state)
        else:
            stream = TokenStream(self.files, self.tokenizer, cfg.data.seq_len + 1, cfg.train.seed, cfg.data.shuffle,
                                 cfg.data.text_field, data_state)
        return BatchLoader(stream, global_batch=cfg.train.global_batch, micro_batch=cfg.train.micro_batch,
                           rank=self.topo.rank, world_size=self.topo.world_size, prefetch=cfg.data.prefetch,
                           pin_memory=self.device.type == "cuda")

    def _start_metrics(self, restored_step: int | None, data_state: DataState) -> TrainerMetrics | None:
        """Rank 0 serves the gauges and logs the start; other ranks report nothing."""
        cfg, topo = self.cfg, self.topo
        metrics = TrainerMetrics() if topo.rank == 0 else None
        port = _metrics_port(cfg, self.env)
        if metrics is not None and port:
            metrics.serve(port)
        self.flops_per_token = self.llama.cfg.flops_per_token(cfg.data.seq_len)
        self.peak = (cfg.metrics.peak_flops or peak_flops(self.device)) * topo.world_size if metrics else 1.0
        if metrics is not None:
            metrics.world_size.set(topo.world_size)
            log_event("start", rank=topo.rank, world_size=topo.world_size, restored_step=restored_step,
                      step=self.step, data_sample=data_state.sample, params=self.llama.cfg.num_params(),
                      device=str(self.device), sharding=cfg.parallelism.sharding if self.distributed else "none")
        return metrics

    def train_step(self, batch: StepBatch) -> StepResult:
        """One optimizer step over this rank's share of the global batch."""
        cfg = self.cfg
        self.step += 1
        step = self.step
        torch.manual_seed(step_seed(cfg.train.seed, step))
        lr = lr_at(step, cfg.train.steps, cfg.optimizer, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        local_loss = torch.zeros((), device=self.device)
        n_micro = len(batch.micro_batches)
        loss_tokens = max(1, batch.loss_tokens)  # the same on every rank: the global batch's
        loss_scale = self.topo.world_size / loss_tokens
        for i, mb in enumerate(batch.micro_batches):
            tokens = mb.tokens.to(self.device, non_blocking=True)
            mask = mb.loss_mask.to(self.device, non_blocking=True) if mb.loss_mask is not None else None
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            set_gradient_sync(self.model, i == n_micro - 1)
            with self.amp if self.amp is not None else contextlib.nullcontext():
                logits = self.model(inputs)
            loss_sum = token_loss_sum(logits, targets, mask) * mb.weight
            torch.autograd.backward(loss_sum * loss_scale)
            local_loss += loss_sum.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # one collective per step: the global loss and whether any rank was told to stop
        report = torch.stack([local_loss / loss_tokens,
                              torch.tensor(float(self.stop.set), device=self.device)])
        if self.distributed:
            dist.all_reduce(report)
        loss, stop_votes = report.tolist()
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.tokens_seen += self.tokens_per_step
        self.extra = {"step": step, "tokens_seen": self.tokens_seen, "data": batch.state_after.as_dict(),
                      "schedule": {"kind": cfg.schedule.kind, "step": step}, "seed": cfg.train.seed}
        return StepResult(loss=loss, lr=lr, grad_norm=grad_norm, stop=stop_votes > 0)

    def _report(self, m: TrainerMetrics, result: StepResult, dt_step: float) -> None:
        step, tokens, grad_norm = self.step, self.tokens_per_step, float(result.grad_norm)
        tps = tokens / dt_step
        mfu = tps * self.flops_per_token / self.peak
        m.step.set(step)
        m.loss.set(result.loss)
        m.lr.set(result.lr)
        m.grad_norm.set(grad_norm)
        m.step_seconds.set(dt_step)
        m.tokens_per_second.set(tps)
        m.mfu.set(mfu)
        m.tokens.inc(tokens)
        m.checkpoint_save_seconds.set(self.ckpt.last_save_blocking_s)
        if step % self.cfg.metrics.log_every == 0 or step == self.cfg.train.steps:
            log_event("train_step", step=step, loss=round(result.loss, 6), lr=result.lr,
                      grad_norm=round(grad_norm, 6), step_s=round(dt_step, 4), tokens_per_s=round(tps, 1),
                      mfu=round(mfu, 6))

    def save(self, *, preempted: bool = False) -> None:
        """The last checkpoint of this process, then wait for every save in flight. On SIGTERM
        when the policy's ``schedule.onPreemption`` asks for one; at the end when ``atEnd`` does
        and the last step is not committed yet (the periodic save may have taken it)."""
        ckpt = self.ckpt
        if preempted:
            if ckpt.settings.on_preemption:
                ckpt.save(self.step, self.model, self.optimizer, self.extra, blocking=True)
        elif self.step and ckpt.enabled and ckpt.settings.at_end and ckpt.last_committed_step != self.step:
            ckpt.save(self.step, self.model, self.optimizer, self.extra, blocking=True)
        ckpt.close()

    def _stop_preempted(self) -> ExitCode:
        t_save = time.perf_counter()
        self.save(preempted=True)
        if self.metrics is not None:
            log_event("preempted", step=self.step, checkpoint_step=self.ckpt.last_committed_step,
                      save_s=round(time.perf_counter() - t_save, 3))
        return ExitCode.PREEMPTED

    def export(self) -> None:
        """Rank 0 writes the Hugging Face layout: to ``export.path`` when set, else to the
        checkpoint store's export location. Gathering the full state dict is a collective,
        so every rank takes part."""
        cfg, ckpt = self.cfg, self.ckpt
        if not cfg.export.enabled or (cfg.export.path is None and not ckpt.enabled):
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.topo.rank != 0:
            return
        state = _tensors(full)
        t0 = time.perf_counter()
        if cfg.export.path is not None:
            # the store's export protocol on a local directory: servable as it is, and never
            # while half-written (kubeforge.store.layout)
            from kubeforge.store import begin_local_export, commit_local_export

            out = Path(cfg.export.path)
            begin_local_export(out)
            self._write_export(state, out)
            commit_local_export(out, self.step)
            where = str(out)
        else:
            with tempfile.TemporaryDirectory(prefix="kubeforge-export-") as tmp:
                self._write_export(state, Path(tmp))
                ckpt.export(Path(tmp), self.step)
            where = str(ckpt.export_uri)
        log_event("exported", step=self.step, uri=where, seconds=round(time.perf_counter() - t0, 3))

    def _write_export(self, state: dict[str, torch.Tensor], out: Path) -> None:
        save_hf(self.llama, out, bos_token_id=self.tokenizer.bos_id, eos_token_id=self.tokenizer.eos_id,
                state_dict={k: v.float() for k, v in state.items()})
        self.tokenizer.save(out)
        # the drift baseline: part of the export's files, so it is committed with them
        cfg = self.cfg
        profile = baseline_profile(self.files, self.tokenizer, text_field=cfg.data.text_field, seed=cfg.train.seed,
                                   shuffle=cfg.data.shuffle)
        (out / BASELINE_PROFILE_NAME).write_bytes(profile.to_json())


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of the cross-entropy of each target token, over those ``mask`` (B, T) keeps (all when None)."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    if mask is None:
        return F.cross_entropy(flat, targets.reshape(-1), reduction="sum")
    per_token = F.cross_entropy(flat, targets.reshape(-1), reduction="none")
    return (per_token * mask.reshape(-1).to(per_token.dtype)).sum()


def _tensors(state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """DCP types a model state dict like an optimizer's (any nesting); a model's holds only tensors."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(state):
        odd = next(k for k in state if k not in tensors)
        raise TypeError(f"model state {odd!r} is a {type(state[odd]).__name__}, not a tensor")
    return tensors


def distributed_fsdp(cfg: TrainerConfig, distributed: bool) -> bool:
    """FSDP2 casts parameters itself (its mixed-precision policy); other paths use autocast."""
    return distributed and cfg.parallelism.sharding != "ddp"


def _init_dir(uri: str, env: Mapping[str, str]) -> Path:
    """A local directory of ``model.init_from``: a path as it is, an export on the store
    (``s3://``, ``file://``) fetched and verified against its commit marker (the server's own
    fetch), into the checkpoint staging volume when there is one."""
    from kubeforge_runtime.serve.model_source import fetch_model

    staging = env.get(ENV_CHECKPOINT_STAGING_DIR)
    return fetch_model(uri, Path(staging or tempfile.gettempdir()) / "init-from")
