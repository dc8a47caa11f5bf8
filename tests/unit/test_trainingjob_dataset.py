"""TrainingJob spec.data.datasetRef (issue 17): resolved to a Dataset version before the first
worker, recorded in status.dataset and kept for the job's life, and mounted as the trainer's
data (train split, sft format); no worker while the version does not exist."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import yaml
from kubeforge import k8s
from kubeforge.api import TrainingJobSpec
from kubeforge.api.trainingjob import DatasetRef
from kubeforge.controllers.trainingjob import handlers
from kubeforge.controllers.trainingjob import manifests as tp
from kubeforge.controllers.trainingjob.plan import DatasetResolution, Observed, plan, resolve_dataset

from tests.unit.test_trainingjob_plan import POLICY, Sim, job_spec

pytestmark = pytest.mark.unit
V2 = "s3://ckpt/ns/chat-data/dataset/v-0000000002"
V3 = "s3://ckpt/ns/chat-data/dataset/v-0000000003"


def dataset(*versions: int, newest: bool = True) -> dict[str, Any]:
    """A Dataset object as the API server returns it, with these committed versions."""
    entries = [{"version": v, "uri": f"s3://ckpt/ns/chat-data/dataset/v-{v:010d}", "records": {"train": 9}}
               for v in versions]
    status: dict[str, Any] = {"versions": entries}
    if newest and versions:
        status.update(newestVersion=max(versions), newestUri=entries[-1]["uri"])
    return {"metadata": {"name": "chat-data", "namespace": "ns"}, "status": status}


def ref(version: int | None = None) -> DatasetRef:
    return DatasetRef.model_validate({"name": "chat-data", **({"version": version} if version else {})})


# ---------------------------------------------------------------------------- resolution

def test_the_newest_version_or_the_pinned_one() -> None:
    assert resolve_dataset(ref(), dataset(1, 2)).resolved == {"name": "chat-data", "version": 2, "uri": V2}
    assert resolve_dataset(ref(2), dataset(1, 2, 3)).resolved == {"name": "chat-data", "version": 2, "uri": V2}
    # a status without newest* (written by an older controller) still names its versions
    assert resolve_dataset(ref(), dataset(2, 3, newest=False)).resolved == {
        "name": "chat-data", "version": 3, "uri": V3}


def test_what_is_not_there_yet_names_the_dataset_and_version() -> None:
    missing = resolve_dataset(ref(), None)
    assert missing.resolved is None
    assert missing.message == ("waiting for the newest version of Dataset chat-data: Dataset chat-data does not "
                               "exist in this namespace")
    empty = resolve_dataset(ref(), dataset())
    assert empty.resolved is None and "has no committed version yet" in empty.message
    pinned = resolve_dataset(ref(4), dataset(2, 3))
    assert pinned.resolved is None
    assert pinned.message == ("waiting for version 4 of Dataset chat-data: it has no committed version 4 "
                              "(committed versions kept: 2, 3)")


# ---------------------------------------------------------------------------- the trainer config

def test_the_config_trains_on_the_train_split_in_sft_form_keeping_the_users_data_settings() -> None:
    spec = TrainingJobSpec.model_validate({"trainer": {"config": {"model": {"preset": "tiny"},
                                                                  "data": {"seq_len": 256, "shuffle": False}}},
                                           "data": {"datasetRef": {"name": "chat-data"}}})
    cm = tp.build_config_map(tp.Owner("llm", "ns", "u"), spec, V2 + "/")
    config = yaml.safe_load(cm["data"]["trainer.yaml"])
    assert config["data"] == {"paths": [f"{V2}/train.tar"], "format": "sft", "seq_len": 256, "shuffle": False}
    assert config["model"] == {"preset": "tiny"} and config["export"] == {"enabled": True}
    plain = yaml.safe_load(tp.build_config_map(tp.Owner("llm", "ns", "u"), spec)["data"]["trainer.yaml"])
    assert plain["data"] == {"seq_len": 256, "shuffle": False}


# ---------------------------------------------------------------------------- the plan

class DatasetSim(Sim):
    """The Sim of the plan's tests, with the Dataset as the handler would resolve it: read only
    while status.dataset is not recorded."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec, POLICY)
        self.dataset_body: dict[str, Any] | None = None
        self.reads = 0

    def observe(self) -> Observed:
        obs = super().observe()
        if self.status().get("dataset"):
            return obs
        self.reads += 1
        r = DatasetRef.model_validate(self.job["spec"]["data"]["datasetRef"])
        return dataclasses.replace(obs, dataset=resolve_dataset(r, copy.deepcopy(self.dataset_body)))


def config_of(sim: DatasetSim) -> dict[str, Any] | None:
    assert sim.last is not None
    cms = [c for c in sim.last.children if c["kind"] == "ConfigMap"]
    return yaml.safe_load(cms[0]["data"]["trainer.yaml"]) if cms else None


