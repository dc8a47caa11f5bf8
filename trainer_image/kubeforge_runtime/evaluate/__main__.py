"""``python -m kubeforge_runtime.evaluate``: score a candidate model against the current one and
write a report with its marker.

    --model URI            the candidate: an export (s3://.../export, a path) or a Hugging Face directory
    --baseline URI         the current (stable) model, scored the same way; needed for ``preference``
    --dataset URI          a Dataset's directory (.../<dataset>/dataset): its version's eval split is scored
    --dataset-version N    default: the newest committed version
    --golden URI           the user's fixed set: a .jsonl or .tar of {prompt or messages, reference}
    --output URI           the report's directory (.../<flywheel>/evaluation/cycle-<N>)
    --settings DOC         JSON (camelCase, ``settings.py``) or @file; default: every default
    --s3-endpoint U        S3 endpoint (else $AWS_ENDPOINT_URL); credentials from AWS_* as for the trainer
    --device D             cuda, cuda:N or cpu (auto: cuda when available; bfloat16 there)

At least one of --dataset and --golden. Exit codes: 0 the report is committed (or already was:
nothing is rewritten) and printed as one JSON line on stdout, whether or not the candidate
passed the gate (``gate.passed`` says); 78 the arguments, settings, a model or an input cannot
work (missing, uncommitted, corrupt, a malformed record: never retried); 1 anything else, e.g.
a store unreachable after retries (retrying may help).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from kubeforge.api.contract import ExitCode
from kubeforge.store.backends import NotFound
from kubeforge.store.evaluation import (
    REPORT_MARKER_NAME,
    REPORT_NAME,
    EvaluationReport,
    ModelRef,
    ReportMarker,
    SuiteScores,
    committed_report_bytes,
    flat_metrics,
    gate,
)
from kubeforge.store.flywheel import EVAL_SPLIT, VERSION_MARKER_NAME, DatasetMarker, version_dir_name
from kubeforge.store.layout import MARKER_NAME, ExportMarker, file_digest, utc_now

from kubeforge_runtime.cli import SettingsError, local_path, open_uri, run_step, s3_options
from kubeforge_runtime.curate.version import committed_versions
from kubeforge_runtime.data.sft import SFTRecord, read_records
from kubeforge_runtime.data.sources import SourceFile
from kubeforge_runtime.evaluate.scoring import ScoredModel, preference, suite_scores
from kubeforge_runtime.evaluate.settings import EvaluationSettings, parse_settings
from kubeforge_runtime.serve.model_source import ModelSourceError, fetch_model

log = logging.getLogger("kubeforge.evaluate")


class InputError(ValueError):
    """An input cannot be evaluated; the message names it."""


def _split_uri(uri: str) -> tuple[str, str]:
    """(directory URI, file name) of a file's URI."""
    head, _, name = uri.rstrip("/").rpartition("/")
    if not name or not head:
        raise InputError(f"{uri!r} does not name a file")
    return head, name


def fetch_golden(uri: str, tmp: Path, endpoint: str | None, env: Mapping[str, str]) -> Path:
    if not uri.endswith((".jsonl", ".json", ".tar")):
        raise InputError(f"--golden {uri}: the golden set must be a .jsonl or .tar file")
    path = local_path(uri)
    if path is not None:
        if not path.is_file():
            raise InputError(f"--golden {uri}: no such file")
        return path
    head, name = _split_uri(uri)
    dest = tmp / f"golden-{name}"
    try:
        open_uri(head, endpoint, env).get_file(name, dest)
    except NotFound:
        raise InputError(f"--golden {uri}: no such object") from None
    return dest


