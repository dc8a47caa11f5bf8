"""The engine: schedule, run one step over the paged cache, sample, detokenize, stop.

Synchronous and single-threaded on purpose: ``AsyncEngine`` runs it in its own thread and
talks to it only through queues, so the scheduler, the block pool and the KV tensors have
one owner and need no locks.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from kubeforge_runtime.intmath import cdiv
from kubeforge_runtime.model.llama import Llama
from kubeforge_runtime.serve.detokenize import Detokenizer, find_stop, stable_length
from kubeforge_runtime.serve.kv_cache import KVBlockPool, KVCacheTensors
from kubeforge_runtime.serve.metrics import ServingMetrics
from kubeforge_runtime.serve.runner import DecodeGroup, KernelSeqs, PagedRunner, PrefillChunk, StepBatch, kernel_takes
from kubeforge_runtime.serve.sampling import SamplingParams, make_generator, sample
from kubeforge_runtime.serve.scheduler import Scheduler, Sequence
from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Sizes of the engine; the CLI flags of the same names fill it."""

    #: tokens per KV block
    block_size: int = 16
    #: KV blocks in the pool; None sizes the pool from ``kv_cache_memory_fraction``
    num_blocks: int | None = None
    #: fraction of device memory (GPU) or of the container's memory (CPU) the process may
    #: use, weights included; the KV pool gets what the weights leave
    kv_cache_memory_fraction: float | None = None
    #: sequences in one step at most
    max_num_seqs: int = 64
    #: tokens computed in one step at most (prefill chunks and decodes together)
    max_num_batched_tokens: int = 512
    #: context limit; None means the model's ``max_position_embeddings``
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    #: "auto" (the fused CPU paged-attention kernel where it applies: CPU, fp32), "kernel"
    #: (required: fail when it cannot be built), "torch" (gather + matmuls, any device)
    attention_backend: str = "auto"


