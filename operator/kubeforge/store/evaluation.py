"""The flywheel's evaluation reports: their layout, their format and the gate a candidate
must pass. No torch, no kopf: the evaluation pod writes a report, the operator reads it and
decides whether a candidate goes on to shadow and canary.

Under a store root::

    <namespace>/<flywheel>/evaluation/cycle-0000000001/report.json   what was scored, and the scores
    <namespace>/<flywheel>/evaluation/cycle-0000000001/commit.json   its marker, written last

A report counts only once its marker exists (the checkpoints' rule), and the marker carries
the report's sha256, so a reader can tell a report from a half-written one.

Metric names are ``<suite>.<score>`` with suite ``eval`` (the Dataset version's eval split)
or ``golden`` (the user's fixed set) and score one of :data:`SCORES`, plus ``preference``
(the candidate's win rate against the current model, 0.5 = no difference). Every score is
higher-is-better except ``perplexity``; :func:`gate` turns each into a signed gain so a rule
reads the same for all of them.
"""

from __future__ import annotations

import builtins
import hashlib
import math
import re
from collections.abc import Callable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from kubeforge.store.layout import _check_name

EVALUATION_DIR = "evaluation"
REPORT_NAME = "report.json"
REPORT_MARKER_NAME = "commit.json"
CYCLE_DIGITS = 10
SUITES = ("eval", "golden")
#: per suite: mean token log-likelihood of the references, its perplexity, and on short
#: answers exact match and normalised token overlap (F1) of the greedy answer
SCORES = ("mean_logprob", "perplexity", "exact_match", "overlap")
PREFERENCE = "preference"
#: a candidate's preference score that means "no better, no worse than the current model"
PREFERENCE_NEUTRAL = 0.5
LOWER_IS_BETTER = frozenset({"perplexity"})
METRICS = tuple(f"{s}.{m}" for s in SUITES for m in SCORES) + (PREFERENCE,)
_CYCLE_DIR = re.compile(r"^cycle-(\d+)$")


def evaluation_prefix(namespace: str, flywheel: str) -> str:
    return f"{_check_name(namespace, 'namespace')}/{_check_name(flywheel, 'flywheel')}/{EVALUATION_DIR}"


def cycle_dir_name(cycle: int) -> str:
    if cycle < 1:
        raise ValueError(f"an evaluation cycle is numbered from 1, got {cycle}")
    return f"cycle-{cycle:0{CYCLE_DIGITS}d}"


def parse_cycle_dir(name: str) -> int | None:
    m = _CYCLE_DIR.match(name)
    return int(m.group(1)) if m else None


class SuiteScores(BaseModel):
    """One model's scores on one suite. A score is None when the suite had nothing it
    applies to (no short answer, no record)."""

    model_config = ConfigDict(frozen=True)
    records: int = Field(description="records scored")
    tokens: int = Field(description="reference tokens the log-likelihood is over (eos included)")
    mean_logprob: float | None = Field(description="mean log-likelihood per reference token, nats")
    perplexity: float | None = Field(description="exp(-mean_logprob)")
    short_answers: int = Field(description="records whose reference is short enough for exact match and overlap")
    exact_match: float | None = Field(description="share of short answers whose greedy answer equals the reference, normalised")
    overlap: float | None = Field(description="mean token F1 of the greedy answer against the reference, normalised")

    def score(self, name: str) -> float | None:
        value = getattr(self, name)
        return None if value is None else float(value)


class PreferenceScore(BaseModel):
    """Candidate against the current model on the prompts both answered, judged by the
    feedback-derived preferred answer (a liked completion, or the user's correction): the one
    whose greedy answer overlaps it more wins; equal overlaps (within ``tie_margin``) tie."""

    model_config = ConfigDict(frozen=True)
    pairs: int
    wins: int
    losses: int
    ties: int
    tie_margin: float
    score: float | None = Field(description="(wins + ties / 2) / pairs; 0.5 means no difference")


class ModelRef(BaseModel):
    model_config = ConfigDict(frozen=True)
    uri: str
    revision: str | None = Field(description="the export's commit-marker time; None for a plain directory")


class EvaluationReport(BaseModel):
    """``report.json``: which models were scored on what, and the scores side by side."""

    model_config = ConfigDict(frozen=True)
    version: int = 1
    time: str
    candidate: ModelRef
    baseline: ModelRef | None = Field(description="the current (stable) model; None scores the candidate alone")
    dataset: str | None = Field(description="the dataset version whose eval split was scored")
    dataset_version: int | None
    golden: str | None = Field(description="the golden set's URI")
    settings: dict[str, object] = Field(default_factory=dict)
    candidate_scores: dict[str, SuiteScores] = Field(description="per suite (eval, golden)")
    baseline_scores: dict[str, SuiteScores] = Field(default_factory=dict)
    preference: PreferenceScore | None = None
    metrics: dict[str, float] = Field(description="every defined metric of the candidate, by name")
    baseline_metrics: dict[str, float] = Field(default_factory=dict)
    gate: GateResult | None = None
    seconds: float = Field(description="wall time of the evaluation")

    def to_json(self) -> builtins.bytes:
        return self.model_dump_json(indent=1).encode()


