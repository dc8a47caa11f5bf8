"""Store reads never hold up their caller: bounded, cached (failures too), concurrent per store
(issue 16 item 4: a dead S3 endpoint stalled the TrainingJob controller for every job)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from kubeforge.api import CheckpointPolicySpec
from kubeforge.controllers.store_access import StoreAccess
from kubeforge.controllers.trainingjob import handlers
from kubeforge.controllers.trainingjob.plan import StoreView
from kubeforge.settings import OperatorSettings
from kubeforge.store import StoreError
from prometheus_client import REGISTRY

pytestmark = pytest.mark.unit
# the gauge is the process's: each test's stores have names of their own, so a read a test left
# behind cannot move another's figures
A, B = ("ns", "policy-a"), ("ns", "policy-b")
C = ("ns", "policy-c")


def reachable(store: tuple[str, str]) -> float | None:
    return REGISTRY.get_sample_value("kubeforge_store_reachable", {"namespace": store[0], "policy": store[1]})


def wait_until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_read_returns_at_once_and_runs_once_per_key() -> None:
    stores, gate, calls = StoreAccess(), threading.Event(), []

    def slow() -> str:
        calls.append(1)
        gate.wait(5)
        return "answer"

    done = threading.Event()
    t0 = time.monotonic()
    for _ in range(5):
        reading = stores.read(A, "job", slow, max_age=30, on_done=done.set)
        assert reading.value is None
    assert time.monotonic() - t0 < 0.5, "read waited for the store"
    gate.set()
    assert done.wait(5)
    assert len(calls) == 1, "a read already running was started again"
    reading = stores.read(A, "job", slow, max_age=30)
    assert reading.value == "answer" and reading.taken is not None
    assert len(calls) == 1, "a fresh answer was read again"
    stores.close()


def test_a_dead_store_holds_only_its_own_threads() -> None:
    stores, gate = StoreAccess(threads_per_store=1), threading.Event()
    for i in range(3):  # more blocked reads than the dead store has threads
        stores.read(A, f"dead-{i}", lambda: gate.wait(10), max_age=30)
    done = threading.Event()
    stores.read(B, "alive", lambda: "ok", max_age=30, on_done=done.set)
    assert done.wait(2), "a dead store delayed another store's read"
    assert stores.read(B, "alive", lambda: "ok", max_age=30).value == "ok"
    gate.set()
    stores.close()


def test_a_failure_is_cached_with_a_backoff_and_a_success_clears_it() -> None:
    now = [100.0]
    stores = StoreAccess(base_backoff_s=5, max_backoff_s=20, clock=lambda: now[0])
    calls: list[int] = []
    failing = [True]

    def fn() -> str:
        calls.append(1)
        if failing[0]:
            raise StoreError("connection refused")
        return "ok"

    def read_and_wait() -> Any:
        done = threading.Event()
        reading = stores.read(C, "job", fn, max_age=0, on_done=done.set)
        done.wait(2)
        return reading

    read_and_wait()
    assert len(calls) == 1 and stores.outage(C) == "connection refused"
    assert reachable(C) == 0
    for _ in range(3):  # within the backoff: no new attempt, the error is the answer
        reading = stores.read(C, "job", fn, max_age=0)
        assert reading.error == "connection refused"
    assert len(calls) == 1
    now[0] += 5.1
    read_and_wait()  # the backoff ended: one attempt, failed again -> 10 s now
    assert len(calls) == 2
    now[0] += 5.1
    stores.read(C, "job", fn, max_age=0)
    assert len(calls) == 2, "the doubled backoff was not kept"
    now[0] += 5.0
    failing[0] = False
    read_and_wait()
    assert len(calls) == 3 and stores.outage(C) is None
    assert stores.read(C, "job", fn, max_age=60).value == "ok"
    assert reachable(C) == 1
    stores.forget_store(C)
    assert reachable(C) is None, "a deleted policy's gauge stays"
    stores.close()


POLICY = CheckpointPolicySpec.model_validate({
    "schedule": {"everySteps": 10},
    "storage": {"s3": {"bucket": "kubeforge", "credentialsSecretRef": {"name": "s3"}}}})


def test_the_trainingjob_reconcile_never_waits_for_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old controller read the store in the reconcile thread: a dead endpoint cost every
    reconcile its retry deadline (10 s, twice), for every job of every policy."""
    gate = threading.Event()
    view = StoreView(last_checkpoint={"step": 7}, export_committed=True, export_uri="s3://kubeforge/x")

    def read(namespace: str, run: str, policy: CheckpointPolicySpec, deadline_s: float) -> StoreView:
        gate.wait(10)
        return view

    monkeypatch.setattr(handlers, "_read_store_view", read)
    state = handlers.TrainingJobs(OperatorSettings())
    key = ("ns", "job")
    t0 = time.monotonic()
    assert handlers._store_view(state, key, "job", "policy", POLICY, fresh=False) is None
    assert handlers._store_view(state, key, "job", "policy", POLICY, fresh=True) is None
    assert time.monotonic() - t0 < 0.5, "the reconcile waited for the store"
    gate.set()
    wait_until(lambda: key in state.queue)  # the job is looked at again once the answer is in
    assert handlers._store_view(state, key, "job", "policy", POLICY, fresh=False) == view
    state.stores.close()


