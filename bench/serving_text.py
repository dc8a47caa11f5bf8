"""The engine thread's text work per generated token: detokenize, find stop strings, hold back
what may still become one. Issue 16 item 10 measured 0.095 s per token with 16 stop strings of
60 KB each. Since then the server refuses stops over 256 characters (``MAX_STOP_CHARS``), and
the engine decodes incrementally (``serve.detokenize``).

Side by side in one process, on the same token streams:
- ``before``: the engine's former code, kept here as the reference. It decoded the whole output
  at every token, searched every stop in the whole text, and tried every prefix length of
  every stop for the held-back tail;
- ``after``: ``Detokenizer.add`` + ``find_stop`` + ``stable_length``, what ``LLMEngine`` runs.

Cases: ``stops_16x256`` (the most the API now takes, stops that never match), ``stops_16x60k``
(the issue's case: only ``before`` can be run, since the API refuses it), and ``long_output``
(no stops, a 4096-token output: the cost of decoding alone). Both tokenizers: the byte-level
one (the default) and a byte-level BPE ``tokenizer.json`` trained here (``tokenizers``).
Figures are microseconds per token, averaged over the output; ``speedup`` = before / after.
Writes ``bench/results/serving_text.json`` (or ``--out``). ``--smoke``: short outputs, into the
system's tmp.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kubeforge_runtime.serve.detokenize import Detokenizer, find_stop, stable_length
from kubeforge_runtime.serve.protocol import MAX_STOP_CHARS, MAX_STOPS
from kubeforge_runtime.tokenizer import ByteTokenizer, HFTokenizer

RESULTS = Path(__file__).parent / "results" / "serving_text.json"
SMOKE_OUT = Path(tempfile.gettempdir()) / "kubeforge-bench-smoke" / "serving_text.json"
TEXT = ("The operator replaces a lost worker and resumes from the last checkpoint; the server batches "
        "requests continuously over a paged cache. Ünïcödé and 漢字 keep multi-byte characters honest. ")


def _old_stable_length(text: str, stops: tuple[str, ...]) -> int:
    """The engine's former ``_stable_length`` (reference for ``before``)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:k], 0, end):
                hold = max(hold, k)
                break
    return end - hold


def before(tok: ByteTokenizer | HFTokenizer, ids: Sequence[int], stops: tuple[str, ...]) -> str:
    """The former per-token path: full decode, full search, every prefix length."""
    out: list[int] = []
    text = ""
    for t in ids:
        out.append(t)
        text = tok.decode(out)
        for s in stops:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        _old_stable_length(text, stops)
    return text


def after(tok: ByteTokenizer | HFTokenizer, ids: Sequence[int], stops: tuple[str, ...]) -> str:
    det = Detokenizer(tok)
    text = ""
    for n, t in enumerate(ids):
        searched = len(det.text)
        det.add(t, final=n == len(ids) - 1)
        text = det.text
        i = find_stop(text, stops, searched)
        if i >= 0:
            text = text[:i]
        stable_length(text, stops)
    return text


def bpe_tokenizer(directory: Path) -> HFTokenizer:
    """A byte-level BPE ``tokenizer.json`` trained on TEXT, so that tokens span several bytes."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([TEXT] * 50, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True, exist_ok=True)
    t.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return HFTokenizer(directory)


def per_token_us(fn: Callable[[], str], tokens: int, repeat: int) -> tuple[float, str]:
    best, text = float("inf"), ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        text = fn()
        best = min(best, time.perf_counter() - t0)
    return best / tokens * 1e6, text


def stops_never_matching(n: int, length: int, seed: int) -> tuple[str, ...]:
    # each ends with a character the output has (so the held-back tail is really tried) and
    # contains one it never has (so no stop ever matches)
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    return tuple("".join(rng.choice(alphabet) for _ in range(length - 2)) + "#e" for _ in range(n))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="output tokens per case with stops")
    ap.add_argument("--long-tokens", type=int, default=4096, help="output tokens of the long_output case")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="short outputs, one repeat, into the system's tmp")
    if ap.parse_known_args(argv)[0].smoke:
        ap.set_defaults(tokens=64, long_tokens=256, repeat=1, out=SMOKE_OUT)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers_ = {"byte": ByteTokenizer(), "bpe": bpe_tokenizer(Path(tmp) / "bpe")}
        result: dict[str, Any] = {"per_token_us": {}, "speedup": {}, "smoke": args.smoke}
        for name, tok in tokenizers_.items():
            stream = tok.encode(TEXT * (args.long_tokens // 20 + 1))
            cases: dict[str, tuple[list[int], tuple[str, ...], bool]] = {
                "stops_16x256": (stream[:args.tokens], stops_never_matching(MAX_STOPS, MAX_STOP_CHARS, 1), True),
                "stops_16x60k": (stream[:args.tokens], stops_never_matching(16, 60_000, 2), False),
                "long_output": (stream[:args.long_tokens], (), True),
            }
            rows: dict[str, dict[str, float | None]] = {}
            for case, (ids, stops, run_after) in cases.items():
                b, text_b = per_token_us(lambda ids=ids, stops=stops, tok=tok: before(tok, ids, stops), len(ids), args.repeat)
                a, text_a = (per_token_us(lambda ids=ids, stops=stops, tok=tok: after(tok, ids, stops), len(ids), args.repeat)
                             if run_after else (None, text_b))
                if text_a != text_b:  # the figures compare the same work only if the texts agree
                    sys.exit(f"{name}/{case}: the incremental text differs from the full decode")
                rows[case] = {"before": round(b, 2), "after": None if a is None else round(a, 2),
                              "tokens": len(ids)}
                print(f"{name:5} {case:13} before {b:10.1f} us/token  after "
                      f"{'refused (400)' if a is None else f'{a:8.1f} us/token'}", file=sys.stderr)
            result["per_token_us"][name] = rows
            result["speedup"][name] = {c: round(r["before"] / r["after"], 1) for c, r in rows.items()
                                       if r["after"] and r["before"]}
    result["setup"] = {"stop_limits": {"max_stops": MAX_STOPS, "max_stop_chars": MAX_STOP_CHARS},
                       "repeat": args.repeat, "best_of_repeats": True}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["speedup"]))


if __name__ == "__main__":
    main()
