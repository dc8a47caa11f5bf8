"""The OpenAI-compatible HTTP front end (aiohttp).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``),
``POST /v1/feedback``, ``GET /v1/models``, ``GET /health`` (readiness: 200 only when loaded,
warmed and not draining), ``GET /livez`` (liveness), ``GET /metrics`` (Prometheus text, vLLM
names, plus kubeforge's capture series).

Completion ids are signed (``feedback.CompletionIds``) so that feedback on an answer verifies
on any replica with the same key. With capture on, every prompt feeds the live profile and a
sampled request is handed to the ``CaptureWriter`` as one small dict once it is answered.

Error answers use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
400 malformed JSON, wrong types, unknown parameters (``param`` names the field) and prompts
that do not fit the context (the message gives the limits); 401 a missing or wrong API key;
404 an unknown model; 429 with ``Retry-After`` when the waiting queue is full; 503 while
loading or draining. ``/v1/feedback`` answers a bad body with 422 (``param`` names the
field), an unknown or expired id with 404, a full capture queue with 503 and Retry-After (the
feedback would be lost otherwise) and, without capture, 501.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydantic
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubeforge_runtime.serve.async_engine import AsyncEngine, EngineDeadError, EngineStepError
from kubeforge_runtime.serve.capture import FEEDBACK, REQUESTS, CaptureWriter
from kubeforge_runtime.serve.engine import RequestOutput
from kubeforge_runtime.serve.feedback import CompletionIds, FeedbackBody, new_feedback_id
from kubeforge_runtime.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from kubeforge_runtime.serve.sampling import SamplingParams
from kubeforge_runtime.tokenizer import BOS_TOKEN, CHAT_TEMPLATE, EOS_TOKEN, ByteTokenizer, HFTokenizer

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass
class ServerSettings:
    """HTTP-side knobs (the engine's are in ``EngineConfig``)."""

    model_name: str
    api_key: str | None = None
    #: requests allowed to wait for a batch slot before new ones get 429
    max_queue_len: int = 256
    #: the Retry-After a 429 or 503 suggests, in seconds
    retry_after_s: int = 1
    #: the served model's revision (its export marker's time), recorded with captured requests
    served_revision: str | None = None
    #: a feedback correction's UTF-8 size limit (so that its record fits the capture's record size)
    max_correction_bytes: int = 65536


@dataclasses.dataclass
class ServerState:
    ready: bool = False
    draining: bool = False
    #: /v1 handlers running now; the drain waits for this to reach zero
    in_flight: int = 0
    load_error: str | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, err_type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.err_type = status, message, param, err_type
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}}
        return web.json_response(body, status=self.status, headers=self.headers)


_UNION_TAGS = ("str", "int", "float", "bool", "list", "dict", "none", "function-", "constrained-", "literal")


def _param_of(loc: tuple[int | str, ...]) -> str:
    """``('messages', 0, 'role')`` → ``messages[0].role``; pydantic's union-member tags
    (``'list[constrained-int]'``, ``'str'``) are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part.startswith(_UNION_TAGS):
            continue
        else:
            out += f".{part}" if out else part
    return out


#: Bodies and prompts larger than this are parsed and tokenized on a worker thread: a body
#: may be 8 MB, and the event loop serves every other client (and the probes) meanwhile.
OFF_LOOP_BYTES = 32 * 1024

T = TypeVar("T")


async def _off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a thread when ``size`` (bytes or characters) is large, else inline."""
    if size > OFF_LOOP_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _decode_body(raw: bytes, model: type[SamplingFields]) -> Any:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", "body") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", "body")
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        raise _validation_error(e) from None


