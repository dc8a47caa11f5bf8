"""Packed training batches with a resumable global sample cursor.

All ranks read the same deterministic token stream: files in an order drawn from
(seed, epoch), each document wrapped in bos ... eos, cut into non-overlapping samples of
``seq_len + 1`` tokens. Sample *i* of that stream is the same on every rank and for every
world size. Step *s* takes the next ``global_batch`` samples; rank *r* of *W* keeps the
ones whose index in the batch is ``r (mod W)``. So the global batch, and the loss it
yields, do not depend on the world size, and a run resumed at another world size neither
repeats nor skips a sample.

The position between two steps is a small ``DataState``: the sample cursor and where the
next sample starts in the stream (epoch, file, piece, token offset). It is saved with each
checkpoint, and resuming seeks there directly rather than re-reading what came before.
Every rank tokenizes the whole stream and keeps its share: reading text is cheap next to
a training step, and it keeps the position global.

SFT data (``SFTStream``, ``sft.py``) is not packed: one record is one padded sample with a
loss mask over its target. Because every rank sees the whole global batch, each step also
carries the global count of tokens the loss counts (``StepBatch.loss_tokens``), so the loss
can be normalised by it with no collective, the same whatever the world size.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import random
import threading
from collections.abc import Iterator
from typing import Any

import torch

from kubeforge_runtime.data.sft import PromptEncoder, SFTRecord, SFTSample, build_sample, read_records
from kubeforge_runtime.data.sources import SourceFile, read_pieces
from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer


@dataclasses.dataclass(frozen=True)
class DataState:
    """Where the stream stands between two steps; JSON-serialisable via ``as_dict``."""

    sample: int = 0  # global samples consumed (the cursor)
    epoch: int = 0
    file: int = 0  # index into this epoch's file order
    piece: int = 0  # index of the piece within the file
    offset: int = 0  # tokens of that piece already consumed

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataState:
        return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class MicroBatch:
    """``tokens`` is (B, T+1); inputs are ``[:, :-1]``, targets ``[:, 1:]``. ``weight`` is 0
    for a filler batch that only keeps collectives in step on a rank with no sample left.
    ``loss_mask`` (B, T), for SFT: 1 where the target counts in the loss; None: every one does."""

    tokens: torch.Tensor
    weight: float
    loss_mask: torch.Tensor | None = None


@dataclasses.dataclass
class StepBatch:
    """This rank's micro-batches of one step, and the data state after the step."""

    micro_batches: list[MicroBatch]
    samples: int  # real samples on this rank
    state_after: DataState
    loss_tokens: int  # tokens the loss counts in the whole global batch (all ranks): its normaliser


def file_order(n_files: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(n_files))
    if shuffle:
        random.Random(f"kubeforge-data/{seed}/{epoch}").shuffle(order)
    return order


class TokenStream:
    """Samples of ``sample_len`` tokens from ``files``, starting at ``state``."""

    def __init__(self, files: list[SourceFile], tokenizer: ByteTokenizer | HFTokenizer, sample_len: int,
                 seed: int, shuffle: bool, text_field: str, state: DataState) -> None:
        if not files:
            raise ValueError("no input files")
        self.files, self.tok, self.sample_len = files, tokenizer, sample_len
        self.seed, self.shuffle, self.text_field = seed, shuffle, text_field
        self.start = state

    def _piece_tokens(self, text: str, doc_start: bool, doc_end: bool) -> list[int]:
        ids = self.tok.encode(text)
        return ([self.tok.bos_id] if doc_start else []) + ids + ([self.tok.eos_id] if doc_end else [])

    def __iter__(self) -> Iterator[tuple[list[int], DataState]]:
        """Yields each sample with the state just after it; epochs repeat without end (a
        sample may span the end of one epoch and the start of the next)."""
        st = self.start
        sample, epoch, file_i, piece_i, offset = st.sample, st.epoch, st.file, st.piece, st.offset
        pending: list[int] = []
        while True:
            order = file_order(len(self.files), self.seed, epoch, self.shuffle)
            while file_i < len(order):
                src = self.files[order[file_i]]
                for p_i, piece in enumerate(read_pieces(src, self.text_field)):
                    if p_i < piece_i:
                        continue  # seeking to the saved position: skipped without tokenizing
                    toks = self._piece_tokens(piece.text, piece.doc_start, piece.doc_end)
                    pos = offset
                    offset = 0
                    while pos < len(toks):
                        take = min(self.sample_len - len(pending), len(toks) - pos)
                        pending.extend(toks[pos:pos + take])
                        pos += take
                        if len(pending) == self.sample_len:
                            sample += 1
                            # a boundary: pending is empty, the stream position says it all
                            if pos < len(toks):
                                after = DataState(sample, epoch, file_i, p_i, pos)
                            else:
                                after = DataState(sample, epoch, file_i, p_i + 1, 0)
                            yield pending, after
                            pending = []
                piece_i, offset = 0, 0
                file_i += 1
            epoch, file_i, piece_i, offset = epoch + 1, 0, 0, 0


