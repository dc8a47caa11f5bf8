"""The data flywheel's costs and accuracy: capture overhead in the server, dedup precision and
recall against exact Jaccard, curation time for 100k records, and PSI on shifted traffic.

- ``capture_overhead``: two servers (``python -m kubeforge_runtime.serve``, the same random-init
  model, one torch thread each) in one run, one with ``--capture-uri`` at sample rate 1.0 on a
  ``file://`` store, one without. They are loaded in turn, ABBA, with the same closed-loop load
  (``--concurrency`` clients, chat completions of ``--new-tokens`` tokens, EOS ignored); the
  figure is capture-on tok/s over capture-off tok/s, the median over the rounds' pairs. The
  servers never run load at the same time.
- ``dedup``: a generated corpus of word documents, some of them planted near-duplicates (a
  few words replaced, inserted or deleted: exact Jaccard of word 5-shingles 0.80..0.98) and
  hard negatives (documents sharing a long passage, Jaccard 0.3..0.7). The truth is every
  pair whose exact Jaccard is >= the threshold (0.8), computed over all pairs; precision and
  recall of the pairs the curation's MinHash + LSH step (datasketch) reports.
  ``dedup_docs_s`` is documents per second through that step.
- ``curate_s``: ``python -m kubeforge_runtime.curate`` on 100k captured request records (and
  feedback for a fifth of them) in committed shards on a ``file://`` store, end to end: the
  shards are read and verified, joined, filtered, deduplicated, split and written.
- ``split_error_points``: the router (``python -m kubeforge_runtime.route``) in front of a
  stable and a canary server at a 20 % canary share; ``--split-requests`` (1000) requests
  without a session key, and as many with one distinct session key each. The figure is
  |measured canary share − 20| in points for the keyless requests (exact by construction);
  ``split.sessions_error_points`` is the same for the sessions (hash buckets: statistical).
- ``shadow_p50_overhead``: two routers in front of the same stable server, one mirroring
  every request to a shadow server, one not, loaded in turn ABBA with one client at a time;
  the figure is the shadowed router's p50 latency over the plain one's, minus 1 (0.05 = 5 %).
  On a cluster the shadow runs on its own node; here the stable server is pinned to CPU 0 and
  the shadow to CPU 1, so the figure is what mirroring costs the primary, not two models
  sharing a core.
- ``psi_detects_shift``: the PSI (kubeforge.store.flywheel) of a live profile against a
  baseline profile of the bundled corpus' lines (what the trainer writes at export), for
  held-out corpus lines (unshifted) and for prompts of another kind (shifted: long
  code-like lines). ``detected`` is true when the shifted stream is major drift (> 0.25) and
  the unshifted one stable (< 0.1) on every feature.

Writes ``bench/results/flywheel.json`` (or ``--out``) and prints a table. ``--smoke`` (run by
``make test``) runs every part small, into a file in the system's tmp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "flywheel.json"
SMOKE_OUT = Path(tempfile.gettempdir()) / "kubeforge-bench-smoke" / "flywheel.json"
SMOKE_DEFAULTS: dict[str, Any] = {"rounds": 1, "requests": 16, "concurrency": 4, "new_tokens": 8,
                                  "split_requests": 100, "shadow_requests": 10,
                                  "dedup_docs": 300, "curate_records": 2000, "psi_prompts": 300, "out": SMOKE_OUT}

# -------------------------------------------------------------------------- capture overhead


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_model(directory: Path) -> Path:
    from kubeforge_runtime.model.hf import save_hf
    from kubeforge_runtime.model.llama import Llama, LlamaConfig
    from kubeforge_runtime.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    # bench/serving.py's model: small enough for two shared cores, large enough that a request's
    # time is mostly the model's, as on any real deployment
    m = Llama(LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=4, max_position_embeddings=2048, vocab_size=tok.vocab_size))
    m.init_weights(0)
    save_hf(m, directory, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(directory)
    return directory


class Server:
    """One ``python -m kubeforge_runtime.serve`` process; stopped by its pid."""

    def __init__(self, model: Path | None, log: Path, *flags: str, cpu: int | None = None,
                 module: str = "kubeforge_runtime.serve") -> None:
        self.port = free_port()
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port), *flags]
        if model is not None:
            cmd += ["--model", str(model), "--threads", "1", "--max-num-seqs", "16", "--shutdown-timeout", "10"]
        pin = None if cpu is None or cpu not in os.sched_getaffinity(0) else (lambda: os.sched_setaffinity(0, {cpu}))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=pin)
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout}s; see {self.log.name}")

    def metrics(self) -> dict[str, float]:
        import urllib.request

        out: dict[str, float] = {}
        with urllib.request.urlopen(self.base + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    out[name] = out.get(name, 0.0) + float(value)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "the a small fox river stone light quiet garden old story winter ship map door".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 40))) for _ in range(n)]


async def load(base: str, texts: list[str], concurrency: int, new_tokens: int) -> dict[str, float]:
    import aiohttp

    todo = list(texts)
    tokens = 0
    failures = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal tokens, failures
        while todo:
            text = todo.pop()
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": new_tokens, "ignore_eos": True,
                    "temperature": 0}
            async with session.post(base + "/v1/chat/completions", json=body) as r:
                if r.status != 200:
                    failures += 1
                    continue
                tokens += (await r.json())["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"tok_s": tokens / wall, "wall_s": wall, "failures": failures}


def capture_overhead(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model = write_model(work / "model")
    store = work / "capture-store"
    capture_uri = f"file://{store}/bench/chat/capture"
    on = Server(model, work / "server-on.log", "--capture-uri", capture_uri, "--capture-sample-rate", "1.0",
                "--capture-shard-records", "500")
    off = Server(model, work / "server-off.log")
    runs: dict[str, list[float]] = {"on": [], "off": []}
    try:
        on.wait_ready()
        off.wait_ready()
        warm = prompts(8, 99)
        for s in (on, off):
            asyncio.run(load(s.base, list(warm), 4, 4))
        for r in range(args.rounds):
            order = (("off", off), ("on", on), ("on", on), ("off", off)) if r % 2 == 0 else \
                (("on", on), ("off", off), ("off", off), ("on", on))
            for label, s in order:
                res = asyncio.run(load(s.base, prompts(args.requests, r), args.concurrency, args.new_tokens))
                if res["failures"]:
                    raise RuntimeError(f"{res['failures']} requests failed on the capture-{label} server")
                runs[label].append(res["tok_s"])
                print(f"round {r}: capture {label:3} {res['tok_s']:.1f} tok/s", file=sys.stderr)
        metrics = on.metrics()
    finally:
        rc_on, rc_off = on.stop(), off.stop()  # the capture server's drain commits its last shard
    if rc_on or rc_off:
        raise RuntimeError(f"servers exited {rc_on}/{rc_off}; see {work}")
    # the ABBA pairs: within a round, on/off of the same position
    pairs = [a / b for a, b in zip(runs["on"], runs["off"], strict=True)]
    markers = [json.loads(p.read_text()) for p in store.rglob("*.commit.json")]
    records = sum(m["records"] for m in markers if m["kind"] == "requests")
    dropped = sum(v for k, v in metrics.items() if k.startswith("kubeforge:capture_dropped_total"))
    expected = 8 + 2 * args.rounds * args.requests  # warm-up + two runs per round on the capture server
    if records + dropped != expected or not markers:
        raise RuntimeError(f"capture committed {records} records in {len(markers)} shards ({dropped} dropped) "
                           f"for {expected} requests")
    return {"ratio": statistics.median(pairs), "tok_s_on": statistics.median(runs["on"]),
            "tok_s_off": statistics.median(runs["off"]), "pairs": pairs, "records": records, "dropped": dropped,
            "shards": len(markers)}


# -------------------------------------------------------------------------- traffic split and shadow


def router(work: Path, name: str, config: dict[str, Any]) -> Server:
    path = work / f"{name}.json"
    path.write_text(json.dumps(config))
    return Server(None, work / f"{name}.log", "--config", str(path), module="kubeforge_runtime.route")


async def revisions(base: str, n: int, sessions: bool) -> dict[str, int]:
    import aiohttp

    counts: dict[str, int] = {}
    todo = list(range(n))

    async def client(session: aiohttp.ClientSession) -> None:
        while todo:
            i = todo.pop()
            headers = {"x-session-id": f"user-{i}"} if sessions else {}
            async with session.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                                    headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"request {i} through the router: {r.status} {await r.text()}")
                rev = r.headers["x-kubeforge-revision"]
                counts[rev] = counts.get(rev, 0) + 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(8)))
    return counts


async def latencies(base: str, texts: list[str], new_tokens: int) -> list[float]:
    import aiohttp

    out = []
    async with aiohttp.ClientSession() as session:
        for text in texts:
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": new_tokens, "ignore_eos": True,
                    "temperature": 0}
            t0 = time.perf_counter()
            async with session.post(base + "/v1/chat/completions", json=body) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"request through {base}: {r.status}")
            out.append(time.perf_counter() - t0)
    return out


def route_split_and_shadow(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model = write_model(work / "route-model")
    stable = Server(model, work / "stable.log", cpu=0)
    other = Server(model, work / "other.log", cpu=1)  # the canary, then the shadow
    procs = [stable, other]
    try:
        stable.wait_ready()
        other.wait_ready()
        split = router(work, "split", {"stable": {"url": stable.base, "revision": "stable"},
                                       "canary": {"url": other.base, "revision": "canary", "percent": 20}})
        procs.append(split)
        plain = router(work, "plain", {"stable": {"url": stable.base, "revision": "stable"}})
        procs.append(plain)
        shadowed = router(work, "shadowed", {"stable": {"url": stable.base, "revision": "stable"},
                                             "shadow": {"url": other.base, "revision": "shadow", "percent": 100}})
        procs.append(shadowed)
        for r in (split, plain, shadowed):
            r.wait_ready()
        keyless = asyncio.run(revisions(split.base, args.split_requests, sessions=False))
        keyed = asyncio.run(revisions(split.base, args.split_requests, sessions=True))
        err = abs(100 * keyless.get("canary", 0) / args.split_requests - 20)
        err_sessions = abs(100 * keyed.get("canary", 0) / args.split_requests - 20)
        runs: dict[str, list[float]] = {"plain": [], "shadowed": []}
        asyncio.run(latencies(plain.base, prompts(4, 98), args.new_tokens))
        asyncio.run(latencies(shadowed.base, prompts(4, 98), args.new_tokens))
        for r in range(args.rounds):
            order = (("plain", plain), ("shadowed", shadowed), ("shadowed", shadowed), ("plain", plain))
            for label, proc in order if r % 2 == 0 else order[::-1]:
                lat = asyncio.run(latencies(proc.base, prompts(args.shadow_requests, 50 + r), args.new_tokens))
                runs[label].extend(lat)
                print(f"round {r}: {label:8} p50 {statistics.median(lat) * 1000:.1f} ms", file=sys.stderr)
        mirrored = shadowed.metrics()
    finally:
        for p in procs:
            p.stop()
    ok = sum(v for k, v in mirrored.items() if k.startswith("kubeforge:shadow_requests_total") and 'outcome="ok"' in k)
    p50 = {k: statistics.median(v) for k, v in runs.items()}
    return {"split_error_points": err, "sessions_error_points": err_sessions, "keyless": keyless, "sessions": keyed,
            "shadow_p50_overhead": p50["shadowed"] / p50["plain"] - 1, "p50_plain_s": p50["plain"],
            "p50_shadowed_s": p50["shadowed"], "shadow_ok": ok, "requests_per_variant": len(runs["plain"])}


# -------------------------------------------------------------------------- dedup accuracy

WORDS = [f"w{i}" for i in range(5000)]


def shingles(text: str, k: int = 5) -> set[str]:
    words = text.split()
    return {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def planted_corpus(n: int, seed: int = 0) -> list[str]:
    """Base documents of 80..160 random words; a quarter of the documents are near-duplicates
    of an earlier one (a few edits), a tenth share a long passage with one (hard negatives)."""
    rng = random.Random(seed)
    docs: list[str] = []
    while len(docs) < n:
        roll = rng.random()
        if docs and roll < 0.25:
            words = rng.choice(docs).split()
            for _ in range(rng.randint(1, max(1, len(words) // 60))):
                op, i = rng.random(), rng.randrange(len(words))
                if op < 0.4:
                    words[i] = rng.choice(WORDS)
                elif op < 0.7:
                    words.insert(i, rng.choice(WORDS))
                elif len(words) > 20:
                    del words[i]
            docs.append(" ".join(words))
        elif docs and roll < 0.35:
            words = rng.choice(docs).split()
            cut = rng.randint(len(words) // 3, 2 * len(words) // 3)
            docs.append(" ".join(words[:cut] + [rng.choice(WORDS) for _ in range(rng.randint(40, 120))]))
        else:
            docs.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 160))))
    return docs


def dedup_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from kubeforge_runtime.curate import near_duplicate_pairs

    docs = planted_corpus(args.dedup_docs)
    sh = [shingles(d) for d in docs]
    truth = {(i, j) for i in range(len(docs)) for j in range(i + 1, len(docs)) if jaccard(sh[i], sh[j]) >= 0.8}
    t0 = time.perf_counter()
    found = {tuple(sorted(p)) for p in near_duplicate_pairs(docs, threshold=0.8, shingle_words=5, num_perm=128)}
    seconds = time.perf_counter() - t0
    hits = len(found & truth)
    return {"docs": len(docs), "true_pairs": len(truth), "found_pairs": len(found),
            "precision": hits / len(found) if found else 1.0, "recall": hits / len(truth) if truth else 1.0,
            "docs_s": len(docs) / seconds, "seconds": seconds}


# -------------------------------------------------------------------------- curation time


def write_capture(root: Path, n: int, seed: int = 1) -> Path:
    """``n`` request records (a fifth rated, a tenth corrected, some duplicated) in committed
    shards of 10k under ``root``'s capture prefix."""
    import hashlib
    import io

    from kubeforge.store import flywheel, layout

    rng = random.Random(seed)
    capture = root / flywheel.capture_prefix("bench", "chat")
    texts = prompts(2000, seed)

    def shard(kind: str, seq: int, records: list[dict[str, Any]]) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for rec in records:
                data = json.dumps(rec).encode()
                info = tarfile.TarInfo(f"{rec['id']}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
        name = flywheel.shard_name(records[0]["time"], "bench-0", seq)
        d = capture / kind
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(raw)
        marker = flywheel.ShardMarker(kind=kind, writer="bench-0", records=len(records), bytes=len(raw),
                                      sha256=hashlib.sha256(raw).hexdigest(), first_time=records[0]["time"],
                                      last_time=records[-1]["time"], time=layout.utc_now())
        (d / flywheel.shard_marker_key(name)).write_bytes(marker.to_json())

    reqs: list[dict[str, Any]] = []
    fbs: list[dict[str, Any]] = []
    seq = 0
    for i in range(n):
        t = f"2026-12-02T{10 + i // 360000:02d}:{i // 6000 % 60:02d}:{i // 100 % 60:02d}.{i % 100 * 10:03d}Z"
        cid = f"chatcmpl-{i:016x}"
        prompt = rng.choice(texts) + f" {i % 997}"
        reqs.append({"type": "request", "id": cid, "time": t, "model": "bench", "revision": None,
                     "endpoint": "chat.completions", "prompt": None,
                     "messages": [{"role": "user", "content": prompt}],
                     "completion": " ".join(rng.choice(WORDS[:300]) for _ in range(rng.randint(10, 60))), "n": 1,
                     "prompt_tokens": len(prompt), "completion_tokens": 40, "finish_reason": "stop",
                     "ttft_s": 0.01, "latency_s": 0.1, "redacted": {}, "truncated": False})
        if i % 5 == 0:
            fbs.append({"type": "feedback", "id": f"fb-{i:016x}", "completion_id": cid, "time": t,
                        "rating": rng.choice([-1, 1, 1, 5, 4, 2]),
                        "correction": ("a better answer " + prompt) if i % 10 == 0 else None, "tags": []})
        if len(reqs) == 10000:
            shard(flywheel.REQUESTS, seq, reqs)
            seq, reqs = seq + 1, []
    if reqs:
        shard(flywheel.REQUESTS, seq, reqs)
    if fbs:
        shard(flywheel.FEEDBACK, 0, fbs)
    return capture


def curate_time(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = work / "curate-store"
    t0 = time.perf_counter()
    capture = write_capture(root, args.curate_records)
    write_s = time.perf_counter() - t0
    out = root / "bench" / "chat-data" / "dataset"
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "kubeforge_runtime.curate", "--source", f"file://{capture}",
                          "--output", f"file://{out}", "--settings", "{}"], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"curate exited {run.returncode}: {run.stderr[-2000:]}")
    manifest = json.loads(run.stdout.strip().splitlines()[-1])
    return {"records": args.curate_records, "seconds": seconds, "write_capture_s": write_s,
            "records_out": manifest["records"], "dedup_ratio": manifest["dedup_ratio"],
            "filters": {f["name"]: [f["records_in"], f["records_out"]] for f in manifest["filters"]}}


