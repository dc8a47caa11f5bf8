"""A scripted user of an InferenceService for ``make demo-flywheel`` and the flywheel tests:
chat requests whose prompts and preferences are known, with feedback on the answers.

``--phase normal``: prompts are lines of the bundled corpus (the kind of text the served model
was trained on). The user's preferences are fixed by where a line comes from: answers to lines
of the even corpus files ("story") are rated +1, of the odd ones ("summary") -1, and every
tenth liked answer gets a correction (the preferred completion). Some prompts carry PII (an email, a
phone number, a card number, an order id), and every prompt is asked twice (exact duplicates)
and once more with its first letter's case changed (a near duplicate: the same lower-cased
words, so the same shingles); answers are greedy, so a repeat gets the same answer, and a near
duplicate mostly does too. ``--phase shifted``: long code-like
prompts, unlike anything in the training data, without feedback.

Prints one JSON line: what was sent and what the user's preferences imply, so a test or the
demo can check the curated Dataset against it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parents[1] / "trainer_image" / "kubeforge_runtime" / "data" / "corpus"
PII = ["my email is jane.roe@example.com", "call me at (555) 867-5309", "card 4111 1111 1111 1111",
       "my order ORD-123456 is late"]


def post(base: str, path: str, body: dict[str, Any], api_key: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw or b"{}")
        except ValueError:
            return e.code, {"error": {"message": raw.decode(errors="replace")}}
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return 0, {"error": {"message": f"{type(e).__name__}: {e}"}}


def normal_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """(topic, prompt): n distinct corpus lines, each asked three times (twice exactly, once with
    its first letter's case changed). The topic is the line's file: stories-00, -02, ... are "story"
    (liked), the odd ones "summary" (disliked)."""
    rng = random.Random(seed)
    files = sorted(CORPUS.glob("*.txt"))
    lines = [("story" if i % 2 == 0 else "summary", ln.strip()) for i, p in enumerate(files)
             for ln in p.read_text().splitlines() if len(ln.split()) >= 8]
    out: list[tuple[str, str]] = []
    for i, (topic, line) in enumerate(rng.sample(lines, n)):
        prompt = line + (f" ({PII[i % len(PII)]})" if i % 7 == 0 else "")
        first = next(j for j, ch in enumerate(prompt) if ch.isalpha())  # many lines start with a quote
        near = prompt[:first] + prompt[first].swapcase() + prompt[first + 1:]
        out += [(topic, prompt), (topic, prompt), (topic, near)]
    return out


def shifted_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [("shifted", " ".join(f"x{rng.randrange(100)}=[{rng.randrange(10**6)}]*{rng.randrange(99)};"
                                 for _ in range(30))) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help=(
        "the server's base URL, e.g. http://127.0.0.1:8000; or several, comma-separated (one per "
        "replica): request i goes to the (i mod n)th, its feedback to the next one, not the one that served"))
    ap.add_argument("--phase", choices=["normal", "shifted"], default="normal")
    ap.add_argument("--prompts", type=int, default=60, help="distinct prompts (normal: each sent 3 times)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=None)
    args = ap.parse_args(argv)
    bases = [b.strip().rstrip("/") for b in args.base.split(",") if b.strip()]
    if not bases:
        ap.error("--base: give at least one URL")
    work = normal_prompts(args.prompts, args.seed) if args.phase == "normal" else shifted_prompts(args.prompts,
                                                                                                   args.seed)
    summary: dict[str, Any] = {"phase": args.phase, "requests": 0, "failed": 0, "feedback": {"+1": 0, "-1": 0},
                               "corrections": 0, "feedback_failed": 0, "story_answers": 0, "summary_answers": 0,
                               "errors": {}}

    lock = threading.Lock()

    def count(key: str, sub: str | None = None) -> None:
        with lock:
            if sub is None:
                summary[key] += 1
            else:
                summary[key][sub] += 1

    def error(status: int, body: dict[str, Any]) -> None:
        """Tally a failed call by status and first error message, so a failing run says why."""
        msg = str((body.get("error") or {}).get("message", body))[:120] if isinstance(body, dict) else str(body)
        with lock:
            key = f"{status}: {msg}"
            summary["errors"][key] = summary["errors"].get(key, 0) + 1

    def one(i_item: tuple[int, tuple[str, str]]) -> None:
        i, (topic, prompt) = i_item
        status, body = post(bases[i % len(bases)], "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                             "temperature": 0}, args.api_key)
        count("requests")
        if status != 200:
            count("failed")
            error(status, body)
            return
        if topic == "shifted":
            return
        count(f"{topic}_answers")
        rating = 1 if topic == "story" else -1
        fb: dict[str, Any] = {"id": body["id"], "rating": rating, "tags": [topic]}
        if topic == "story" and i % 10 == 0:
            fb["correction"] = "Once upon a time there was a small fox who lived by the river."
        fstatus, fbody = post(bases[(i + 1) % len(bases)], "/v1/feedback", fb, args.api_key)
        if fstatus != 200:
            count("feedback_failed")
            error(fstatus, fbody)
            return
        count("feedback", "+1" if rating > 0 else "-1")
        if "correction" in fb:
            count("corrections")

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, enumerate(work)))
    print(json.dumps(summary))
    return 0 if summary["failed"] == 0 and summary["feedback_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
