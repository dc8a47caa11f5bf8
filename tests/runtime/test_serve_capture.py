"""Capture of served traffic and feedback (issue 17, the server's half).

The writer alone (no model): committed shards are tar files of ``<id>.json`` records whose
marker comes last and matches them; a store that fails, or fails only the marker, costs the
shard's records (counted) and never a committed half shard, nor the writer; a full queue drops
and counts; close flushes; records are redacted and cut to size; the live profile keeps two
windows. Then the real server over HTTP (``test_serve_api``'s harness): records of both
endpoints, streaming or not, with every field; redaction; sampling; feedback on another
replica with the same key, 404 for forged or expired ids, 422 naming the field, 401, 501;
the store down (unreachable, or MinIO stopped and started) never costs a request; the drain
on SIGTERM flushes the queue and the profile; a server killed with SIGKILL leaves no marker
without its whole shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubeforge.store import flywheel
from kubeforge.store.backends import FileBackend, StoreError
from kubeforge_runtime.serve.capture import CaptureSettings, CaptureWriter, LiveProfile, fit_record
from kubeforge_runtime.serve.feedback import CompletionIds, FeedbackBody
from kubeforge_runtime.serve.metrics import CaptureMetrics
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from tests.fixtures.s3 import S3Server
from tests.runtime.test_serve_api import API_KEY, Server, save_tiny_model

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(120)]

REQUEST_FIELDS = {"type", "id", "time", "model", "revision", "endpoint", "prompt", "messages", "completion", "n",
                  "prompt_tokens", "completion_tokens", "finish_reason", "ttft_s", "latency_s", "redacted",
                  "truncated"}
FEEDBACK_FIELDS = {"type", "id", "completion_id", "time", "rating", "correction", "tags"}
FEEDBACK_KEY = "shared-feedback-key"
PII = ("mail jane.doe@example.com or call (555) 123-4567, card 4111 1111 1111 1111, "
       "key sk-abcdefghijklmnop1234, ticket TCK-991")
PII_REDACTED = "mail <EMAIL> or call <PHONE>, card <CREDIT_CARD>, key <API_KEY>, ticket <TICKET>"
PII_COUNTS = {"EMAIL": 1, "PHONE": 1, "CREDIT_CARD": 1, "API_KEY": 1, "TICKET": 1}


# -- reading a capture directory as curation would: markers first ------------------------------

def committed(capture: Path, kind: str = flywheel.REQUESTS) -> list[tuple[flywheel.ShardMarker, list[dict[str, Any]]]]:
    """Every committed shard of ``kind``, checked against its marker, with its records."""
    out = []
    for marker_path in sorted((capture / kind).glob(f"*{flywheel.SHARD_MARKER_SUFFIX}")):
        marker = flywheel.ShardMarker.model_validate_json(marker_path.read_bytes())
        shard = marker_path.with_name(marker_path.name.removesuffix(flywheel.SHARD_MARKER_SUFFIX)
                                      + flywheel.SHARD_SUFFIX)
        data = shard.read_bytes()
        assert flywheel.parse_shard_name(shard.name) is not None, shard.name
        assert (len(data), hashlib.sha256(data).hexdigest()) == (marker.bytes, marker.sha256), shard
        records = []
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                f = tar.extractfile(member)
                assert f is not None
                record = json.loads(f.read())
                assert member.name == f"{record['id']}.json"
                records.append(record)
        assert len(records) == marker.records and marker.kind == kind
        assert marker.first_time <= marker.last_time
        out.append((marker, records))
    return out


def records_of(capture: Path, kind: str = flywheel.REQUESTS) -> list[dict[str, Any]]:
    return [r for _, recs in committed(capture, kind) for r in recs]


def wait_records(capture: Path, ids: set[str], kind: str = flywheel.REQUESTS) -> dict[str, dict[str, Any]]:
    """The committed records by id, once all of ``ids`` are among them."""
    def ready() -> dict[str, dict[str, Any]] | None:
        by_id = {r["id"]: r for r in records_of(capture, kind)}
        return by_id if ids <= set(by_id) else None
    return dict(wait_for(ready, what=f"{len(ids)} records"))


def wait_for(fn: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- the writer alone ------------------------------------------------------------------------

class FlakyBackend(FileBackend):
    """A volume whose puts fail while ``fail(key)`` says so."""

    def __init__(self, root: Path, fail: Callable[[str], bool]) -> None:
        super().__init__(root)
        self.fail = fail

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.fail(key):
            raise StoreError(f"{self.uri}: put {key}: simulated outage")
        super().put_bytes(key, data)


def make_writer(backend: FileBackend, **settings: Any) -> tuple[CaptureWriter, CollectorRegistry]:
    registry = CollectorRegistry()
    s = CaptureSettings(**{"writer": "pod-0", "shard_seconds": 3600.0, "profile_interval_s": 3600.0, **settings})
    return CaptureWriter(backend, s, CaptureMetrics("m", registry), decode=lambda ids: bytes(ids).decode()), registry


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, {"model_name": "m", **labels})
    return float(value or 0.0)


def raw_request(i: int, **over: Any) -> dict[str, Any]:
    return {"id": f"cmpl-{i:040x}", "time": 1_800_000_000.0 + i, "model": "m", "revision": "r1",
            "endpoint": "completions", "prompt": f"prompt {i}", "messages": None, "completion": f"answer {i}",
            "n": 1, "prompt_tokens": 3, "completion_tokens": 2, "finish_reason": "stop", "ttft_s": 0.01,
            "latency_s": 0.02, **over}


def test_writer_commits_tar_shards_with_markers_and_rotates_by_records(tmp_path: Path) -> None:
    w, reg = make_writer(FileBackend(tmp_path), shard_records=3)
    w.start()
    for i in range(7):
        assert w.capture(flywheel.REQUESTS, raw_request(i))
    assert w.close(10)
    shards = committed(tmp_path)
    assert [m.records for m, _ in shards] == [3, 3, 1]
    names = sorted(p.name for p in (tmp_path / "requests").glob("*.tar"))
    assert [flywheel.parse_shard_name(n)[1:] for n in names] == [("pod-0", 0), ("pod-0", 1), ("pod-0", 2)]  # type: ignore[index]
    recs = [r for _, rs in shards for r in rs]
    assert [r["id"] for r in recs] == [f"cmpl-{i:040x}" for i in range(7)]
    assert all(set(r) == REQUEST_FIELDS for r in recs)
    assert recs[0]["time"] == "2027-01-15T08:00:00.000Z" and recs[0]["truncated"] is False
    assert metric(reg, "kubeforge:capture_records_total", kind="requests") == 7
    assert metric(reg, "kubeforge:capture_bytes_total", kind="requests") == sum(m.bytes for m, _ in shards)


def test_writer_rotates_by_seconds(tmp_path: Path) -> None:
    w, _ = make_writer(FileBackend(tmp_path), shard_seconds=0.2)
    w.start()
    w.capture(flywheel.REQUESTS, raw_request(0))
    wait_for(lambda: committed(tmp_path), 5, "the shard of an idle writer to be committed by age")
    w.capture(flywheel.REQUESTS, raw_request(1))
    wait_for(lambda: len(committed(tmp_path)) == 2, 5, "a second shard")
    assert w.close(5)


def test_store_error_drops_and_counts_and_the_writer_goes_on(tmp_path: Path) -> None:
    down = True
    w, reg = make_writer(FlakyBackend(tmp_path, lambda key: down), shard_records=2)
    w.start()
    for i in range(4):
        w.capture(flywheel.REQUESTS, raw_request(i))
    wait_for(lambda: metric(reg, "kubeforge:capture_dropped_total", reason="store_error") == 4, 5, "4 dropped")
    assert committed(tmp_path) == []
    down = False
    for i in range(4, 6):
        w.capture(flywheel.REQUESTS, raw_request(i))
    assert w.close(5)
    assert [r["id"] for r in records_of(tmp_path)] == [f"cmpl-{i:040x}" for i in (4, 5)]
    assert metric(reg, "kubeforge:capture_records_total", kind="requests") == 2


def test_a_failed_marker_leaves_no_committed_shard(tmp_path: Path) -> None:
    """The shard is written, its marker is not: the half-written shard is never read."""
    w, reg = make_writer(FlakyBackend(tmp_path, lambda key: key.endswith(flywheel.SHARD_MARKER_SUFFIX)),
                         shard_records=2)
    w.start()
    for i in range(2):
        w.capture(flywheel.REQUESTS, raw_request(i))
    assert w.close(5)
    assert len(list((tmp_path / "requests").glob("*.tar"))) == 1
    assert committed(tmp_path) == []
    assert metric(reg, "kubeforge:capture_dropped_total", reason="store_error") == 2
    assert metric(reg, "kubeforge:capture_records_total", kind="requests") == 0


def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    w, reg = make_writer(FileBackend(tmp_path), queue_size=2)
    # not started: nothing takes from the queue (close starts it)
    assert [w.capture(flywheel.REQUESTS, raw_request(i)) for i in range(5)] == [True, True, False, False, False]
    assert metric(reg, "kubeforge:capture_dropped_total", reason="queue_full") == 3
    assert w.close(5)
    assert len(records_of(tmp_path)) == 2


def test_records_after_the_drain_began_or_left_when_it_times_out_are_counted_as_shutdown(tmp_path: Path) -> None:
    entered, gate = threading.Event(), threading.Event()  # every put waits for the gate: the store hangs

    def hang(key: str) -> bool:
        entered.set()
        gate.wait(30)
        return False

    w, reg = make_writer(FlakyBackend(tmp_path, hang), shard_records=1)
    w.start()
    w.capture(flywheel.REQUESTS, raw_request(0))
    assert entered.wait(10), "the writer never reached the store"
    for i in range(1, 4):  # the writer is stuck uploading record 0's shard: these stay queued
        w.capture(flywheel.REQUESTS, raw_request(i))
    assert not w.close(0.5)
    # the three queued and the one in the shard being uploaded
    assert metric(reg, "kubeforge:capture_dropped_total", reason="shutdown") == 4
    assert w.capture(flywheel.REQUESTS, raw_request(9)) is False
    assert metric(reg, "kubeforge:capture_dropped_total", reason="shutdown") == 5
    assert metric(reg, "kubeforge:capture_dropped_total", reason="queue_full") == 0
    gate.set()  # the store answers after all: what lands late is not counted as committed too
    w._thread.join(30)
    assert not w._thread.is_alive()
    assert metric(reg, "kubeforge:capture_records_total", kind="requests") == 0
    assert metric(reg, "kubeforge:capture_dropped_total", reason="shutdown") == 5


def test_close_flushes_what_is_queued_and_the_profile(tmp_path: Path) -> None:
    w, _ = make_writer(FileBackend(tmp_path))
    for i in range(50):
        w.observe_prompt([i % 7] * (i + 1))
        w.capture(flywheel.REQUESTS, raw_request(i))
    w.capture(flywheel.FEEDBACK, {"id": "fb-1", "completion_id": "cmpl-0", "time": 1_800_000_000.5, "rating": 5,
                                  "correction": None, "tags": []})
    w.start()
    assert w.close(10)
    assert len(records_of(tmp_path)) == 50
    [fb] = records_of(tmp_path, flywheel.FEEDBACK)
    assert set(fb) == FEEDBACK_FIELDS and fb["rating"] == 5
    profile = flywheel.Profile.model_validate_json((tmp_path / "profiles" / "pod-0.json").read_bytes())
    assert profile.prompts == 50 and sum(profile.token_frequency) == sum(range(1, 51))
    assert w.capture(flywheel.REQUESTS, raw_request(99)) is False  # closed


def test_records_are_redacted_and_cut_to_size(tmp_path: Path) -> None:
    w, _ = make_writer(FileBackend(tmp_path), redact_patterns=(("TICKET", r"TCK-\d+"),), max_record_bytes=2048)
    w.start()
    w.capture(flywheel.REQUESTS, raw_request(0, prompt=PII, completion="sure: " + PII))
    w.capture(flywheel.REQUESTS, raw_request(1, endpoint="chat.completions", prompt=None, completion="ok",
                                             messages=[{"role": "user", "content": PII}]))
    w.capture(flywheel.REQUESTS, raw_request(2, prompt=list(b"token prompt")))
    w.capture(flywheel.REQUESTS, raw_request(3, prompt="p" * 50_000, completion="c" * 3000))
    w.capture(flywheel.REQUESTS, raw_request(4, prompt=None, endpoint="chat.completions", messages=[
        {"role": "user", "content": "é" * 900} for _ in range(6)]))
    w.capture(flywheel.FEEDBACK, {"id": "fb-2", "completion_id": "cmpl-0", "time": 1_800_000_000.0, "rating": -1,
                                  "correction": PII, "tags": ["write bob@example.org"]})
    assert w.close(5)
    r0, r1, r2, r3, r4 = records_of(tmp_path)
    assert (r0["prompt"], r0["completion"]) == (PII_REDACTED, "sure: " + PII_REDACTED)
    assert r0["redacted"] == {k: 2 * v for k, v in PII_COUNTS.items()}
    assert r1["messages"] == [{"role": "user", "content": PII_REDACTED}] and r1["redacted"] == PII_COUNTS
    assert r2["prompt"] == "token prompt"
    for r in (r3, r4):
        assert r["truncated"] is True and set(r) == REQUEST_FIELDS
        assert len(json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode()) <= 2048
    # cut to a common length, the longest first: neither text is sacrificed for the other
    assert r3["prompt"].startswith("ppp") and len(r3["prompt"]) == len(r3["completion"]) > 600
    assert 600 < sum(len(m["content"]) for m in r4["messages"]) < 1024
    [fb] = records_of(tmp_path, flywheel.FEEDBACK)
    assert fb["correction"] == PII_REDACTED and fb["tags"] == ["write <EMAIL>"]


def test_redaction_off_keeps_the_text(tmp_path: Path) -> None:
    w, _ = make_writer(FileBackend(tmp_path), redact=False)
    w.start()
    w.capture(flywheel.REQUESTS, raw_request(0, prompt=PII))
    assert w.close(5)
    [r] = records_of(tmp_path)
    assert r["prompt"] == PII and r["redacted"] == {}


def test_fit_record_never_exceeds_the_limit() -> None:
    for n in (1, 100, 1500, 10_000):
        for text in ("a" * n, '"\\' * n, "日本" * n):
            rec = {"id": "x", "prompt": text, "completion": text[: n // 2], "messages": None, "truncated": False}
            data, truncated = fit_record(dict(rec), 1024)
            assert len(data) <= 1024 and truncated == (len(json.dumps(rec, ensure_ascii=False,
                                                                      separators=(",", ":")).encode()) > 1024)


def test_live_profile_keeps_the_current_and_the_previous_window() -> None:
    p = LiveProfile(window=3)
    for i in range(7):
        p.add([1] * (i + 1))
    snap = p.snapshot()
    # windows of prompts 0-2 (turned over), 3-5 (previous), 6 (current)
    assert snap.prompts == 4 and sum(snap.token_frequency) == 4 + 5 + 6 + 7 and snap.time is not None


def test_a_killed_writer_leaves_no_marker_without_its_shard(tmp_path: Path) -> None:
    """SIGKILL while shards are written: every marker has its whole shard (a shard without a
    marker may remain, and is not committed)."""
    script = f"""