def fetch_eval_split(uri: str, version: int | None, tmp: Path, endpoint: str | None,
                     env: Mapping[str, str]) -> tuple[int, Path]:
    """The committed version's eval split, checked against the version's marker."""
    path = local_path(uri)
    if path is not None and not path.is_dir():
        raise InputError(f"--dataset {uri}: no such directory")
    backend = open_uri(uri, endpoint, env)
    committed = committed_versions(backend)
    if not committed:
        raise InputError(f"--dataset {uri}: no committed version")
    if version is None:
        version = committed[-1]
    elif version not in committed:
        raise InputError(f"--dataset-version {version}: not a committed version of {uri} "
                         f"(committed: {', '.join(map(str, committed[-5:]))})")
    vdir = version_dir_name(version)
    marker = DatasetMarker.model_validate_json(backend.get_bytes(f"{vdir}/{VERSION_MARKER_NAME}"))
    dest = tmp / f"v{version}-{EVAL_SPLIT}"
    backend.get_file(f"{vdir}/{EVAL_SPLIT}", dest)
    digest = marker.files.get(EVAL_SPLIT)
    if digest is None or file_digest(dest) != digest:
        raise InputError(f"--dataset {uri}: {vdir}/{EVAL_SPLIT} does not match the version's commit marker")
    return version, dest


def load_records(path: Path, limit: int, target_field: str) -> list[SFTRecord]:
    out: list[SFTRecord] = []
    for _, rec in read_records(SourceFile(str(path), "sft"), target_field=target_field):
        if len(out) == limit:
            break
        out.append(rec)
    return out


def export_revision(uri: str, local: Path, endpoint: str | None, env: Mapping[str, str]) -> str | None:
    """The export's commit-marker time (what the server reports as the served revision)."""
    if (local / MARKER_NAME).is_file():
        return ExportMarker.model_validate_json((local / MARKER_NAME).read_bytes()).time
    if urlparse(uri).scheme == "s3":
        try:
            return ExportMarker.model_validate_json(open_uri(uri, endpoint, env).get_bytes(MARKER_NAME)).time
        except NotFound:
            return None
    return None


def read_committed_report(uri: str, endpoint: str | None, env: Mapping[str, str]) -> bytes | None:
    path = local_path(uri)
    if path is not None and not path.is_dir():
        return None
    return committed_report_bytes(open_uri(uri, endpoint, env).get_bytes)


def score(m: ScoredModel, suites: Mapping[str, list[SFTRecord]],
          settings: EvaluationSettings) -> tuple[dict[str, SuiteScores], dict[str, list[str]]]:
    scores, answers = {}, {}
    for name, records in suites.items():
        t0 = time.perf_counter()
        logprobs = m.reference_logprobs(records, settings.batch_size)
        answers[name] = m.greedy_answers(records, settings.max_new_tokens, settings.batch_size)
        scores[name] = suite_scores(logprobs, answers[name], records, settings.short_answer_words)
        log.info("%s: %d records in %.2fs: %s", name, len(records), time.perf_counter() - t0,
                 scores[name].model_dump_json())
    return scores, answers


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    return run_step(run, argv, env)


