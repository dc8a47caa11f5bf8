"""PII redaction of captured text: what capture applies before a record leaves the server,
and what curation applies again (capture may have run with it off).

Each match is replaced by a typed placeholder, ``<EMAIL>``, ``<PHONE>``, ``<CREDIT_CARD>``,
``<API_KEY>``, or ``<NAME>`` for a user pattern called NAME. The built-in patterns, in the
order they run:

- API_KEY: ``sk-``/``pk-``/``rk-`` style keys, AWS access key ids (``AKIA...``), GitHub and
  Slack tokens, ``Bearer <token>``, and any 32+ character run of letters, digits, ``_`` and
  ``-`` that mixes letters and digits;
- EMAIL: ``local@domain.tld``;
- CREDIT_CARD: 13 to 19 digits, optionally grouped by spaces or dashes, passing the Luhn check
  (so order numbers and timestamps are kept);
- PHONE: an optional ``+country`` then 7 to 15 digits in groups (``(555) 123-4567``,
  ``+44 20 7946 0958``); a bare run of digits without a separator is not a phone number.

The rules are deliberately simple and documented in docs/flywheel.md: they catch the common
shapes, not every possible one. Users add their own with ``patterns``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

# Every pattern is tried at few positions of a run (a lookbehind for its start, not ``\b``, which
# holds inside ``a-b-c``), so its cost is linear in the text: with ``\b`` and a lookahead over
# the rest of the run, 16k characters of ``a-a-a-...`` took 1.7 s, holding the GIL.
_API_KEY = re.compile(
    r"\b(?:(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|xox[abpr]-[A-Za-z0-9-]{10,})"
    r"|(?<=Bearer )[A-Za-z0-9._~+/=-]{16,}")
#: a 32+ character run of letters, digits, ``_`` and ``-``; ``_long_token`` keeps those without
#: both a letter and a digit
_LONG_TOKEN = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{32,}(?![A-Za-z0-9_-])")
#: the punctuation a run may start with (``...jane@x.com``) is kept, outside the placeholder
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])([._%+-]*)[A-Za-z0-9_][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
                    r"\.[A-Za-z]{2,}\b")
_LETTER = re.compile(r"[A-Za-z]")
_DIGIT = re.compile(r"[0-9]")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])(?:\d{2,4}[ .-]){0,3}\d{3,4}(?!\w)")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(m: re.Match[str]) -> str | None:
    digits = re.sub(r"[ -]", "", m.group(0))
    return "<CREDIT_CARD>" if 13 <= len(digits) <= 19 and _luhn(digits) else None


def _long_token(m: re.Match[str]) -> str | None:
    """The run without its leading and trailing dashes (kept around the placeholder)."""
    run = m.group(0)
    token = run.strip("-")
    if len(token) < 32 or not (_LETTER.search(token) and _DIGIT.search(token)):
        return None
    lead = len(run) - len(run.lstrip("-"))
    return f"{run[:lead]}<API_KEY>{run[lead + len(token):]}"


def _email(m: re.Match[str]) -> str:
    return f"{m.group(1)}<EMAIL>"


def _phone(m: re.Match[str]) -> str | None:
    digits = re.sub(r"\D", "", m.group(0))
    return "<PHONE>" if 7 <= len(digits) <= 15 else None


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]
    #: None: always the placeholder; else decides per match (None keeps the text)
    check: object = None


BUILTIN: tuple[Rule, ...] = (
    Rule("API_KEY", _API_KEY),
    Rule("API_KEY", _LONG_TOKEN, _long_token),
    Rule("EMAIL", _EMAIL, _email),
    Rule("CREDIT_CARD", _CARD, _card),
    Rule("PHONE", _PHONE, _phone),
)

_PLACEHOLDER_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,31}$")


class Redactor:
    """Replaces PII in text; ``counts`` of one call tell what was replaced, by type."""

    def __init__(self, patterns: Mapping[str, str] | Iterable[tuple[str, str]] = (), builtin: bool = True) -> None:
        rules = list(BUILTIN) if builtin else []
        items = patterns.items() if isinstance(patterns, Mapping) else patterns
        for name, regex in items:
            if not _PLACEHOLDER_NAME.match(name):
                raise ValueError(f"redact pattern name {name!r} must match {_PLACEHOLDER_NAME.pattern} "
                                 "(it becomes the placeholder <NAME>)")
            try:
                rules.append(Rule(name, re.compile(regex)))
            except re.error as e:
                raise ValueError(f"redact pattern {name}: not a valid regular expression: {e}") from None
        self.rules = tuple(rules)

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """(redacted text, replacements per type)."""
        counts: dict[str, int] = {}
        for rule in self.rules:
            def sub(m: re.Match[str], rule: Rule = rule) -> str:
                out = rule.check(m) if callable(rule.check) else f"<{rule.name}>"
                if out is None:
                    return m.group(0)
                counts[rule.name] = counts.get(rule.name, 0) + 1
                return out
            text = rule.pattern.sub(sub, text)
        return text, counts

    def redact_text(self, text: str | None, counts: dict[str, int]) -> str | None:
        """``redact`` that adds its replacements to ``counts``; None stays None."""
        if text is None:
            return None
        out, c = self.redact(text)
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
        return out