class ReportMarker(BaseModel):
    """``commit.json`` next to a report, written after it."""

    model_config = ConfigDict(frozen=True)
    version: int = 1
    time: str
    bytes: int
    sha256: str

    def to_json(self) -> builtins.bytes:
        return self.model_dump_json(indent=1).encode()


def committed_report_bytes(get_bytes: Callable[[str], builtins.bytes]) -> builtins.bytes | None:
    """The report's bytes when its marker exists and names them (``get_bytes`` reads a file of
    the report's directory and raises ``FileNotFoundError`` for a missing one); None for no
    report, a half-written one, or one the marker does not describe."""
    try:
        marker = ReportMarker.model_validate_json(get_bytes(REPORT_MARKER_NAME))
        body = get_bytes(REPORT_NAME)
    except FileNotFoundError:
        return None
    return body if hashlib.sha256(body).hexdigest() == marker.sha256 else None


def flat_metrics(suites: Mapping[str, SuiteScores], preference: PreferenceScore | None = None) -> dict[str, float]:
    """``<suite>.<score>`` for every score that is defined, plus ``preference``."""
    out = {f"{s}.{m}": v for s, scores in suites.items() for m in SCORES if (v := scores.score(m)) is not None}
    if preference is not None and preference.score is not None:
        out[PREFERENCE] = preference.score
    return out


# ---------------------------------------------------------------------------------- the gate

class GateRule(BaseModel):
    """What one metric must show, as a gain of the candidate over the current model in the
    metric's own units (for ``perplexity``, the drop counts as the gain)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    min_gain: float | None = Field(default=None, alias="minGain",
                                   description="the candidate must gain at least this much")
    max_regression: float | None = Field(default=None, alias="maxRegression", ge=0,
                                         description="the candidate must not lose more than this")


class GateCheck(BaseModel):
    model_config = ConfigDict(frozen=True)
    metric: str
    candidate: float | None
    baseline: float | None
    gain: float | None
    passed: bool
    reason: str


class GateResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    passed: bool
    checks: list[GateCheck]

    @property
    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]


def check_rule_names(rules: Mapping[str, object]) -> None:
    """Raise ValueError naming a rule for an unknown metric."""
    for name in rules:
        if name not in METRICS:
            raise ValueError(f"evaluation gate: unknown metric {name!r}; known: {', '.join(METRICS)}")


def gain(metric: str, candidate: float, baseline: float) -> float:
    """The candidate's gain on ``metric``: positive is better."""
    return baseline - candidate if metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER else candidate - baseline


def gate(metrics: Mapping[str, float], baseline_metrics: Mapping[str, float],
         rules: Mapping[str, GateRule]) -> GateResult:
    """Every rule checked; a metric the report lacks fails its rule (a gate that cannot be
    checked does not pass). ``preference`` is already relative: its baseline is 0.5."""
    check_rule_names(rules)
    checks = []
    for name, rule in sorted(rules.items()):
        cand = metrics.get(name)
        base = PREFERENCE_NEUTRAL if name == PREFERENCE else baseline_metrics.get(name)
        if cand is None or base is None or not (math.isfinite(cand) and math.isfinite(base)):
            which = "candidate" if cand is None or not math.isfinite(cand) else "current model"
            checks.append(GateCheck(metric=name, candidate=cand, baseline=base, gain=None, passed=False,
                                    reason=f"{name}: no finite score for the {which}, so the rule cannot pass"))
            continue
        g = gain(name, cand, base)
        failed = []
        if rule.min_gain is not None and g < rule.min_gain:
            failed.append(f"gain {g:+.4g} is below minGain {rule.min_gain:g}")
        if rule.max_regression is not None and g < -rule.max_regression:
            failed.append(f"regression {-g:.4g} exceeds maxRegression {rule.max_regression:g}")
        reason = "; ".join(failed) if failed else f"gain {g:+.4g}"
        checks.append(GateCheck(metric=name, candidate=cand, baseline=base, gain=g, passed=not failed,
                                reason=f"{name}: {reason} (candidate {cand:.4g}, current {base:.4g})"))
    return GateResult(passed=all(c.passed for c in checks), checks=checks)


EvaluationReport.model_rebuild()
