"""Which revision answers a request, and which requests are mirrored to the shadow: the
router's policy, with no I/O (the block pool's habit: the policy is tested alone).

The canary share is exact in aggregate: requests without a session key are counted, and the
n-th goes to the canary exactly when ``floor(n·p) > floor((n−1)·p)`` (p the share), so after
any n requests the canary has had ``floor(n·p)`` of them, never more than one off the set
share, and the canary requests are spread evenly rather than bunched. A request with a
session key is sticky: the key's hash places the session in one of 10 000 buckets, and
buckets below p·10 000 belong to the canary, so a session stays on its revision for as long
as the share does not change, and raising the share only moves sessions onto the canary
(10 % → 50 % keeps every canary session there). Shadow sampling counts the same way over
the mirrorable requests.
"""

from __future__ import annotations

import dataclasses
import hashlib
from fractions import Fraction

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUCKETS = 10_000
STABLE, CANARY, SHADOW = "stable", "canary", "shadow"


class Upstream(BaseModel):
    """One revision's server: its base URL and the name metrics and headers carry."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str = Field(pattern=r"^https?://[^/\s]+/?$", description="http://host:port of the revision's Service")
    revision: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CanaryUpstream(Upstream):
    percent: float = Field(ge=0, le=100, description="share of requests the canary answers")


class ShadowUpstream(Upstream):
    percent: float = Field(ge=0, le=100, description="share of generation requests mirrored to the shadow")


class RouterConfig(BaseModel):
    """The router's whole configuration (``--config``, JSON; reread when the file changes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stable: Upstream
    canary: CanaryUpstream | None = None
    shadow: ShadowUpstream | None = None
    #: request header carrying the session key; the body's OpenAI ``user`` field is the fallback
    session_header: str = "x-session-id"
    #: shadow copies in flight at most: a copy beyond this is dropped (and counted), never queued
    shadow_concurrency: int = Field(16, ge=1, le=1024)
    shadow_timeout_s: float = Field(60.0, gt=0)
    #: seconds a primary request may take, end to end
    upstream_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _distinct_revisions(self) -> RouterConfig:
        names = [u.revision for u in (self.stable, self.canary, self.shadow) if u is not None]
        if len(set(names)) != len(names):
            raise ValueError(f"revisions must be distinct, got {names}")
        return self


def session_bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(b"kubeforge-route/" + key.encode()).digest()[:8], "big") % BUCKETS


@dataclasses.dataclass
class ExactShare:
    """Counts requests and says yes to exactly ``floor(n · percent / 100)`` of the first n."""

    percent: float
    n: int = 0

    def __post_init__(self) -> None:
        # exact arithmetic: 20 % is 1/5, so every 5th request, not a float that drifts
        self._share = Fraction(self.percent).limit_denominator(BUCKETS) / 100

    def take(self) -> bool:
        self.n += 1
        return int(self.n * self._share) > int((self.n - 1) * self._share)


@dataclasses.dataclass
class TrafficSplit:
    """The decisions of one router process. A new config keeps the counters when the share
    is unchanged (a reload must not bunch canary requests), and starts them afresh when it
    changes."""

    config: RouterConfig
    _canary: ExactShare = dataclasses.field(init=False)
    _shadow: ExactShare = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self._canary = ExactShare(self.config.canary.percent if self.config.canary else 0.0)
        self._shadow = ExactShare(self.config.shadow.percent if self.config.shadow else 0.0)

    def update(self, config: RouterConfig) -> None:
        self.config = config
        canary = config.canary.percent if config.canary else 0.0
        shadow = config.shadow.percent if config.shadow else 0.0
        if canary != self._canary.percent:
            self._canary = ExactShare(canary)
        if shadow != self._shadow.percent:
            self._shadow = ExactShare(shadow)

    def choose(self, session_key: str | None) -> Upstream:
        """The revision that answers this request."""
        canary = self.config.canary
        if canary is None or canary.percent <= 0:
            return self.config.stable
        if session_key:
            hit = session_bucket(session_key) < canary.percent * BUCKETS / 100
        else:
            hit = self._canary.take()
        return canary if hit else self.config.stable

    def mirror(self) -> Upstream | None:
        """The shadow this generation request is copied to, or None."""
        shadow = self.config.shadow
        if shadow is None or shadow.percent <= 0:
            return None
        return shadow if self._shadow.take() else None
