"""Exact and near-duplicate detection.

Near duplicates: each text becomes its set of word ``k``-shingles (lower-cased ``\\w+`` words,
``k`` in a row; a text of fewer than ``k`` words is one shingle of all its words), each shingle
hashed with CRC-32 (deterministic across processes, which Python's ``hash`` is not), a
datasketch ``MinHash`` of those hashes, and a ``MinHashLSH`` index. Two texts are near
duplicates when the Jaccard similarity of their shingle sets reaches the threshold.

LSH only proposes candidates, and it is built at ``threshold - CANDIDATE_MARGIN``: its bands
make an S-curve around their threshold, so an index at the threshold itself misses many pairs
just above it (about 15% of them on a corpus with planted near-duplicates). Each candidate is
then checked exactly on the two shingle-hash sets, so no pair below the threshold is ever
taken: precision is 1 and recall is what the lowered index finds (0.98 on that corpus).
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

_WORD = re.compile(r"\w+")
#: how far below the threshold the LSH index proposes candidates (they are checked exactly)
CANDIDATE_MARGIN = 0.1


def shingles(text: str, k: int) -> list[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) <= k:
        return [" ".join(words).encode()] if words else []
    return [" ".join(gram).encode() for gram in zip(*(words[j:] for j in range(k)), strict=False)]


@dataclasses.dataclass(frozen=True)
class Sketch:
    """One text's MinHash values and its shingle hashes (sorted, unique): plain arrays, so a
    process pool hands them back cheaply."""

    values: np.ndarray
    shingle_hashes: np.ndarray


def _same(h: int) -> int:
    """The shingles are hashed already (CRC-32): MinHash takes the values as they are."""
    return h


def sketches(texts: Iterable[str], *, shingle_words: int = 5, num_perm: int = 128) -> list[Sketch | None]:
    """A ``Sketch`` per text (None for a text without words: nothing to compare)."""
    hashed = [[zlib.crc32(s) for s in shingles(t, shingle_words)] for t in texts]
    built: Iterator[MinHash] = iter(MinHash.bulk((h for h in hashed if h), num_perm=num_perm, hashfunc=_same))
    return [Sketch(next(built).hashvalues, np.unique(np.array(h, dtype=np.uint32))) if h else None
            for h in hashed]


def shingle_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


class _Index:
    """MinHashLSH over sketches, proposing candidates below the threshold for the exact check."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=max(0.05, threshold - CANDIDATE_MARGIN), num_perm=num_perm)
        self.base = MinHash(num_perm=num_perm, hashfunc=_same)
        self.sets: dict[str, np.ndarray] = {}

    def minhash(self, sk: Sketch) -> MinHash:
        return MinHash(num_perm=self.num_perm, hashfunc=_same, hashvalues=sk.values,
                       permutations=self.base.permutations, scheme=self.base.scheme)

    def matches(self, m: MinHash, sk: Sketch) -> list[str]:
        """Keys in the index whose shingle sets are at least ``threshold`` similar to ``sk``'s."""
        return [k for k in self.lsh.query(m) if shingle_jaccard(self.sets[k], sk.shingle_hashes) >= self.threshold]

    def insert(self, key: str, m: MinHash, sk: Sketch) -> None:
        self.lsh.insert(key, m)
        self.sets[key] = sk.shingle_hashes


def near_duplicate_flags(texts: Sequence[str], *, threshold: float = 0.8, shingle_words: int = 5,
                         num_perm: int = 128, computed: Sequence[Sketch | None] | None = None) -> list[bool]:
    """``flags[i]`` is True when text ``i`` is a near duplicate of an earlier text that was kept
    (texts in the order to keep: the first of a group stays). ``computed``: the texts' sketches
    when made already (in a process pool)."""
    index = _Index(threshold, num_perm)
    flags = []
    sks = computed if computed is not None else sketches(texts, shingle_words=shingle_words, num_perm=num_perm)
    for i, sk in enumerate(sks):
        if sk is None:
            flags.append(False)
            continue
        m = index.minhash(sk)
        dup = bool(index.matches(m, sk))
        if not dup:
            index.insert(str(i), m, sk)
        flags.append(dup)
    return flags


def near_duplicate_pairs(texts: Sequence[str], *, threshold: float = 0.8, shingle_words: int = 5,
                         num_perm: int = 128) -> set[tuple[int, int]]:
    """Every pair ``(i, j)``, ``i < j``, of near duplicates that the index finds: what a
    precision/recall measurement against exact Jaccard compares."""
    index = _Index(threshold, num_perm)
    pairs: set[tuple[int, int]] = set()
    for j, sk in enumerate(sketches(texts, shingle_words=shingle_words, num_perm=num_perm)):
        if sk is None:
            continue
        m = index.minhash(sk)
        pairs.update((int(k), j) for k in index.matches(m, sk))
        index.insert(str(j), m, sk)
    return pairs


def jaccard(a: str, b: str, shingle_words: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (the reference for a benchmark)."""
    sa, sb = set(shingles(a, shingle_words)), set(shingles(b, shingle_words))
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)
