"""Offline evaluation (``python -m kubeforge_runtime.evaluate``): a candidate fine-tuned on the
feedback-preferred answers scores better than the model it started from on every score, the
gate passes it and fails the reverse, the log-likelihood is the trainer's own loss, reports are
committed with a marker and never rewritten, and bad input is refused naming what is wrong."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from kubeforge.store import open_store
from kubeforge.store.backends import FileBackend
from kubeforge.store.evaluation import REPORT_MARKER_NAME, REPORT_NAME, EvaluationReport, ReportMarker
from kubeforge.store.flywheel import EVAL_SPLIT, version_dir_name
from kubeforge.store.layout import EXPORT_PENDING_NAME
from kubeforge_runtime.curate.version import write_version
from kubeforge_runtime.data.sft import PromptEncoder, SFTRecord, build_sample
from kubeforge_runtime.evaluate.__main__ import main
from kubeforge_runtime.evaluate.scoring import ScoredModel, preference
from kubeforge_runtime.evaluate.text import exact_match, normalise, overlap
from kubeforge_runtime.model.hf import save_hf
from kubeforge_runtime.model.llama import Llama
from kubeforge_runtime.model.shape import preset
from kubeforge_runtime.tokenizer import ByteTokenizer
from kubeforge_runtime.train.loop import token_loss_sum

pytestmark = pytest.mark.runtime
TOK = ByteTokenizer()
NAMES = ["Ada", "Boris", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kira", "Lars"]


def record(i: int, name: str) -> dict[str, Any]:
    """The users' preferred style: a fixed greeting frame around the prompt's name."""
    if i % 3 == 0:
        return {"id": f"r{i}", "prompt": None, "messages": [{"role": "user", "content": f"greet {name}"}],
                "target": f"Hello, {name}!", "source": f"r{i}", "rating": 1, "corrected": False}
    return {"id": f"r{i}", "prompt": f"Name: {name}. Greet them.", "messages": None,
            "target": f"Hello, {name}!", "source": f"r{i}", "rating": 1, "corrected": True}


def train(model: Llama, records: list[dict[str, Any]], steps: int) -> None:
    enc = PromptEncoder(TOK)
    recs = [SFTRecord.parse(r, r["id"]) for r in records]
    samples = [build_sample(enc.ids(r), TOK.encode(r.target), bos=TOK.bos_id, eos=TOK.eos_id, pad=TOK.pad_id,
                            sample_len=48) for r in recs]
    tokens = torch.tensor([s.tokens for s in samples])
    mask = torch.tensor([s.loss_mask for s in samples])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = token_loss_sum(model(tokens[:, :-1]), tokens[:, 1:], mask) / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def flywheel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base model, a candidate fine-tuned from it on the preferred answers, a committed
    dataset version whose eval split holds names the candidate never saw, and a golden set."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    base = Llama(preset("tiny", max_position_embeddings=128))
    base.init_weights(3)
    save_hf(base, root / "base", bos_token_id=TOK.bos_id, eos_token_id=TOK.eos_id)
    cand = Llama(preset("tiny", max_position_embeddings=128))
    cand.load_state_dict(base.state_dict())
    train(cand, [record(i, n) for i, n in enumerate(NAMES[:9] * 2)], steps=150)
    save_hf(cand, root / "candidate", bos_token_id=TOK.bos_id, eos_token_id=TOK.eos_id)
    evals = [record(100 + i, n) for i, n in enumerate(NAMES[9:] * 2)]
    write_version(FileBackend(root / "dataset"), 1, [record(i, n) for i, n in enumerate(NAMES[:9])], evals, {
        "source": "file:///capture", "source_shards": [], "window_start": None, "window_end": None,
        "filters": [], "dedup_ratio": 0.0})
    (root / "golden.jsonl").write_text("".join(
        json.dumps({"prompt": f"Name: {n}. Greet them.", "reference": f"Hello, {n}!"}) + "\n" for n in NAMES[9:]))
    return {"root": root, "base": root / "base", "candidate": root / "candidate", "dataset": root / "dataset",
            "golden": root / "golden.jsonl"}


def evaluate(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, EvaluationReport | None, str]:
    rc = main([str(a) for a in args], env={})
    out, err = capsys.readouterr()
    line = out.strip().splitlines()[-1] if out.strip() else ""
    return rc, EvaluationReport.model_validate_json(line) if rc == 0 else None, err


GATE = json.dumps({"gate": {"eval.mean_logprob": {"minGain": 0.5}, "golden.exact_match": {"maxRegression": 0},
                            "eval.perplexity": {"maxRegression": 0}, "preference": {"minGain": 0.2}}})


def test_a_candidate_trained_on_the_preferred_answers_wins_on_every_score_and_passes_its_gate(
        flywheel: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cycle-1"
    rc, report, err = evaluate(capsys, "--model", flywheel["candidate"], "--baseline", flywheel["base"],
                               "--dataset", flywheel["dataset"].as_uri(), "--golden", flywheel["golden"],
                               "--output", out.as_uri(), "--settings", GATE)
    assert rc == 0, err
    assert report is not None and report.dataset_version == 1
    c, b = report.candidate_scores, report.baseline_scores
    assert c["eval"].records == 6 and c["golden"].records == 3 and c["eval"].short_answers == 6
    assert c["eval"].mean_logprob is not None and b["eval"].mean_logprob is not None
    assert c["eval"].mean_logprob > b["eval"].mean_logprob + 1.0
    assert report.metrics["eval.perplexity"] < report.baseline_metrics["eval.perplexity"]
    # names it never saw in training: the frame is learnt, so overlap is high, exact match for some
    assert report.metrics["eval.overlap"] >= 0.5 > report.baseline_metrics["eval.overlap"]
    assert report.baseline_metrics["golden.exact_match"] == 0.0
    assert report.preference is not None and report.preference.pairs == 6
    assert report.preference.wins >= 4 and report.preference.losses == 0
    assert report.gate is not None and report.gate.passed, report.gate
    assert {ch.metric for ch in report.gate.checks} == {"eval.mean_logprob", "golden.exact_match",
                                                        "eval.perplexity", "preference"}
    # the marker is written last and holds the report's digest
    body = (out / REPORT_NAME).read_bytes()
    marker = ReportMarker.model_validate_json((out / REPORT_MARKER_NAME).read_bytes())
    assert marker.sha256 == hashlib.sha256(body).hexdigest() and marker.bytes == len(body)
    assert EvaluationReport.model_validate_json(body) == report


def test_the_reverse_fails_the_gate_naming_each_metric(flywheel: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kubeforge.evaluate")
    rc, report, err = evaluate(capsys, "--model", flywheel["base"], "--baseline", flywheel["candidate"],
                               "--dataset", flywheel["dataset"], "--golden", flywheel["golden"],
                               "--output", tmp_path / "r", "--settings", GATE)
    assert rc == 0, err  # a failed gate is a result, not a failure of the step
    assert report is not None and report.gate is not None and not report.gate.passed
    failed = {c.metric: c.reason for c in report.gate.failures}
    assert set(failed) >= {"eval.mean_logprob", "eval.perplexity", "preference"}
    assert "below minGain 0.5" in failed["eval.mean_logprob"]
    assert "exceeds maxRegression 0" in failed["eval.perplexity"]
    assert report.preference is not None and report.preference.score is not None and report.preference.score < 0.5
    assert any(r.getMessage().startswith("gate FAIL: eval.mean_logprob: gain") for r in caplog.records)


def test_the_mean_logprob_is_the_trainers_loss_on_the_same_records(flywheel: dict[str, Path]) -> None:
    m = ScoredModel.load(flywheel["candidate"], torch.device("cpu"))
    recs = [SFTRecord.parse(record(i, n), "r") for i, n in enumerate(NAMES)]
    got = m.reference_logprobs(recs, batch_size=5)
    enc = PromptEncoder(TOK)
    for r, (logp, n) in zip(recs, got, strict=True):
        s = build_sample(enc.ids(r), TOK.encode(r.target), bos=TOK.bos_id, eos=TOK.eos_id, pad=TOK.pad_id,
                         sample_len=64)
        tokens, mask = torch.tensor([s.tokens]), torch.tensor([s.loss_mask])
        with torch.inference_mode():
            loss = token_loss_sum(m.model(tokens[:, :-1]), tokens[:, 1:], mask).item()
        assert n == len(TOK.encode(r.target)) + 1  # the target and its eos
        assert logp == pytest.approx(-loss, rel=1e-4, abs=1e-4)


def test_a_committed_report_is_not_rewritten(flywheel: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kubeforge.evaluate")
    out = tmp_path / "cycle-2"
    rc, first, err = evaluate(capsys, "--model", flywheel["candidate"], "--golden", flywheel["golden"], "--output", out)
    assert rc == 0 and first is not None, err
    assert first.baseline is None and first.preference is None and "eval" not in first.candidate_scores
    before = (out / REPORT_NAME).stat().st_mtime_ns
    rc, again, err = evaluate(capsys, "--model", flywheel["candidate"], "--golden", flywheel["golden"], "--output", out)
    assert rc == 0 and again == first and "nothing rewritten" in caplog.text
    assert (out / REPORT_NAME).stat().st_mtime_ns == before
    # the same output for another candidate is refused: its report would be the first one's
    rc, _, err = evaluate(capsys, "--model", flywheel["base"], "--golden", flywheel["golden"], "--output", out)
    assert rc == 78 and "holds a committed report of other inputs (model:" in err, err
    assert (out / REPORT_NAME).stat().st_mtime_ns == before
    # a report without its marker is not a report: the rerun scores and commits
    (out / REPORT_MARKER_NAME).unlink()
    rc, third, err = evaluate(capsys, "--model", flywheel["base"], "--golden", flywheel["golden"], "--output", out)
    assert rc == 0 and third is not None and third.candidate.uri == str(flywheel["base"])


def test_the_export_revision_is_reported(flywheel: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store((tmp_path / "store").as_uri())
    marker = store.write_export("ns", "job", flywheel["candidate"], step=7)
    rc, report, err = evaluate(capsys, "--model", store.export_uri("ns", "job"), "--golden", flywheel["golden"],
                               "--output", tmp_path / "out")
    assert rc == 0 and report is not None, err
    assert report.candidate.revision == marker.time


@pytest.mark.parametrize(("change", "needle"), [
    (lambda p: ["--settings", '{"maxRecord": 3}'], "maxRecord: unknown key"),
    (lambda p: ["--settings", '{"gate": {"eval.bleu": {"minGain": 1}}}'], "unknown metric 'eval.bleu'"),
    (lambda p: ["--settings", '{"gate": {"preference": {"maxRegression": -1}}}'], "gate.preference.maxRegression"),
    (lambda p: ["--settings", '{"gate": {"preference": {"minGain": 0}}}', "--no-baseline"], "needs --baseline"),
    (lambda p: ["--no-dataset", "--no-golden"], "give --dataset"),
    (lambda p: ["--dataset", str(p["root"] / "nothing")], "no such directory"),
    (lambda p: ["--dataset-version", "2"], "--dataset-version 2: not a committed version"),
    (lambda p: ["--golden", str(p["root"] / "golden.csv")], "must be a .jsonl or .tar"),
    (lambda p: ["--golden", str(p["bad_golden"])], "needs a string field 'reference'"),
    (lambda p: ["--model", str(p["pending"])], "export-pending.json"),
    (lambda p: ["--dataset", str(p["tampered"])], "does not match the version's commit marker"),
])
def test_bad_input_is_a_configuration_error_naming_it(flywheel: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str], change: Any,
                                                      needle: str) -> None:
    paths = dict(flywheel)
    paths["bad_golden"] = tmp_path / "bad.jsonl"
    paths["bad_golden"].write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    paths["pending"] = tmp_path / "pending"
    paths["pending"].mkdir()
    (paths["pending"] / "config.json").write_text("{}")
    (paths["pending"] / EXPORT_PENDING_NAME).write_text("{}")
    paths["tampered"] = tmp_path / "tampered"
    write_version(FileBackend(paths["tampered"]), 1, [record(0, "Ada")], [record(1, "Boris")], {
        "source": "x", "source_shards": [], "window_start": None, "window_end": None, "filters": [],
        "dedup_ratio": 0.0})
    with open(paths["tampered"] / version_dir_name(1) / EVAL_SPLIT, "ab") as f:
        f.write(b"\0" * 512)
    opts = {"--model": str(flywheel["candidate"]), "--baseline": str(flywheel["base"]),
            "--dataset": str(flywheel["dataset"]), "--golden": str(flywheel["golden"])}
    extra = change(paths)
    for flag in [a for a in extra if a.startswith("--no-")]:
        opts.pop("--" + flag.removeprefix("--no-"))
    extra = [a for a in extra if not a.startswith("--no-")]
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        opts[flag] = value
    out = tmp_path / "out"
    rc, _, err = evaluate(capsys, *[x for kv in opts.items() for x in kv], "--output", out)
    assert rc == 78 and "configuration error" in err and needle in err, err
    assert not (out / REPORT_MARKER_NAME).exists()


def test_evaluation_on_s3(flywheel: dict[str, Path], tmp_path: Path, s3_server: Any,
                          capsys: pytest.CaptureFixture[str]) -> None:
    root = s3_server.uri(f"evaluate/{tmp_path.name}")
    store = open_store(root, **s3_server.store_options()).backend
    for path in sorted(flywheel["dataset"].rglob("*")):
        if path.is_file():
            store.put_file(f"ds/dataset/{path.relative_to(flywheel['dataset'])}", path)
    store.put_file("golden/set.jsonl", flywheel["golden"])
    for path in sorted(flywheel["candidate"].iterdir()):  # the model from S3 too, by --s3-endpoint alone
        store.put_file(f"models/candidate/{path.name}", path)
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "AWS_REGION": s3_server.region}
    rc = main(["--model", f"{root}/models/candidate", "--dataset", f"{root}/ds/dataset", "--golden",
               f"{root}/golden/set.jsonl", "--output", f"{root}/fw/evaluation/{version_dir_name(1)}",
               "--s3-endpoint", s3_server.endpoint], env=env)
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = EvaluationReport.model_validate_json(out.strip().splitlines()[-1])
    assert report.candidate_scores["golden"].records == 3 and report.dataset_version == 1
    body = store.get_bytes(f"fw/evaluation/{version_dir_name(1)}/{REPORT_NAME}")
    assert EvaluationReport.model_validate_json(body) == report


def test_normalised_exact_match_and_overlap() -> None:
    assert normalise("  The  Answer, is: 42! ") == "answer is 42"
    assert exact_match("the Paris.", "Paris") and not exact_match("Paris, France", "Paris")
    assert overlap("Paris France", "Paris") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert overlap("", "") == 1.0 and overlap("x", "") == 0.0 and overlap("a b", "c d") == 0.0
    assert math.isclose(overlap("hello world", "world hello"), 1.0)


def test_preference_counts_wins_ties_and_losses() -> None:
    p = preference(["Hello, Ada!", "Hi", "x", "same"], ["Hi", "Hello, Bo!", "x", "same"],
                   ["Hello, Ada!", "Hello, Bo!", "Hello, Cy!", "same"], tie_margin=0.0)
    assert (p.pairs, p.wins, p.losses, p.ties) == (4, 1, 1, 2) and p.score == 0.5
    assert preference([], [], [], 0.0).score is None