def _decode_feedback(raw: bytes) -> FeedbackBody:
    """A bad feedback body is a 422, malformed JSON included (the completion routes answer 400)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(422, f"request body is not valid JSON: {e}", "body") from None
    if not isinstance(body, dict):
        raise APIError(422, "request body must be a JSON object", "body")
    try:
        return FeedbackBody.model_validate(body)
    except pydantic.ValidationError as e:
        raise _validation_error(e, 422) from None


def _validation_error(e: pydantic.ValidationError, status: int = 400) -> APIError:
    errors = e.errors()
    # a union reports one error per member; the first names the field well enough
    first = errors[0]
    param = _param_of(tuple(first["loc"]))
    msgs = []
    for err in errors[:4]:
        p = _param_of(tuple(err["loc"])) or "body"
        msgs.append(f"{p}: {err['msg']}" + (" (unknown parameter)" if err["type"] == "extra_forbidden" else ""))
    return APIError(status, "; ".join(dict.fromkeys(msgs)), param or None)


class ChatTemplate:
    """The tokenizer's Jinja chat template, else the byte tokenizer's documented one
    (``<s>role: content</s>\\n`` per message, then ``assistant: ``)."""

    def __init__(self, tokenizer: ByteTokenizer | HFTokenizer) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        source = tokenizer.chat_template if isinstance(tokenizer, HFTokenizer) else None
        bos, eos = BOS_TOKEN, EOS_TOKEN
        if isinstance(tokenizer, HFTokenizer):
            cfg_path = Path(tokenizer.directory) / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
            bos = _token_text(cfg.get("bos_token")) or bos
            eos = _token_text(cfg.get("eos_token")) or eos

        def raise_exception(message: str) -> None:
            raise APIError(400, f"chat template: {message}", "messages")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source or CHAT_TEMPLATE)
        self.bos, self.eos = bos, eos

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return str(self.template.render(messages=messages, bos_token=self.bos, eos_token=self.eos,
                                        add_generation_prompt=add_generation_prompt))


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _add_bos(tokenizer: ByteTokenizer | HFTokenizer) -> bool:
    """Text prompts get bos prepended, as Llama's tokenizer (and so vLLM) does, unless the
    tokenizer's config says otherwise."""
    if isinstance(tokenizer, HFTokenizer):
        cfg_path = Path(tokenizer.directory) / "tokenizer_config.json"
        if cfg_path.exists():
            return bool(json.loads(cfg_path.read_text()).get("add_bos_token", True))
    return True


@dataclasses.dataclass
class _Trace:
    """What capture keeps of one answer while it is produced: choice 0 (the one recorded) and
    when the first token of any choice came."""

    arrival: float
    first_token_at: float | None = None
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0

    def see(self, index: int, out: RequestOutput) -> None:
        if self.first_token_at is None and out.new_token_ids:
            self.first_token_at = time.monotonic()
        if index == 0:
            self.text += out.delta_text
            if out.finished:
                self.finish_reason, self.completion_tokens = out.finish_reason, out.num_output_tokens


