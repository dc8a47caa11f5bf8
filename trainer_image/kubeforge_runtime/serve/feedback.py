"""Signed completion ids and the body of ``POST /v1/feedback``.

A completion id carries its own proof: ``cmpl-<hex>`` / ``chatcmpl-<hex>`` where the hex is
8 digits of issue time (unix seconds), 16 random and 16 of HMAC-SHA256 over everything before
them (``cmpl-`` + time + random) under the service's feedback key. So any replica holding the
same key accepts feedback on an answer another replica gave, with no shared state, and an id
that was never issued, was altered, or is older than the TTL is told apart from a real one
without a lookup (the store holds the records, but a replica must answer at once).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr

PREFIXES = ("cmpl", "chatcmpl")
_ID = re.compile(r"^((?:cmpl|chatcmpl)-[0-9a-f]{8}[0-9a-f]{16})([0-9a-f]{16})$")
#: ids issued this far in the future (a replica whose clock runs ahead) still verify
CLOCK_SKEW_S = 300.0
DEFAULT_TTL_S = 7 * 24 * 3600.0


class CompletionIds:
    """Issues and verifies signed completion ids under one key."""

    def __init__(self, key: bytes, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time) -> None:
        if not key:
            raise ValueError("the feedback key must not be empty")
        self._key, self.ttl_s, self._clock = key, ttl_s, clock

    @classmethod
    def random_key(cls, ttl_s: float = DEFAULT_TTL_S) -> CompletionIds:
        """A per-process key: ids verify on this process only."""
        return cls(secrets.token_bytes(32), ttl_s)

    def _tag(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()[:16]

    def new(self, prefix: str) -> str:
        if prefix not in PREFIXES:
            raise ValueError(f"completion id prefix must be one of {PREFIXES}, got {prefix!r}")
        body = f"{prefix}-{int(self._clock()) & 0xFFFFFFFF:08x}{secrets.token_hex(8)}"
        return body + self._tag(body)

    def verify(self, completion_id: str) -> bool:
        """Issued under this key, and neither older than the TTL nor from the future."""
        m = _ID.match(completion_id)
        if m is None or not hmac.compare_digest(m.group(2), self._tag(m.group(1))):
            return False
        issued = int(m.group(1).split("-", 1)[1][:8], 16)
        age = self._clock() - issued
        return -CLOCK_SKEW_S <= age <= self.ttl_s


def new_feedback_id() -> str:
    return f"fb-{secrets.token_hex(16)}"


def _rating(value: int) -> int:
    # 1 is valid on both scales (+1 of a thumbs rating, 1 of five stars)
    if value != -1 and not 1 <= value <= 5:
        raise ValueError("must be -1 or 1 (thumbs down/up), or an integer from 1 to 5")
    return value


MAX_TAGS = 32
MAX_TAG_CHARS = 64


class FeedbackBody(BaseModel):
    """``POST /v1/feedback``: strict like the completion bodies, an unknown field or a wrong
    type is refused naming the field."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: Annotated[StrictStr, Field(max_length=128)]
    rating: Annotated[StrictInt, AfterValidator(_rating)]
    correction: StrictStr | None = None
    tags: Annotated[list[Annotated[StrictStr, Field(max_length=MAX_TAG_CHARS)]], Field(max_length=MAX_TAGS)] = (
        Field(default_factory=list))
