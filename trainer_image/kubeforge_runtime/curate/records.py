"""The records curation reads (request and feedback, as capture writes them) and the example
it turns each kept request into (an SFT record in the making). Field names are those of
``kubeforge.store.flywheel``'s record formats."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from kubeforge.store.flywheel import feedback_score


class MalformedRecord(ValueError):
    """A record lacks a field or has one of the wrong type; the message names the field."""


def parse_time(value: Any, field: str = "time") -> float:
    """RFC 3339 to POSIX seconds; a time without offset is UTC."""
    if not isinstance(value, str):
        raise MalformedRecord(f"{field}: expected an RFC 3339 string")
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise MalformedRecord(f"{field}: not an RFC 3339 time: {value!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def _str(obj: Mapping[str, Any], field: str, *, optional: bool = False) -> str | None:
    v = obj.get(field)
    if v is None and optional:
        return None
    if not isinstance(v, str):
        raise MalformedRecord(f"{field}: expected a string")
    return v


def _content(v: Any, where: str) -> str:
    """A chat message's content: a string, OpenAI's list of text parts, or null (empty)."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in v):
        return "".join(p["text"] for p in v)
    raise MalformedRecord(f"{where}: expected a string or a list of text parts")


def parse_messages(v: Any, field: str = "messages") -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise MalformedRecord(f"{field}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise MalformedRecord(f"{field}[{i}]: expected an object with a string role")
        out.append({"role": m["role"], "content": _content(m.get("content"), f"{field}[{i}].content")})
    return out


@dataclasses.dataclass(frozen=True)
class Request:
    """One captured request record (the fields curation uses)."""

    id: str
    time: str
    ts: float
    prompt: str | None
    messages: list[dict[str, str]] | None
    completion: str
    finish_reason: str | None

    @classmethod
    def parse(cls, obj: object) -> Request:
        if not isinstance(obj, Mapping):
            raise MalformedRecord("not a JSON object")
        if obj.get("type", "request") != "request":
            raise MalformedRecord(f"type: expected 'request', got {obj.get('type')!r}")
        rid = _str(obj, "id")
        assert rid is not None
        if not rid or "." in rid or "/" in rid:
            raise MalformedRecord("id: must be non-empty, without '.' or '/'")
        time = obj.get("time")
        ts = parse_time(time)
        prompt = _str(obj, "prompt", optional=True)
        messages = parse_messages(obj["messages"]) if obj.get("messages") is not None else None
        if (prompt is None) == (messages is None):
            raise MalformedRecord("prompt, messages: exactly one must be set")
        completion = _str(obj, "completion")
        assert completion is not None
        return cls(rid, str(time), ts, prompt, messages, completion, _str(obj, "finish_reason", optional=True))


@dataclasses.dataclass(frozen=True)
class Feedback:
    """One feedback record."""

    id: str
    completion_id: str
    ts: float
    rating: int
    correction: str | None

    @property
    def score(self) -> float:
        return feedback_score(self.rating)

    @classmethod
    def parse(cls, obj: object) -> Feedback:
        if not isinstance(obj, Mapping):
            raise MalformedRecord("not a JSON object")
        if obj.get("type", "feedback") != "feedback":
            raise MalformedRecord(f"type: expected 'feedback', got {obj.get('type')!r}")
        fid, cid = _str(obj, "id"), _str(obj, "completion_id")
        assert fid is not None and cid is not None
        rating = obj.get("rating")
        try:
            feedback_score(rating)  # type: ignore[arg-type]
        except ValueError as e:
            raise MalformedRecord(f"rating: {e}") from None
        assert isinstance(rating, int)
        return cls(fid, cid, parse_time(obj.get("time")), rating, _str(obj, "correction", optional=True))


@dataclasses.dataclass(frozen=True)
class Example:
    """A request on its way to becoming an SFT record: its target is the completion, or the
    latest correction its feedback gave."""

    id: str
    time: str
    ts: float
    prompt: str | None
    messages: list[dict[str, str]] | None
    target: str
    rating: int | None
    score: float | None
    corrected: bool
    finish_reason: str | None

    def prompt_text(self) -> str:
        """The prompt as text: itself, or the messages' contents one per line (what the length
        filters and near-duplicate shingles read)."""
        if self.prompt is not None:
            return self.prompt
        assert self.messages is not None
        return "\n".join(m["content"] for m in self.messages)

    def content_key(self) -> str:
        """What exact dedup hashes: (prompt or messages, target)."""
        return json.dumps([self.prompt if self.prompt is not None else self.messages, self.target],
                          ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    def sft(self) -> dict[str, Any]:
        """The SFT record (``flywheel``'s format) as a train/eval tar member holds it."""
        return {"id": self.id, "prompt": self.prompt, "messages": self.messages, "target": self.target,
                "source": self.id, "rating": self.rating, "corrected": self.corrected}
