"""Capture of served traffic and feedback into the store, for the data flywheel (issue 17).

The request path does as little as it can: it decides sampling (``sampled()``, one random
number), builds a small dict of what it already has and ``put_nowait``s it into a bounded
queue. Everything else happens on one background thread, not the event loop: PII redaction,
cutting a record to ``max_record_bytes``, JSON, the WebDataset tar shards (member
``<id>.json``), their rotation, the upload (shard first, its ``ShardMarker`` last, so a
half-written shard is never read) and the live prompt profile. A full queue or a failing
store loses records, counted in ``kubeforge:capture_dropped_total{reason}``, never a request:
the store's own retries are kept to a few seconds so an outage costs records, not a writer
stuck behind one shard.

Layout and record formats: ``kubeforge.store.flywheel``; the URI given is the capture
directory itself (``.../<namespace>/<service>/capture``), so keys here are relative to it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import math
import queue
import random
import re
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kubeforge.store import flywheel
from kubeforge.store.backends import ObjectBackend, S3Options, open_backend
from kubeforge.store.layout import utc_now

from kubeforge_runtime.redact import Redactor
from kubeforge_runtime.serve.metrics import CaptureMetrics

log = logging.getLogger(__name__)

REQUESTS, FEEDBACK = flywheel.REQUESTS, flywheel.FEEDBACK
#: how long one store call may keep retrying before its shard is given up
STORE_RETRY_DEADLINE_S = 3.0
#: the writer thread looks at its clocks (shard age, profile interval) at least this often
MAX_WAIT_S = 0.5


@dataclasses.dataclass(frozen=True)
class CaptureSettings:
    """What ``--capture-*``, ``--drift-window`` and ``--profile-interval-seconds`` set."""

    #: share of requests recorded (0..1); the prompt profile sees every request regardless
    sample_rate: float = 1.0
    redact: bool = True
    #: user patterns, (NAME, regex): matches become ``<NAME>``
    redact_patterns: tuple[tuple[str, str], ...] = ()
    #: a record's JSON is cut to this size (prompt and completion text first)
    max_record_bytes: int = 65536
    queue_size: int = 10000
    shard_records: int = 1000
    shard_seconds: float = 60.0
    #: this server's name in shard and profile names (a DNS label: the pod name)
    writer: str = "server"
    #: prompts per profile window; the profile written holds the current and the previous one
    drift_window: int = 500
    profile_interval_s: float = 30.0


def writer_name(name: str) -> str:
    """A pod or host name made safe for ``flywheel.shard_name``."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", name).strip(".-") or "server"


def open_capture_backend(uri: str, endpoint_url: str | None = None, access_key_id: str | None = None,
                         secret_access_key: str | None = None, region: str | None = None,
                         force_path_style: bool = True) -> ObjectBackend:
    """The capture directory as a backend with short retries and timeouts (an unreachable
    endpoint costs a shard a few seconds, not minutes). Its endpoint, region and addressing
    are its own: without ``endpoint_url`` it is AWS's, whatever ``AWS_ENDPOINT_URL`` (the
    model's store) says."""
    return open_backend(uri, S3Options(endpoint_url=endpoint_url, access_key_id=access_key_id,
                                       secret_access_key=secret_access_key, region=region,
                                       force_path_style=force_path_style, ignore_env_endpoint=True,
                                       retry_deadline_s=STORE_RETRY_DEADLINE_S, connect_timeout_s=2.0,
                                       read_timeout_s=20.0))


def rfc3339(t: float) -> str:
    """Unix seconds in ``layout.utc_now``'s form (milliseconds, ``Z``)."""
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


