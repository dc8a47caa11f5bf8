"""Answer comparison on text alone (no torch: the router imports it to compare a shadow's
answers with the primary's): SQuAD's normalisation, exact match and token F1."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    """SQuAD's answer normalisation, Unicode-aware: NFKC, case folded, punctuation (every
    ``P*`` category) and English articles removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, reference: str) -> bool:
    return normalise(answer) == normalise(reference)


def overlap(answer: str, reference: str) -> float:
    """Token F1 of the normalised answer against the normalised reference (1.0 when both are
    empty, 0.0 when only one is)."""
    a, r = normalise(answer).split(), normalise(reference).split()
    if not a or not r:
        return float(a == r)
    same = sum((Counter(a) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(a), same / len(r)
    return 2 * precision * recall / (precision + recall)


def is_short(reference: str, max_words: int) -> bool:
    return len(reference.split()) <= max_words
