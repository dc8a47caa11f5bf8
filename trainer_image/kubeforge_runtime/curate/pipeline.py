"""The curation pipeline, pure: decoded records in, SFT records per split and counts out.

The steps run in this order, each counted in and out (``Curated.filters``):

1. ``records``: well-formed request records, one per completion id (the earliest);
2. ``feedback``: feedback joined by completion id; a record's latest feedback (by time, then
   feedback id) decides its score, its latest correction becomes its target;
3. ``redact``: PII replaced in prompt, messages and target (drops nothing);
4. ``length``, ``finish_reason``, ``quality``, ``script``: ``filters.py``;
5. ``exact_dedup``: one record per hash of (prompt or messages, target);
6. ``near_dedup``: MinHash + LSH over prompt and target, candidates checked exactly (``dedup.py``).

Records are processed in time order (then by id), so "the first" of a duplicate group is the
earliest. The split of a record is a function of its completion id alone, so a record never
moves between splits across versions. Within a split, records are ordered by a hash of their
id: a fixed order (the same input gives the same bytes) that mixes old and new traffic, since
the trainer reads a file front to back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

from kubeforge.store.flywheel import FilterCount

from kubeforge_runtime.curate import filters
from kubeforge_runtime.curate.dedup import Sketch, near_duplicate_flags, sketches
from kubeforge_runtime.curate.records import Example, Feedback, MalformedRecord, Request
from kubeforge_runtime.curate.settings import CurationSettings, FilterSettings
from kubeforge_runtime.redact import Redactor

T = TypeVar("T")
R = TypeVar("R")

SPLIT_SALT = "kubeforge-split/"
ORDER_SALT = "kubeforge-order/"


def eval_split(completion_id: str, eval_percent: float) -> bool:
    """Whether a record goes to eval: the first 8 bytes of sha256(SPLIT_SALT + id) as a fraction
    of 2**64, below ``eval_percent`` / 100."""
    h = int.from_bytes(hashlib.sha256((SPLIT_SALT + completion_id).encode()).digest()[:8], "big")
    return h < eval_percent / 100 * 2**64


def _order_key(record_id: str) -> bytes:
    return hashlib.sha256((ORDER_SALT + record_id).encode()).digest()


@dataclasses.dataclass(frozen=True)
class Curated:
    """What a curation produced, before anything is written."""

    train: list[dict[str, object]]
    eval: list[dict[str, object]]
    filters: list[FilterCount]
    redacted: dict[str, int]
    feedback: dict[str, int]
    window_start: str | None
    window_end: str | None

    @property
    def dedup_ratio(self) -> float:
        by_name = {f.name: f for f in self.filters}
        before = by_name["exact_dedup"].records_in
        removed = before - by_name["near_dedup"].records_out
        return removed / before if before else 0.0

    @property
    def records(self) -> dict[str, int]:
        return {"train": len(self.train), "eval": len(self.eval)}


def _requests(raw: Iterable[object]) -> tuple[list[Request], int]:
    """Well-formed requests, earliest first, one per id; and how many records were read."""
    parsed, n = [], 0
    for obj in raw:
        n += 1
        try:
            parsed.append(Request.parse(obj))
        except (MalformedRecord, KeyError):
            continue
    parsed.sort(key=lambda r: (r.ts, r.id))
    seen: set[str] = set()
    unique = []
    for r in parsed:
        if r.id not in seen:
            seen.add(r.id)
            unique.append(r)
    return unique, n


def _feedback(raw: Iterable[object], request_ids: set[str]) -> tuple[dict[str, tuple[Feedback, str | None]],
                                                                       dict[str, int]]:
    """Per completion id: its latest feedback and its latest correction."""
    parsed, n = [], 0
    for obj in raw:
        n += 1
        try:
            parsed.append(Feedback.parse(obj))
        except (MalformedRecord, KeyError):
            continue
    parsed.sort(key=lambda f: (f.ts, f.id))
    latest: dict[str, tuple[Feedback, str | None]] = {}
    joined = 0
    for f in parsed:
        if f.completion_id not in request_ids:
            continue  # its request was sampled out, or lies outside the shards read
        joined += 1
        prev = latest.get(f.completion_id)
        correction = f.correction if f.correction is not None else (prev[1] if prev else None)
        latest[f.completion_id] = (f, correction)
    counts = {"records": n, "malformed": n - len(parsed), "joined": joined}
    return latest, counts


#: the per-record filters, in order (``filters.py``)
FILTERS: tuple[tuple[str, Callable[[Example, FilterSettings], bool]], ...] = (
    ("length", filters.length_ok),
    ("finish_reason", filters.finish_ok),
    ("quality", filters.quality_ok),
    ("script", filters.script_ok),
)
#: below this many records a process pool costs more than it saves
PARALLEL_MIN_RECORDS = 20_000


def _redact(ex: Example, redactor: Redactor, counts: dict[str, int]) -> Example:
    prompt = redactor.redact_text(ex.prompt, counts)
    messages = None if ex.messages is None else [
        {"role": m["role"], "content": redactor.redact_text(m["content"], counts) or ""} for m in ex.messages]
    return dataclasses.replace(ex, prompt=prompt, messages=messages, target=redactor.redact_text(ex.target, counts) or "")


def judge(examples: Sequence[Example], settings: CurationSettings) -> tuple[list[tuple[Example, int]], dict[str, int]]:
    """Redaction and the filters, record by record: each example redacted, with the index in
    ``FILTERS`` of the first filter that drops it (``len(FILTERS)``: kept); and the redactions."""
    counts: dict[str, int] = {}
    redactor = settings.redact.redactor() if settings.redact.enabled else None
    out = []
    for ex in examples:
        if redactor is not None:
            ex = _redact(ex, redactor, counts)
        failed = next((i for i, (_, ok) in enumerate(FILTERS) if not ok(ex, settings.filters)), len(FILTERS))
        out.append((ex, failed))
    return out, counts


def _sketch_chunk(texts: Sequence[str], shingle_words: int, num_perm: int) -> list[Sketch | None]:
    return sketches(texts, shingle_words=shingle_words, num_perm=num_perm)


def _chunks(items: Sequence[T], n: int) -> list[Sequence[T]]:
    size = max(1, -(-len(items) // n))
    return [items[i:i + size] for i in range(0, len(items), size)]


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a pod's limit)."""
    n = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def curate(requests: Iterable[object], feedback: Iterable[object], settings: CurationSettings, *,
           workers: int | None = None) -> Curated:
    """The whole pipeline over decoded request and feedback records (anything that is not a
    well-formed record is counted and dropped). Redaction, filters and MinHashes run in
    ``workers`` processes (default: the CPUs available, when at least 4) when there are enough
    records; the result does not depend on how many."""
    reqs, n_read = _requests(requests)
    latest, fb_counts = _feedback(feedback, {r.id for r in reqs})
    examples = []
    for r in reqs:
        fb = latest.get(r.id)
        correction = fb[1] if fb else None
        examples.append(Example(
            id=r.id, time=r.time, ts=r.ts, prompt=r.prompt, messages=r.messages,
            target=correction if correction is not None else r.completion,
            rating=fb[0].rating if fb else None, score=fb[0].score if fb else None,
            corrected=correction is not None, finish_reason=r.finish_reason))
    counts = [FilterCount(name="records", records_in=n_read, records_out=len(examples))]

    def count(name: str, before: int, after: int) -> None:
        counts.append(FilterCount(name=name, records_in=before, records_out=after))

    fs = settings.feedback
    n = len(examples)
    examples = [ex for ex in examples
                if (ex.score >= fs.min_score if ex.score is not None else not fs.require_feedback)]
    count("feedback", n, len(examples))
    fb_counts["corrections"] = sum(ex.corrected for ex in examples)

    if workers is None:  # with fewer CPUs, handing records to workers and back costs what it saves
        workers = available_cpus() if available_cpus() >= 4 else 1
    n_workers = workers if len(examples) >= PARALLEL_MIN_RECORDS else 1
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ProcessPoolExecutor(n_workers, mp_context=mp.get_context("fork"))) \
            if n_workers > 1 else None

        def map_chunks(fn: Callable[[Sequence[T]], R], items: Sequence[T]) -> list[R]:
            if pool is None:
                return [fn(items)]
            return list(pool.map(fn, _chunks(items, n_workers * 4)))

        redacted: dict[str, int] = {}
        judged: list[tuple[Example, int]] = []
        for part, part_counts in map_chunks(functools.partial(judge, settings=settings), examples):
            judged.extend(part)
            for k, v in part_counts.items():
                redacted[k] = redacted.get(k, 0) + v
        count("redact", len(examples), len(examples))
        for i, (name, _) in enumerate(FILTERS):
            count(name, sum(failed >= i for _, failed in judged), sum(failed > i for _, failed in judged))
        examples = [ex for ex, failed in judged if failed == len(FILTERS)]

        d = settings.dedup
        n = len(examples)
        if d.exact:
            seen: set[bytes] = set()
            unique = []
            for ex in examples:
                h = hashlib.sha256(ex.content_key().encode()).digest()
                if h not in seen:
                    seen.add(h)
                    unique.append(ex)
            examples = unique
        count("exact_dedup", n, len(examples))
        n = len(examples)
        if d.near_duplicate_threshold is not None:
            # of a group the first is kept: a corrected record (the user's own target) before an
            # uncorrected one, then the better rated (an unrated one last), then the earliest (output order is by id)
            examples.sort(key=lambda ex: (not ex.corrected, -(ex.score if ex.score is not None else -1.0)))
            texts = [f"{ex.prompt_text()}\n{ex.target}" for ex in examples]
            computed = [sk for part in map_chunks(functools.partial(
                _sketch_chunk, shingle_words=d.shingle_words, num_perm=d.num_perm), texts) for sk in part]
            flags = near_duplicate_flags(texts, threshold=d.near_duplicate_threshold, shingle_words=d.shingle_words,
                                         num_perm=d.num_perm, computed=computed)
            examples = [ex for ex, dup in zip(examples, flags, strict=True) if not dup]
        count("near_dedup", n, len(examples))

    kept = sorted(examples, key=lambda ex: _order_key(ex.id))
    train: list[dict[str, object]] = []
    evals: list[dict[str, object]] = []
    for ex in kept:
        (evals if eval_split(ex.id, settings.split.eval_percent) else train).append(ex.sft())
    return Curated(train=train, eval=evals, filters=counts, redacted=redacted, feedback=fb_counts,
                   window_start=reqs[0].time if reqs else None, window_end=reqs[-1].time if reqs else None)
