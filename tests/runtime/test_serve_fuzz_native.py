"""Fuzzing the server's default CPU path (issue 16 item 14): fp32 with the native ops
(paged-attention kernel, packed GEMM, fused RMSNorm/RoPE; ``--attention-backend kernel``
fails at start when they cannot be built, so this file never silently fuzzes the torch path).
The API fuzz in test_serve_api.py runs a float64 server, which never reaches them.

Beyond its bodies: ``n`` up to 16, the most and the longest stop strings the API takes, prompts
at the context limit, and bodies near the 8 MB limit. Every answer is 200 or a 4xx naming the
problem, the server stays healthy, and every KV block comes back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.runtime.test_serve_api import API_KEY, Server, _bodies, _wait_until_idle, save_tiny_model

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(300)]

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--attention-backend", "kernel",
               "--block-size", "8", "--num-blocks", "96", "--max-num-seqs", "16", "--max-num-batched-tokens", "64",
               "--max-model-len", str(MAX_MODEL_LEN), api_key=API_KEY)
    try:
        s.wait_ready()
        yield s
    finally:
        assert s.stop() == 0


_stop = st.text(st.characters(codec="utf-8"), min_size=1, max_size=256)
_heavy = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(max_size=300), st.lists(st.integers(0, 258), min_size=1, max_size=300))},
    optional={"n": st.integers(1, 16), "max_tokens": st.integers(1, 24), "temperature": st.floats(0, 2),
              "top_k": st.integers(-1, 300), "top_p": st.floats(0.01, 1), "seed": st.integers(0, 2**32),
              "stop": st.one_of(_stop, st.lists(_stop, max_size=16)), "stream": st.booleans(),
              "ignore_eos": st.booleans()})


def _check(server: Server, path: str, raw: bytes) -> int:
    status, _, data = server.request("POST", path, raw=raw, timeout=120)
    assert status in (200, 400, 404, 429), (status, data[:300])
    if status != 200:
        assert "error" in json.loads(data) and json.loads(data)["error"]["message"]
    assert server.request("GET", "/livez", headers={})[0] == 200
    return status


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=st.one_of(_bodies, _heavy))
def test_fuzzed_requests_on_the_native_path_never_crash_it(native: Server, path: str, body: Any) -> None:
    raw = json.dumps(body).encode()
    if isinstance(body, dict) and "max_tokens" not in body and raw.startswith(b"{") and raw != b"{}":
        raw = raw.replace(b"{", b'{"max_tokens": 4, ', 1)
    _check(native, path, raw)


@pytest.mark.parametrize("body", [
    {"prompt": "x" * 7_900_000, "max_tokens": 1},  # near the 8 MB body limit: refused for its length
    {"prompt": "ab" * (MAX_MODEL_LEN // 2 - 2), "max_tokens": 2, "n": 16},
    {"prompt": [7] * (MAX_MODEL_LEN - 1), "max_tokens": 1, "n": 16},  # the context exactly full
    {"prompt": "z", "max_tokens": MAX_MODEL_LEN - 2, "ignore_eos": True, "stop": ["\u2603" * 256] * 16, "n": 4},
], ids=["8MB-body", "n16", "full-context", "longest-stops"])
def test_limits_on_the_native_path(native: Server, body: dict[str, Any]) -> None:
    assert _check(native, "/v1/completions", json.dumps(body).encode()) in (200, 400)


def test_the_native_server_is_whole_afterwards(native: Server) -> None:
    _wait_until_idle(native, timeout=60)
    status, r = native.post("/v1/completions", {"prompt": "still here", "max_tokens": 3})
    assert status == 200 and r["usage"]["completion_tokens"] == 3
    assert "attention native CPU ops" in Path(native.log_path).read_text()
