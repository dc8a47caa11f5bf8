"""Exact and near-duplicate detection.

Near duplicates: each text becomes its set of word ``k``-shingles (lower-cased ``\\w+`` words,
``k`` in a row; a text of fewer than ``k`` words is one shingle of all its words), a datasketch
``MinHash`` of that set, and a ``MinHashLSH`` index at the threshold. LSH only proposes
candidates (its bands are tuned to the threshold, so some pairs below it collide and a few
above it do not); a candidate counts when the MinHashes' estimated Jaccard similarity reaches
the threshold, which is what keeps precision up. Shingles are hashed with CRC-32, which
datasketch's affine32 scheme mixes before permuting: it is deterministic across processes
(Python's ``hash`` is not) and twice as fast as the default SHA-1 on short byte strings.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

_WORD = re.compile(r"\w+")


def shingles(text: str, k: int) -> list[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) <= k:
        return [" ".join(words).encode()] if words else []
    return [" ".join(gram).encode() for gram in zip(*(words[j:] for j in range(k)), strict=False)]


def minhash_values(texts: Sequence[str], *, shingle_words: int = 5, num_perm: int = 128) -> list[np.ndarray | None]:
    """Each text's MinHash values (None for a text without words: nothing to compare). Plain
    arrays, so a process pool can hand them back cheaply."""
    sets = [shingles(t, shingle_words) for t in texts]
    built = iter(MinHash.bulk((s for s in sets if s), num_perm=num_perm, hashfunc=zlib.crc32))
    return [next(built).hashvalues if s else None for s in sets]


def minhashes(values: Iterable[np.ndarray | None], num_perm: int = 128) -> list[MinHash | None]:
    """``MinHash`` objects around values from ``minhash_values``."""
    base = MinHash(num_perm=num_perm, hashfunc=zlib.crc32)
    return [None if v is None else MinHash(num_perm=num_perm, hashfunc=zlib.crc32, hashvalues=v,
                                           permutations=base.permutations, scheme=base.scheme) for v in values]


def _hashes(texts: Sequence[str], shingle_words: int, num_perm: int,
            values: Sequence[np.ndarray | None] | None) -> list[MinHash | None]:
    if values is not None:
        return minhashes(values, num_perm)
    sets = [shingles(t, shingle_words) for t in texts]
    built = iter(MinHash.bulk((s for s in sets if s), num_perm=num_perm, hashfunc=zlib.crc32))
    return [next(built) if s else None for s in sets]


def near_duplicate_flags(texts: Sequence[str], *, threshold: float = 0.8, shingle_words: int = 5,
                         num_perm: int = 128, values: Sequence[np.ndarray | None] | None = None) -> list[bool]:
    """``flags[i]`` is True when text ``i`` is a near duplicate of an earlier text that was kept
    (texts in the order to keep: the first of a group stays). ``values``: the texts'
    ``minhash_values`` when computed already (in a process pool)."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept: dict[str, MinHash] = {}
    flags = []
    for i, m in enumerate(_hashes(texts, shingle_words, num_perm, values)):
        if m is None:
            flags.append(False)
            continue
        dup = any(kept[key].jaccard(m) >= threshold for key in lsh.query(m))
        if not dup:
            key = str(i)
            lsh.insert(key, m)
            kept[key] = m
        flags.append(dup)
    return flags


def near_duplicate_pairs(texts: Sequence[str], *, threshold: float = 0.8, shingle_words: int = 5,
                         num_perm: int = 128) -> set[tuple[int, int]]:
    """Every pair ``(i, j)``, ``i < j``, whose estimated Jaccard similarity reaches ``threshold``
    among LSH's candidates: what a precision/recall measurement against exact Jaccard compares."""
    hashes = _hashes(texts, shingle_words, num_perm, None)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    pairs: set[tuple[int, int]] = set()
    for j, m in enumerate(hashes):
        if m is None:
            continue
        for key in lsh.query(m):
            i = int(key)
            other = hashes[i]
            assert other is not None
            if other.jaccard(m) >= threshold:
                pairs.add((i, j))
        lsh.insert(str(j), m)
    return pairs


def jaccard(a: str, b: str, shingle_words: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (the reference the estimate is held to)."""
    sa, sb = set(shingles(a, shingle_words)), set(shingles(b, shingle_words))
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)
