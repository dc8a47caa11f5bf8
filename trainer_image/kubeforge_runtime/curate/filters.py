"""Length and quality measures of one example. Deliberately simple, so a user can predict
what each keeps:

- length: characters of the prompt (a chat's message contents, one per line) and of the target;
- alpha ratio: letters / non-space characters of the target (code, tables and number dumps
  score low; prose scores about 0.8);
- repeat ratio: occurrences of the target's most frequent word 3-gram / all its word 3-grams,
  0 when no 3-gram occurs twice (a model stuck in a loop scores near 1);
- script: the share of the target's letters whose Unicode script is one of ``scripts`` must be
  over half; a target without letters passes (the alpha ratio judges it). The script of a letter
  is the first word of its Unicode name (LATIN SMALL LETTER A is Latin; CJK ideographs are Han;
  fullwidth Latin is Latin);
- finish reason: a completion that ended for a listed reason (``length``: cut off) is dropped,
  unless a correction replaced it.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from kubeforge_runtime.curate.records import Example
from kubeforge_runtime.curate.settings import FilterSettings

_ASCII_SPACE = string.whitespace.encode()
_ASCII_LETTERS = string.ascii_letters.encode()
_LETTER = re.compile(r"[^\W\d_]")  # a word character that is neither a digit nor '_'
_NAME_SCRIPT = {"CJK": "Han", "IDEOGRAPHIC": "Han", "KANGXI": "Han", "FULLWIDTH": "Latin", "HALFWIDTH": "Katakana"}


def alpha_ratio(text: str) -> float:
    if text.isascii():  # bytes.translate counts in C, twenty times faster than a regex
        b = text.encode()
        non_space = len(b.translate(None, _ASCII_SPACE))
        letters = len(b) - len(b.translate(None, _ASCII_LETTERS))
    else:
        non_space = len(text) - sum(map(str.isspace, text))
        letters = sum(map(str.isalpha, text))
    return letters / non_space if non_space else 0.0


def repeat_ratio(text: str) -> float:
    words = text.lower().split()
    if len(words) < 3:
        return 0.0
    grams = Counter(zip(words, words[1:], words[2:], strict=False))
    top = grams.most_common(1)[0][1]
    return top / (len(words) - 2) if top > 1 else 0.0


@lru_cache(maxsize=1 << 16)
def letter_script(ch: str) -> str:
    """The script of one letter, by the first word of its Unicode name (Title case)."""
    first = unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]
    return _NAME_SCRIPT.get(first, first.title())


def script_share(text: str, scripts: Sequence[str]) -> float:
    """Share of ``text``'s letters in ``scripts``; 1.0 for a text without letters."""
    if text.isascii():  # the common case, without a look at each character: ASCII letters are Latin
        return 1.0 if "Latin" in scripts or not _LETTER.search(text) else 0.0
    counts: Counter[str] = Counter(letter_script(ch) for ch in text if ch.isalpha())
    total = sum(counts.values())
    if not total:
        return 1.0
    return sum(counts[s] for s in scripts) / total


def length_ok(ex: Example, f: FilterSettings) -> bool:
    p, t = len(ex.prompt_text()), len(ex.target)
    return f.min_prompt_chars <= p <= f.max_prompt_chars and f.min_target_chars <= t <= f.max_target_chars


def finish_ok(ex: Example, f: FilterSettings) -> bool:
    return ex.corrected or ex.finish_reason not in f.drop_finish_reasons


def quality_ok(ex: Example, f: FilterSettings) -> bool:
    return alpha_ratio(ex.target) >= f.min_alpha_ratio and repeat_ratio(ex.target) <= f.max_repeat_ratio


def script_ok(ex: Example, f: FilterSettings) -> bool:
    return not f.scripts or script_share(ex.target, f.scripts) > 0.5