# -------------------------------------------------------------------------- PSI


def psi_shift(args: argparse.Namespace) -> dict[str, Any]:
    from kubeforge.store import flywheel
    from kubeforge_runtime.data.sources import CORPUS_DIR
    from kubeforge_runtime.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    lines = [ln.strip() for p in sorted(CORPUS_DIR.glob("*.txt")) for ln in p.read_text().splitlines() if ln.strip()]
    random.Random(3).shuffle(lines)
    n = args.psi_prompts
    baseline, unshifted = flywheel.Profile(), flywheel.Profile()
    half = len(lines) // 2
    for ln in lines[:min(half, 5000)]:  # what the trainer profiles at export: up to 5000 lines
        baseline.add(tok.encode(ln))
    for ln in lines[half:half + n]:  # lines the baseline never saw
        unshifted.add(tok.encode(ln))
    rng = random.Random(4)
    shifted = flywheel.Profile()
    for _ in range(n):
        code = " ".join(f"x{rng.randrange(100)}=[{rng.randrange(10**6)}]*{rng.randrange(99)};" for _ in range(40))
        shifted.add(tok.encode(code))
    u, s = flywheel.profile_psi(baseline, unshifted), flywheel.profile_psi(baseline, shifted)
    return {"unshifted": u, "shifted": s, "prompts": n, "baseline_prompts": baseline.prompts,
            "detected": all(v > 0.25 for v in s.values()) and all(v < 0.1 for v in u.values())}


