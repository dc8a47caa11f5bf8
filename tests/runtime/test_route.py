"""The traffic router (``python -m kubeforge_runtime.route``) in front of real servers: the
canary share exact in aggregate, sessions sticky, streams passed through unchanged, a shadow
that answers is compared and never returned, one that is down or hung never touches a client,
an unreachable canary falls back to the stable revision, per-revision metrics, reloads, drain.
"""

from __future__ import annotations

import concurrent.futures
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

import pytest
from kubeforge_runtime.route.proxy import answer_text
from kubeforge_runtime.route.split import BUCKETS, ExactShare, RouterConfig, TrafficSplit, session_bucket
from pydantic import ValidationError

from tests.runtime.test_serve_api import Server, free_port, save_tiny_model

pytestmark = pytest.mark.runtime


# -- the policy alone -----------------------------------------------------------------------

@pytest.mark.parametrize("percent", [0, 1, 10, 20, 33.3, 50, 99.5, 100])
def test_the_share_is_exact_after_every_request(percent: float) -> None:
    share = ExactShare(percent)
    taken = 0
    for n in range(1, 2001):
        taken += share.take()
        assert abs(taken - n * percent / 100) < 1, (n, taken)
    if percent == 20:
        assert taken == 400


def cfg(canary: float | None = None, shadow: float | None = None, **kw: Any) -> RouterConfig:
    doc: dict[str, Any] = {"stable": {"url": "http://127.0.0.1:1", "revision": "stable"}, **kw}
    if canary is not None:
        doc["canary"] = {"url": "http://127.0.0.1:2", "revision": "canary", "percent": canary}
    if shadow is not None:
        doc["shadow"] = {"url": "http://127.0.0.1:3", "revision": "shadow", "percent": shadow}
    return RouterConfig.model_validate(doc)


def test_sessions_are_sticky_and_a_larger_share_only_moves_sessions_onto_the_canary() -> None:
    split = TrafficSplit(cfg(canary=20))
    keys = [f"user-{i}" for i in range(1000)]
    first = {k: split.choose(k).revision for k in keys}
    assert all(split.choose(k).revision == first[k] for k in keys for _ in range(3))
    share = sum(v == "canary" for v in first.values()) / len(keys)
    assert abs(share - 0.20) <= 0.03, share
    split.update(cfg(canary=50))
    later = {k: split.choose(k).revision for k in keys}
    assert all(later[k] == "canary" for k in keys if first[k] == "canary")
    assert abs(sum(v == "canary" for v in later.values()) / len(keys) - 0.5) <= 0.03
    assert 0 <= session_bucket("x") < BUCKETS


def test_a_reload_with_the_same_share_keeps_counting() -> None:
    split = TrafficSplit(cfg(canary=50, shadow=50))
    picks = [split.choose(None).revision for _ in range(3)]
    split.update(cfg(canary=50, shadow=50, shadow_concurrency=4))
    picks += [split.choose(None).revision for _ in range(3)]
    assert picks == ["stable", "canary"] * 3
    assert [split.mirror() is not None for _ in range(4)] == [False, True, False, True]
    split.update(cfg())
    assert split.choose(None).revision == "stable" and split.mirror() is None


def test_config_rules() -> None:
    with pytest.raises(ValidationError, match="revisions must be distinct"):
        RouterConfig.model_validate({"stable": {"url": "http://a:1", "revision": "r"},
                                     "canary": {"url": "http://b:1", "revision": "r", "percent": 5}})
    with pytest.raises(ValidationError, match="percent"):
        cfg(canary=101)
    with pytest.raises(ValidationError, match="url"):
        RouterConfig.model_validate({"stable": {"url": "ftp://a/b", "revision": "r"}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        RouterConfig.model_validate({"stable": {"url": "http://a:1", "revision": "r"}, "mirror": {}})


def test_answer_text_of_json_and_sse() -> None:
    assert answer_text(b'{"choices": [{"text": "hi"}]}') == "hi"
    assert answer_text(b'{"choices": [{"message": {"role": "assistant", "content": "yo"}}]}') == "yo"
    sse = (b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n'
           b'data: {"choices": [{"delta": {"content": "a"}}]}\n\ndata: {"choices": [{"text": "b"}]}\n\n'
           b'data: [DONE]\n\n')
    assert answer_text(sse) == "ab"
    assert answer_text(b"not json") == "" and answer_text(b'{"error": {}}') == ""


# -- the router process in front of real servers --------------------------------------------

class Router:
    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubeforge_runtime.route", "--config", str(config_path), "--host", "127.0.0.1",
             "--port", str(self.port), "--shutdown-timeout", "20"],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.http = Server.__new__(Server)  # reuse the server harness' HTTP helpers on the router's port
        self.http.port, self.http.api_key, self.http.log_path, self.http.proc = self.port, None, log_path, self.proc

    def wait_ready(self) -> None:
        self.http.wait_ready(30)

    def complete(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        status, h, data = self.http.request("POST", "/v1/completions", body,
                                            headers={"Content-Type": "application/json", **(headers or {})})
        return status, h.get("x-kubeforge-revision", ""), data

    def metrics(self) -> dict[str, float]:
        _, _, data = self.http.request("GET", "/metrics")
        out = {}
        for line in data.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    root = tmp_path_factory.mktemp("route")
    out: dict[str, Server] = {}
    try:
        for name, seed in (("stable", 7), ("canary", 8), ("shadow", 9)):
            out[name] = Server(save_tiny_model(root / name, seed=seed), root / f"{name}.log")
        for s in out.values():
            s.wait_ready()
        yield out
    finally:
        for s in out.values():
            s.stop()


def write_config(path: Path, servers: dict[str, Server], canary: float | None = None, shadow: float | None = None,
                 canary_url: str | None = None, shadow_url: str | None = None, **kw: Any) -> Path:
    doc: dict[str, Any] = {"stable": {"url": servers["stable"].base, "revision": "r1"}, **kw}
    if canary is not None:
        doc["canary"] = {"url": canary_url or servers["canary"].base, "revision": "r2", "percent": canary}
    if shadow is not None:
        doc["shadow"] = {"url": shadow_url or servers["shadow"].base, "revision": "r3", "percent": shadow}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)  # atomically, as a ConfigMap volume swaps its files
    return path


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Any]:
    started: list[Router] = []

    def start(config: Path) -> Router:
        r = Router(config, tmp_path / f"router-{len(started)}.log")
        started.append(r)
        r.wait_ready()
        return r

    yield start
    for r in started:
        r.stop()