def test_fresh_means_read_after_worker_zero_finished(monkeypatch: pytest.MonkeyPatch) -> None:
    """"Is the export committed?" once worker 0 exited 0: an answer from before the question is no
    answer (it would say "no export" and replace worker 0), so None until a newer read is in."""
    answers = iter([StoreView(export_committed=False), StoreView(export_committed=True)])
    monkeypatch.setattr(handlers, "_read_store_view", lambda *a: next(answers))
    state = handlers.TrainingJobs(OperatorSettings())
    key = ("ns", "job")
    handlers._store_view(state, key, "job", "policy", POLICY, fresh=False)
    wait_until(lambda: handlers._store_view(state, key, "job", "policy", POLICY, fresh=False) is not None)
    assert handlers._store_view(state, key, "job", "policy", POLICY, fresh=True) is None
    wait_until(lambda: handlers._store_view(state, key, "job", "policy", POLICY, fresh=True) is not None)
    seen = handlers._store_view(state, key, "job", "policy", POLICY, fresh=True)
    assert seen is not None and seen.export_committed is True
    state.stores.close()


D, E = ("ns", "policy-d"), ("ns", "policy-e")


def test_an_answer_is_as_old_as_its_read_not_its_end() -> None:
    """A read already in flight when the export question was asked may have fetched the marker
    before the commit: it does not count as newer than the question."""
    now = [10.0]
    stores, gate = StoreAccess(clock=lambda: now[0]), threading.Event()
    done = threading.Event()
    stores.read(D, "job", lambda: gate.wait(5) and "before the commit", max_age=30, on_done=done.set)
    wait_until(lambda: now[0] == 10.0)  # the read has started at t=10
    time.sleep(0.1)
    now[0] = 20.0  # worker 0 exits now: the question is asked at t=20
    gate.set()
    assert done.wait(5)
    reading = stores.read(D, "job", lambda: "after", max_age=30)
    assert reading.value == "before the commit" and not reading.newer_than(20.0)
    stores.close()


def test_other_errors_are_the_keys_answer_not_an_outage() -> None:
    stores, done = StoreAccess(), threading.Event()

    def forbidden() -> str:
        raise PermissionError("secrets is forbidden")

    stores.read(E, "job", forbidden, max_age=0, on_done=done.set)
    assert done.wait(5)
    assert stores.outage(E) is None
    assert stores.read(E, "job", forbidden, max_age=30).error == "secrets is forbidden"
    stores.close()


def test_a_forgotten_key_or_store_leaves_no_trace_of_a_read_in_flight() -> None:
    store = ("ns", "policy-f")
    stores, gate, calls = StoreAccess(), threading.Event(), []

    def slow() -> str:
        calls.append(1)
        gate.wait(5)
        return "stale"

    stores.read(store, "gone", slow, max_age=30)
    stores.read(store, "kept", slow, max_age=30)
    wait_until(lambda: len(calls) == 2)
    stores.forget(lambda k: k == "gone")
    stores.forget_store(store)  # the policy deleted (or its spec changed) while both read
    gate.set()
    time.sleep(0.3)
    assert reachable(store) is None, "a read that ended after its policy was deleted brought its gauge back"
    assert stores.read(store, "gone", lambda: "fresh", max_age=30).value is None  # (starts a new read)
    done = threading.Event()
    stores.read(store, "kept", lambda: "fresh", max_age=30, on_done=done.set)  # a new pool, a new read
    assert done.wait(5)
    assert stores.read(store, "kept", lambda: "x", max_age=30).value == "fresh"
    stores.close()


def test_reads_queued_before_an_outage_do_not_each_wait_it_out() -> None:
    store = ("ns", "policy-g")
    stores, calls = StoreAccess(threads_per_store=1), []
    first_started, release = threading.Event(), threading.Event()

    def failing() -> str:
        calls.append(1)
        first_started.set()
        release.wait(5)
        raise StoreError("connection refused")

    for i in range(4):  # one runs, three wait in the pool's queue
        stores.read(store, f"job-{i}", failing, max_age=0)
    assert first_started.wait(5)
    release.set()
    wait_until(lambda: stores.outage(store) is not None)
    time.sleep(0.3)
    assert len(calls) == 1, "reads queued behind the failure each tried the dead store"
    stores.close()
