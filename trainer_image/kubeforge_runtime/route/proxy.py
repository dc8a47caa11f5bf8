"""The router's HTTP side (aiohttp): every request to one revision, generation requests
optionally mirrored to the shadow, per-revision metrics.

- A request goes to the revision ``TrafficSplit.choose`` names, streamed back as it comes
  (SSE included), with ``x-kubeforge-revision`` saying which revision answered.
  ``/v1/feedback``, ``/v1/models`` and every other path go to the stable revision: completion
  ids are signed with the service's key, so the stable revision accepts feedback on a
  canary's answer.
- A canary that cannot be connected to (refused, no connection within 5 s, DNS, closed before
  its answer began) gets the request sent to the stable revision instead, and the failure is
  counted (``kubeforge:router_fallbacks_total``): a broken candidate costs its guard rails, not
  a client. An HTTP error from the canary is its answer and is returned. A client that hangs
  up is counted as ``code="client_closed"``, not against the revision, and (aiohttp's handler
  cancellation) its upstream request is cancelled.
- A mirrored request is sent to the shadow at the same time as to the primary, with
  ``stream: false``, in a task the primary never awaits; at most ``shadow_concurrency`` are in
  flight and a copy beyond that is dropped, so a slow or dead shadow never delays a client.
  When both have answered, their texts are compared (token F1, ``evaluate/text.py``) and the
  pair is kept in a bounded log (``GET /router/shadow``) and in
  ``kubeforge:shadow_agreement``.

Metrics (``GET /metrics``; every series has ``revision``): ``kubeforge:router_requests_total``
(``code``), ``kubeforge:router_request_duration_seconds`` (end to end),
``kubeforge:router_first_byte_seconds`` (the time to the first byte: TTFT for a streamed
answer), ``kubeforge:router_fallbacks_total``, ``kubeforge:shadow_requests_total``
(``outcome``: ok, error, timeout, dropped), ``kubeforge:shadow_request_duration_seconds``,
``kubeforge:shadow_agreement``, and ``kubeforge:router_traffic_percent`` (``role``: canary,
shadow) with the shares in effect.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kubeforge_runtime.evaluate.text import overlap
from kubeforge_runtime.route.split import CANARY, SHADOW, RouterConfig, TrafficSplit, Upstream

log = logging.getLogger("kubeforge.route")

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
#: RFC 9110 hop-by-hop fields, plus what aiohttp sets itself
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                  "transfer-encoding", "upgrade", "host", "content-length"})
REVISION_HEADER = "x-kubeforge-revision"
#: bytes of a primary answer kept for the shadow comparison
_KEEP_BYTES = 1 << 20
SHADOW_LOG = 256
#: a revision that does not accept a connection within this is unreachable (dropped packets
#: hang where a refusal is immediate): the request goes to the stable revision
CONNECT_TIMEOUT_S = 5.0
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kubeforge:router_requests", "Requests answered, by revision and status code.",
                                ["revision", "code"], registry=r)
        self.duration = Histogram("kubeforge:router_request_duration_seconds", "End-to-end request time.",
                                  ["revision"], buckets=_LATENCY, registry=r)
        self.first_byte = Histogram("kubeforge:router_first_byte_seconds",
                                    "Time to the first byte of the answer (TTFT when streamed).", ["revision"],
                                    buckets=_LATENCY, registry=r)
        self.fallbacks = Counter("kubeforge:router_fallbacks", "Requests a revision could not be connected to, "
                                 "answered by the stable revision instead.", ["revision"], registry=r)
        self.shadow = Counter("kubeforge:shadow_requests", "Mirrored requests, by outcome.",
                              ["revision", "outcome"], registry=r)
        self.shadow_duration = Histogram("kubeforge:shadow_request_duration_seconds", "Shadow answer time.",
                                         ["revision"], buckets=_LATENCY, registry=r)
        self.agreement = Histogram("kubeforge:shadow_agreement", "Token F1 of the shadow's answer against the "
                                   "primary's.", ["revision"], buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                                                                        0.99, 1.0), registry=r)
        self.percent = Gauge("kubeforge:router_traffic_percent", "Share of requests sent to the revision.",
                             ["revision", "role"], registry=r)
        self.config_errors = Counter("kubeforge:router_config_errors", "Config files that did not parse (the "
                                     "previous config stays).", registry=r)

    def show_config(self, config: RouterConfig) -> None:
        self.percent.clear()
        if config.canary is not None:
            self.percent.labels(config.canary.revision, CANARY).set(config.canary.percent)
        if config.shadow is not None:
            self.percent.labels(config.shadow.revision, SHADOW).set(config.shadow.percent)


def session_key(request: web.Request, body: bytes, header: str) -> str | None:
    """The header, else the OpenAI ``user`` field of a JSON body."""
    key = request.headers.get(header)
    if key:
        return key
    if body[:1] == b"{":
        with contextlib.suppress(ValueError):
            user = json.loads(body).get("user")
            if isinstance(user, str) and user:
                return user
    return None


def answer_text(body: bytes) -> str:
    """The first choice's text of an OpenAI answer, JSON or SSE (``data:`` lines)."""

    def of(doc: Any) -> str:
        choice = (doc.get("choices") or [{}])[0] if isinstance(doc, dict) else {}
        if not isinstance(choice, dict):
            return ""
        for part in (choice.get("message"), choice.get("delta")):
            if isinstance(part, dict) and isinstance(part.get("content"), str):
                return str(part["content"])
        return choice["text"] if isinstance(choice.get("text"), str) else ""

    text = body.decode(errors="replace")
    if text.lstrip().startswith("{"):
        with contextlib.suppress(ValueError):
            return of(json.loads(text))
        return ""
    out = []
    for line in text.splitlines():
        data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
        if data and data != "[DONE]":
            with contextlib.suppress(ValueError):
                out.append(of(json.loads(data)))
    return "".join(out)


