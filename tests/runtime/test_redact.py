"""The PII redactor capture and curation share: each built-in type is caught in its common
shapes, look-alikes (order numbers, timestamps, plain words) are kept, user patterns add types,
and the counts say what was replaced."""

from __future__ import annotations

import pytest
from kubeforge_runtime.redact import Redactor

pytestmark = pytest.mark.runtime


@pytest.mark.parametrize(("text", "kind"), [
    ("write to jane.doe+news@example.co.uk today", "EMAIL"),
    ("call (555) 123-4567 now", "PHONE"),
    ("call +44 20 7946 0958 now", "PHONE"),
    ("call 555-123-4567", "PHONE"),
    ("card 4111 1111 1111 1111 exp", "CREDIT_CARD"),
    ("card 4111-1111-1111-1111", "CREDIT_CARD"),
    ("card 5500005555555559.", "CREDIT_CARD"),
    ("key sk-abcdefghijklmnop1234 here", "API_KEY"),
    ("aws AKIAIOSFODNN7EXAMPLE x", "API_KEY"),
    ("token ghp_" + "a1" * 18 + " x", "API_KEY"),
    ("Authorization: Bearer abc.def-ghi_jkl~mno123", "API_KEY"),
    ("secret 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 x", "API_KEY"),
])
def test_builtin_types_are_replaced_by_their_placeholder(text: str, kind: str) -> None:
    out, counts = Redactor().redact(text)
    assert counts == {kind: 1}, (out, counts)
    assert f"<{kind}>" in out


@pytest.mark.parametrize("text", [
    "order 1234567890123 shipped",  # 13 digits failing the Luhn check
    "at 20261202183355 the job ran",
    "version 1.2.3 of the model",
    "the year 2026 and room 101",
    "an ordinary sentence about kubernetes operators",
    "a long identifier_with_only_letters_and_underscores_here",
    "user at example dot com",
])
def test_look_alikes_are_kept(text: str) -> None:
    assert Redactor().redact(text) == (text, {})


def test_counts_add_up_and_user_patterns_run_after_the_builtins() -> None:
    r = Redactor({"TICKET": r"TCK-\d+"})
    text = "a@b.io and c@d.io, ticket TCK-42, card 4111111111111111"
    out, counts = r.redact(text)
    assert counts == {"EMAIL": 2, "TICKET": 1, "CREDIT_CARD": 1}
    assert out == "<EMAIL> and <EMAIL>, ticket <TICKET>, card <CREDIT_CARD>"
    total: dict[str, int] = {}
    assert r.redact_text(None, total) is None and total == {}
    assert r.redact_text(text, total) == out and r.redact_text("e@f.io", total) == "<EMAIL>"
    assert total == {"EMAIL": 3, "TICKET": 1, "CREDIT_CARD": 1}


def test_builtin_off_keeps_only_user_patterns() -> None:
    assert Redactor({"SECRET": "hunter2"}, builtin=False).redact("a@b.io hunter2") == ("a@b.io <SECRET>",
                                                                                     {"SECRET": 1})


@pytest.mark.parametrize(("patterns", "message"), [
    ({"lower": "x"}, "must match"),
    ({"A B": "x"}, "must match"),
    ({"BAD": "("}, "not a valid regular expression"),
])
def test_bad_user_patterns_are_refused_naming_them(patterns: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Redactor(patterns)


def test_the_punctuation_a_run_starts_or_ends_with_stays_outside_the_placeholder() -> None:
    r = Redactor()
    assert r.redact("Contact: ...jane@x.com now")[0] == "Contact: ...<EMAIL> now"
    assert r.redact("(-jane@x.com)")[0] == "(-<EMAIL>)"
    assert r.redact("--tok_1234567890abcdefghij1234567890abcd--")[0] == "--<API_KEY>--"
    # 31 characters between the dashes: not a key
    assert r.redact("-" + "a1" * 15 + "b-") == ("-" + "a1" * 15 + "b-", {})


@pytest.mark.timeout(20)
@pytest.mark.parametrize("unit", ["a-", "a.", "1 ", "ab1", "x", "a@"])
def test_adversarial_runs_take_linear_time(unit: str) -> None:
    """A run of 128k characters that almost matches (``a-a-a-...``): with a ``\\b`` start and a
    lookahead over the rest of the run, a pattern rescans the run from every word boundary
    (about 100 s at this size, holding the GIL of the capture writer); a start found by a
    lookbehind tries once per run. The timeout is a hang guard, 200x the linear time."""
    text = unit * (131072 // len(unit))
    out, counts = Redactor().redact(text)
    assert len(out) <= len(text)
    if unit == "ab1":  # one long token mixing letters and digits
        assert out == "<API_KEY>" and counts == {"API_KEY": 1}
    elif unit in ("a-", "x"):  # no digit: not a key
        assert out == text and counts == {}
