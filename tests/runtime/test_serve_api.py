"""The real server over HTTP (``python -m kubeforge_runtime.serve`` as a subprocess on
127.0.0.1, ended by pid): concurrency does not change greedy outputs, streaming equals
non-streaming, a client that disconnects frees its blocks, bad input is answered 400/401/404
naming the field, a full queue is answered 429 with Retry-After, SIGTERM drains without
dropping an accepted request and exits 0, and fuzzed bodies never crash the server.

The model is a random-init ``tiny`` Llama served in float64, so that greedy outputs of
differently composed batches are equal token for token (see test_serve_engine.py).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubeforge_runtime.model.hf import save_hf
from kubeforge_runtime.model.llama import Llama, preset
from kubeforge_runtime.tokenizer import ByteTokenizer

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(90)]

# -- harness --------------------------------------------------------------------------------


def save_tiny_model(directory: Path, seed: int = 7) -> Path:
    """A random-init ``tiny`` Llama in Hugging Face layout, with the byte tokenizer's files."""
    tok = ByteTokenizer()
    m = Llama(preset("tiny", initializer_range=0.2))
    m.init_weights(seed)
    save_hf(m, directory, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, model_dir: Path, log_path: Path, *flags: str, api_key: str | None = None) -> None:
        self.port = free_port()
        self.api_key = api_key
        cmd = [sys.executable, "-m", "kubeforge_runtime.serve", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--threads", "1", "--served-model-name", "tiny", *flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if api_key:
            env["KUBEFORGE_API_KEY"] = api_key
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log_path.read_text()}")

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=data, headers=headers if headers is not None else self.headers())
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        status, _, data = self.request("POST", path, body)
        return status, json.loads(data)

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of the sample lines (the model_name label is dropped)."""
        _, _, data = self.request("GET", "/metrics")
        out: dict[str, float] = {}
        for line in data.decode().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, value = line.rsplit(" ", 1)
            name = re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "")
            out[name] = float(value)
        return out

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


async def _complete(session: aiohttp.ClientSession, server: Server, path: str, body: dict[str, Any],
                    ) -> tuple[int, dict[str, Any]]:
    """POST; for ``stream: true`` the SSE chunks are folded into the non-streaming shape."""
    async with session.post(server.base + path, json=body, headers=server.headers()) as resp:
        if not body.get("stream") or resp.status != 200:
            return resp.status, await resp.json()
        texts: dict[int, str] = {}
        finish: dict[int, str | None] = {}
        usage = None
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                piece = c["text"] if "text" in c else c["delta"].get("content", "")
                texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
                if c["finish_reason"]:
                    finish[c["index"]] = c["finish_reason"]
        return 200, {"choices": [{"index": i, "text": texts[i], "finish_reason": finish.get(i)}
                                 for i in sorted(texts)], "usage": usage}


def _text(choice: dict[str, Any]) -> str:
    return str(choice["text"] if "text" in choice else choice["message"]["content"])


def _gather(server: Server, path: str, bodies: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    async def go() -> list[tuple[int, dict[str, Any]]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            return list(await asyncio.gather(*(_complete(s, server, path, b) for b in bodies)))
    return asyncio.run(go())


def _wait_until_idle(server: Server, timeout: float = 15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle: {m}")
        time.sleep(0.05)


# -- fixtures -------------------------------------------------------------------------------

API_KEY = "test-key"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # 64 blocks of 8 tokens hold two full-length sequences: 16 concurrent requests preempt
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--dtype", "float64", "--block-size", "8",
               "--num-blocks", "64", "--max-num-seqs", "8", "--max-num-batched-tokens", "64", api_key=API_KEY)
    try:
        s.wait_ready()
        yield s
    finally:
        assert s.stop() == 0


# -- tests ----------------------------------------------------------------------------------

def test_health_models_and_metrics_names(server: Server) -> None:
    assert server.request("GET", "/health", headers={})[0] == 200
    assert server.post("/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 200
    _, _, raw = server.request("GET", "/v1/models")
    assert json.loads(raw)["data"][0]["id"] == "tiny"
    names = set(server.metrics())
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"]:
        assert name in names, name
    assert any(n.startswith("vllm:request_success_total{finished_reason=") for n in names)


def test_concurrent_greedy_equals_one_at_a_time(server: Server) -> None:
    import random

    rng = random.Random(3)
    bodies = [{"prompt": [rng.randrange(256) for _ in range(rng.randint(1, 100))], "max_tokens": 24,
               "temperature": 0, "stream": i % 2 == 1} for i in range(16)]
    alone = [server.post("/v1/completions", {**b, "stream": False}) for b in bodies]
    preempted = server.metrics()["vllm:num_preemptions_total"]
    together = _gather(server, "/v1/completions", bodies)
    assert server.metrics()["vllm:num_preemptions_total"] > preempted, "64 blocks for 16 requests must preempt"
    assert [s for s, _ in together] == [200] * 16
    assert [_text(r["choices"][0]) for _, r in together] == [_text(r["choices"][0]) for _, r in alone]
    assert len({_text(r["choices"][0]) for _, r in alone}) > 10
    # the same prompt twice in a row: the second is served from the prefix cache, unchanged
    first = server.post("/v1/completions", {**bodies[5], "stream": False})[1]
    second = server.post("/v1/completions", {**bodies[5], "stream": False})[1]
    n = len(bodies[5]["prompt"])
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 8 * 8 > 0
    assert _text(second["choices"][0]) == _text(first["choices"][0]) == _text(alone[5][1]["choices"][0])
    _wait_until_idle(server)


def test_streaming_equals_non_streaming(server: Server) -> None:
    for path, base in [("/v1/completions", {"prompt": "The quick brown fox"}),
                       ("/v1/chat/completions", {"messages": [{"role": "system", "content": "be brief"},
                                                              {"role": "user", "content": "hello there"}]})]:
        for extra in [{"max_tokens": 40}, {"max_tokens": 60, "stop": ["e", "zz"]},
                      {"max_tokens": 30, "n": 2, "temperature": 0.9, "seed": 5}]:
            body = {**base, "temperature": 0, **extra}
            status, plain = server.post(path, body)
            assert status == 200, plain
            _, streamed = _gather(server, path, [{**body, "stream": True,
                                                  "stream_options": {"include_usage": True}}])[0]
            assert [_text(c) for c in streamed["choices"]] == [_text(c) for c in plain["choices"]]
            assert [c["finish_reason"] for c in streamed["choices"]] == [c["finish_reason"] for c in plain["choices"]]
            # the plain request ran first, so the streamed one may find the prompt cached
            assert {**streamed["usage"], "prompt_tokens_details": None} == {**plain["usage"],
                                                                           "prompt_tokens_details": None}


def test_disconnect_mid_stream_frees_blocks(server: Server) -> None:
    before = server.metrics()["vllm:generation_tokens_total"]

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                body = {"prompt": "abc", "max_tokens": 240, "ignore_eos": True, "stream": True}
                resp = await s.post(server.base + "/v1/completions", json=body, headers=server.headers())
                chunks = 0
                async for raw in resp.content:
                    chunks += raw.startswith(b"data: ")
                    if chunks == 3:
                        break
                resp.close()  # drops the connection mid-stream
    asyncio.run(go())
    m = _wait_until_idle(server)
    generated = m["vllm:generation_tokens_total"] - before
    assert generated < 3 * 240, "the disconnected requests must have been cancelled, not run to the end"


def test_bad_input_is_answered_with_the_field(server: Server) -> None:
    def err(path: str, body: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None,
            method: str = "POST") -> tuple[int, dict[str, Any], dict[str, str]]:
        status, hdrs, data = server.request(method, path, body, raw=raw, headers=headers)
        return status, json.loads(data)["error"], hdrs

    c = "/v1/completions"
    assert err(c, raw=b"{not json")[:2] == (400, {**err(c, raw=b"{not json")[1], "param": "body"})
    assert err(c, raw=b"[1, 2]")[0] == 400
    s, e, _ = err(c, {"prompt": "hi", "max_tokens": "10"})
    assert (s, e["param"]) == (400, "max_tokens")
    s, e, _ = err(c, {"prompt": "hi", "max_token": 10})
    assert (s, e["param"]) == (400, "max_token") and "unknown parameter" in e["message"]
    s, e, _ = err(c, {"prompt": "hi", "temperature": -1})
    assert (s, e["param"]) == (400, "temperature")
    s, e, _ = err(c, {"prompt": 5})
    assert (s, e["param"]) == (400, "prompt")
    s, e, _ = err("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert (s, e["param"]) == (400, "messages[0].role")
    s, e, _ = err(c, {"prompt": [1] * 300})
    assert s == 400 and "256" in e["message"] and "300" in e["message"]
    s, e, _ = err(c, {"prompt": [1] * 100, "max_tokens": 200})
    assert (s, e["param"]) == (400, "max_tokens") and "256" in e["message"] and "300" in e["message"]
    s, e, _ = err(c, {"prompt": [999]})
    assert (s, e["param"]) == (400, "prompt")
    # stop strings are bounded: 16 of at most 256 characters (unbounded, they stalled the engine)
    s, e, _ = err(c, {"prompt": "hi", "stop": ["x" * 257]})
    assert s == 400 and e["param"].startswith("stop") and "256" in e["message"], e
    s, e, _ = err(c, {"prompt": "hi", "stop": "x" * 60_000})
    assert s == 400 and e["param"] == "stop" and "256" in e["message"], e
    s, e, _ = err(c, {"prompt": "hi", "stop": [f"s{i}" for i in range(17)]})
    assert s == 400 and e["param"] == "stop" and "16" in e["message"], e
    # a body near the 8 MB limit is parsed and tokenized off the event loop, then refused
    s, e, _ = err(c, {"prompt": "y" * 7_000_000})
    assert s == 400 and "maximum context length" in e["message"], e
    s, e, _ = err(c, {"prompt": "hi", "model": "gpt-4"})
    assert (s, e["param"]) == (404, "model")
    s, e, _ = err(c, {"prompt": "hi"}, headers={"Content-Type": "application/json"})
    assert s == 401
    s, e, _ = err(c, {"prompt": "hi"}, headers={"Authorization": "Bearer wrong"})
    assert s == 401
    assert err(c, method="GET")[0] == 405
    assert server.request("GET", "/nope")[0] == 404
    assert server.request("GET", "/health", headers={})[0] == 200


def test_full_queue_answers_429_with_retry_after(model_dir: Path, tmp_path: Path) -> None:
    s = Server(model_dir, tmp_path / "server.log", "--max-num-seqs", "1", "--max-queue-len", "1")
    try:
        s.wait_ready()
        results: list[tuple[int, str | None]] = []

        async def one(session: aiohttp.ClientSession) -> None:
            body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True}
            async with session.post(s.base + "/v1/completions", json=body, headers=s.headers()) as r:
                await r.read()
                results.append((r.status, r.headers.get("Retry-After")))

        async def go() -> None:
            async with aiohttp.ClientSession() as session:
                # the queue holds requests not yet running: let the first one start, then
                # five arrive at once: one of them waits, the others find the queue full
                first = asyncio.create_task(one(session))
                deadline = time.monotonic() + 30
                while (await asyncio.to_thread(s.metrics))["vllm:num_requests_running"] < 1:
                    assert time.monotonic() < deadline, "the first request never started"
                    await asyncio.sleep(0.02)
                await asyncio.gather(*(one(session) for _ in range(5)))
                await first
        asyncio.run(go())
        statuses = sorted(st_ for st_, _ in results)
        assert statuses.count(200) >= 2 and 429 in statuses, statuses
        assert all(ra == "1" for st_, ra in results if st_ == 429)
        _wait_until_idle(s)
    finally:
        assert s.stop() == 0


def test_sigterm_drains_accepted_requests_and_exits_zero(model_dir: Path, tmp_path: Path) -> None:
    # two sequences at a time: of eight accepted requests most are still queued at SIGTERM
    s = Server(model_dir, tmp_path / "server.log", "--max-num-seqs", "2", "--shutdown-timeout", "60")
    try:
        s.wait_ready()

        async def one(session: aiohttp.ClientSession, started: asyncio.Event) -> dict[str, Any]:
            body = {"prompt": "drain me", "max_tokens": 200, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with session.post(s.base + "/v1/completions", json=body, headers=s.headers()) as r:
                assert r.status == 200
                started.set()
                usage, finish = None, None
                async for raw in r.content:
                    line = raw.decode().strip()
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        usage = chunk.get("usage") or usage
                        for c in chunk["choices"]:
                            finish = c["finish_reason"] or finish
                return {"usage": usage, "finish": finish}

        async def go() -> tuple[list[dict[str, Any]], int, int]:
            async with aiohttp.ClientSession() as session:
                events = [asyncio.Event() for _ in range(8)]
                tasks = [asyncio.create_task(one(session, ev)) for ev in events]
                await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in events)), 30)
                s.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                async with session.get(s.base + "/health") as h:
                    health = h.status
                async with session.get(s.base + "/livez") as lz:
                    assert lz.status == 200  # draining is alive: no restart mid-drain
                async with session.post(s.base + "/v1/completions", json={"prompt": "late", "max_tokens": 2},
                                        headers=s.headers()) as late:
                    late_status = late.status
                return list(await asyncio.gather(*tasks)), health, late_status

        done, health, late = asyncio.run(go())
        assert (health, late) == (503, 503)
        assert all(d["finish"] == "length" and d["usage"]["completion_tokens"] == 200 for d in done), done
        assert s.proc.wait(60) == 0
    finally:
        s.stop()
    assert "drained" in s.log_path.read_text()


# -- fuzzing --------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
_fields = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
           "seed", "stop", "stop_token_ids", "ignore_eos", "n", "stream", "stream_options", "user", "logprobs"]
_small_valid = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(-3, 300), max_size=30),
                         st.lists(st.text(max_size=10), max_size=3))},
    optional={"max_tokens": st.integers(-1, 6), "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5),
              "top_k": st.integers(-3, 300), "seed": st.integers(-(2**65), 2**65), "n": st.integers(0, 3),
              "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
              "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
              "stop_token_ids": st.lists(st.integers(-1, 2**40), max_size=3), "ignore_eos": st.booleans()})
_small_chat = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                                 "content": st.one_of(st.text(max_size=20), st.none(), _json)}),
                          max_size=3)},
    optional={"max_tokens": st.integers(-1, 6), "max_completion_tokens": st.integers(-1, 6),
              "stream": st.booleans(), "temperature": st.floats(0, 2), "n": st.integers(1, 2)})
_bodies = st.one_of(_json, st.dictionaries(st.sampled_from(_fields), _json, max_size=6), _small_valid, _small_chat)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=_bodies,
       mangle=st.sampled_from(["json", "json", "json", "truncate", "bytes"]))
def test_fuzzed_requests_never_crash_the_server(server: Server, path: str, body: Any, mangle: str) -> None:
    raw = json.dumps(body).encode()
    if mangle == "truncate":
        raw = raw[: len(raw) // 2]
    elif mangle == "bytes":
        raw = bytes(b ^ 0x5A for b in raw)
    if isinstance(body, dict) and "max_tokens" not in body and "max_completion_tokens" not in body:
        # keep valid requests short; everything else is left as generated
        raw = raw.replace(b"{", b'{"max_tokens": 4, ', 1) if raw.startswith(b"{") and raw != b"{}" else raw
    status, _, data = server.request("POST", path, raw=raw)
    assert status in (200, 400, 404, 429), (status, data[:300])
    if status != 200:
        assert "error" in json.loads(data)
    assert server.request("GET", "/health", headers={})[0] == 200


def test_server_is_whole_after_fuzzing(server: Server) -> None:
    _wait_until_idle(server)
    # greedy: the OpenAI default temperature (1) samples, and the tiny model may then draw its
    # end-of-text token early (a CI run drew it at the first token); a whole server answers in
    # full or stops at that token
    status, r = server.post("/v1/completions", {"prompt": "still here", "max_tokens": 3, "temperature": 0})
    assert status == 200, r
    choice = r["choices"][0]
    assert (r["usage"]["completion_tokens"], choice["finish_reason"]) == (3, "length") or \
        (1 <= r["usage"]["completion_tokens"] < 3 and choice["finish_reason"] == "stop"), r


def test_unloadable_model_exits_nonzero(tmp_path: Path) -> None:
    """A bad model URI must fail the pod (CrashLoopBackOff shows it), not leave it unready forever."""
    s = Server(tmp_path / "missing", tmp_path / "server.log")
    try:
        assert s.proc.wait(60) == 1
    finally:
        s.stop()
    assert "no config.json" in s.log_path.read_text()
