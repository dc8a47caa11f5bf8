"""``python -m kubeforge_runtime.curate``: curate a capture directory into a dataset version.

    --source URI     the capture dir: s3://bucket/prefix/<ns>/<service>/capture or file:///...
    --output URI     the dataset dir: s3://bucket/prefix/<ns>/<dataset>/dataset or file:///...
    --settings DOC   JSON (Dataset.spec.curation, camelCase) or @file; default: every default
    --version N      the version to write; default 1 + the newest committed one
    --s3-endpoint U  S3 endpoint (else $AWS_ENDPOINT_URL); credentials from AWS_* as for the trainer

Exit codes: 0 a version is committed (or ``--version`` names one already committed: nothing is
rewritten) and its manifest is printed as one JSON line on stdout; 3 the source has no committed
request record (nothing is written); 78 the settings or arguments cannot work (never retried);
1 anything else, e.g. a store unreachable after retries (retrying may help).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Mapping

from kubeforge.api.contract import ExitCode

from kubeforge_runtime.cli import SettingsError, local_path, open_uri, run_step
from kubeforge_runtime.curate.pipeline import curate
from kubeforge_runtime.curate.settings import parse_settings
from kubeforge_runtime.curate.source import read_capture
from kubeforge_runtime.curate.version import committed_versions, read_manifest, write_version

log = logging.getLogger("kubeforge.curate")
SOURCE_EMPTY = 3


def _missing_dir(uri: str) -> bool:
    """A file:// source that does not exist is empty (opening it would create it)."""
    path = local_path(uri)
    return path is not None and not path.exists()


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    return run_step(run, argv, env)


def run(argv: list[str] | None, env: Mapping[str, str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubeforge_runtime.curate", description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="capture directory URI (s3:// or file://)")
    ap.add_argument("--output", required=True, help="dataset directory URI (s3:// or file://)")
    ap.add_argument("--settings", default=None, help="curation settings: JSON, or @file")
    ap.add_argument("--version", type=int, default=None, help="version to write (default: 1 + newest committed)")
    ap.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        settings = parse_settings(args.settings)
        if args.version is not None and args.version < 1:
            raise SettingsError(f"--version must be at least 1, got {args.version}")
    except SettingsError as e:
        print(f"kubeforge: configuration error: {e}", file=sys.stderr, flush=True)
        return int(ExitCode.CONFIG_ERROR)

    t0 = time.perf_counter()
    out = open_uri(args.output, args.s3_endpoint, env) if not _missing_dir(args.output) else None
    committed = committed_versions(out) if out is not None else []
    if args.version is not None and args.version in committed and out is not None:
        # a rerun of a curation that committed (its pod restarted): the version stands as it is
        manifest = read_manifest(out, args.version)
        log.info("version %d is already committed: nothing rewritten", args.version)
        if manifest is not None:
            print(manifest.model_dump_json(), flush=True)
        return int(ExitCode.SUCCESS)
    newest = committed[-1] if committed else 0
    version = args.version if args.version is not None else newest + 1
    if version <= newest:
        print(f"kubeforge: configuration error: --version {version} is not after the newest committed "
              f"version {newest}", file=sys.stderr, flush=True)
        return int(ExitCode.CONFIG_ERROR)

    source = None if _missing_dir(args.source) else read_capture(open_uri(args.source, args.s3_endpoint, env))
    if source is None or not source.requests:
        why = "" if source is None or not source.skipped else f" ({len(source.skipped)} shards skipped: " + \
            "; ".join(source.skipped[:5]) + ")"
        print(f"kubeforge: source empty: no committed request records under {args.source}{why}",
              file=sys.stderr, flush=True)
        return SOURCE_EMPTY
    for s in source.skipped:
        log.warning("skipped %s", s)
    curated = curate(source.requests, source.feedback, settings)
    t_curate = time.perf_counter() - t0
    if out is None:
        out = open_uri(args.output, args.s3_endpoint, env)
    manifest = write_version(out, version, curated.train, curated.eval, {
        "source": args.source, "source_shards": source.shards, "skipped_shards": source.skipped,
        "window_start": curated.window_start, "window_end": curated.window_end, "filters": curated.filters,
        "dedup_ratio": curated.dedup_ratio, "settings": settings.as_document(), "redacted": curated.redacted,
        "feedback": curated.feedback})
    log.info("committed version %d: %s records, curated in %.2fs, written in %.2fs", version, manifest.records,
             t_curate, time.perf_counter() - t0 - t_curate)
    print(manifest.model_dump_json(), flush=True)
    return int(ExitCode.SUCCESS)


if __name__ == "__main__":
    sys.exit(main())