def _cap(lengths: list[int], budget: int) -> int:
    """The largest L with sum(min(n, L)) <= budget: cutting every text to L characters takes
    from the longest first and leaves the short ones whole."""
    lo, hi = 0, max(lengths)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_record(record: dict[str, Any], max_bytes: int) -> tuple[bytes, bool]:
    """The record's JSON cut to ``max_bytes``: prompt, completion and message contents lose
    their tails, the longest first, down to a common length; messages themselves go (oldest
    first) only when that is not enough. Returns (JSON, truncated). Each pass takes away the
    characters the excess is worth at the texts' own bytes per character (so UTF-8 text is not
    cut twice as short as it must be), at least one; a pass that leaves a little over repeats."""
    data = _encode(record)
    if len(data) <= max_bytes:
        return data, False
    record["truncated"] = True
    while True:
        data = _encode(record)
        excess = len(data) - max_bytes
        if excess <= 0:
            return data, True
        slots: list[tuple[dict[str, Any], str]] = [(record, k) for k in ("prompt", "completion")
                                                   if isinstance(record.get(k), str) and record[k]]
        slots += [(m, "content") for m in record.get("messages") or () if m.get("content")]
        if slots:
            lengths = [len(h[k]) for h, k in slots]
            text_bytes = sum(len(json.dumps(h[k], ensure_ascii=False).encode()) - 2 for h, k in slots)
            remove = max(1, math.ceil(excess * sum(lengths) / text_bytes))
            cap = _cap(lengths, sum(lengths) - remove)
            for holder, key in slots:
                holder[key] = holder[key][:cap]
        elif record.get("messages"):
            record["messages"] = record["messages"][1:]
        else:
            return data, True  # nothing left to cut: ids and counts alone are over the limit