import itertools, sys
from pathlib import Path
from prometheus_client import CollectorRegistry
from kubeforge.store.backends import FileBackend
from kubeforge_runtime.serve.capture import CaptureSettings, CaptureWriter
from kubeforge_runtime.serve.metrics import CaptureMetrics
w = CaptureWriter(FileBackend(Path({str(tmp_path)!r})), CaptureSettings(writer="pod-k", shard_records=2),
                  CaptureMetrics("m", CollectorRegistry()))
w.start()
print("started", flush=True)
for i in itertools.count():
    w.capture("requests", {{"id": f"cmpl-{{i:040x}}", "time": 1.8e9, "model": "m", "revision": None,
               "endpoint": "completions", "prompt": "x" * 20000, "messages": None, "completion": "y", "n": 1,
               "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "stop", "ttft_s": 0.0, "latency_s": 0.0}})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"started"
        wait_for(lambda: len(list((tmp_path / "requests").glob("*.commit.json"))) >= 5, 30, "5 committed shards")
    finally:
        proc.kill()
        proc.wait()
    shards = committed(tmp_path)  # asserts every marker's shard is whole and matches
    assert len(shards) >= 5 and all(m.records == 2 for m, _ in shards)
    # what a reader lists: at most the one shard that was written when the kill came lacks its marker
    # (a half-written file under a temporary name is not listed at all)
    listed = {Path(o.key).name for o in FileBackend(tmp_path).list("requests")}
    tars = {n for n in listed if n.endswith(flywheel.SHARD_SUFFIX)}
    marked = {n.removesuffix(flywheel.SHARD_MARKER_SUFFIX) + flywheel.SHARD_SUFFIX
              for n in listed if n.endswith(flywheel.SHARD_MARKER_SUFFIX)}
    assert marked <= tars and len(tars - marked) <= 1 and len(marked) == len(shards)


# -- ids and the feedback body ---------------------------------------------------------------

def test_completion_ids_verify_under_the_same_key_within_the_ttl() -> None:
    now = [1_800_000_000.0]
    a = CompletionIds(b"k1", ttl_s=60, clock=lambda: now[0])
    b = CompletionIds(b"k1", ttl_s=60, clock=lambda: now[0])
    other = CompletionIds(b"k2", ttl_s=60, clock=lambda: now[0])
    cid = a.new("chatcmpl")
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{40}", cid) and cid[9:17] == f"{int(now[0]):08x}"
    assert a.verify(cid) and b.verify(cid) and not other.verify(cid)
    assert a.verify(a.new("cmpl"))
    forged_tag = cid[:-1] + ("0" if cid[-1] != "0" else "1")
    later_time = cid[:9] + f"{int(now[0]) + 5:08x}" + cid[17:]
    assert not a.verify(forged_tag) and not a.verify(later_time) and not a.verify("cmpl-" + cid[9:] + "0")
    assert not a.verify(cid.replace("chatcmpl", "cmpl")) and not a.verify("cmpl-nothex") and not a.verify("")
    now[0] += 61
    assert not a.verify(cid)
    with pytest.raises(ValueError):
        a.new("fb")


@pytest.mark.parametrize(("body", "field"), [
    ({"id": "x", "rating": 0}, "rating"), ({"id": "x", "rating": 6}, "rating"), ({"id": "x", "rating": -2}, "rating"),
    ({"id": "x", "rating": "x"}, "rating"), ({"id": "x", "rating": 1.0}, "rating"),
    ({"id": "x", "rating": True}, "rating"), ({"id": "x"}, "rating"), ({"rating": 1}, "id"),
    ({"id": 5, "rating": 1}, "id"), ({"id": "x", "rating": 1, "correction": 5}, "correction"),
    ({"id": "x", "rating": 1, "tags": "a"}, "tags"), ({"id": "x", "rating": 1, "tags": [1]}, "tags"),
    ({"id": "x", "rating": 1, "extra": 1}, "extra"),
])
def test_feedback_body_is_strict(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as e:
        FeedbackBody.model_validate(body)
    assert e.value.errors()[0]["loc"][0] == field


def test_feedback_ratings_on_both_scales() -> None:
    assert [FeedbackBody.model_validate({"id": "x", "rating": r}).rating for r in (-1, 1, 2, 3, 4, 5)] == [
        -1, 1, 2, 3, 4, 5]


# -- the real server -------------------------------------------------------------------------

def _sse(data: bytes) -> tuple[str, str, dict[str, Any] | None]:
    """(id, text of choice 0, usage) of a streamed answer."""
    rid, text, usage = "", "", None
    for line in data.decode().splitlines():
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        rid = chunk["id"]
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            if c["index"] == 0:
                text += c["text"] if "text" in c else c["delta"].get("content", "") or ""
    return rid, text, usage


def ask(server: Server, path: str, body: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(completion id, text of choice 0, usage), streaming or not."""
    status, _, data = server.request("POST", path, body)
    assert status == 200, data[:500]
    if body.get("stream"):
        rid, text, usage = _sse(data)
        assert usage is not None
        return rid, text, usage
    r = json.loads(data)
    c = r["choices"][0]
    return r["id"], c["text"] if "text" in c else c["message"]["content"], r["usage"]


def labelled(server: Server, name: str, **labels: str) -> float:
    _, _, data = server.request("GET", "/metrics")
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in data.decode().splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name, labels)


def capture_flags(capture: Path, *extra: str) -> list[str]:
    return ["--dtype", "float64", "--capture-uri", f"file://{capture}", "--capture-writer", "pod-a",
            "--capture-shard-seconds", "0.3", "--profile-interval-seconds", "0.3", *extra]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def capture_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("capture-a")


@pytest.fixture(scope="module")
def server_a(model_dir: Path, capture_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(model_dir, tmp_path_factory.mktemp("log-a") / "server.log",
               *capture_flags(capture_a, "--capture-shard-records", "4", "--feedback-key", FEEDBACK_KEY,
                              "--capture-redact-pattern", r"TICKET=TCK-\d+", "--served-revision",
                              "2026-12-01T10:00:00.000Z"), api_key=API_KEY)
    try:
        s.wait_ready()
        yield s
    finally:
        assert s.stop() == 0


def test_records_of_both_endpoints_streaming_or_not(server_a: Server, capture_a: Path) -> None:
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]}
    cases = [("/v1/completions", {"prompt": "The quick brown fox"}, "completions"),
             ("/v1/chat/completions", chat, "chat.completions")]
    asked = []
    for path, base, endpoint in cases:
        for stream in (False, True):
            body = {**base, "max_tokens": 12, "temperature": 0, "stream": stream,
                    "stream_options": {"include_usage": True}} if stream else {**base, "max_tokens": 12,
                                                                               "temperature": 0}
            rid, text, usage = ask(server_a, path, body)
            assert re.fullmatch(("chatcmpl" if "chat" in path else "cmpl") + r"-[0-9a-f]{40}", rid), rid
            asked.append((rid, text, usage, endpoint, base))
    # token-id prompt and a batch of two prompts with n=2: choice 0 is recorded
    rid, text, usage = ask(server_a, "/v1/completions", {"prompt": list(b"ids!"), "max_tokens": 3, "temperature": 0})
    status, r = server_a.post("/v1/completions", {"prompt": ["first", "second"], "n": 2, "max_tokens": 3})
    assert status == 200
    by_id = wait_records(capture_a, {a[0] for a in asked} | {rid, r["id"]})
    for cid, text_, usage_, endpoint, base in asked:
        rec = by_id[cid]
        assert set(rec) == REQUEST_FIELDS and rec["type"] == "request"
        assert (rec["endpoint"], rec["model"], rec["revision"]) == (endpoint, "tiny", "2026-12-01T10:00:00.000Z")
        assert rec["completion"] == text_ and rec["n"] == 1 and rec["finish_reason"] in ("stop", "length")
        assert (rec["prompt_tokens"], rec["completion_tokens"]) == (usage_["prompt_tokens"],
                                                                    usage_["completion_tokens"])
        assert 0 < rec["ttft_s"] <= rec["latency_s"] < 30
        assert rec["redacted"] == {} and rec["truncated"] is False
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["time"])
        if endpoint == "completions":
            assert (rec["prompt"], rec["messages"]) == (base["prompt"], None)
        else:
            assert (rec["prompt"], rec["messages"]) == (None, base["messages"])
    # the streamed answer equals the plain one, in the records too
    assert by_id[asked[0][0]]["completion"] == by_id[asked[1][0]]["completion"]
    assert by_id[rid]["prompt"] == "ids!" and by_id[rid]["completion"] == text
    batch = by_id[r["id"]]
    assert (batch["prompt"], batch["n"], batch["completion"]) == ("first", 4, r["choices"][0]["text"])
    assert labelled(server_a, "kubeforge:capture_records_total", kind="requests") >= 6


def test_redaction_in_the_server(server_a: Server, capture_a: Path) -> None:
    rid, _, _ = ask(server_a, "/v1/completions", {"prompt": PII, "max_tokens": 2})
    cid, _, _ = ask(server_a, "/v1/chat/completions", {"messages": [{"role": "user", "content": PII}],
                                                       "max_tokens": 2})
    recs = wait_records(capture_a, {rid, cid})
    assert recs[rid]["prompt"] == PII_REDACTED and recs[rid]["redacted"] == PII_COUNTS
    assert recs[cid]["messages"][0]["content"] == PII_REDACTED and recs[cid]["redacted"] == PII_COUNTS
    assert PII not in json.dumps(list(recs.values()))


def test_feedback_is_recorded_and_bad_bodies_name_the_field(server_a: Server, capture_a: Path) -> None:
    cid, _, _ = ask(server_a, "/v1/completions", {"prompt": "rate me", "max_tokens": 4})
    status, r = server_a.post("/v1/feedback", {"id": cid, "rating": 5, "correction": "write to bob@example.org",
                                               "tags": ["helpful"]})
    assert status == 200, r
    assert re.fullmatch(r"fb-[0-9a-f]{32}", r["id"]) and r["object"] == "feedback" and r["completion_id"] == cid
    status, r2 = server_a.post("/v1/feedback", {"id": cid, "rating": -1})
    assert status == 200
    fbs = [f for f in wait_records(capture_a, {r["id"], r2["id"]}, flywheel.FEEDBACK).values()
           if f["completion_id"] == cid]
    first = next(f for f in fbs if f["id"] == r["id"])
    assert set(first) == FEEDBACK_FIELDS and first["type"] == "feedback"
    assert (first["rating"], first["correction"], first["tags"]) == (5, "write to <EMAIL>", ["helpful"])
    assert any(f["rating"] == -1 and f["correction"] is None and f["tags"] == [] for f in fbs)

    def err(body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None,
            ) -> tuple[int, dict[str, Any]]:
        status, _, data = server_a.request("POST", "/v1/feedback", body, raw=raw, headers=headers)
        return status, json.loads(data)["error"]

    for body, field in [({"id": cid, "rating": 0}, "rating"), ({"id": cid, "rating": "x"}, "rating"),
                        ({"id": cid, "rating": 6}, "rating"), ({"id": cid, "rating": 1, "comment": "hi"}, "comment"),
                        ({"id": cid, "rating": 1, "correction": 7}, "correction"),
                        ({"id": cid, "rating": 1, "correction": ["a"]}, "correction"),
                        ({"id": cid, "rating": 1, "tags": "a"}, "tags"), ({"rating": 1}, "id"),
                        ({"id": cid, "rating": 1, "correction": "x" * 40_000}, "correction")]:
        status, e = err(body)
        assert (status, e["param"]) == (422, field), (body, e)
        assert set(e) == {"message", "type", "param", "code"} and e["code"] == 422
    assert err(raw=b"{nope")[0] == 422 and err(raw=b"{nope")[1]["param"] == "body"
    assert err(raw=b"[1]")[1]["param"] == "body"
    forged = cid[:-1] + ("0" if cid[-1] != "0" else "1")
    for bad in (forged, "cmpl-unknown", CompletionIds(b"another key").new("cmpl")):
        status, e = err({"id": bad, "rating": 1})
        assert (status, e["param"]) == (404, "id"), e
    assert err({"id": cid, "rating": 1}, headers={"Content-Type": "application/json"})[0] == 401
    assert err({"id": cid, "rating": 1}, headers={"Authorization": "Bearer wrong"})[0] == 401


def test_feedback_works_on_another_replica_and_ids_expire(model_dir: Path, server_a: Server, tmp_path: Path) -> None:
    """Replica B shares A's key: it accepts A's ids, with its own (short) TTL; it also samples
    half of its requests."""
    capture_b = tmp_path / "capture-b"
    b = Server(model_dir, tmp_path / "b.log", *capture_flags(capture_b, "--feedback-key", FEEDBACK_KEY,
                                                             "--feedback-ttl-seconds", "3",
                                                             "--capture-sample-rate", "0.5"))
    try:
        b.wait_ready()
        cid, _, _ = ask(server_a, "/v1/completions", {"prompt": "served by A", "max_tokens": 2})
        status, r = b.post("/v1/feedback", {"id": cid, "rating": 4, "tags": ["from-b"]})
        assert status == 200, r
        [fb] = wait_for(lambda: records_of(capture_b, flywheel.FEEDBACK), what="B's feedback record")
        assert (fb["completion_id"], fb["rating"], fb["tags"]) == (cid, 4, ["from-b"])
        # half of 60 requests are recorded (binomial: 30 +- 3.9)
        ids = {ask(b, "/v1/completions", {"prompt": f"request {i}", "max_tokens": 1})[0] for i in range(60)}
        time.sleep(1.0)
        wait_for(lambda: labelled(b, "kubeforge:prompt_profile_prompts_total") == 60, what="B's profile")
        recorded = {rec["id"] for rec in records_of(capture_b)}
        assert recorded <= ids and 15 <= len(recorded) <= 45, len(recorded)
        assert labelled(b, "kubeforge:capture_records_total", kind="requests") == len(recorded)
        issued = int(cid[5:13], 16)
        while time.time() < issued + 4.1:  # B's TTL is 3 s (the id's time has whole seconds)
            time.sleep(0.1)
        status, r = b.post("/v1/feedback", {"id": cid, "rating": 4})
        assert (status, r["error"]["param"]) == (404, "id"), r
        assert server_a.post("/v1/feedback", {"id": cid, "rating": 4})[0] == 200  # A's TTL is 7 days
    finally:
        assert b.stop() == 0


def test_sample_rate_zero_records_nothing_but_profiles_every_prompt(model_dir: Path, tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    s = Server(model_dir, tmp_path / "s.log", *capture_flags(capture, "--capture-sample-rate", "0"))
    prompts = [f"prompt number {i} " * (i + 1) for i in range(10)]
    try:
        s.wait_ready()
        for p in prompts:
            ask(s, "/v1/completions", {"prompt": p, "max_tokens": 2})
        ask(s, "/v1/completions", {"prompt": ["ab", "cd"], "max_tokens": 1})
        ask(s, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 1})
        ask(s, "/v1/chat/completions", {"messages": [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "hello there"}], "max_tokens": 1})
        profile_path = capture / "profiles" / "pod-a.json"
        profile = wait_for(lambda: profile_path.exists() and (lambda p: p if p.prompts == 14 else None)(
            flywheel.Profile.model_validate_json(profile_path.read_bytes())), what="the profile of 14 prompts")
    finally:
        assert s.stop() == 0
    # the byte tokenizer: one id per byte, no bos in the profile; a chat is its contents, one per
    # line, without the template (what the trainer's baseline profiles)
    expected = flywheel.Profile()
    for ids in [list(p.encode()) for p in [*prompts, "ab", "cd"]] + [[5, 6, 7], list(b"be brief\nhello there")]:
        expected.add(ids)
    assert (profile.prompt_length, profile.token_frequency) == (expected.prompt_length, expected.token_frequency)
    assert not (capture / "requests").exists() or not list((capture / "requests").iterdir())


def test_drain_on_sigterm_flushes_queued_records_and_the_profile(model_dir: Path, tmp_path: Path) -> None:
    capture = tmp_path / "capture"
    s = Server(model_dir, tmp_path / "s.log", "--dtype", "float64", "--capture-uri", f"file://{capture}",
               "--capture-writer", "pod-d", "--capture-shard-seconds", "3600", "--profile-interval-seconds",
               "3600", "--shutdown-timeout", "10")
    try:
        s.wait_ready()
        ids = []
        for i in range(6):
            body: dict[str, Any] = {"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 2}
            if i % 2:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            ids.append(ask(s, "/v1/chat/completions", body)[0])
        time.sleep(0.5)
        assert committed(capture) == []  # the shard is open: an hour to go
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
    finally:
        s.stop()
    [(marker, recs)] = committed(capture)
    assert [r["id"] for r in recs] == ids and marker.writer == "pod-d"
    assert flywheel.Profile.model_validate_json((capture / "profiles" / "pod-d.json").read_bytes()).prompts == 6
    log_text = s.log_path.read_text()
    assert "capture flushed" in log_text
    assert "feedback verifies only on this replica" in log_text  # no --feedback-key


def test_unreachable_store_costs_records_never_requests(model_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEFORGE_CAPTURE_AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("KUBEFORGE_CAPTURE_AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    s = Server(model_dir, tmp_path / "s.log", "--dtype", "float64", "--capture-uri", "s3://bucket/ns/svc/capture",
               "--capture-s3-endpoint", "http://127.0.0.1:9", "--capture-shard-records", "6")
    try:
        s.wait_ready()
        latencies = []
        for i in range(12):
            t0 = time.monotonic()
            ask(s, "/v1/completions", {"prompt": f"store down {i}", "max_tokens": 4})
            latencies.append(time.monotonic() - t0)
        # each failed shard costs the writer seconds of retries; a request that waited on it would show it
        assert max(latencies) < 1.0, latencies
        wait_for(lambda: labelled(s, "kubeforge:capture_dropped_total", reason="store_error") == 12, 30,
                 "12 records dropped for the store")
        assert labelled(s, "kubeforge:capture_records_total", kind="requests") == 0
        assert labelled(s, "kubeforge:capture_dropped_total", reason="queue_full") == 0
    finally:
        assert s.stop() == 0


def test_s3_capture_survives_an_outage(model_dir: Path, tmp_path: Path, s3_server: S3Server,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEFORGE_CAPTURE_AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("KUBEFORGE_CAPTURE_AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    prefix = "store-root/ns/svc/capture"
    s = Server(model_dir, tmp_path / "s.log", "--dtype", "float64", "--capture-uri", s3_server.uri(prefix),
               "--capture-s3-endpoint", s3_server.endpoint, "--capture-shard-records", "2",
               "--capture-writer", "pod-s3")
    client = s3_server.client()

    def markers() -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket,
                                                                  Prefix=f"{prefix}/requests/")
        return [o["Key"] for p in pages for o in p.get("Contents", []) if o["Key"].endswith(".commit.json")]

    try:
        s.wait_ready()
        for i in range(4):
            ask(s, "/v1/completions", {"prompt": f"up {i}", "max_tokens": 2})
        wait_for(lambda: len(markers()) == 2, what="2 committed shards on S3")
        s3_server.stop()
        try:
            for i in range(4):
                t0 = time.monotonic()
                ask(s, "/v1/completions", {"prompt": f"down {i}", "max_tokens": 2})
                assert time.monotonic() - t0 < 1.0
            wait_for(lambda: labelled(s, "kubeforge:capture_dropped_total", reason="store_error") == 4, 30,
                     "the records of the outage dropped")
        finally:
            s3_server.start()
        for i in range(2):
            ask(s, "/v1/completions", {"prompt": f"back {i}", "max_tokens": 2})
        wait_for(lambda: len(markers()) == 3, 30, "a shard committed after the outage")
        key = markers()[-1].removesuffix(".commit.json") + ".tar"
        data = client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            prompts = [json.loads(tar.extractfile(m).read())["prompt"] for m in tar.getmembers()]  # type: ignore[union-attr]
        assert prompts == ["back 0", "back 1"]
        assert labelled(s, "kubeforge:capture_records_total", kind="requests") == 6
    finally:
        assert s.stop() == 0


def test_feedback_without_capture_is_501(model_dir: Path, tmp_path: Path) -> None:
    s = Server(model_dir, tmp_path / "s.log", "--dtype", "float64")
    try:
        s.wait_ready()
        cid, _, _ = ask(s, "/v1/completions", {"prompt": "no capture", "max_tokens": 2})
        assert re.fullmatch(r"cmpl-[0-9a-f]{40}", cid)
        status, r = s.post("/v1/feedback", {"id": cid, "rating": 1})
        assert status == 501 and r["error"]["code"] == 501, r
        assert not any(n.startswith("kubeforge:") for n in s.metrics())
    finally:
        assert s.stop() == 0
    assert "feedback verifies only on this replica" not in s.log_path.read_text()


def test_capture_flags_are_checked(model_dir: Path) -> None:
    for flags, message in [(["--capture-sample-rate", "1.5"], "capture-sample-rate"),
                           (["--capture-redact-pattern", "nope"], "NAME=REGEX"),
                           (["--capture-redact-pattern", "lower=x"], "must match"),
                           (["--capture-max-record-bytes", "10"], "at least 1024")]:
        out = subprocess.run([sys.executable, "-m", "kubeforge_runtime.serve", "--model", str(model_dir), *flags],
                             capture_output=True, text=True, timeout=60, env={**os.environ})
        assert out.returncode == 2 and message in out.stderr, (flags, out.stderr[-500:])
