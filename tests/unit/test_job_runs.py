"""Issue 16 item 9: every TrainingJob object has a run of its own in the store, so a job created
again under an old name neither resumes, nor is retained as, nor serves its predecessor's run;
a job that started before runs were keyed by uid keeps its own (legacy) run."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from kubeforge.api import CheckpointPolicySpec, TrainingJobSpec, contract
from kubeforge.api.common import DNS_1035_LABEL
from kubeforge.api.crdgen import crd
from kubeforge.api.trainingjob import ResumeFrom, TrainingJob
from kubeforge.controllers.checkpointpolicy import manifests as policy_manifests
from kubeforge.controllers.status import parse_spec
from kubeforge.controllers.trainingjob.manifests import resume_from_env
from kubeforge.controllers.trainingjob.plan import volume_view
from kubeforge.store import CommitMarker, ResumeSourceError, Store, open_store
from kubeforge.store.inspector import parse_jobs
from kubeforge.store.report import JobRef, RetentionRule, inspect_store, job_refs, job_run

from tests.unit.test_trainingjob_plan import POLICY, Sim, job_spec

pytestmark = pytest.mark.unit
NS = "ns"


def commit(store: Store, run: str, step: int, tmp: Path, time: str | None = None) -> None:
    f = tmp / "shard"
    f.write_bytes(f"{run}:{step}".encode())
    digest = store.upload_checkpoint_file(NS, run, step, "shard", f)
    store.write_marker(NS, run, CommitMarker(step=step, time=time or dt.datetime.now(dt.UTC).isoformat(),
                                             world_size=1, bytes=digest.size, files={"shard": digest}))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"file://{tmp_path / 'store'}")


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}


# ---- the run of a job ------------------------------------------------------------------

def job(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "llm", "namespace": NS, "uid": "u-2"}, "status": status or {}}


def test_a_new_object_gets_a_run_of_its_own_and_a_job_started_before_keeps_its_legacy_run() -> None:
    assert job_run(job()) == "llm/runs/u-2"
    assert job_run(job({"conditions": [{"type": "Ready", "status": "False"}]})) == "llm/runs/u-2"
    for started in ({"startTime": "2026-01-01T00:00:00Z"}, {"lastCheckpoint": {"step": 3, "uri": "x"}},
                    {"workerPods": [{"index": 0, "attempt": 0, "uid": "pod"}]},
                    {"workerPods": [{"index": 0, "attempt": 2}]}, {"completionTime": "2026-01-01T00:00:00Z"}):
        assert job_run(job(started)) == "llm", started
    assert job_run(job({"run": "llm/runs/u-2", "startTime": "2026-01-01T00:00:00Z"})) == "llm/runs/u-2"


def test_the_plan_records_the_run_tells_the_workers_and_says_so() -> None:
    sim = Sim(job_spec(checkpointPolicyRef={"name": "p"}), POLICY)
    p = sim.step()
    assert sim.status()["run"] == "llm/runs/job-uid"
    assert p.events[0].reason == "RunAssigned" and "ns/llm/runs/job-uid, from step 0" in p.events[0].message
    assert p.create == [], "no pod before status.run reads back"
    p = sim.step()
    worker = next(m for m in p.create if m["metadata"]["name"] == "llm-worker-0")
    assert env_of(worker)[contract.ENV_JOB_RUN] == "llm/runs/job-uid"
    assert contract.ENV_RESUME_FROM not in env_of(worker)
    assert "RunAssigned" not in [e.reason for e in sim.step().events]  # decided once


def test_a_job_running_across_the_upgrade_keeps_resuming_its_own_checkpoints() -> None:
    sim = Sim(job_spec(min_r=1, max_r=1, checkpointPolicyRef={"name": "p"}), POLICY)
    sim.job["status"] = {"startTime": "2026-01-01T00:00:00Z", "workerPods": [{"index": 0, "attempt": 1}],
                         "lastCheckpoint": {"step": 40, "uri": "s3://ckpt/ns/llm/checkpoints/step-0000000040"}}
    p = sim.step()
    assert sim.status()["run"] == "llm"
    assert any(e.reason == "RunAssigned" and "keeps the run" in e.message for e in p.events)
    worker = next(m for m in p.create if m["metadata"]["name"] == "llm-worker-0")
    assert env_of(worker)[contract.ENV_JOB_RUN] == "llm"


def test_a_crd_that_drops_status_run_holds_the_job_without_pods_and_its_run_never_flips() -> None:
    sim = Sim(job_spec(min_r=1, max_r=1, checkpointPolicyRef={"name": "p"}), POLICY)
    sim.pruned = frozenset({"run"})  # the installed CRD predates status.run: the API server drops it
    runs, created = [], []
    for _ in range(5):
        created += sim.step().create
        runs.append(job_run(sim.job))
    assert created == [] and not sim.pods, "no pod while status.run does not read back"
    assert runs == ["llm/runs/job-uid"] * 5, "the run never flips"
    ready = sim.cond("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "CRDOutdated")
    assert "status.run" in ready["message"] and "apply crds/" in ready["message"].lower()
    assert "helm does not upgrade CRDs" in ready["message"]
    assert sim.events.count("CRDOutdated") == 1 and sim.events.count("RunAssigned") == 1
    assert sim.last is not None and sim.last.requeue_after == 30.0  # looks again: crds/ may be applied
    sim.pruned = frozenset()  # crds/ applied: the next write records the run, then the pods come
    sim.converge(2)
    worker = sim.pods["llm-worker-0"]
    assert sim.status()["run"] == "llm/runs/job-uid" and env_of(worker)[contract.ENV_JOB_RUN] == "llm/runs/job-uid"
    assert sim.cond("Ready")["reason"] != "CRDOutdated" and sim.events.count("CRDOutdated") == 1


@pytest.mark.parametrize("name", ["a/b", "..", ".", "Base", "-base", "base-", "base.v2"])
def test_resume_from_names_a_training_job_by_its_dns_label_name(name: str) -> None:
    # a '/' or '..' reached the trainer's store layout (ValueError: retried until the budget was gone)
    schema = crd(TrainingJob)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    field = schema["properties"]["spec"]["properties"]["resumeFrom"]["properties"]["trainingJob"]
    assert field["pattern"] == DNS_1035_LABEL and "DNS-1035" in field["description"]
    spec, error = parse_spec(TrainingJobSpec, {"checkpointPolicyRef": {"name": "p"}, "resumeFrom": {"trainingJob": name}})
    assert spec is None and error is not None
    assert error.startswith("spec.resumeFrom.trainingJob: ") and DNS_1035_LABEL in error
    assert parse_spec(TrainingJobSpec, {"checkpointPolicyRef": {"name": "p"},
                                        "resumeFrom": {"trainingJob": "base-v2"}})[0] is not None


def test_resume_from_reaches_the_workers_and_a_missing_source_fails_the_job_naming_the_field() -> None:
    sim = Sim(job_spec(min_r=1, max_r=1, checkpointPolicyRef={"name": "p"},
                       resumeFrom={"trainingJob": "base", "step": 100}), POLICY)
    sim.converge(2)
    worker = sim.pods["llm-worker-0"]
    assert json.loads(env_of(worker)[contract.ENV_RESUME_FROM]) == {"trainingJob": "base", "run": None, "step": 100}
    sim.run_all()
    sim.step()
    sim.exit("llm-worker-0", int(contract.ExitCode.RESUME_SOURCE_INVALID),
             "kubeforge: cannot resume: spec.resumeFrom.step: no committed checkpoint of TrainingJob base at step 100")
    sim.step()
    failed = sim.cond("Failed")
    assert failed["status"] == "True" and failed["reason"] == "ResumeSourceInvalid"
    assert "spec.resumeFrom.step" in failed["message"]
    assert "ResumeSourceInvalid" in sim.events
    assert sim.status()["restarts"]["application"] == 0


def test_resume_from_step_alone_means_this_names_earlier_run() -> None:
    spec = TrainingJobSpec.model_validate({"checkpointPolicyRef": {"name": "p"}, "resumeFrom": {"step": 7}})
    assert json.loads(resume_from_env(spec, "llm", None) or "") == {"trainingJob": "llm", "run": None, "step": 7}


# ---- the store -------------------------------------------------------------------------

def test_runs_of_a_name_and_the_resume_source(store: Store, tmp_path: Path) -> None:
    commit(store, "llm", 10, tmp_path, "2026-01-01T00:00:00Z")
    commit(store, "llm/runs/u-1", 4, tmp_path, "2026-01-02T00:00:00Z")
    commit(store, "llm/runs/u-1", 8, tmp_path, "2026-01-03T00:00:00Z")
    commit(store, "llm/runs/u-2", 1, tmp_path, "2026-01-04T00:00:00Z")
    commit(store, "llm-other", 99, tmp_path)
    assert store.runs(NS, "llm") == ["llm", "llm/runs/u-1", "llm/runs/u-2"]
    src = store.resume_source(NS, "llm", exclude="llm/runs/u-2")
    assert src.run == "llm/runs/u-1" and [c.step for c in src.checkpoints] == [4, 8]
    assert store.resume_source(NS, "llm", step=10, exclude="llm/runs/u-2").run == "llm"
    assert store.resume_source(NS, "llm", run="llm", exclude="llm/runs/u-2").run == "llm"
    with pytest.raises(ResumeSourceError, match=r"^spec\.resumeFrom\.step: .*TrainingJob llm at step 5"):
        store.resume_source(NS, "llm", step=5, exclude="llm/runs/u-2")
    with pytest.raises(ResumeSourceError, match=r"^spec\.resumeFrom\.trainingJob: .*runs: none"):
        store.resume_source(NS, "gone")
    with pytest.raises(ValueError, match="run must be"):
        store.list_checkpoints(NS, "llm/u-1")


def test_retention_and_the_report_look_at_the_jobs_own_run_only(store: Store, tmp_path: Path) -> None:
    """keepLast=1 for the new object must not delete the predecessor's checkpoints, and its
    entry must not report them (the old code applied both to <job>/, the predecessor's)."""
    for step in (10, 20, 30):
        commit(store, "llm", step, tmp_path)
    commit(store, "llm/runs/u-2", 1, tmp_path)
    commit(store, "llm/runs/u-2", 2, tmp_path)
    refs = job_refs([{"metadata": {"name": "llm", "namespace": NS, "uid": "u-2"}, "status": {"run": "llm/runs/u-2"}}])
    assert refs == [JobRef("llm", None, "llm/runs/u-2")]
    report = inspect_store(store, NS, refs, RetentionRule(keep_last=1, keep_every=None, incomplete_grace_seconds=60))
    assert report.deleted == {"llm": [1]}
    assert [c.step for c in store.list_checkpoints(NS, "llm")] == [10, 20, 30]
    entry = report.jobs[0]
    assert entry["name"] == "llm" and entry["run"] == "llm/runs/u-2" and entry["newestStep"] == 2
    assert entry["newestUri"].endswith("/ns/llm/runs/u-2/checkpoints/step-0000000002")


def test_the_inspector_pod_passes_each_jobs_run_and_the_volume_view_ignores_another_runs_entry() -> None:
    refs = [JobRef("llm", 3, "llm/runs/u-2"), JobRef("old", None, None)]
    spec = CheckpointPolicySpec.model_validate({"schedule": {"everySteps": 10},
                                                  "storage": {"volume": {"claimName": "c"}}})
    pod = policy_manifests.build_inspector_pod("p", NS, "uid", spec, refs, "img")
    args = pod["spec"]["containers"][0]["command"]
    assert parse_jobs(args[args.index("--jobs") + 1]) == refs
    with pytest.raises(ValueError, match=r"--jobs\[0\]\.run"):
        parse_jobs('[{"name": "llm", "run": "other/runs/u"}]')
    predecessor = {"name": "llm", "newestStep": 40, "newestUri": "file:///mnt/checkpoints/ns/llm/checkpoints/x"}
    assert volume_view(predecessor, "llm/runs/u-2") is None
    assert volume_view(predecessor, "llm") is not None
    own = {**predecessor, "run": "llm/runs/u-2"}
    view = volume_view(own, "llm/runs/u-2")
    assert view is not None and view.last_checkpoint == {"step": 40, "uri": own["newestUri"]}


def test_admission_rules_of_resume_from() -> None:
    assert any("has(self.trainingJob) || has(self.step)" == r.rule for r in ResumeFrom.cel_rules)
    assert any("resumeFrom" in r.rule and "checkpointPolicyRef" in r.rule for r in TrainingJobSpec.cel_rules)
    with pytest.raises(ValueError, match="step"):
        TrainingJobSpec.model_validate({"resumeFrom": {"step": -1}})