def _error(status: int, message: str, revision: str | None) -> web.Response:
    """An error the router answers itself, in OpenAI's shape; with the revision it was for."""
    resp = web.json_response({"error": {"message": message, "type": "server_error", "param": None, "code": None}},
                             status=status)
    if revision is not None:
        resp.headers[REVISION_HEADER] = revision
    return resp


def _forward_headers(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in _HOP}


class Router:
    def __init__(self, config: RouterConfig, metrics: RouterMetrics | None = None) -> None:
        self.split = TrafficSplit(config)
        self.metrics = metrics or RouterMetrics()
        self.metrics.show_config(config)
        self.shadow_in_flight = 0
        self.shadow_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=SHADOW_LOG)
        self.in_flight = 0
        self.draining = False
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def config(self) -> RouterConfig:
        return self.split.config

    def update(self, config: RouterConfig) -> None:
        self.split.update(config)
        self.metrics.show_config(config)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/router/shadow", self.shadow_page)
        app.router.add_route("*", "/{tail:.*}", self.proxy)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        # no total timeout here: each call sets its own; keep-alive pools per upstream
        self._session = aiohttp.ClientSession(auto_decompress=False,
                                              connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=10))

    async def _stop(self, app: web.Application) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the router's app has not started"
        return self._session

    # -- plain routes ---------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """Ready while not draining and the stable revision is (the router is worth nothing
        without it)."""
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        try:
            async with self.session.get(self.config.stable.url.rstrip("/") + "/health",
                                        timeout=aiohttp.ClientTimeout(total=2)) as r:
                ok = r.status == 200
        except (TimeoutError, aiohttp.ClientError):
            ok = False
        return web.json_response({"status": "ok" if ok else "stable revision not ready"}, status=200 if ok else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def shadow_page(self, request: web.Request) -> web.Response:
        return web.json_response({"comparisons": list(self.shadow_log)})

    # -- proxying -------------------------------------------------------------------------

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            resp = _error(503, "router is shutting down", None)
            resp.headers["Retry-After"] = "1"
            return resp
        self.in_flight += 1
        try:
            return await self._proxy(request)
        finally:
            self.in_flight -= 1

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        cfg = self.config
        generation = request.method == "POST" and request.path in GENERATION_PATHS
        target = self.split.choose(session_key(request, body, cfg.session_header)) if generation else cfg.stable
        primary: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        shadow = self.split.mirror() if generation else None
        if shadow is not None:
            self._mirror(shadow, request, body, primary)
        try:
            return await self._forward(target, request, body, primary)
        finally:
            if not primary.done():
                primary.set_result(None)

    async def _forward(self, target: Upstream, request: web.Request, body: bytes,
                       primary: asyncio.Future[str | None]) -> web.StreamResponse:
        try:
            return await self._forward_once(target, request, body, primary)
        except asyncio.CancelledError:  # the client hung up (handler cancellation): not the revision's failure
            self.metrics.requests.labels(target.revision, "client_closed").inc()
            raise

    async def _forward_once(self, target: Upstream, request: web.Request, body: bytes,
                            primary: asyncio.Future[str | None]) -> web.StreamResponse:
        t0 = time.perf_counter()
        m = self.metrics
        url = target.url.rstrip("/") + request.path_qs
        try:
            upstream = await self.session.request(
                request.method, url, headers=_forward_headers(request), data=body,
                timeout=aiohttp.ClientTimeout(total=self.config.upstream_timeout_s, sock_connect=CONNECT_TIMEOUT_S))
        except aiohttp.ClientConnectionError as e:
            if target.revision != self.config.stable.revision:
                m.fallbacks.labels(target.revision).inc()
                log.warning("revision %s unreachable (%s): answered by the stable revision", target.revision, e)
                return await self._forward_once(self.config.stable, request, body, primary)
            m.requests.labels(target.revision, "502").inc()
            return _error(502, f"stable revision unreachable: {e}", target.revision)
        except TimeoutError:
            m.requests.labels(target.revision, "504").inc()
            return _error(504, "upstream timed out", target.revision)
        async with upstream:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in upstream.headers.items():
                if k.lower() not in _HOP:
                    resp.headers.add(k, v)
            resp.headers[REVISION_HEADER] = target.revision
            await resp.prepare(request)
            kept = bytearray()
            first = None
            chunks = upstream.content.iter_any().__aiter__()
            while True:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except aiohttp.ClientError as e:  # the revision died mid-answer: the client sees a cut stream
                    m.requests.labels(target.revision, "aborted").inc()
                    log.warning("revision %s broke off an answer: %s", target.revision, e)
                    return resp
                if first is None:
                    first = time.perf_counter()
                    m.first_byte.labels(target.revision).observe(first - t0)
                if len(kept) < _KEEP_BYTES:
                    kept += chunk
                try:
                    await resp.write(chunk)
                except ConnectionError:  # aiohttp's ClientConnectionResetError is one
                    # the client hung up: not the revision's failure
                    m.requests.labels(target.revision, "client_closed").inc()
                    return resp
            await resp.write_eof()
        m.requests.labels(target.revision, str(upstream.status)).inc()
        m.duration.labels(target.revision).observe(time.perf_counter() - t0)
        if not primary.done():
            primary.set_result(answer_text(bytes(kept)) if upstream.status == 200 else None)
        return resp

    def _mirror(self, shadow: Upstream, request: web.Request, body: bytes,
                primary: asyncio.Future[str | None]) -> None:
        if self.shadow_in_flight >= self.config.shadow_concurrency:
            self.metrics.shadow.labels(shadow.revision, "dropped").inc()
            return
        self.shadow_in_flight += 1
        task = asyncio.create_task(self._shadow_call(shadow, request.path_qs, _forward_headers(request), body, primary))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow_call(self, shadow: Upstream, path: str, headers: dict[str, str], body: bytes,
                           primary: asyncio.Future[str | None]) -> None:
        m = self.metrics
        t0 = time.perf_counter()
        released = False
        try:
            with contextlib.suppress(ValueError):
                doc = json.loads(body)
                if isinstance(doc, dict) and doc.get("stream"):
                    body = json.dumps({**doc, "stream": False}).encode()
            try:
                async with self.session.post(shadow.url.rstrip("/") + path, headers=headers, data=body,
                                             timeout=aiohttp.ClientTimeout(total=self.config.shadow_timeout_s,
                                                                           sock_connect=CONNECT_TIMEOUT_S)) as r:
                    raw = await r.read()
                    status = r.status
            except TimeoutError:
                m.shadow.labels(shadow.revision, "timeout").inc()
                return
            except aiohttp.ClientError as e:
                m.shadow.labels(shadow.revision, "error").inc()
                log.debug("shadow %s: %s", shadow.revision, e)
                return
            m.shadow_duration.labels(shadow.revision).observe(time.perf_counter() - t0)
            m.shadow.labels(shadow.revision, "ok" if status == 200 else "error").inc()
            # the copy is done: its slot is free while it waits for the primary to compare
            self.shadow_in_flight -= 1
            released = True
            main_text = await primary
            if status != 200 or main_text is None:
                return
            shadow_text = answer_text(raw)
            agreement = overlap(shadow_text, main_text)
            m.agreement.labels(shadow.revision).observe(agreement)
            self.shadow_log.append({"time": time.time(), "revision": shadow.revision, "agreement": round(agreement, 4),
                                    "primary": main_text[:2000], "shadow": shadow_text[:2000]})
        finally:
            if not released:
                self.shadow_in_flight -= 1