def hung_port() -> tuple[socket.socket, int]:
    """A port that accepts connections and never answers (a hung upstream)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(256)
    return s, int(s.getsockname()[1])


def served(server: Server) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("vllm:request_success_total"))


BODY = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "temperature": 0}


def test_1000_requests_at_20_percent_give_the_canary_exactly_200(servers: dict[str, Server], tmp_path: Path,
                                                                 router: Any) -> None:
    r = router(write_config(tmp_path / "c.json", servers, canary=20))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: r.complete(BODY), range(1000)))
    assert {s for s, _, _ in results} == {200}
    by_rev = {rev: sum(1 for _, x, _ in results if x == rev) for rev in ("r1", "r2")}
    assert by_rev == {"r1": 800, "r2": 200}
    # the two revisions are different models: their answers say who answered
    direct = {n: servers[n].post("/v1/completions", BODY)[1]["choices"][0]["text"] for n in ("stable", "canary")}
    assert direct["stable"] != direct["canary"]
    for _, rev, data in results[:50]:
        assert json.loads(data)["choices"][0]["text"] == direct["stable" if rev == "r1" else "canary"]
    m = r.metrics()
    assert m['kubeforge:router_requests_total{code="200",revision="r2"}'] == 200
    assert m['kubeforge:router_requests_total{code="200",revision="r1"}'] == 800
    assert m['kubeforge:router_traffic_percent{revision="r2",role="canary"}'] == 20
    assert m['kubeforge:router_first_byte_seconds_count{revision="r2"}'] == 200
    # a non-generation request goes to the stable revision
    status, h, _ = r.http.request("GET", "/v1/models")
    assert status == 200 and h["x-kubeforge-revision"] == "r1"


def test_a_session_stays_on_its_revision_and_streams_pass_through(servers: dict[str, Server], tmp_path: Path,
                                                                  router: Any) -> None:
    r = router(write_config(tmp_path / "c.json", servers, canary=50))
    seen: dict[str, set[str]] = {}
    for i in range(40):
        for _ in range(3):
            status, rev, _ = r.complete(BODY, {"x-session-id": f"s{i}"})
            assert status == 200
            seen.setdefault(f"s{i}", set()).add(rev)
    assert all(len(v) == 1 for v in seen.values()) and {next(iter(v)) for v in seen.values()} == {"r1", "r2"}
    # the OpenAI ``user`` field is a session key too
    revs = {r.complete({**BODY, "user": "alice"})[1] for _ in range(5)}
    assert len(revs) == 1
    stream = {**BODY, "stream": True, "max_tokens": 8}
    status, h, via_router = r.http.request("POST", "/v1/completions", stream,
                                           headers={"Content-Type": "application/json", "x-session-id": "s0"})
    name = "stable" if h["x-kubeforge-revision"] == "r1" else "canary"
    _, _, direct = servers[name].request("POST", "/v1/completions", stream)
    assert status == 200 and h["content-type"].startswith("text/event-stream")
    assert answer_text(via_router) == answer_text(direct) != ""


def test_the_shadow_sees_copies_and_its_answers_are_compared_never_returned(servers: dict[str, Server],
                                                                             tmp_path: Path, router: Any) -> None:
    r = router(write_config(tmp_path / "c.json", servers, shadow=100))
    stable_text = servers["stable"].post("/v1/completions", BODY)[1]["choices"][0]["text"]
    shadow_text = servers["shadow"].post("/v1/completions", BODY)[1]["choices"][0]["text"]
    assert stable_text != shadow_text
    before = served(servers["shadow"])
    for _ in range(20):
        status, rev, data = r.complete(BODY)
        assert status == 200 and rev == "r1" and json.loads(data)["choices"][0]["text"] == stable_text
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and r.metrics().get(
            'kubeforge:shadow_requests_total{outcome="ok",revision="r3"}', 0) < 20:
        time.sleep(0.1)
    m = r.metrics()
    assert m['kubeforge:shadow_requests_total{outcome="ok",revision="r3"}'] == 20
    assert served(servers["shadow"]) - before == 20
    _, _, page = r.http.request("GET", "/router/shadow")
    comparisons = json.loads(page)["comparisons"]
    assert len(comparisons) == 20 and all(c["revision"] == "r3" and 0 <= c["agreement"] <= 1 for c in comparisons)
    assert {(c["primary"], c["shadow"]) for c in comparisons} == {(stable_text, shadow_text)}
    assert m['kubeforge:shadow_agreement_count{revision="r3"}'] == 20


def test_a_shadow_that_is_down_or_hung_never_touches_a_client(servers: dict[str, Server], tmp_path: Path,
                                                               router: Any) -> None:
    dead = free_port()
    r = router(write_config(tmp_path / "c.json", servers, shadow=100, shadow_url=f"http://127.0.0.1:{dead}"))
    assert all(r.complete(BODY)[0] == 200 for _ in range(10))
    deadline = time.monotonic() + 10
    while r.metrics().get('kubeforge:shadow_requests_total{outcome="error",revision="r3"}', 0) < 10:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    sock, port = hung_port()
    try:
        hung = router(write_config(tmp_path / "h.json", servers, shadow=100, shadow_url=f"http://127.0.0.1:{port}",
                                   shadow_concurrency=2, shadow_timeout_s=30))
        t0 = time.monotonic()
        assert all(hung.complete(BODY)[0] == 200 for _ in range(10))
        assert time.monotonic() - t0 < 10  # nobody waited for the 30 s shadow timeout
        m = hung.metrics()
        assert m['kubeforge:shadow_requests_total{outcome="dropped",revision="r3"}'] == 8
    finally:
        sock.close()


def test_an_unreachable_canary_falls_back_to_the_stable_revision(servers: dict[str, Server], tmp_path: Path,
                                                                 router: Any) -> None:
    r = router(write_config(tmp_path / "c.json", servers, canary=50, canary_url=f"http://127.0.0.1:{free_port()}"))
    results = [r.complete(BODY) for _ in range(20)]
    assert all(s == 200 and rev == "r1" for s, rev, _ in results)
    assert r.metrics()['kubeforge:router_fallbacks_total{revision="r2"}'] == 10


def test_the_config_is_reloaded_and_a_bad_one_is_refused(servers: dict[str, Server], tmp_path: Path,
                                                         router: Any) -> None:
    path = write_config(tmp_path / "c.json", servers, canary=100)
    r = router(path)
    assert r.complete(BODY)[1] == "r2"
    write_config(path, servers, canary=0)
    deadline = time.monotonic() + 10
    while r.complete(BODY)[1] != "r1":
        assert time.monotonic() < deadline, r.log_path.read_text()
        time.sleep(0.2)
    path.write_text('{"stable": {"url": "nope"}}')
    deadline = time.monotonic() + 10
    while r.metrics().get("kubeforge:router_config_errors_total", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert r.complete(BODY)[:2] == (200, "r1")
    assert re.search(r"config not reloaded, the previous one stays: .*stable.url", r.log_path.read_text())


def test_a_bad_config_at_start_exits_78_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"stable": {"url": "http://a:1", "revision": "r"},
                                "canary": {"url": "http://b:1", "revision": "c", "percent": 120}}))
    proc = subprocess.run([sys.executable, "-m", "kubeforge_runtime.route", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78 and "canary.percent" in proc.stderr


def test_sigterm_finishes_the_requests_in_flight(servers: dict[str, Server], tmp_path: Path, router: Any) -> None:
    r = router(write_config(tmp_path / "c.json", servers))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(r.complete, {**BODY, "max_tokens": 200, "ignore_eos": True}) for _ in range(4)]
        time.sleep(0.3)
        r.proc.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert all(s == 200 and json.loads(d)["usage"]["completion_tokens"] == 200 for s, _, d in results)
    assert r.proc.wait(30) == 0 and "drained" in r.log_path.read_text()


def test_a_client_that_hangs_up_is_not_counted_against_the_revision(servers: dict[str, Server], tmp_path: Path,
                                                                    router: Any) -> None:
    r = router(write_config(tmp_path / "c.json", servers))
    sock = socket.create_connection(("127.0.0.1", r.port))
    body = json.dumps({**BODY, "max_tokens": 200, "ignore_eos": True, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    sock.close()
    deadline = time.monotonic() + 10
    while r.metrics().get('kubeforge:router_requests_total{code="client_closed",revision="r1"}', 0) < 1:
        assert time.monotonic() < deadline, r.metrics()
        time.sleep(0.1)
    assert not any('code="aborted"' in k for k in r.metrics())
    assert r.complete(BODY)[0] == 200
