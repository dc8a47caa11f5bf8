"""Incremental detokenization and stop strings: the text of an output grows by what each new
token adds, at a cost that does not grow with the output.

Decoding the whole output at every token costs O(length) per token, O(length²) per request,
on the engine thread that steps every sequence. Instead:

- byte-level tokenizer: a UTF-8 incremental decoder (an incomplete character waits for its
  next bytes; ``finish`` turns a dangling one into U+FFFD, as a full decode would);
- ``tokenizers`` (``HFTokenizer``): vLLM's window. The text added is
  ``decode(ids[prefix:]) - decode(ids[prefix:read])``, taken only when it does not end in an
  incomplete character. The window starts at the last token whose text was taken, so merges
  and leading-space rules see their left neighbour.

Stop strings are searched only in the part of the text that a new token could complete
(from ``len(old text) - longest stop + 1``), and the held-back tail is found by looking at
where each stop string could start, not by trying every prefix length.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer

REPLACEMENT = "\ufffd"
#: How many of the text's last characters ``stable_length`` looks for in a stop string.
PROBE = 8


class Detokenizer:
    """One output's text, fed token by token."""

    def __init__(self, tokenizer: ByteTokenizer | HFTokenizer) -> None:
        self.text = ""
        self._tok = tokenizer
        self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace") \
            if isinstance(tokenizer, ByteTokenizer) else None
        self._ids: list[int] = []
        self._prefix = 0  # window start: the first token of the last text taken
        self._read = 0  # tokens whose text is in self.text

    def add(self, token: int, final: bool = False) -> str:
        """Feed one token; returns the text it added. ``final``: the output ends here, so an
        incomplete last character is given as U+FFFD instead of waiting."""
        if self._bytes is not None:
            piece = self._bytes.decode(bytes([token]) if 0 <= token < 256 else b"", final=final)
        else:
            self._ids.append(token)
            piece = self._window(final)
        self.text += piece
        return piece

    def _window(self, final: bool) -> str:
        decode = self._tok.decode
        before = decode(self._ids[self._prefix:self._read])
        now = decode(self._ids[self._prefix:])
        if len(now) <= len(before) or (now.endswith(REPLACEMENT) and not final):
            return ""  # nothing yet, or a character still missing bytes
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before):]


def find_stop(text: str, stops: Sequence[str], searched: int) -> int:
    """The earliest index of a stop string in ``text`` that was not there when only
    ``text[:searched]`` existed; -1 when none."""
    if not stops:
        return -1
    start = max(0, searched - max(len(s) for s in stops) + 1)
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else -1


def stable_length(text: str, stops: Sequence[str]) -> int:
    """How much of an unfinished output may be streamed: not a trailing U+FFFD (changed by
    the next token), nor a tail that could still grow into a stop string (it would have to be
    taken back), i.e. the longest proper prefix of a stop that the text ends with.

    Not by trying every prefix length (O(len(stop)²) per token): a prefix longer than the
    text's last ``PROBE`` characters must contain them where it ends, so only the places
    where ``s`` contains that probe are tried; shorter ones are at most ``PROBE - 1`` tries."""
    end = len(text)
    while end and text[end - 1] == REPLACEMENT:
        end -= 1
    if not end:
        return 0
    m = min(PROBE, end)
    probe, last, hold = text[end - m:end], text[end - 1], 0
    for s in stops:
        j = s.rfind(probe, 0, len(s) - 1)  # k = j + m <= len(s) - 1: a proper prefix
        while j >= 0 and j + m > hold:
            if text.endswith(s[:j + m], 0, end):
                hold = j + m
                break
            j = s.rfind(probe, 0, j + m - 1)
        else:
            for k in range(min(m - 1, len(s) - 1), hold, -1):
                if s[k - 1] == last and probe.endswith(s[:k]):
                    hold = k
                    break
    return end - hold