class _Shard:
    """One tar being filled in memory (at most shard_records x max_record_bytes)."""

    def __init__(self, kind: str, seq: int) -> None:
        self.kind, self.seq = kind, seq
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.records = 0
        self.first_time = self.last_time = ""
        self.opened = time.monotonic()

    def add(self, record_id: str, record_time: float, data: bytes) -> None:
        info = tarfile.TarInfo(f"{record_id}.json")
        info.size, info.mtime, info.mode = len(data), int(record_time), 0o644
        self.tar.addfile(info, io.BytesIO(data))
        stamp = rfc3339(record_time)
        # a long answer may be added after a later short one: the window is min..max
        self.first_time = min(self.first_time, stamp) if self.first_time else stamp
        self.last_time = max(self.last_time, stamp)
        self.records += 1

    def finish(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


class LiveProfile:
    """Two windows of ``window`` prompts: the written profile is the current one merged with
    the previous, so it always holds between ``window`` and ``2 * window`` recent prompts
    (once that many arrived) and never jumps to empty when a window turns over."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.current = flywheel.Profile()
        self.previous = flywheel.Profile()

    def add(self, token_ids: Sequence[int]) -> None:
        self.current.add(token_ids)
        if self.current.prompts >= self.window:
            self.previous, self.current = self.current, flywheel.Profile()

    def snapshot(self) -> flywheel.Profile:
        out = flywheel.merged((self.previous, self.current))
        out.time = utc_now()
        return out


_CLOSE = object()
#: a chat's text for the live profile is cut here before it is queued: at least 4096 tokens
#: (the profile's last length bucket) for any tokenizer of up to 8 characters a token
PROFILE_MAX_CHARS = 32768


class CaptureWriter:
    """The bounded queue and its background writer thread (see the module docstring)."""

    def __init__(self, backend: ObjectBackend, settings: CaptureSettings, metrics: CaptureMetrics,
                 decode: Callable[[Sequence[int]], str] | None = None,
                 encode: Callable[[str], list[int]] | None = None) -> None:
        self.backend, self.settings, self.metrics = backend, settings, metrics
        self.writer = writer_name(settings.writer)
        self._decode, self._encode = decode, encode
        self._redactor = Redactor(settings.redact_patterns) if settings.redact else None
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=settings.queue_size)
        self._shards: dict[str, _Shard] = {}
        self._seq = {REQUESTS: 0, FEEDBACK: 0}
        self.profile = LiveProfile(settings.drift_window)
        self._profile_due = time.monotonic() + settings.profile_interval_s
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        #: records taken from the queue into open shards (or uploading) and not yet committed
        #: or dropped; once ``close`` gave up (``_gave_up``) they were counted as shutdown
        self._count_lock = threading.Lock()
        self._uncommitted = 0
        self._gave_up = False

    # -- the request side (event loop): nothing here may block or take long ----------------

    def sampled(self) -> bool:
        return random.random() < self.settings.sample_rate

    def observe_prompt(self, token_ids: list[int] | str) -> None:
        """A prompt for the live profile (every request, sampled or not): its token ids, or a
        text the writer thread tokenizes (a chat's contents: no second tokenization on the
        event loop). Lost, uncounted, when the queue is full: ``prompt_profile_prompts_total``
        counts what was added."""
        if isinstance(token_ids, str) and len(token_ids) > PROFILE_MAX_CHARS:
            token_ids = token_ids[:PROFILE_MAX_CHARS]
        try:
            self._queue.put_nowait(("prompt", token_ids))
        except queue.Full:
            pass

    def capture(self, kind: str, raw: dict[str, Any]) -> bool:
        """Queue a request (``kind`` REQUESTS) or feedback record; False when the queue was
        full and it was dropped (and counted)."""
        if self._closing.is_set():
            self.metrics.dropped["shutdown"].inc()
            return False
        try:
            self._queue.put_nowait((kind, raw))
            return True
        except queue.Full:
            self.metrics.dropped["queue_full"].inc()
            return False

    # -- life -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float) -> bool:
        """Flush what is queued into final shards and write the profile, for up to ``timeout``
        seconds; True when all of it was done in time."""
        if self._thread.ident is None:
            self._thread.start()
        self._closing.set()
        try:
            self._queue.put_nowait(("close", _CLOSE))  # wakes an idle writer at once
        except queue.Full:
            pass  # a busy one sees _closing once the queue is empty
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            # what the writer will not commit before the process ends: the queued records and
            # those in its open or uploading shards (should one still land, it is not counted
            # as committed too)
            with self._queue.mutex:
                queued = sum(1 for k, _ in self._queue.queue if k in (REQUESTS, FEEDBACK))
            with self._count_lock:
                self._gave_up = True
                left = queued + self._uncommitted
            self.metrics.dropped["shutdown"].inc(left)
            log.warning("capture: drain did not finish in %.1fs; %d records are lost", timeout, left)
            return False
        return True

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except Exception:  # noqa: BLE001 - the writer must outlive any one record
                log.exception("capture writer: unexpected error (continuing)")

    def _step(self) -> bool:
        """One item or one wake-up; True once closed and flushed."""
        try:
            kind, item = self._queue.get(timeout=self._wait_s())
        except queue.Empty:
            kind, item = "", None
        if item is _CLOSE or (kind == "" and self._closing.is_set()):
            self._drain()
            return True
        if kind == "prompt":
            self._profile(item)
        elif kind == REQUESTS:
            self._add(REQUESTS, self._request_record(item))
        elif kind == FEEDBACK:
            self._add(FEEDBACK, self._feedback_record(item))
        self._tick()
        return False

    def _profile(self, prompt: list[int] | str) -> None:
        if isinstance(prompt, str):
            if self._encode is None:
                return
            prompt = self._encode(prompt)
        self.profile.add(prompt)
        self.metrics.profile_prompts.inc()

    def _drain(self) -> None:
        """The records first, into committed shards; then the queued prompts and the profile
        (the drain budget goes to what is captured before what is profiled)."""
        prompts: list[list[int] | str] = []
        while True:
            try:
                kind, item = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "prompt":
                prompts.append(item)
            elif kind in (REQUESTS, FEEDBACK):
                self._add(kind, self._request_record(item) if kind == REQUESTS else self._feedback_record(item))
        for kind in list(self._shards):
            self._commit(kind)
        for prompt in prompts:
            self._profile(prompt)
        self._write_profile()

    def _wait_s(self) -> float:
        now = time.monotonic()
        due = [self._profile_due] + [s.opened + self.settings.shard_seconds for s in self._shards.values()]
        return min(MAX_WAIT_S, max(0.001, min(due) - now))

    def _tick(self) -> None:
        now = time.monotonic()
        for kind, shard in list(self._shards.items()):
            if now - shard.opened >= self.settings.shard_seconds:
                self._commit(kind)
        if now >= self._profile_due:
            self._profile_due = now + self.settings.profile_interval_s
            self._write_profile()

    def _redact(self, text: str | None, counts: dict[str, int]) -> str | None:
        return text if self._redactor is None else self._redactor.redact_text(text, counts)

    def _redact_long(self, text: str | None, counts: dict[str, int]) -> str | None:
        """``_redact`` of a text first cut to twice the record size: a regex holds the GIL for
        its whole scan, and a 500 KB prompt would stall the event loop for it. ``fit_record``
        cuts well before this point, so a PII match broken by it never reaches the record."""
        limit = 2 * self.settings.max_record_bytes
        return self._redact(text[:limit] if text is not None and len(text) > limit else text, counts)

    def _request_record(self, raw: dict[str, Any]) -> tuple[str, float, dict[str, Any]]:
        counts: dict[str, int] = {}
        prompt = raw["prompt"]
        if isinstance(prompt, list):  # token ids
            prompt = self._decode(prompt) if self._decode is not None else None
        messages = raw["messages"]
        if messages is not None:
            messages = [{**m, "content": self._redact_long(m["content"], counts)} for m in messages]
        record = {
            "type": "request", "id": raw["id"], "time": rfc3339(raw["time"]), "model": raw["model"],
            "revision": raw["revision"], "endpoint": raw["endpoint"], "prompt": self._redact_long(prompt, counts),
            "messages": messages, "completion": self._redact_long(raw["completion"], counts), "n": raw["n"],
            "prompt_tokens": raw["prompt_tokens"], "completion_tokens": raw["completion_tokens"],
            "finish_reason": raw["finish_reason"], "ttft_s": raw["ttft_s"], "latency_s": raw["latency_s"],
            "redacted": counts, "truncated": False}
        return raw["id"], raw["time"], record

    def _feedback_record(self, raw: dict[str, Any]) -> tuple[str, float, dict[str, Any]]:
        counts: dict[str, int] = {}
        tags = [self._redact(t, counts) for t in raw["tags"]]
        record = {"type": "feedback", "id": raw["id"], "completion_id": raw["completion_id"],
                  "time": rfc3339(raw["time"]), "rating": raw["rating"],
                  "correction": self._redact(raw["correction"], counts), "tags": tags}
        return raw["id"], raw["time"], record

    def _add(self, kind: str, entry: tuple[str, float, dict[str, Any]]) -> None:
        record_id, record_time, record = entry
        if kind == REQUESTS:
            data, _ = fit_record(record, self.settings.max_record_bytes)
        else:
            data = _encode(record)  # the handler bounds a correction's size
        shard = self._shards.get(kind)
        if shard is None:
            shard = self._shards[kind] = _Shard(kind, self._seq[kind])
            self._seq[kind] += 1
        shard.add(record_id, record_time, data)
        with self._count_lock:
            self._uncommitted += 1
        if shard.records >= self.settings.shard_records:
            self._commit(kind)

    def _commit(self, kind: str) -> None:
        """Upload the open shard, then its marker; on failure its records are dropped."""
        shard = self._shards.pop(kind)
        data = shard.finish()
        key = f"{kind}/{flywheel.shard_name(shard.first_time, self.writer, shard.seq)}"
        marker = flywheel.ShardMarker(kind=kind, writer=self.writer, records=shard.records, bytes=len(data),
                                      sha256=hashlib.sha256(data).hexdigest(), first_time=shard.first_time,
                                      last_time=shard.last_time, time=utc_now())
        try:
            self.backend.put_bytes(key, data)
            self.backend.put_bytes(flywheel.shard_marker_key(key), marker.to_json())
        except Exception as e:  # noqa: BLE001 - any store failure costs the shard, never the writer
            log.warning("capture: shard %s (%d records) not written, dropped: %s", key, shard.records, e)
            if self._settle(shard.records):
                self.metrics.dropped["store_error"].inc(shard.records)
            return
        if self._settle(shard.records):
            self.metrics.records[kind].inc(shard.records)
            self.metrics.bytes[kind].inc(len(data))

    def _settle(self, records: int) -> bool:
        """A shard's records left the uncommitted count; False when ``close`` already counted
        them as lost (shutdown)."""
        with self._count_lock:
            self._uncommitted -= records
            return not self._gave_up

    def _write_profile(self) -> None:
        snapshot = self.profile.snapshot()
        if snapshot.prompts == 0:
            return
        key = f"{flywheel.PROFILES}/{self.writer}.json"  # flywheel.profile_key under the capture dir
        try:
            self.backend.put_bytes(key, snapshot.to_json())
        except Exception as e:  # noqa: BLE001 - the next interval tries again
            log.warning("capture: profile %s not written: %s", key, e)
