"""Store calls off the reconcile path: bounded, cached and concurrent per store.

A store call can take its whole retry deadline (``store_retry_deadline_s``, 10 s) when the S3
endpoint is away, and a TrainingJob reconcile used to make two of them in its own thread: with
about 20 S3-backed jobs and a dead endpoint every reconcile thread waited on S3, and a node
loss of a job that does not even use S3 was handled minutes late. Here:

- **Concurrent per store.** Each store (a CheckpointPolicy, ``(namespace, name)``) has a small
  pool of its own (``StoreAccessSettings.threads_per_store``); a dead store occupies only its
  own threads, never the reconcile pool or another policy's.
- **Bounded.** ``read`` never blocks its caller: it returns what was last read (with its
  age), and a read still running for the same key is not started twice, so the work queued
  per store is at most one read per key.
- **Cached, failures too.** A read that fails with ``StoreError`` marks its store down for a
  backoff (5 s, doubling to ``max_backoff_s``): reads of a down store are not attempted until
  it ends (queued ones are dropped), the next one then tries once. Other errors (a Secret the
  operator may not read, a bug) are the key's answer, not an outage. Each change is a log line and ``kubeforge_store_reachable{namespace,policy}``;
  ``outage(store)`` lets the other controllers fail fast with the same error.

When a read finishes its caller's ``on_done`` runs (the TrainingJob controller enqueues the
job), so a fresh answer is used at once rather than at the next periodic look.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar, cast

from kubeforge.metrics import STORE_REACHABLE, remove_series
from kubeforge.store import StoreError

log = logging.getLogger("kubeforge.store_access")
T = TypeVar("T")
#: a store: the CheckpointPolicy's (namespace, name)
StoreKey = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Reading(Generic[T]):
    """The newest successful answer for a key (None: none yet), when its read started
    (``time.monotonic()``: an answer is no older than that), and the error of the last attempt
    when that one failed."""

    value: T | None = None
    taken: float | None = None
    error: str | None = None

    def newer_than(self, t: float) -> bool:
        return self.value is not None and self.taken is not None and self.taken >= t


@dataclasses.dataclass
class Outage:
    """A store that failed: no read of it is started before ``until``."""

    since: float
    until: float
    failures: int
    error: str


def shared_stores(memo: Any) -> StoreAccess:
    """The operator's one ``StoreAccess`` (``main`` puts it in the memo; a memo made without
    one, as in the unit tests, gets one here)."""
    stores = memo.get("stores")
    if stores is None:
        stores = memo["stores"] = StoreAccess()
    return cast(StoreAccess, stores)


class StoreAccess:
    """Reads of each store in its own small pool, their answers and failures cached."""

    def __init__(self, threads_per_store: int = 2, base_backoff_s: float = 5.0, max_backoff_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threads_per_store = threads_per_store
        self.base_backoff_s, self.max_backoff_s = base_backoff_s, max_backoff_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pools: dict[StoreKey, concurrent.futures.ThreadPoolExecutor] = {}
        self._readings: dict[Hashable, Reading[Any]] = {}
        #: reads in flight: key -> (its store, a token); a read whose token is gone (its key or
        #: store forgotten meanwhile) leaves no trace when it ends
        self._running: dict[Hashable, tuple[StoreKey, object]] = {}
        self._store_of: dict[Hashable, StoreKey] = {}
        self._outages: dict[StoreKey, Outage] = {}
        self._closed = False

    def read(self, store: StoreKey, key: Hashable, fn: Callable[[], T], *, max_age: float,
             on_done: Callable[[], None] | None = None) -> Reading[T]:
        """What was last read for ``key``; a new ``fn()`` is started in ``store``'s pool when
        that is older than ``max_age`` (or there is none), unless one runs already or the
        store is down. Never waits for ``fn``."""
        now = self._clock()
        with self._lock:
            reading: Reading[T] = self._readings.get(key, Reading())
            due = reading.taken is None or now - reading.taken > max_age
            outage = self._outages.get(store)
            if outage is not None and now < outage.until:
                return dataclasses.replace(reading, error=reading.error or outage.error)
            if not due or key in self._running or self._closed:
                return reading
            pool = self._pools.get(store)
            if pool is None:
                pool = self._pools[store] = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.threads_per_store, thread_name_prefix=f"store-{store[0]}-{store[1]}")
            token = object()
            self._running[key] = (store, token)
            self._store_of[key] = store
            # under the lock: forget_store cannot shut this pool down between choosing and using it
            pool.submit(self._run, store, key, token, fn, on_done)
        return reading

    def outage(self, store: StoreKey) -> str | None:
        """Why ``store`` is down now (its last error), or None."""
        with self._lock:
            outage = self._outages.get(store)
            return outage.error if outage is not None and self._clock() < outage.until else None

    def call(self, store: StoreKey, fn: Callable[[], T]) -> T:
        """``fn()`` for a caller that reads ``store`` in its own thread, under the same outage
        rule as ``read``: while the store is down it fails fast (``StoreError`` with the last
        error) instead of waiting out a retry deadline, and its ``StoreError`` marks it down."""
        down = self.outage(store)
        if down is not None:
            raise StoreError(f"{down} (retried after a backoff)")
        try:
            value = fn()
        except StoreError as e:
            self.failed(store, str(e))
            raise
        with self._lock:
            self._mark_up(store)
        return value

    def failed(self, store: StoreKey, error: str) -> None:
        """Record a failure of ``store`` seen by a caller that read it itself."""
        with self._lock:
            self._mark_down(store, error)

    def forget(self, match: Callable[[Any], bool]) -> None:
        """Drop the answers (and reads in flight) of the keys ``match`` accepts: their object
        was deleted."""
        with self._lock:
            for key in [k for k in {*self._readings, *self._running} if match(k)]:
                self._readings.pop(key, None)
                self._running.pop(key, None)
                self._store_of.pop(key, None)

    def forget_store(self, store: StoreKey) -> None:
        """A policy deleted or changed: its outage, answers, reads in flight and metric go
        (a changed spec is tried afresh at once), its threads end once idle."""
        with self._lock:
            self._outages.pop(store, None)
            pool = self._pools.pop(store, None)
            for key in [k for k, s in self._store_of.items() if s == store]:
                self._readings.pop(key, None)
                self._running.pop(key, None)
                del self._store_of[key]
            if pool is not None:
                pool.shutdown(wait=False)
        remove_series(STORE_REACHABLE, *store)

    def close(self) -> None:
        """Stop starting reads; running ones are not waited for (the process is ending)."""
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals -----------------------------------------------------------------

    def _current(self, key: Hashable, token: object) -> bool:
        entry = self._running.get(key)
        return entry is not None and entry[1] is token

    def _run(self, store: StoreKey, key: Hashable, token: object, fn: Callable[[], Any],
             on_done: Callable[[], None] | None) -> None:
        started = self._clock()
        with self._lock:
            outage = self._outages.get(store)
            if outage is not None and started < outage.until:  # queued before the store went down
                if self._current(key, token):
                    del self._running[key]
                return
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - a store's failure is recorded, never raised into a pool
            with self._lock:
                if not self._current(key, token):
                    return
                del self._running[key]
                old = self._readings.get(key, Reading())
                self._readings[key] = dataclasses.replace(old, error=str(e))
                if isinstance(e, StoreError):
                    self._mark_down(store, str(e))
                else:
                    log.warning("reading the store of CheckpointPolicy %s/%s for %s failed: %s", *store, key, e)
        else:
            with self._lock:
                if not self._current(key, token):
                    return
                del self._running[key]
                self._readings[key] = Reading(value, started)
                self._mark_up(store)
        if on_done is not None:
            try:
                on_done()
            except Exception:  # noqa: BLE001
                log.exception("after reading the store of %s/%s", *store)

    def _mark_down(self, store: StoreKey, error: str) -> None:
        now = self._clock()
        old = self._outages.get(store)
        failures = (old.failures + 1) if old else 1
        backoff = min(self.max_backoff_s, self.base_backoff_s * 2 ** (failures - 1))
        self._outages[store] = Outage(old.since if old else now, now + backoff, failures, error)
        if old is None:
            log.warning("store of CheckpointPolicy %s/%s unreachable: %s; its reads pause %.0f s at a time "
                        "(up to %.0f s), other stores and pod management are not held up", *store, error, backoff,
                        self.max_backoff_s)
        STORE_REACHABLE.labels(*store).set(0)

    def _mark_up(self, store: StoreKey) -> None:
        old = self._outages.pop(store, None)
        if old is not None:
            log.info("store of CheckpointPolicy %s/%s reachable again after %.0f s (%d failed reads)", *store,
                     self._clock() - old.since, old.failures)
        STORE_REACHABLE.labels(*store).set(1)