class SFTStream:
    """One sample per SFT record of ``files``, starting at ``state``; epochs repeat without end,
    files in the order drawn from (seed, epoch) like ``TokenStream``."""

    def __init__(self, files: list[SourceFile], tokenizer: ByteTokenizer | HFTokenizer, sample_len: int,
                 seed: int, shuffle: bool, state: DataState) -> None:
        if not files:
            raise ValueError("no input files")
        self.files, self.tok, self.sample_len = files, tokenizer, sample_len
        self.seed, self.shuffle, self.start = seed, shuffle, state
        self.prompts = PromptEncoder(tokenizer)

    def sample(self, rec: SFTRecord) -> SFTSample:
        return build_sample(self.prompts.ids(rec), self.tok.encode(rec.target), bos=self.tok.bos_id,
                            eos=self.tok.eos_id, pad=self.tok.pad_id, sample_len=self.sample_len)

    def __iter__(self) -> Iterator[tuple[SFTSample, DataState]]:
        """Yields each sample with the state just after it."""
        st = self.start
        sample, epoch, file_i, rec_i = st.sample, st.epoch, st.file, st.piece
        while True:
            order = file_order(len(self.files), self.seed, epoch, self.shuffle)
            seen = rec_i > 0 or file_i > 0  # a resumed epoch had records before its position
            while file_i < len(order):
                for i, rec in read_records(self.files[order[file_i]], rec_i):
                    seen = True
                    sample += 1
                    yield self.sample(rec), DataState(sample, epoch, file_i, i + 1, 0)
                rec_i = 0
                file_i += 1
            if not seen:
                raise ValueError("data.paths: no SFT records in any input file")
            epoch, file_i, rec_i = epoch + 1, 0, 0


def rank_plan(global_batch: int, micro_batch: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """Which in-batch sample indices this rank takes, and how many micro-batches every rank
    runs (the same number on all ranks, so collectives stay matched when the batch does not
    divide evenly)."""
    mine = list(range(rank, global_batch, world_size))
    per_rank_max = math.ceil(global_batch / world_size)
    return mine, max(1, math.ceil(per_rank_max / micro_batch))


class BatchLoader:
    """Iterates ``StepBatch`` es for this rank, prepared ``prefetch`` steps ahead by a thread."""

    def __init__(self, stream: TokenStream | SFTStream, *, global_batch: int, micro_batch: int, rank: int,
                 world_size: int, prefetch: int = 4, pin_memory: bool = False) -> None:
        self.stream, self.global_batch, self.micro_batch = stream, global_batch, micro_batch
        self.mine, self.n_micro = rank_plan(global_batch, micro_batch, rank, world_size)
        self.pin_memory = pin_memory
        self._queue: queue.Queue[StepBatch | BaseException] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="kubeforge-data", daemon=True)
        self._thread.start()

    def _tensor(self, rows: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(rows, dtype=dtype)
        return t.pin_memory() if self.pin_memory else t

    def _build(self, batch: list[list[int]] | list[SFTSample], state_after: DataState) -> StepBatch:
        rows = [batch[i] for i in self.mine]
        first = batch[0]
        width = len(first.tokens) if isinstance(first, SFTSample) else len(first)
        mbs: list[MicroBatch] = []
        for m in range(self.n_micro):
            chunk = rows[m * self.micro_batch:(m + 1) * self.micro_batch]
            if not chunk:
                mbs.append(MicroBatch(torch.zeros(1, width, dtype=torch.long), 0.0,
                                      torch.zeros(1, width - 1) if isinstance(first, SFTSample) else None))
            elif isinstance(first, SFTSample):
                samples = [r for r in chunk if isinstance(r, SFTSample)]
                mbs.append(MicroBatch(self._tensor([r.tokens for r in samples], torch.long), 1.0,
                                      self._tensor([r.loss_mask for r in samples], torch.float32)))
            else:
                mbs.append(MicroBatch(self._tensor([r for r in chunk if isinstance(r, list)], torch.long), 1.0))
        if isinstance(first, SFTSample):
            loss_tokens = sum(sum(r.loss_mask) for r in batch if isinstance(r, SFTSample))
        else:
            loss_tokens = len(batch) * (width - 1)
        return StepBatch(mbs, len(rows), state_after, loss_tokens)

    def _produce(self) -> None:
        try:
            batch: list[Any] = []
            for sample, after in self.stream:
                batch.append(sample)
                if len(batch) == self.global_batch:
                    item = self._build(batch, after)
                    batch = []
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
        except BaseException as e:  # handed to the consumer, which raises it in the training thread
            self._queue.put(e)

    def __iter__(self) -> Iterator[StepBatch]:
        return self

    def __next__(self) -> StepBatch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
