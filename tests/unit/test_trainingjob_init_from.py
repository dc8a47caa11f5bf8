"""TrainingJob spec.initFrom (fine-tuning from another job's export, issue 17 point 5): no
worker until that job's export is committed, then its URI recorded in status.initFrom, kept
for the job's life, and mounted as the trainer's model.init_from."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import yaml
from kubeforge import k8s
from kubeforge.api.trainingjob import InitFrom
from kubeforge.controllers.trainingjob import handlers
from kubeforge.controllers.trainingjob.plan import Observed, resolve_init

from tests.unit.test_trainingjob_plan import POLICY, Sim, job_spec

pytestmark = pytest.mark.unit
EXPORT = "s3://ckpt/ns/base/runs/u1/export"
LATER = "s3://ckpt/ns/base/runs/u2/export"


def base_job(export_uri: str | None, phase: str = "Running") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if export_uri:
        status["exportUri"] = export_uri
    return {"metadata": {"name": "base", "namespace": "ns"}, "status": status}


REF = InitFrom.model_validate({"trainingJobRef": {"name": "base"}})


def test_resolution_names_what_is_missing() -> None:
    assert resolve_init(REF, None).message == ("waiting for the export of TrainingJob base: it does not exist in "
                                               "this namespace")
    running = resolve_init(REF, base_job(None))
    assert running.resolved is None and "no committed export yet (phase Running)" in running.message
    assert resolve_init(REF, base_job(EXPORT, "Succeeded")).resolved == {"trainingJob": "base", "uri": EXPORT}


class InitSim(Sim):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec, POLICY)
        self.base: dict[str, Any] | None = None
        self.reads = 0

    def observe(self) -> Observed:
        obs = super().observe()
        if self.status().get("initFrom"):
            return obs
        self.reads += 1
        return dataclasses.replace(obs, init_from=resolve_init(REF, copy.deepcopy(self.base)))


def config_of(sim: InitSim) -> dict[str, Any] | None:
    assert sim.last is not None
    cms = [c for c in sim.last.children if c["kind"] == "ConfigMap"]
    return yaml.safe_load(cms[0]["data"]["trainer.yaml"]) if cms else None


def test_no_worker_until_the_export_is_committed_then_it_is_kept() -> None:
    sim = InitSim(job_spec(1, 1, initFrom={"trainingJobRef": {"name": "base"}}))
    sim.base = base_job(None)
    p = sim.converge(3)
    assert sim.pods == {} and config_of(sim) is None
    ready = sim.cond("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForInitFrom")
    assert "TrainingJob base" in ready["message"] and sim.events.count("WaitingForInitFrom") == 1
    assert p.waiting_for_export == "base"

    sim.base = base_job(EXPORT, "Succeeded")
    p = sim.converge(2)
    assert sim.status()["initFrom"] == {"trainingJob": "base", "uri": EXPORT}
    assert "InitFromResolved" in sim.events and p.waiting_for_export is None and sim.workers()
    config = config_of(sim)
    assert config is not None and config["model"] == {"init_from": EXPORT}, config

    reads = sim.reads
    sim.base = base_job(LATER, "Succeeded")  # the base job exported again
    sim.run_all()
    sim.converge(2)
    assert sim.reads == reads and sim.status()["initFrom"]["uri"] == EXPORT
    assert config_of(sim)["model"]["init_from"] == EXPORT  # type: ignore[index]


def test_a_job_waiting_for_an_export_is_brought_back_by_that_jobs_events(monkeypatch: pytest.MonkeyPatch) -> None:
    caches = handlers.Caches()
    handlers._track_wait(caches.export_waiters, ("ns", "ft"), "base")
    assert caches.export_waiters == {("ns", "base"): {("ns", "ft")}}
    handlers._track_wait(caches.export_waiters, ("ns", "ft"), None)
    assert caches.export_waiters == {}
    calls: list[tuple[str, str, str]] = []
    monkeypatch.setattr(k8s, "get_custom", lambda ns, plural, name: calls.append((ns, plural, name)) or base_job(EXPORT))
    job = {"metadata": {"name": "ft", "namespace": "ns"}, "spec": {"initFrom": {"trainingJobRef": {"name": "base"}}}}
    got = handlers._read_init(job)
    assert got is not None and got.resolved == {"trainingJob": "base", "uri": EXPORT}
    assert calls == [("ns", "trainingjobs", "base")]
    assert handlers._read_init({**job, "status": {"initFrom": got.resolved}}) is None and len(calls) == 1