def run(argv: list[str] | None, env: Mapping[str, str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubeforge_runtime.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the candidate model: export or Hugging Face directory URI")
    ap.add_argument("--baseline", default=None, help="the current model, scored side by side")
    ap.add_argument("--dataset", default=None, help="a Dataset's directory URI: its eval split is scored")
    ap.add_argument("--dataset-version", type=int, default=None, help="default: newest committed")
    ap.add_argument("--golden", default=None, help="golden set file URI (.jsonl or .tar)")
    ap.add_argument("--output", required=True, help="report directory URI")
    ap.add_argument("--settings", default=None, help="evaluation settings: JSON, or @file")
    ap.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    ap.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda when available)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    ep = args.s3_endpoint
    try:
        settings = parse_settings(args.settings)
        if args.dataset is None and args.golden is None:
            raise SettingsError("give --dataset (its eval split) or --golden (a golden set), or both")
        if "preference" in settings.gate and (args.baseline is None or args.dataset is None):
            raise SettingsError("gate.preference needs --baseline and --dataset (it compares both models' "
                                "answers to the eval split's preferred targets)")
        if settings.gate and args.baseline is None and any(k != "preference" for k in settings.gate):
            raise SettingsError("gate: a rule compares the candidate with the current model; give --baseline")
    except SettingsError as e:
        print(f"kubeforge: configuration error: {e}", file=sys.stderr, flush=True)
        return int(ExitCode.CONFIG_ERROR)

    done = read_committed_report(args.output, ep, env)
    if done is not None:  # a rerun of an evaluation that committed (its pod restarted)
        report = EvaluationReport.model_validate_json(done)
        asked: dict[str, object] = {"model": args.model, "baseline": args.baseline, "dataset": args.dataset, "golden": args.golden,
                 "settings": settings.as_document()}
        found: dict[str, object] = {"model": report.candidate.uri, "baseline": report.baseline.uri if report.baseline else None,
                 "dataset": report.dataset, "golden": report.golden, "settings": report.settings}
        if args.dataset_version is not None and args.dataset_version != report.dataset_version:
            asked["datasetVersion"], found["datasetVersion"] = args.dataset_version, report.dataset_version
        differ = sorted(k for k in asked if asked[k] != found.get(k))
        if differ:
            print(f"kubeforge: configuration error: --output {args.output} holds a committed report of other "
                  f"inputs ({', '.join(f'{k}: {found.get(k)!r}, asked {asked[k]!r}' for k in differ)}); give each "
                  "evaluation its own output", file=sys.stderr, flush=True)
            return int(ExitCode.CONFIG_ERROR)
        log.info("%s already holds a committed report of these inputs: nothing rewritten", args.output)
        print(report.model_dump_json(), flush=True)
        return int(ExitCode.SUCCESS)

    t0 = time.perf_counter()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory(prefix="kubeforge-evaluate-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            suites: dict[str, list[SFTRecord]] = {}
            version = None
            if args.dataset is not None:
                version, split = fetch_eval_split(args.dataset, args.dataset_version, tmp, ep, env)
                suites["eval"] = load_records(split, settings.max_records, "target")
                if not suites["eval"]:
                    raise InputError(f"--dataset {args.dataset}: version {version}'s eval split is empty")
            if args.golden is not None:
                suites["golden"] = load_records(fetch_golden(args.golden, tmp, ep, env), settings.max_records,
                                                "reference")
                if not suites["golden"]:
                    raise InputError(f"--golden {args.golden}: no record")
            refs, models = {}, {}
            for role, uri in (("candidate", args.model), ("baseline", args.baseline)):
                if uri is not None:
                    local = fetch_model(uri, tmp / role, options=s3_options(ep, env))
                    refs[role] = ModelRef(uri=uri, revision=export_revision(uri, local, ep, env))
                    models[role] = ScoredModel.load(local, device)
        except (InputError, ModelSourceError, ValueError, FileNotFoundError) as e:
            print(f"kubeforge: configuration error: {e}", file=sys.stderr, flush=True)
            return int(ExitCode.CONFIG_ERROR)

        cand_scores, cand_answers = score(models["candidate"], suites, settings)
        base_scores: dict[str, SuiteScores] = {}
        pref = None
        if "baseline" in models:
            base_scores, base_answers = score(models["baseline"], suites, settings)
            if "eval" in suites:
                pref = preference(cand_answers["eval"], base_answers["eval"], [r.target for r in suites["eval"]],
                                  settings.tie_margin)
    metrics = flat_metrics(cand_scores, pref)
    base_metrics = flat_metrics(base_scores)
    report = EvaluationReport(
        time=utc_now(), candidate=refs["candidate"], baseline=refs.get("baseline"),
        dataset=args.dataset, dataset_version=version, golden=args.golden, settings=settings.as_document(),
        candidate_scores=cand_scores, baseline_scores=base_scores, preference=pref, metrics=metrics,
        baseline_metrics=base_metrics,
        gate=gate(metrics, base_metrics, settings.gate) if settings.gate else None,
        seconds=round(time.perf_counter() - t0, 3))
    body = report.to_json()
    out = open_uri(args.output, ep, env)
    out.put_bytes(REPORT_NAME, body)
    out.put_bytes(REPORT_MARKER_NAME, ReportMarker(time=utc_now(), bytes=len(body),
                                                   sha256=hashlib.sha256(body).hexdigest()).to_json())
    if report.gate is not None:
        for c in report.gate.checks:
            log.info("gate %s: %s", "pass" if c.passed else "FAIL", c.reason)
    log.info("committed %s/%s in %.1fs", args.output, REPORT_NAME, report.seconds)
    print(report.model_dump_json(), flush=True)
    return int(ExitCode.SUCCESS)


if __name__ == "__main__":
    sys.exit(main())