# -------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4, help="ABBA rounds of the capture on/off servers")
    ap.add_argument("--requests", type=int, default=128, help="requests per server per run")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dedup-docs", type=int, default=2000)
    ap.add_argument("--curate-records", type=int, default=100000)
    ap.add_argument("--psi-prompts", type=int, default=1000)
    ap.add_argument("--split-requests", type=int, default=1000, help="requests through the 20 %% canary router")
    ap.add_argument("--shadow-requests", type=int, default=40, help="sequential requests per ABBA block")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="every part, small, into the system's tmp")
    ap.add_argument("--skip", nargs="*", default=[], choices=["capture", "route", "dedup", "curate", "psi"])
    if "--smoke" in (argv if argv is not None else sys.argv[1:]):
        ap.set_defaults(**SMOKE_DEFAULTS)
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"smoke": args.smoke}
    with tempfile.TemporaryDirectory(prefix="kubeforge-bench-flywheel-") as tmp:
        work = Path(tmp)
        if "capture" not in args.skip:
            cap = capture_overhead(args, work)
            result["capture_overhead"] = cap["ratio"]
            result["capture"] = cap
        if "route" not in args.skip:
            rt = route_split_and_shadow(args, work)
            result.update(split_error_points=rt["split_error_points"], shadow_p50_overhead=rt["shadow_p50_overhead"],
                          split=rt)
        if "dedup" not in args.skip:
            d = dedup_accuracy(args)
            result.update(dedup_docs_s=d["docs_s"], dedup_precision=d["precision"], dedup_recall=d["recall"],
                          dedup=d)
        if "curate" not in args.skip:
            c = curate_time(args, work)
            result["curate_s"] = c["seconds"]
            result["curate"] = c
        if "psi" not in args.skip:
            result["psi_detects_shift"] = psi_shift(args)
    result["setup"] = {k: v for k, v in vars(args).items() if k not in ("out", "skip", "smoke")}
    result["setup"]["cpus"] = os.cpu_count()
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'figure':28} value   (goal)")
    if "capture_overhead" in result:
        print(f"{'capture_overhead':28} {result['capture_overhead']:.3f}   (>= 0.97)")
    for k, goal in (("split_error_points", "<= 3 at 20 %"), ("shadow_p50_overhead", "<= 0.05"),
                    ("dedup_precision", ">= 0.95"), ("dedup_recall", ">= 0.95"), ("dedup_docs_s", ""),
                    ("curate_s", f"{args.curate_records} records")):
        if k in result:
            print(f"{k:28} {result[k]:.3f}   ({goal})")
    if "psi_detects_shift" in result:
        p = result["psi_detects_shift"]
        print(f"{'psi unshifted':28} {p['unshifted']}")
        print(f"{'psi shifted':28} {p['shifted']}   detected: {p['detected']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