def test_no_worker_until_the_dataset_version_exists_then_it_is_kept_for_the_jobs_life() -> None:
    sim = DatasetSim(job_spec(1, 2, data={"datasetRef": {"name": "chat-data"}}))
    p = sim.converge(3)
    assert sim.pods == {} and p.create == []
    ready = sim.cond("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForDataset")
    assert "Dataset chat-data" in ready["message"] and "the newest version" in ready["message"]
    assert sim.status()["phase"] == "Pending" and "dataset" not in sim.status()
    assert sim.events.count("WaitingForDataset") == 1, "one Event for the wait, not one per pass"
    assert p.waiting_for_dataset == "chat-data"
    assert config_of(sim) is None, "no config is mounted before the data is known"

    sim.dataset_body = dataset(1)  # version 1 is committed but we wait for the newest: any
    p = sim.converge(2)
    assert sim.status()["dataset"] == {"name": "chat-data", "version": 1,
                                       "uri": "s3://ckpt/ns/chat-data/dataset/v-0000000001"}
    assert "DatasetResolved" in sim.events and p.waiting_for_dataset is None
    assert len(sim.workers()) == 2
    config = config_of(sim)
    assert config is not None and config["data"]["paths"] == ["s3://ckpt/ns/chat-data/dataset/v-0000000001/train.tar"]
    assert config["data"]["format"] == "sft"

    reads = sim.reads
    sim.dataset_body = dataset(1, 2, 3)  # newer versions while the job runs
    sim.run_all()
    sim.converge(2)
    assert sim.reads == reads, "the Dataset is not read again once the version is recorded"
    assert sim.status()["dataset"]["version"] == 1
    assert config_of(sim)["data"]["paths"] == ["s3://ckpt/ns/chat-data/dataset/v-0000000001/train.tar"]  # type: ignore[index]


def test_a_recorded_version_wins_over_a_newer_resolution() -> None:
    sim = DatasetSim(job_spec(1, 1, data={"datasetRef": {"name": "chat-data"}}))
    sim.dataset_body = dataset(2)
    sim.converge(2)
    status = sim.status()
    obs = sim.observe()
    newer = dataclasses.replace(obs, dataset=DatasetResolution({"name": "chat-data", "version": 3, "uri": V3}))
    assert status["dataset"]["version"] == 2 and plan(newer).status["dataset"]["version"] == 2


def test_a_pinned_version_waits_with_its_number() -> None:
    sim = DatasetSim(job_spec(1, 1, data={"datasetRef": {"name": "chat-data", "version": 3}}))
    sim.dataset_body = dataset(1, 2)
    sim.converge(3)
    assert sim.pods == {}
    message = sim.cond("Ready")["message"]
    assert "version 3 of Dataset chat-data" in message and "kept: 1, 2" in message
    sim.dataset_body = dataset(1, 2, 3)
    sim.converge(2)
    assert sim.status()["dataset"] == {"name": "chat-data", "version": 3, "uri": V3} and sim.workers()


def test_a_job_without_a_dataset_ref_is_unchanged() -> None:
    sim = Sim(job_spec(1, 1), POLICY)
    p = sim.converge(2)
    assert "dataset" not in sim.status() and p.waiting_for_dataset is None and sim.workers()
    assert [c["kind"] for c in p.children][:2] == ["ConfigMap", "Service"]


# ---------------------------------------------------------------------------- the handler

def test_the_handler_reads_the_dataset_only_until_it_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, str]] = []

    def get_custom(ns: str, plural: str, name: str) -> dict[str, Any]:
        calls.append((ns, plural, name))
        return dataset(5)

    monkeypatch.setattr(k8s, "get_custom", get_custom)
    job = {"metadata": {"name": "llm", "namespace": "ns"}, "spec": {"data": {"datasetRef": {"name": "chat-data"}}}}
    got = handlers._read_dataset(job)
    assert got is not None and got.resolved is not None and got.resolved["version"] == 5
    assert calls == [("ns", "datasets", "chat-data")]
    assert handlers._read_dataset({**job, "status": {"dataset": got.resolved}}) is None and len(calls) == 1
    assert handlers._read_dataset({**job, "spec": {}}) is None and len(calls) == 1


def test_the_config_is_applied_again_once_the_dataset_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[str] = []

    def apply(obj: dict[str, Any]) -> dict[str, Any]:
        applied.append(obj["kind"])
        return obj

    monkeypatch.setattr(k8s, "apply", apply)
    caches = handlers.Caches()
    sim = DatasetSim(job_spec(1, 1, data={"datasetRef": {"name": "chat-data"}}))

    def children_only() -> Any:  # the pods and Events of the pass are not this test's
        assert sim.last is not None
        return dataclasses.replace(sim.last, create=[], delete=[], events=[])

    sim.converge(2)
    handlers.apply_children(caches, sim.observe(), children_only())
    assert applied and "ConfigMap" not in applied
    sim.dataset_body = dataset(1)
    sim.step()
    applied.clear()
    handlers.apply_children(caches, sim.observe(), children_only())
    assert "ConfigMap" in applied, "the same generation, but now with the dataset: applied again"
    applied.clear()
    sim.step()
    handlers.apply_children(caches, sim.observe(), children_only())
    assert applied == [], "applied once per generation and dataset"


def test_a_dataset_event_brings_back_the_jobs_waiting_for_it() -> None:
    caches = handlers.Caches()
    handlers._track_dataset_wait(caches, ("ns", "a"), "chat-data")
    handlers._track_dataset_wait(caches, ("ns", "b"), "chat-data")
    handlers._track_dataset_wait(caches, ("other", "c"), "chat-data")
    assert caches.dataset_waiters[("ns", "chat-data")] == {("ns", "a"), ("ns", "b")}
    handlers._track_dataset_wait(caches, ("ns", "a"), None)
    handlers._track_dataset_wait(caches, ("ns", "b"), "other-data")
    assert ("ns", "chat-data") not in caches.dataset_waiters
    assert caches.dataset_waiters[("ns", "other-data")] == {("ns", "b")}
