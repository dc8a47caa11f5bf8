"""The one way the controllers run work outside kopf's handlers: tasks owned by the
operator's ``Background`` (``memo.background``), started by each kind's startup handler and
all stopped by the operator's cleanup handler.

- ``every(name, interval, fn)``: a periodic pass (CheckpointPolicy retention, the
  InferenceService export poll), run only in the active replica (``controllers.peering``). Not kopf timers: kopf puts a finalizer on every object a
  timer runs for, and a finalizer left behind by a stopped operator blocks deleting the
  object and its namespace.
- ``spawn(name, coroutine)``: a long-running task (the TrainingJob queue's workers).
- ``SideBySide``: the objects of one periodic pass worked on in threads of the pass's own, so
  one whose store is dead (a retry deadline per call) delays neither the others nor kopf's
  handlers.
- ``WorkQueue``: keys due at a time, one worker per key at a time (controller-runtime's
  work queue), for a kind whose events only say "look at this object again";
  ``queue_worker`` is one worker of it: each key reconciled in a thread of the kind's pool.

A failing pass is logged and the next one runs; a task that ends by an exception is logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

log = logging.getLogger("kubeforge.background")
K = TypeVar("K", bound=Hashable)


class Background:
    """The operator's background tasks and what must be closed with them."""

    def __init__(self, active: Callable[[], bool] = lambda: True) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closers: list[Callable[[], None]] = []
        #: whether this replica is the active one (``controllers.peering``): passes of
        #: ``every`` loops, and the TrainingJob queue's keys, are skipped while it is not
        self.active = active

    @property
    def names(self) -> list[str]:
        return sorted(name for name, task in self._tasks.items() if not task.done())

    def spawn(self, name: str, coroutine: Coroutine[Any, Any, None]) -> None:
        if name in self._tasks and not self._tasks[name].done():
            coroutine.close()
            raise RuntimeError(f"background task {name} runs already")
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        task.add_done_callback(_report)
        self._tasks[name] = task

    def every(self, name: str, interval_s: float, fn: Callable[[], Awaitable[None]], always: bool = False) -> None:
        """``fn`` every ``interval_s`` (the first time after one interval), skipped while this
        replica is not the active one unless ``always``."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval_s)
                if not always and not self.active():
                    continue
                try:
                    await fn()
                except Exception:  # one failed pass must not end the loop
                    log.exception("background pass %s failed", name)

        self.spawn(name, loop())

    def close_with(self, closer: Callable[[], None]) -> None:
        """Call ``closer`` (a thread pool's shutdown...) once the tasks are stopped."""
        self._closers.append(closer)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        while self._closers:
            self._closers.pop()()


def _report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s ended: %r", task.get_name(), task.exception())


class WorkQueue(Generic[K]):
    """Keys due at a time; a key is handed to one worker at a time, and adding a key while
    it is being worked on brings it back once that work is done."""

    def __init__(self) -> None:
        self._due: dict[K, float] = {}
        self._busy: set[K] = set()
        self._wake = asyncio.Event()

    def add(self, key: K, delay: float = 0.0) -> None:
        due = time.monotonic() + delay
        self._due[key] = min(self._due.get(key, due), due)
        self._wake.set()

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` waits to be handed out."""
        return key in self._due

    async def get(self) -> K:
        while True:
            now = time.monotonic()
            ready = [(due, k) for k, due in self._due.items() if k not in self._busy]
            if ready:
                due, key = min(ready, key=lambda dk: dk[0])
                if due <= now:
                    del self._due[key]
                    self._busy.add(key)
                    return key
                timeout: float | None = due - now
            else:
                timeout = None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def done(self, key: K) -> None:
        self._busy.discard(key)
        self._wake.set()


class SideBySide(Generic[K]):
    """A pass's work on each key, ``threads`` keys at a time in a pool of its own. A key whose
    work from an earlier pass still runs is skipped (logged); a pass waits ``timeout`` at most
    and leaves what is still running to finish on its own."""

    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self.busy: set[K] = set()

    async def run(self, keys: list[K], fn: Callable[[K], None], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        running = []
        for key in keys:
            if key in self.busy:
                log.info("%s: %s still runs from an earlier pass", self.name, key)
                continue
            self.busy.add(key)
            running.append(loop.run_in_executor(self.pool, self._one, fn, key))
        if running:
            await asyncio.wait(running, timeout=timeout)

    def _one(self, fn: Callable[[K], None], key: K) -> None:
        try:
            fn(key)
        except Exception:  # one object's failure must not stop the others'
            log.exception("%s failed for %s", self.name, key)
        finally:
            self.busy.discard(key)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


async def queue_worker(queue: WorkQueue[K], background: Background, pool: concurrent.futures.Executor,
                       reconcile: Callable[[K], float | None], what: str, *, standby_retry_s: float,
                       error_backoff_s: float) -> None:
    """Hand the queue's keys to ``reconcile`` (in ``pool``: the Kubernetes client blocks) one
    at a time, forever; a key comes back when ``reconcile`` returns a delay, after
    ``error_backoff_s`` when it raises. In a standby replica (or one a moment before its next
    look at the peering object: kopf resumes the handlers at once) a key is kept and tried
    again after ``standby_retry_s``."""
    loop = asyncio.get_running_loop()
    while True:
        key = await queue.get()
        if not background.active():
            queue.done(key)
            queue.add(key, standby_retry_s)
            continue
        try:
            again = await loop.run_in_executor(pool, reconcile, key)
        except Exception:
            log.exception("reconciling %s %s failed", what, key)
            again = error_backoff_s
        finally:
            queue.done(key)
        if again is not None:
            queue.add(key, again)
