"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step the batch is formed anew (vLLM v1's unified scheduler): running sequences first,
in arrival order, each asking for all its uncomputed tokens (one for a decoding sequence, the
rest of the prompt for a prefilling one) capped by what is left of the step's token budget;
then waiting sequences while budget, ``max_num_seqs`` and free blocks allow. A prompt larger
than the budget is prefilled in chunks over several steps, so decoding sequences keep
producing a token every step while it loads (chunked prefill).

When the pool cannot give a running sequence the block it needs, the most recently admitted
running sequence is preempted: its blocks are freed and it goes back to the head of the
queue with its generated tokens, to be recomputed as a longer prompt later (vLLM's
recompute preemption). Its full blocks usually survive in the prefix cache, so recompute is
often cheap.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import TYPE_CHECKING

import torch

from kubeforge_runtime.intmath import cdiv
from kubeforge_runtime.serve.kv_cache import BlockHash, KVBlockPool, hash_block
from kubeforge_runtime.serve.sampling import SamplingParams

if TYPE_CHECKING:
    from kubeforge_runtime.serve.detokenize import Detokenizer


class Sequence:
    """One request's tokens, blocks and progress."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, block_size: int,
                 arrival_time: float | None = None, generator: torch.Generator | None = None) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.block_size = block_size
        self.generator = generator
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        #: tokens whose keys and values are in the cache
        self.num_computed_tokens = 0
        #: prompt tokens served from the prefix cache at (first) admission
        self.num_cached_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[BlockHash] = []
        #: blocks already published in the prefix cache
        self.num_registered_blocks = 0
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        #: detokenized output (stop strings already cut) and how much of it was streamed
        self.text = ""
        #: the output's incremental detokenizer (``serve.detokenize``), made by the engine
        self.detokenizer: Detokenizer | None = None
        self.num_sent_chars = 0
        self.admitted_once = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def update_block_hashes(self) -> None:
        """Hash every full block of the known tokens (computed or not)."""
        bs = self.block_size
        while len(self.block_hashes) < len(self.token_ids) // bs:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if i else None
            self.block_hashes.append(hash_block(parent, self.token_ids[i * bs:(i + 1) * bs]))


@dataclasses.dataclass
class ScheduledStep:
    entries: list[tuple[Sequence, int]]  # sequence and how many new tokens it computes
    num_preempted: int


class Scheduler:
    def __init__(self, pool: KVBlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        #: prefix-cache accounting in tokens, as vLLM's metrics count it
        self.prefix_queries = 0
        self.prefix_hits = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, seq: Sequence, upto_tokens: int) -> int:
        return max(0, cdiv(upto_tokens, self.block_size) - len(seq.block_ids))

    def _preempt(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def release(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free(seq.block_ids)
        seq.block_ids = []

    def schedule(self) -> ScheduledStep:
        budget = self.max_num_batched_tokens
        entries: list[tuple[Sequence, int]] = []
        preempted = 0
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self._blocks_needed(seq, seq.num_computed_tokens + num_new)
            while need > self.pool.num_free_blocks:
                victim = self.running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            else:
                seq.block_ids += self.pool.allocate(need)
                entries.append((seq, num_new))
                budget -= num_new
                i += 1
                continue
            break
        # vLLM's rule: admit nothing new in a step that had to preempt
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            seq.update_block_hashes()
            # at least one token must be computed to get logits for the next one
            cacheable = seq.block_hashes[:(seq.num_tokens - 1) // self.block_size]
            hit = self.pool.lookup_prefix(cacheable)
            num_cached = len(hit) * self.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            need = cdiv(num_cached + num_new, self.block_size) - len(hit)
            if need + self.pool.num_needed_to_touch(hit) > self.pool.num_free_blocks:
                break
            self.waiting.popleft()
            self.pool.touch(hit)
            seq.block_ids = hit + self.pool.allocate(need)
            seq.num_computed_tokens = num_cached
            seq.num_registered_blocks = len(hit)
            if not seq.admitted_once:
                seq.admitted_once = True
                seq.num_cached_tokens = num_cached
                self.prefix_queries += seq.num_tokens
                self.prefix_hits += num_cached
            self.running.append(seq)
            entries.append((seq, num_new))
            budget -= num_new
        return ScheduledStep(entries, preempted)

    def after_compute(self, seq: Sequence, num_new: int) -> None:
        """Advance a sequence past a step and publish its newly full blocks."""
        seq.num_computed_tokens += num_new
        seq.update_block_hashes()
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
        for b in range(seq.num_registered_blocks, full):
            self.pool.register(seq.block_ids[b], seq.block_hashes[b])
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)
