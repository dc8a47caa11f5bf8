"""The evaluation gate the operator applies to a candidate's report: every score turned into a
gain the same way (perplexity's drop is its gain), a rule the report cannot satisfy fails, and
the report format round-trips."""

from __future__ import annotations

import pytest
from kubeforge.store.evaluation import (
    METRICS,
    EvaluationReport,
    GateRule,
    ModelRef,
    SuiteScores,
    cycle_dir_name,
    evaluation_prefix,
    flat_metrics,
    gain,
    gate,
    parse_cycle_dir,
)


def rule(**kw: float) -> GateRule:
    return GateRule.model_validate(kw)


def test_a_gain_is_positive_when_the_candidate_is_better() -> None:
    assert gain("eval.mean_logprob", -1.0, -2.0) == 1.0
    assert gain("golden.perplexity", 3.0, 5.0) == 2.0  # lower is better
    assert gain("golden.exact_match", 0.2, 0.5) == pytest.approx(-0.3)


def test_min_gain_and_max_regression() -> None:
    cand = {"eval.perplexity": 4.0, "golden.exact_match": 0.48, "preference": 0.7}
    base = {"eval.perplexity": 5.0, "golden.exact_match": 0.5}
    ok = gate(cand, base, {"eval.perplexity": rule(minGain=0.5), "golden.exact_match": rule(maxRegression=0.05),
                           "preference": rule(minGain=0.1)})
    assert ok.passed and [c.metric for c in ok.checks] == ["eval.perplexity", "golden.exact_match", "preference"]
    assert ok.checks[2].baseline == 0.5 and ok.checks[2].gain == pytest.approx(0.2)
    bad = gate(cand, base, {"eval.perplexity": rule(minGain=1.5), "golden.exact_match": rule(maxRegression=0.01)})
    assert not bad.passed
    reasons = [c.reason for c in bad.failures]
    assert reasons[0].startswith("eval.perplexity: gain +1 is below minGain 1.5")
    assert reasons[1].startswith("golden.exact_match: regression 0.02 exceeds maxRegression 0.01")


def test_a_rule_on_a_missing_or_non_finite_score_fails() -> None:
    res = gate({"eval.overlap": float("nan")}, {"golden.overlap": 0.3},
               {"eval.overlap": rule(maxRegression=1), "golden.overlap": rule(maxRegression=1)})
    assert not res.passed and len(res.failures) == 2
    assert "no finite score for the candidate" in res.failures[1].reason  # golden.overlap: candidate lacks it
    assert "cannot pass" in res.failures[0].reason


def test_unknown_metrics_and_negative_regressions_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown metric 'eval.bleu'"):
        gate({}, {}, {"eval.bleu": rule(minGain=0)})
    with pytest.raises(ValueError, match="maxRegression"):
        rule(maxRegression=-1)
    assert "preference" in METRICS and "golden.perplexity" in METRICS


def test_layout_names() -> None:
    assert evaluation_prefix("ns", "fw") == "ns/fw/evaluation"
    assert cycle_dir_name(3) == "cycle-0000000003" and parse_cycle_dir("cycle-0000000003") == 3
    assert parse_cycle_dir("v-0000000003") is None
    with pytest.raises(ValueError):
        cycle_dir_name(0)
    with pytest.raises(ValueError):
        evaluation_prefix("ns", "a/b")


def test_flat_metrics_leave_out_undefined_scores_and_the_report_round_trips() -> None:
    s = SuiteScores(records=2, tokens=10, mean_logprob=-1.5, perplexity=4.48, short_answers=0, exact_match=None,
                    overlap=None)
    metrics = flat_metrics({"eval": s})
    assert metrics == {"eval.mean_logprob": -1.5, "eval.perplexity": 4.48}
    report = EvaluationReport(time="t", candidate=ModelRef(uri="s3://b/x", revision=None), baseline=None,
                              dataset=None, dataset_version=None, golden="g", candidate_scores={"golden": s},
                              metrics=metrics, gate=gate(metrics, {}, {}), seconds=1.0)
    assert EvaluationReport.model_validate_json(report.to_json()) == report
