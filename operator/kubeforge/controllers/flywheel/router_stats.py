"""The guard rails' inputs: the router pods' counters, per revision, over one rollout step.

Each router pod of an InferenceService (``<name>-router``) exports, per revision label
(stable, canary, shadow), ``kubeforge:router_requests{revision,code}``,
``kubeforge:router_request_duration_seconds`` and, for the shadow,
``kubeforge:shadow_requests{revision,outcome}`` and ``kubeforge:shadow_request_duration_seconds``.
``scrape`` reads one pod's /metrics into flat series (``Counters``); a step keeps the counters
of each pod at its start (``status.step.baseline``, by pod uid) and ``step_stats`` counts
from them: a pod that started since counts from zero, and a counter below its baseline (the
router process restarted) counts from zero too. No Prometheus is needed, and an operator
restarted mid-step continues from the same baseline.
"""

from __future__ import annotations

import dataclasses
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

#: series name → value; names: ``req|<revision>|<code>``, ``shadow|<revision>|<outcome>``,
#: ``fb|<revision>|`` (requests the revision could not be connected to, answered by the stable
#: one), ``dur|<revision>|<le>`` and ``sdur|<revision>|<le>`` (cumulative histogram buckets)
Counters = dict[str, float]
SCRAPE_TIMEOUT_S = 2.0
_FAMILIES = {"kubeforge:router_requests": "req", "kubeforge:shadow_requests": "shadow",
             "kubeforge:router_fallbacks": "fb",
             "kubeforge:router_request_duration_seconds": "dur", "kubeforge:shadow_request_duration_seconds": "sdur"}


def parse(text: str) -> Counters:
    out: Counters = {}
    for family in text_string_to_metric_families(text):
        prefix = _FAMILIES.get(family.name)
        if prefix is None:
            continue
        for s in family.samples:
            rev = s.labels.get("revision", "")
            if prefix in ("req", "shadow", "fb") and s.name.endswith("_total"):
                out[f"{prefix}|{rev}|{s.labels.get('code') or s.labels.get('outcome') or ''}"] = s.value
            elif prefix in ("dur", "sdur") and s.name.endswith("_bucket"):
                out[f"{prefix}|{rev}|{s.labels['le']}"] = s.value
    return out


def scrape(ip: str, port: int) -> Counters:
    """One router pod's counters (raises OSError when it does not answer)."""
    with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as resp:  # noqa: S310
        return parse(resp.read().decode())


def delta(now: Mapping[str, Counters], baseline: Mapping[str, Mapping[str, float]]) -> Counters:
    """Summed over the pods: each series' growth since the pod's baseline."""
    out: Counters = {}
    for pod, series in now.items():
        base = baseline.get(pod, {})
        for k, v in series.items():
            b = base.get(k, 0.0)
            out[k] = out.get(k, 0.0) + (v - b if v >= b else v)
    return out


@dataclasses.dataclass(frozen=True)
class RevisionStats:
    requests: int
    errors: int
    p95_s: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


def p95(counts: Counters, prefix: str, revision: str) -> float | None:
    """The upper bound of the bucket holding the 95th percentile (conservative: never below it);
    ``math.inf`` when it lies beyond the last bucket."""
    buckets = sorted(((float(k.rsplit("|", 1)[1]), v) for k, v in counts.items()
                      if k.startswith(f"{prefix}|{revision}|")), key=lambda b: b[0])
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    for le, cum in buckets:
        if cum >= 0.95 * total:
            return le
    return None


def revision_stats(counts: Counters, revision: str) -> RevisionStats:
    """A primary revision's requests, its failures and its p95. A failure is a 5xx answer, an
    answer it broke off mid-stream (``aborted``), or a request it could not be connected to (the client got the stable revision's answer: the
    fallback costs the candidate, not the client); a client that hung up counts for neither."""
    total = errors = 0.0
    for k, v in counts.items():
        kind, rev, code = k.split("|", 2)
        if rev != revision or code == "client_closed":
            continue
        if kind == "req":
            total += v
            if code.startswith("5") or code == "aborted":  # aborted: it broke off mid-answer
                errors += v
        elif kind == "fb":
            total += v
            errors += v
    return RevisionStats(int(total), int(errors), p95(counts, "dur", revision))


def shadow_stats(counts: Counters, revision: str = "shadow") -> RevisionStats:
    """The shadow's mirrored requests (dropped copies are the router's choice, not counted),
    its errors and timeouts, and its p95."""
    total = errors = 0.0
    for k, v in counts.items():
        kind, rev, outcome = k.split("|", 2)
        if kind == "shadow" and rev == revision and outcome != "dropped":
            total += v
            if outcome != "ok":
                errors += v
    return RevisionStats(int(total), int(errors), p95(counts, "sdur", revision))
