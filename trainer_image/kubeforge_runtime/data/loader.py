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
    for a filler batch that only keeps collectives in step on a rank with no sample left."""

    tokens: torch.Tensor
    weight: float


@dataclasses.dataclass
class StepBatch:
    """This rank's micro-batches of one step, and the data state after the step."""

    micro_batches: list[MicroBatch]
    samples: int  # real samples on this rank
    state_after: DataState


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


def rank_plan(global_batch: int, micro_batch: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """Which in-batch sample indices this rank takes, and how many micro-batches every rank
    runs (the same number on all ranks, so collectives stay matched when the batch does not
    divide evenly)."""
    mine = list(range(rank, global_batch, world_size))
    per_rank_max = math.ceil(global_batch / world_size)
    return mine, max(1, math.ceil(per_rank_max / micro_batch))


class BatchLoader:
    """Iterates ``StepBatch`` es for this rank, prepared ``prefetch`` steps ahead by a thread."""

    def __init__(self, stream: TokenStream, *, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 prefetch: int = 4, pin_memory: bool = False) -> None:
        self.stream, self.global_batch, self.micro_batch = stream, global_batch, micro_batch
        self.mine, self.n_micro = rank_plan(global_batch, micro_batch, rank, world_size)
        self.pin_memory = pin_memory
        self._queue: queue.Queue[StepBatch | BaseException] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="kubeforge-data", daemon=True)
        self._thread.start()

    def _build(self, batch: list[list[int]], state_after: DataState) -> StepBatch:
        rows = [batch[i] for i in self.mine]
        mbs: list[MicroBatch] = []
        for m in range(self.n_micro):
            chunk = rows[m * self.micro_batch:(m + 1) * self.micro_batch]
            if chunk:
                t = torch.tensor(chunk, dtype=torch.long)
                mbs.append(MicroBatch(t.pin_memory() if self.pin_memory else t, 1.0))
            else:
                mbs.append(MicroBatch(torch.zeros(1, len(batch[0]), dtype=torch.long), 0.0))
        return StepBatch(mbs, len(rows), state_after)

    def _produce(self) -> None:
        try:
            batch: list[list[int]] = []
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