class OpenAIServer:
    def __init__(self, settings: ServerSettings, state: ServerState, ids: CompletionIds | None = None) -> None:
        self.settings = settings
        self.state = state
        self.ids = ids or CompletionIds.random_key()
        self.capture: CaptureWriter | None = None
        self.engine: AsyncEngine | None = None
        self.tokenizer: ByteTokenizer | HFTokenizer | None = None
        self.chat_template: ChatTemplate | None = None
        self.add_bos = True
        self.model_root = ""

    def attach(self, engine: AsyncEngine, tokenizer: ByteTokenizer | HFTokenizer, model_root: str,
               capture: CaptureWriter | None = None) -> None:
        """Called once the model is loaded (the HTTP side listens from the start so that
        probes see 503 rather than a refused connection while weights download)."""
        self.engine, self.tokenizer, self.model_root = engine, tokenizer, model_root
        self.capture = capture
        self.chat_template = ChatTemplate(tokenizer)
        self.add_bos = _add_bos(tokenizer)

    # -- app ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._gate], client_max_size=8 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/livez", self.livez)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/feedback", self.feedback)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except APIError as e:
            return e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return APIError(e.status, e.reason, err_type="invalid_request_error" if e.status < 500 else "server_error",
                            headers={k: v for k, v in e.headers.items() if k.lower() == "allow"}).response()
        except EngineDeadError as e:
            return APIError(503, str(e), err_type="server_error").response()
        except EngineStepError as e:
            return APIError(500, str(e), err_type="server_error").response()
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return APIError(500, "internal error", err_type="server_error").response()

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.state.draining:
            raise APIError(503, "server is shutting down", err_type="server_error", headers=retry)
        if not self.state.ready:
            raise APIError(503, self.state.load_error or "model is loading", err_type="server_error", headers=retry)
        key = self.settings.api_key
        if key is not None and not hmac.compare_digest(request.headers.get("Authorization", "").encode(),
                                                       f"Bearer {key}".encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           err_type="authentication_error")
        self.state.in_flight += 1
        try:
            return await handler(request)
        finally:
            self.state.in_flight -= 1

    # -- plain routes ---------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.state.ready and not self.state.draining and (self.engine is None or self.engine.dead is None):
            return web.json_response({"status": "ok"})
        status = "draining" if self.state.draining else ("failed" if self.state.load_error else "loading")
        return web.json_response({"status": status}, status=503)

    async def livez(self, request: web.Request) -> web.Response:
        """Liveness, unlike readiness, stays 200 while loading and draining: restarting a pod
        that is downloading weights or finishing its last requests helps nobody. Only a failed
        load or a dead engine thread is fatal."""
        if self.state.load_error or (self.engine is not None and self.engine.dead is not None):
            return web.json_response({"status": "failed"}, status=503)
        return web.json_response({"status": "alive"})

    async def metrics(self, request: web.Request) -> web.Response:
        body = b""
        if self.engine is not None:
            body = generate_latest(self.engine.engine.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        assert self.engine is not None
        return web.json_response({"object": "list", "data": [{
            "id": self.settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "kubeforge",
            "root": self.model_root, "max_model_len": self.engine.engine.max_model_len}]})

    # -- generation -----------------------------------------------------------------------

    async def _parse(self, request: web.Request, model: type[SamplingFields]) -> Any:
        raw = await request.read()
        req = await _off_loop(len(raw), _decode_body, raw, model)
        if req.model is not None and req.model != self.settings.model_name:
            raise APIError(404, f"the model `{req.model}` does not exist; this server serves "
                                f"`{self.settings.model_name}`", "model", err_type="not_found_error")
        return req

    def _check_prompt(self, ids: list[int], max_tokens: int | None, param: str) -> int:
        """The prompt fits; returns the effective max_tokens."""
        assert self.engine is not None and self.tokenizer is not None
        limit = self.engine.engine.max_model_len
        vocab = self.engine.engine.model.cfg.vocab_size
        if not ids:
            raise APIError(400, "the prompt is empty", param)
        if len(ids) >= limit:  # before the vocabulary scan: a prompt may have millions of ids
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt has "
                                f"{len(ids)} tokens; it must be at most {limit - 1} to leave room for one "
                                f"generated token.", param)
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of the vocabulary (size {vocab})", param)
        if max_tokens is None:
            return limit - len(ids)
        if len(ids) + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                                f"completion). Please reduce the prompt or max_tokens.", "max_tokens")
        return max_tokens

    def _sampling(self, req: SamplingFields, max_tokens: int, index: int) -> SamplingParams:
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        seed = None if req.seed is None else req.seed + index
        return SamplingParams(max_tokens=max_tokens, temperature=float(req.temperature), top_p=float(req.top_p),
                              top_k=req.top_k, seed=seed, stop=tuple(s for s in stop if s),
                              stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos)

    def _admit(self, num_new: int) -> None:
        assert self.engine is not None
        if self.engine.num_waiting + num_new > self.settings.max_queue_len:
            raise APIError(429, f"the server is at capacity ({self.engine.num_waiting} requests waiting); retry "
                                f"after {self.settings.retry_after_s}s", err_type="rate_limit_error",
                           headers={"Retry-After": str(self.settings.retry_after_s)})

    async def _outputs(self, jobs: list[tuple[list[int], SamplingParams]], arrival: float,
                       ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """The engine outputs of every choice, merged, tagged with the choice index. Closing
        this iterator aborts whatever is unfinished."""
        assert self.engine is not None
        engine = self.engine
        base = uuid.uuid4().hex
        if len(jobs) == 1:
            async with contextlib.aclosing(engine.generate(base, jobs[0][0], jobs[0][1], arrival)) as gen:
                async for out in gen:
                    yield 0, out
            return
        merged: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()

        async def pump(i: int, ids: list[int], params: SamplingParams) -> None:
            try:
                async with contextlib.aclosing(engine.generate(f"{base}-{i}", ids, params, arrival)) as gen:
                    async for out in gen:
                        merged.put_nowait((i, out))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                merged.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, ids, p)) for i, (ids, p) in enumerate(jobs)]
        remaining = len(jobs)
        try:
            while remaining:
                i, item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        req: CompletionRequest = await self._parse(request, CompletionRequest)
        assert self.tokenizer is not None
        p = req.prompt
        # characters of text prompts, plus ids of token prompts (each costs a conversion)
        texts_len = len(p) if isinstance(p, str) else sum(len(x) if isinstance(x, (str, list)) else 1 for x in p)
        prompts = await _off_loop(texts_len, self._encode_prompts, p)
        jobs = []
        for pi, ids in enumerate(prompts):
            mt = self._check_prompt(ids, req.max_tokens, "prompt" if len(prompts) == 1 else f"prompt[{pi}]")
            for j in range(req.n):
                jobs.append((ids, self._sampling(req, mt, j)))
        self._admit(len(jobs))
        rid, created = self.ids.new("cmpl"), int(time.time())
        usage_prompt = sum(len(ids) for ids in prompts) * req.n
        # the profile counts what the user wrote: text prompts without the bos added here
        strip_bos = self.add_bos and (isinstance(p, str) or isinstance(p[0], str))
        trace = self._observe(arrival, [ids[1:] if strip_bos else ids for ids in prompts])

        def chunk(i: int, text: str, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": self.settings.model_name,
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            resp = await self._stream(request, jobs, arrival, chunk, None, rid, created, "text_completion",
                                      usage_prompt, include_usage, trace)
        else:
            texts, finishes, completion, cached = await self._collect(jobs, arrival, trace)
            resp = web.json_response({
                "id": rid, "object": "text_completion", "created": created, "model": self.settings.model_name,
                "choices": [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": finishes[i]}
                            for i in range(len(jobs))],
                "usage": _usage(usage_prompt, completion, cached)})
        if trace is not None:
            self._capture_request(trace, rid, "completions", _first_prompt(p), None, len(jobs), len(prompts[0]))
        return resp

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        req: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        assert self.tokenizer is not None and self.chat_template is not None
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await _off_loop(sum(len(m["content"]) for m in messages), self._encode_chat, messages,
                              req.add_generation_prompt)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        mt = self._check_prompt(ids, max_tokens, "messages")
        jobs = [(ids, self._sampling(req, mt, j)) for j in range(req.n)]
        self._admit(len(jobs))
        rid, created = self.ids.new("chatcmpl"), int(time.time())
        # the profile counts what the user wrote, as the trainer's baseline does: the messages'
        # contents, one per line, without the chat template's role names and special tokens
        # (tokenized by the capture writer's thread)
        trace = self._observe(arrival, ["\n".join(m["content"] for m in messages) if self.capture is not None else ""])

        def chunk(i: int, text: str, finish: str | None) -> dict[str, Any]:
            delta = {"content": text} if text or finish is None else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": self.settings.model_name,
                    "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def first(i: int) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": self.settings.model_name,
                    "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            resp = await self._stream(request, jobs, arrival, chunk, first, rid, created, "chat.completion.chunk",
                                      len(ids) * req.n, include_usage, trace)
        else:
            texts, finishes, completion, cached = await self._collect(jobs, arrival, trace)
            resp = web.json_response({
                "id": rid, "object": "chat.completion", "created": created, "model": self.settings.model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                             "finish_reason": finishes[i]} for i in range(len(jobs))],
                "usage": _usage(len(ids) * req.n, completion, cached)})
        if trace is not None:
            self._capture_request(trace, rid, "chat.completions", None, messages, len(jobs), len(ids))
        return resp

    # -- capture and feedback -------------------------------------------------------------

    def _observe(self, arrival: float, prompts: Sequence[list[int] | str]) -> _Trace | None:
        """Every prompt goes to the live profile; a trace comes back when this request is
        sampled (one random number: an unsampled request costs nothing more)."""
        capture = self.capture
        if capture is None:
            return None
        for ids in prompts:
            capture.observe_prompt(ids)
        return _Trace(arrival) if capture.sampled() else None

    def _capture_request(self, trace: _Trace, rid: str, endpoint: str, prompt: str | list[int] | None,
                         messages: list[dict[str, str]] | None, n: int, prompt_tokens: int) -> None:
        assert self.capture is not None
        if trace.finish_reason is None:
            return  # the answer broke off (an in-band error): nothing whole to keep
        now = time.monotonic()
        self.capture.capture(REQUESTS, {
            "id": rid, "time": time.time() - (now - trace.arrival), "model": self.settings.model_name,
            "revision": self.settings.served_revision, "endpoint": endpoint, "prompt": prompt,
            "messages": messages, "completion": trace.text, "n": n, "prompt_tokens": prompt_tokens,
            "completion_tokens": trace.completion_tokens, "finish_reason": trace.finish_reason,
            "ttft_s": (trace.first_token_at or now) - trace.arrival, "latency_s": now - trace.arrival})

    async def feedback(self, request: web.Request) -> web.Response:
        if self.capture is None:
            raise APIError(501, "feedback needs capture, and this server runs without it (no --capture-uri; "
                                "set spec.logging on the InferenceService)", err_type="server_error")
        raw = await request.read()
        body = await _off_loop(len(raw), _decode_feedback, raw)
        if not self.ids.verify(body.id):
            raise APIError(404, f"no completion `{body.id}`: unknown, or older than the feedback TTL", "id",
                           err_type="not_found_error")
        if body.correction is not None and len(body.correction.encode()) > self.settings.max_correction_bytes:
            raise APIError(422, f"correction: at most {self.settings.max_correction_bytes} bytes (UTF-8)",
                           "correction")
        fid = new_feedback_id()
        queued = self.capture.capture(FEEDBACK, {"id": fid, "completion_id": body.id, "time": time.time(),
                                                 "rating": body.rating, "correction": body.correction,
                                                 "tags": body.tags})
        if not queued:
            raise APIError(503, "capture queue is full; retry", err_type="server_error",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        return web.json_response({"id": fid, "object": "feedback", "completion_id": body.id})

    def _encode_prompts(self, p: str | list[int] | list[str] | list[list[int]]) -> list[list[int]]:
        if isinstance(p, str):
            return [self._encode_text(p)]
        prompts: list[list[int]] = []
        for item in p:  # validated: all ints, all strings, or all id lists
            if isinstance(item, int):
                return [[int(t) for t in p if isinstance(t, int)]]
            prompts.append(self._encode_text(item) if isinstance(item, str) else list(item))
        return prompts

    def _encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        assert self.tokenizer is not None and self.chat_template is not None
        try:
            text = self.chat_template.render(messages, add_generation_prompt)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - a template error is the request's fault
            raise APIError(400, f"chat template failed: {e}", "messages") from None
        return self.tokenizer.encode(text)

    def _encode_text(self, text: str) -> list[int]:
        assert self.tokenizer is not None
        ids = self.tokenizer.encode(text)
        return [self.tokenizer.bos_id, *ids] if self.add_bos else ids

    async def _collect(self, jobs: list[tuple[list[int], SamplingParams]], arrival: float, trace: _Trace | None,
                       ) -> tuple[list[str], list[str | None], int, int]:
        texts = [""] * len(jobs)
        finishes: list[str | None] = [None] * len(jobs)
        completion = cached = 0
        async with contextlib.aclosing(self._outputs(jobs, arrival)) as outs:
            async for i, out in outs:
                if trace is not None:
                    trace.see(i, out)
                texts[i] += out.delta_text
                if out.finished:
                    finishes[i] = out.finish_reason
                    completion += out.num_output_tokens
                    cached += out.num_cached_tokens
        return texts, finishes, completion, cached

    async def _stream(self, request: web.Request, jobs: list[tuple[list[int], SamplingParams]], arrival: float,
                      chunk: Callable[[int, str, str | None], dict[str, Any]],
                      first: Callable[[int], dict[str, Any]] | None, rid: str, created: int, obj: str,
                      usage_prompt: int, include_usage: bool, trace: _Trace | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
            await resp.write(f"data: {data}\n\n".encode())

        if first is not None:
            for i in range(len(jobs)):
                await send(first(i))
        completion = cached = 0
        try:
            async with contextlib.aclosing(self._outputs(jobs, arrival)) as outs:
                async for i, out in outs:
                    if trace is not None:
                        trace.see(i, out)
                    if out.finished:
                        completion += out.num_output_tokens
                        cached += out.num_cached_tokens
                    if out.delta_text or out.finished:
                        await send(chunk(i, out.delta_text, out.finish_reason if out.finished else None))
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - headers are sent; report in-band like OpenAI
            log.warning("stream %s failed: %r", rid, e)
            if trace is not None:
                trace.finish_reason = None
            await send({"error": {"message": str(e), "type": "server_error", "param": None, "code": 500}})
        else:
            if include_usage:
                await send({"id": rid, "object": obj, "created": created, "model": self.settings.model_name,
                            "choices": [], "usage": _usage(usage_prompt, completion, cached)})
        await send("[DONE]")
        await resp.write_eof()
        return resp


def _first_prompt(p: str | list[int] | list[str] | list[list[int]]) -> str | list[int]:
    """The prompt of choice 0, the one capture records (token ids are decoded by the writer)."""
    if isinstance(p, str):
        return p
    first = p[0]
    return [int(t) for t in p if isinstance(t, int)] if isinstance(first, int) else first


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens`` counts prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