def _memory_budget(device: torch.device) -> int:
    """Bytes this process may use: the GPU's total memory, or the cgroup limit (else
    physical memory) on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            return int(raw)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


#: glibc ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def settle_process() -> list[str]:
    """Process-wide settings for serving, applied once the engine is loaded and warm (by the
    server, and by the serving benchmark as the server does); what was applied, for the log.

    - glibc's malloc keeps freed memory mapped: mmap threshold at its maximum (32 MB), trim
      threshold 1 GB. By default a freed block over a (dynamic) threshold goes back to the OS
      and the next allocation maps it anew, zeroed, one page fault per 4 KB: every large
      activation of every prefill step. (vLLM's CPU guide preloads tcmalloc for this reason.)
    - the objects made at start-up (the model, torch's modules) are frozen out of the garbage
      collector, so a full collection no longer walks them (as vLLM does after start-up).
    """
    done = []
    try:
        libc = ctypes.CDLL(None)
        if libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1:
            done.append("malloc keeps freed memory mapped")
    except (OSError, AttributeError):  # not glibc
        pass
    gc.collect()
    gc.freeze()
    done.append(f"{gc.get_freeze_count()} start-up objects frozen out of the garbage collector")
    return done


def resolve_num_blocks(cfg: EngineConfig, model: Llama, max_model_len: int) -> int:
    """Pool size from the explicit count, or from the memory fraction minus the weights.

    On the CPU in fp32 (unless ``attention_backend`` is "torch") the weights are counted
    twice: the runner keeps packed copies of the projections.

    Without either flag: 0.9 of a GPU, 0.2 of the CPU budget, capped on the CPU to what
    ``max_num_seqs`` full-length sequences could ever hold twice over (a CPU pod's memory is
    shared with everything else in it, and beyond that size the pool only grows the cache).
    """
    p = next(model.parameters())
    bs = cfg.block_size
    per_seq = cdiv(max_model_len, bs)
    if cfg.num_blocks is not None:
        n = cfg.num_blocks
    else:
        frac = cfg.kv_cache_memory_fraction
        if frac is None:
            frac = 0.9 if p.device.type == "cuda" else 0.2
        weights = sum(t.numel() * t.element_size() for t in model.parameters())
        if p.device.type == "cpu" and p.dtype == torch.float32 and cfg.attention_backend != "torch":
            # the CPU path keeps a packed copy of the layers' projection weights
            # (``PagedRunner._pack``): count the weights twice
            weights *= 2
        c = model.cfg
        per_block = KVCacheTensors.bytes_per_block(c.num_hidden_layers, bs, c.num_key_value_heads, c.head_dim,
                                                   p.dtype)
        n = int((_memory_budget(p.device) * frac - weights * 1.1) // per_block)
        if p.device.type != "cuda" and cfg.kv_cache_memory_fraction is None:
            n = min(n, 2 * cfg.max_num_seqs * per_seq)
    if n < per_seq:
        raise ValueError(f"the KV pool must hold at least one full-length sequence: {n} blocks of {bs} tokens "
                         f"< {per_seq} blocks for max_model_len {max_model_len}")
    return n


@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request (a streaming delta)."""

    request_id: str
    new_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


class LLMEngine:
    def __init__(self, model: Llama, tokenizer: ByteTokenizer | HFTokenizer, config: EngineConfig,
                 metrics: ServingMetrics | None = None, eos_token_ids: Iterable[int] = ()) -> None:
        self.model = model
        self.tokenizer = tokenizer
        #: end-of-sequence ids: the tokenizer's plus the model's own (Llama 3 chat models end
        #: turns with <|eot_id|>, listed in generation_config.json's eos_token_id)
        self.eos_ids = frozenset({tokenizer.eos_id, *eos_token_ids})
        self.config = config
        self.max_model_len = min(config.max_model_len or model.cfg.max_position_embeddings,
                                 model.cfg.max_position_embeddings)
        self.block_size = config.block_size
        self.num_blocks = resolve_num_blocks(config, model, self.max_model_len)
        self.pool = KVBlockPool(self.num_blocks, config.enable_prefix_caching)
        self.runner = PagedRunner(model, self.num_blocks, config.block_size, self.max_model_len,
                                  config.attention_backend)
        self.scheduler = Scheduler(self.pool, config.block_size, config.max_num_seqs, config.max_num_batched_tokens)
        self.metrics = metrics or ServingMetrics(model_name="model")
        self._seqs: dict[str, Sequence] = {}
        self._prefix_counted = (0, 0)

    # -- requests -----------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self._seqs:
            raise ValueError(f"duplicate request id {request_id}")
        if not prompt_ids:
            raise ValueError("the prompt must have at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_model_len {self.max_model_len}")
        seq = Sequence(request_id, prompt_ids, params, self.block_size, arrival_time,
                       make_generator(params, self.runner.device))
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        self.update_gauges()

    def abort_request(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            seq.finish_reason = "abort"
            self.scheduler.release(seq)
            self.update_gauges()

    def abort_all(self) -> list[str]:
        """Abort every request (after a failed step); returns their ids."""
        ids = list(self._seqs)
        for request_id in ids:
            self.abort_request(request_id)
        return ids

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- one step ------------------------------------------------------------------------

    def _build_batch(self, entries: list[tuple[Sequence, int]]) -> tuple[StepBatch, list[Sequence]]:
        bs = self.block_size
        # decode tokens first, longest context first, so that each decode group is a
        # contiguous run of the flat token list
        decodes = sorted((e for e in entries if e[1] == 1), key=lambda e: -e[0].num_computed_tokens)
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        logits_idx: list[int] = []
        sampled: list[Sequence] = []
        use_kernel = self.runner.kernel is not None
        kernel_tables: list[list[int]] = []
        kernel_meta: tuple[list[int], list[int], list[int]] = ([], [], [])  # q_start, q_len, ctx_len
        for seq, n in decodes + [e for e in entries if e[1] != 1]:
            start = seq.num_computed_tokens
            t0 = len(input_ids)
            input_ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            bt = seq.block_ids
            slot_mapping += [bt[p // bs] * bs + p % bs for p in range(start, start + n)]
            ctx = start + n
            nb = cdiv(ctx, bs)
            if use_kernel and kernel_takes(n, ctx):
                kernel_tables.append(bt[:nb])
                for column, value in zip(kernel_meta, (t0, n, ctx), strict=True):
                    column.append(value)
            elif n == 1:
                decode_tables.append(bt[:nb])
                decode_lens.append(ctx)
            else:
                prefills.append(PrefillChunk(t0, n, ctx, torch.tensor(bt[:nb])))
            if ctx == seq.num_tokens:
                logits_idx.append(t0 + n - 1)
                sampled.append(seq)
        kernel = None
        if kernel_tables:
            width = max(len(t) for t in kernel_tables)
            meta = torch.tensor(kernel_meta)
            kernel = KernelSeqs(torch.tensor([t + [0] * (width - len(t)) for t in kernel_tables]), meta[0], meta[1],
                                meta[2])
        batch = StepBatch(torch.tensor(input_ids), torch.tensor(positions), torch.tensor(slot_mapping),
                          _decode_groups(decode_tables, decode_lens), prefills,
                          torch.tensor(logits_idx, dtype=torch.long), kernel)
        return batch, sampled

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the outputs of the requests that produced a token or ended."""
        sched = self.scheduler.schedule()
        m = self.metrics
        if sched.num_preempted:
            m.num_preemptions.inc(sched.num_preempted)
        q, h = self.scheduler.prefix_queries, self.scheduler.prefix_hits
        if (q, h) != self._prefix_counted:
            m.prefix_cache_queries.inc(q - self._prefix_counted[0])
            m.prefix_cache_hits.inc(h - self._prefix_counted[1])
            self._prefix_counted = (q, h)
        outputs: list[RequestOutput] = []
        if sched.entries:
            batch, sampled = self._build_batch(sched.entries)
            logits = self.runner.forward(batch)
            for seq, n in sched.entries:
                self.scheduler.after_compute(seq, n)
            tokens = sample(logits, [s.params for s in sampled], [s.generator for s in sampled])
            now = time.monotonic()
            for seq, tok in zip(sampled, tokens, strict=True):
                outputs.append(self._append_token(seq, tok, now))
        self.update_gauges()
        return outputs

    def update_gauges(self) -> None:
        m = self.metrics
        m.num_requests_running.set(self.num_running)
        m.num_requests_waiting.set(self.num_waiting)
        m.kv_cache_usage.set(self.pool.usage())

    def _append_token(self, seq: Sequence, token: int, now: float) -> RequestOutput:
        m = self.metrics
        if seq.first_token_time is None:
            seq.first_token_time = now
            m.time_to_first_token.observe(now - seq.arrival_time)
            m.prompt_tokens.inc(seq.num_prompt_tokens)
        else:
            assert seq.last_token_time is not None
            m.inter_token_latency.observe(now - seq.last_token_time)
        seq.last_token_time = now
        m.generation_tokens.inc()
        seq.token_ids.append(token)
        p = seq.params
        reason: str | None = None
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        at_length = seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len
        if seq.detokenizer is None:
            seq.detokenizer = Detokenizer(self.tokenizer)
        searched = len(seq.detokenizer.text)
        seq.detokenizer.add(token, final=reason is not None or at_length)
        text = seq.detokenizer.text
        idx = find_stop(text, p.stop, searched)
        if idx >= 0:
            text, reason = text[:idx], "stop"
        if reason is None and at_length:
            reason = "length"
        seq.text = text
        safe = stable_length(text, p.stop) if reason is None else len(text)
        delta = text[seq.num_sent_chars:safe] if safe > seq.num_sent_chars else ""
        seq.num_sent_chars = max(seq.num_sent_chars, safe)
        if reason is not None:
            seq.finish_reason = reason
            self.scheduler.release(seq)
            self._seqs.pop(seq.request_id, None)
            m.e2e_request_latency.observe(now - seq.arrival_time)
            m.request_success_for(reason).inc()
        return RequestOutput(seq.request_id, [token], delta, reason is not None, reason, seq.num_prompt_tokens,
                             seq.num_output_tokens, seq.num_cached_tokens)


def _decode_groups(block_tables: list[list[int]], context_lens: list[int], max_waste: float = 1.25,
                   ) -> list[DecodeGroup]:
    """Split decoding sequences, given longest first and in flat token order, into runs whose
    padded size stays within ``max_waste`` of their real size (each extra group costs a few
    kernel launches per layer, padding costs gathered and attended keys)."""
    bounds: list[int] = []  # start of each group
    real = 0
    for i, bt in enumerate(block_tables):
        if bounds and (i - bounds[-1] + 1) * len(block_tables[bounds[-1]]) <= max_waste * (real + len(bt)):
            real += len(bt)
        else:
            bounds.append(i)
            real = len(bt)
    ends = bounds[1:] + [len(block_tables)] if bounds else []
    out = []
    for start, end in zip(bounds, ends, strict=True):
        nb = len(block_tables[start])
        out.append(DecodeGroup(start, torch.tensor([bt + [0] * (nb - len(bt)) for bt in block_tables[start:end]],
                                                   dtype=torch.long),
                               torch.tensor(context_lens[start:end], dtype=torch.long)))
    return out
