"""The engine on its own thread, fed and drained from asyncio.

Why a thread and not ``run_in_executor`` per step: the step loop must keep running while no
handler awaits it, and torch releases the GIL inside its kernels, so the HTTP side stays
responsive during a forward pass. Requests and aborts cross into the engine thread through a
queue; outputs cross back with one ``call_soon_threadsafe`` per step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator
from typing import Any

from kubeforge_runtime.serve.engine import LLMEngine, RequestOutput
from kubeforge_runtime.serve.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; the request cannot complete."""


class EngineStepError(RuntimeError):
    """A step failed; the requests in it were aborted (the engine keeps serving)."""


#: Failed steps, each followed by a failed probe, in a row before the engine counts as broken.
#: After a failed step (its requests are failed) the engine runs a one-token probe request of
#: its own: when that works the failure was the batch's (a bad request), the count goes back
#: to 0 and the engine goes on; when it fails too the fault is sticky (a CUDA error, a
#: corrupted allocator) and would answer 500 forever. Broken, the engine thread stops, so
#: /livez answers 503 and the kubelet restarts the container.
MAX_CONSECUTIVE_STEP_FAILURES = 3
PROBE_ID = "kubeforge-engine-probe"


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_step_failures: int = MAX_CONSECUTIVE_STEP_FAILURES) -> None:
        self.engine = engine
        self.max_step_failures = max_step_failures
        self.step_failures = 0  # in a row
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: BaseException | None = None

    @property
    def num_unfinished(self) -> int:
        """Requests accepted and not yet finished (only read and written on the event loop)."""
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        return max(0, self.num_unfinished - self.engine.num_running)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- engine thread --------------------------------------------------------------------

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request_id, prompt_ids, params, arrival = arg
                try:
                    self.engine.add_request(request_id, prompt_ids, params, arrival)
                except Exception as e:  # noqa: BLE001 - the request's failure, not the engine's
                    self._post([e], request_id)
            else:
                self.engine.abort_request(arg)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception as e:
                    log.exception("engine step failed; failing the requests in flight")
                    for request_id in self.engine.abort_all():
                        self._post([EngineStepError(f"generation failed: {e!r}")], request_id)
                    if self._probe():
                        self.step_failures = 0
                        continue
                    self.step_failures += 1
                    log.error("engine probe failed after a failed step (%d in a row)", self.step_failures)
                    if self.step_failures >= self.max_step_failures:
                        raise EngineStepError(f"{self.step_failures} engine steps failed in a row, the last "
                                              f"with {e!r}: the engine is broken") from e
                    continue
                self.step_failures = 0
                if outputs:
                    self._post(outputs)
        except BaseException as e:
            log.exception("engine thread died")
            self.dead = e
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_all, e)

    def _probe(self) -> bool:
        """One greedy token of a one-token prompt, on the engine alone (its requests were just
        aborted), counted in metrics of its own; whether it worked."""
        from kubeforge_runtime.serve.metrics import ServingMetrics

        real = self.engine.metrics
        self.engine.metrics = ServingMetrics("probe")
        try:
            self.engine.add_request(PROBE_ID, [0], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
            while self.engine.has_unfinished_requests():
                self.engine.step()
            return True
        except Exception:  # noqa: BLE001 - the answer is the point
            log.exception("engine probe failed")
            self.engine.abort_all()
            return False
        finally:
            self.engine.metrics = real

    def _post(self, items: list[Any], request_id: str | None = None) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, items, request_id)

    # -- event loop -----------------------------------------------------------------------

    def _dispatch(self, items: list[Any], request_id: str | None) -> None:
        for item in items:
            rid = request_id if request_id is not None else item.request_id
            q = self._streams.get(rid)
            if q is not None:
                q.put_nowait(item)

    def _fail_all(self, e: BaseException) -> None:
        for q in self._streams.values():
            q.put_nowait(EngineDeadError(f"engine stopped: {e!r}"))

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       arrival_time: float | None = None) -> AsyncGenerator[RequestOutput, None]:
        """Stream one request's outputs; leaving the iterator early (a client went away, the
        handler was cancelled) aborts the request and frees its blocks."""
        if self.dead is not None:
            raise EngineDeadError(f"engine stopped: {self.dead!r}")
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = q
        self._inbox.put(("add", (request_id, prompt_ids, params, arrival_time or time.monotonic())))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True  # never reached the engine, or the engine is gone
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))
                self._wakeup.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._streams:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True
