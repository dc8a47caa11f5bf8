"""``python -m kubeforge.store.inspector``: one retention-and-report pass over a store, run in
the short-lived pod the operator starts for a CheckpointPolicy whose storage is a volume.

The operator cannot mount a PersistentVolumeClaim, so it mounts the claim in this pod (the
workload image, which carries ``kubeforge.store``) and reads the result back from the pod's
termination message: one JSON object, ``{"jobs": [...], "deleted": {job: [steps]},
"deletedCount": {job: n}}`` on success, ``{"error": "..."}`` with exit code 1 when the store
cannot be read. The message is also printed on stdout.

A termination message holds at most 4096 bytes, so the message leaves out what the operator
can derive (checkpoint and export URIs), lists at most 20 deleted steps per job, and when the
summaries still do not fit keeps the first job entries whole and says ``"truncated": <number
left out>`` (the operator keeps its previous entries for those jobs and says so).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kubeforge.store.backends import StoreError
from kubeforge.store.layout import parse_run_key
from kubeforge.store.report import JobRef, RetentionRule, inspect_store
from kubeforge.store.store import open_store

#: The kubelet keeps at most this many bytes of a termination message.
MESSAGE_LIMIT = 4096
DEFAULT_MESSAGE_FILE = "/dev/termination-log"


def parse_jobs(raw: str) -> list[JobRef]:
    """``[{"name": "a", "lastStep": 40, "run": "a/runs/<uid>"}, ...]`` → JobRefs (``run`` absent:
    the legacy run ``<name>``); a clear error naming what is wrong."""
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"--jobs: not JSON: {e}") from e
    if not isinstance(items, list):
        raise ValueError("--jobs: must be a JSON list of {name, lastStep}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise ValueError(f"--jobs[{i}]: needs a non-empty string 'name'")
        last = item.get("lastStep")
        if last is not None and (not isinstance(last, int) or isinstance(last, bool) or last < 0):
            raise ValueError(f"--jobs[{i}].lastStep: must be a non-negative integer")
        run = item.get("run")
        if run is not None:
            try:
                if not isinstance(run, str) or parse_run_key(run)[0] != item["name"]:
                    raise ValueError(f"the run of job {item['name']!r} must be {item['name']}/runs/<uid>")
            except ValueError as e:
                raise ValueError(f"--jobs[{i}].run: {e}") from e
        out.append(JobRef(item["name"], last, run))
    return out


#: Steps listed per job in ``deleted``; ``deletedCount`` always has the full number.
MAX_DELETED_LISTED = 20
#: Left out of the message: the operator derives them from the policy's storage and the layout.
DERIVED_KEYS = ("newestUri", "exportUri")


def fit_message(result: dict[str, Any], limit: int = MESSAGE_LIMIT) -> str:
    """Compact JSON of ``result`` within ``limit`` bytes: URIs left out, at most
    ``MAX_DELETED_LISTED`` deleted steps listed per job (``deletedCount`` has them all), then
    job entries dropped from the end when still needed (``truncated`` counts them)."""
    if "error" in result:
        return json.dumps({"error": str(result["error"])[:limit - 64]}, separators=(",", ":"))
    deleted: dict[str, list[int]] = result.get("deleted", {})
    base = {**result, "deleted": {k: sorted(v)[:MAX_DELETED_LISTED] for k, v in deleted.items()},
            "deletedCount": {k: len(v) for k, v in deleted.items()}}
    jobs = [{k: v for k, v in j.items() if k not in DERIVED_KEYS} for j in result.get("jobs", [])]
    dropped = 0
    while True:
        body = {**base, "jobs": jobs}
        if dropped:
            kept = {j["name"] for j in jobs}
            body["truncated"] = dropped
            # what retention deleted is reported for every job, listed or not
            body["deleted"] = {k: v if k in kept else [] for k, v in base["deleted"].items()}
        text = json.dumps(body, separators=(",", ":"), sort_keys=True)
        if len(text.encode()) <= limit or not jobs:
            return text
        jobs.pop()
        dropped += 1


def run(store_uri: str, namespace: str, jobs: list[JobRef], retention: RetentionRule | None) -> dict[str, Any]:
    root = Path(store_uri.removeprefix("file://")) if store_uri.startswith("file://") else None
    if root is not None and not root.exists():
        # the claim is mounted but no job has written under the policy's path yet
        if not root.parent.exists():
            raise StoreError(f"{store_uri}: the volume is not mounted at {root.parent}")
        return {"jobs": [{"name": j.name, "committed": 0, "bytes": 0} for j in jobs], "deleted": {},
                "note": f"{store_uri} does not exist yet"}
    store = open_store(store_uri)
    store.check()
    return inspect_store(store, namespace, jobs, retention).dump()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubeforge.store.inspector", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="store root, e.g. file:///mnt/checkpoints/team-a")
    ap.add_argument("--namespace", required=True, help="namespace of the TrainingJobs")
    ap.add_argument("--jobs", default="[]", help='JSON list: [{"name": "job", "lastStep": 40, "run": "job/runs/<uid>"}]')
    ap.add_argument("--keep-last", type=int, default=None, help="apply retention: keep the K newest")
    ap.add_argument("--keep-every", type=int, default=None, help="and every M-th step")
    ap.add_argument("--incomplete-grace-seconds", type=float, default=3600.0)
    ap.add_argument("--message-file", default=DEFAULT_MESSAGE_FILE,
                    help="where the result goes (the container's terminationMessagePath)")
    args = ap.parse_args(argv)
    code = 0
    try:
        jobs = parse_jobs(args.jobs)
        retention = None if args.keep_last is None else RetentionRule(args.keep_last, args.keep_every,
                                                                      args.incomplete_grace_seconds)
        result = run(args.store, args.namespace, jobs, retention)
    except (StoreError, ValueError, OSError) as e:
        result, code = {"error": f"{type(e).__name__}: {e}"}, 1
    message = fit_message(result)
    print(message, flush=True)
    try:
        Path(args.message_file).write_text(message)
    except OSError as e:
        print(f"cannot write the termination message to {args.message_file}: {e}", file=sys.stderr)
        code = code or 2
    return code


if __name__ == "__main__":
    sys.exit(main())
