"""The store inspector of volume-backed CheckpointPolicies: the pass it runs in its pod
(retention + report, ``python -m kubeforge.store.inspector``), the pod the operator makes for
it, and how the operator reads its termination message back."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubeforge.api import CheckpointPolicySpec
from kubeforge.api.contract import CHECKPOINT_MOUNT_DIR
from kubeforge.controllers.checkpointpolicy import manifests as insp_pod
from kubeforge.controllers.checkpointpolicy import plan as insp
from kubeforge.controllers.trainingjob.plan import volume_view
from kubeforge.store import CommitMarker, open_store
from kubeforge.store.inspector import MESSAGE_LIMIT, fit_message, main
from kubeforge.store.report import JobRef

pytestmark = pytest.mark.unit
NS = "team-a"


def commit(root: Path, job: str, step: int) -> None:
    store = open_store(f"file://{root}")
    src = root.parent / f"src-{job}-{step}"
    src.write_bytes(b"x" * 10)
    digest = store.upload_checkpoint_file(NS, job, step, "shard.bin", src)
    store.write_marker(NS, job, CommitMarker(step=step, time=f"2026-11-27T00:00:{step % 60:02d}Z", world_size=1,
                                             bytes=10, files={"shard.bin": digest}))


def steps_on_disk(root: Path, job: str) -> list[int]:
    return [c.step for c in open_store(f"file://{root}").committed_checkpoints(NS, job)]


def run_main(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    msg = tmp_path / "termination-log"
    code = main([*args, "--message-file", str(msg)])
    return code, json.loads(msg.read_text())


def test_retention_k2_m10_after_35_saves_and_the_report(tmp_path: Path) -> None:
    root = tmp_path / "claim" / "team"
    for step in range(1, 36):
        commit(root, "llama", step)
    code, msg = run_main(tmp_path, "--store", f"file://{root}", "--namespace", NS,
                         "--jobs", json.dumps([{"name": "llama", "lastStep": 7}, {"name": "idle"}]),
                         "--keep-last", "2", "--keep-every", "10")
    assert code == 0, msg
    # the last 2, every 10th, and step 7 (the job's status says it restored from there)
    assert steps_on_disk(root, "llama") == [7, 10, 20, 30, 34, 35]
    gone = sorted(set(range(1, 36)) - {7, 10, 20, 30, 34, 35})
    # the message lists the first 20 deleted steps and counts them all; URIs are left to the operator
    assert msg["deleted"]["llama"] == gone[:20] and msg["deletedCount"] == {"llama": len(gone)}
    assert msg["jobs"] == [
        {"name": "llama", "committed": 6, "bytes": 60, "newestStep": 35, "newestTime": "2026-11-27T00:00:35Z"},
        {"name": "idle", "committed": 0, "bytes": 0}]


def test_report_only_without_keep_last_and_a_restore_lease_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "claim"
    for step in (10, 20, 30):
        commit(root, "llama", step)
    code, msg = run_main(tmp_path, "--store", f"file://{root}", "--namespace", NS, "--jobs", '[{"name": "llama"}]')
    assert code == 0 and msg["deleted"] == {} and steps_on_disk(root, "llama") == [10, 20, 30]
    open_store(f"file://{root}").write_restore_lease(NS, "llama", 10)
    code, msg = run_main(tmp_path, "--store", f"file://{root}", "--namespace", NS, "--jobs", '[{"name": "llama"}]',
                         "--keep-last", "1")
    assert code == 0 and msg["deleted"] == {"llama": [20]} and steps_on_disk(root, "llama") == [10, 30]


def test_a_path_no_job_wrote_yet_is_empty_but_an_unmounted_volume_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "claim").mkdir()
    code, msg = run_main(tmp_path, "--store", f"file://{tmp_path / 'claim' / 'team'}", "--namespace", NS,
                         "--jobs", '[{"name": "a"}]', "--keep-last", "2")
    assert code == 0 and msg["jobs"] == [{"name": "a", "committed": 0, "bytes": 0}] and "does not exist" in msg["note"]
    code, msg = run_main(tmp_path, "--store", f"file://{tmp_path / 'nothing' / 'team'}", "--namespace", NS)
    assert code == 1 and "not mounted" in msg["error"]


@pytest.mark.parametrize(("jobs", "field"), [
    ("{", "--jobs: not JSON"), ('{"name": "a"}', "--jobs: must be a JSON list"),
    ('[{"nam": "a"}]', "--jobs[0]: needs a non-empty string 'name'"),
    ('[{"name": "a", "lastStep": -1}]', "--jobs[0].lastStep: must be a non-negative integer")])
def test_bad_jobs_argument_is_an_error_naming_the_field(tmp_path: Path, jobs: str, field: str) -> None:
    (tmp_path / "claim").mkdir()
    code, msg = run_main(tmp_path, "--store", f"file://{tmp_path / 'claim'}", "--namespace", NS, "--jobs", jobs)
    assert code == 1 and field in msg["error"]


def test_the_message_fits_the_kubelets_limit() -> None:
    jobs = [{"name": f"job-{i:03d}", "committed": 3, "bytes": 10**12, "newestStep": 10**6, "newestTime": "T" * 24,
             "newestUri": "file:///mnt/checkpoints/" + "x" * 60} for i in range(100)]
    text = fit_message({"jobs": jobs, "deleted": {"job-000": [1, 2], "job-099": [3]}})
    body = json.loads(text)
    assert len(text.encode()) <= MESSAGE_LIMIT
    assert body["truncated"] == 100 - len(body["jobs"]) > 0 and len(body["jobs"]) >= 25
    assert body["jobs"] == [{k: v for k, v in j.items() if k != "newestUri"} for j in jobs[:len(body["jobs"])]]
    # deletions are counted for every job, listed or not
    assert body["deleted"] == {"job-000": [1, 2], "job-099": []}
    assert body["deletedCount"] == {"job-000": 2, "job-099": 1}
    # a first pass deleting thousands of checkpoints still reports the job
    huge = json.loads(fit_message({"jobs": jobs[:1], "deleted": {"job-000": list(range(5000, 0, -1))}}))
    assert huge["jobs"] == [{k: v for k, v in jobs[0].items() if k != "newestUri"}] and "truncated" not in huge
    assert huge["deleted"] == {"job-000": list(range(1, 21))} and huge["deletedCount"] == {"job-000": 5000}
    long_error = fit_message({"error": "x" * 5000})
    assert len(long_error.encode()) <= MESSAGE_LIMIT and json.loads(long_error)["error"].startswith("xxx")


def spec(**retention: Any) -> CheckpointPolicySpec:
    return CheckpointPolicySpec.model_validate({
        "schedule": {"everySteps": 10}, "retention": {"keepLast": 2, **retention},
        "storage": {"volume": {"claimName": "ckpt", "path": "/team-a"}}})


def test_the_inspector_pod_mounts_the_claim_where_workers_do_and_runs_the_pass(tmp_path: Path) -> None:
    pod = insp_pod.build_inspector_pod("nightly", NS, "uid-1", spec(keepEvery=10), [JobRef("llama", 40), JobRef("b")],
                             "registry/trainer:1")
    assert pod["metadata"]["name"] == "nightly-inspector"
    assert pod["metadata"]["labels"][insp_pod.INSPECTOR_LABEL] == "uid-1"
    assert pod["metadata"]["annotations"][insp_pod.POLICY_ANNOTATION] == "nightly"
    assert pod["metadata"]["ownerReferences"] == [{"apiVersion": "kubeforge.dev/v1alpha1", "kind": "CheckpointPolicy",
                                                   "name": "nightly", "uid": "uid-1", "controller": True}]
    ps = pod["spec"]
    c = ps["containers"][0]
    assert ps["restartPolicy"] == "Never" and ps["activeDeadlineSeconds"] == insp_pod.DEADLINE_S
    assert ps["volumes"] == [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt"}}]
    assert c["volumeMounts"] == [{"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT_DIR}]
    assert c["image"] == "registry/trainer:1" and c["terminationMessagePath"] == "/dev/termination-log"
    assert ps["securityContext"]["runAsNonRoot"] and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in ps["tolerations"]
    term = ps["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["labelSelector"]["matchExpressions"][0]["values"] == ["b", "llama"]
    # the command is the inspector's own CLI; run it against a stand-in for the mount
    mount = tmp_path / "mnt"
    for step in (5, 10, 15, 20, 25):
        commit(mount / "team-a", "llama", step)
    assert c["command"][:3] == ["python", "-m", "kubeforge.store.inspector"]
    args = [a.replace(f"file://{CHECKPOINT_MOUNT_DIR}", f"file://{mount}") for a in c["command"][3:]]
    code, msg = run_main(tmp_path, *args)
    assert code == 0 and steps_on_disk(mount / "team-a", "llama") == [10, 20, 25]
    # what the kubelet then writes into the pod status is what the operator reads back
    done = {"status": {"phase": "Succeeded", "containerStatuses": [{"name": "inspector", "state": {"terminated": {
        "exitCode": 0, "message": (tmp_path / "termination-log").read_text()}}}]}}
    result = insp.inspector_result(done)
    assert result.finished and result.error is None and result.report == msg
    assert result.report["deleted"] == {"llama": [5, 15]}
    assert "affinity" not in insp_pod.build_inspector_pod("nightly", NS, "uid-1", spec(), [], "img")["spec"]


def test_the_inspector_runs_as_a_module(tmp_path: Path) -> None:
    (tmp_path / "claim").mkdir()
    out = subprocess.run([sys.executable, "-m", "kubeforge.store.inspector", "--store", f"file://{tmp_path / 'claim'}",
                          "--namespace", NS, "--jobs", '[{"name": "a"}]', "--message-file", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads((tmp_path / "m").read_text())


def _pod(phase: str, terminated: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    st: dict[str, Any] = {"phase": phase, **status}
    if terminated is not None:
        st["containerStatuses"] = [{"name": "inspector", "state": {"terminated": terminated}}]
    return {"status": st}


def test_inspector_results() -> None:
    assert insp.inspector_result(_pod("Running")) == insp.InspectorResult(False, waiting="Running")
    pending = insp.inspector_result(_pod("Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available"}]))
    assert not pending.finished and pending.waiting == "Pending (Unschedulable: 0/3 nodes are available)"
    failed = insp.inspector_result(_pod("Failed", {"exitCode": 1, "message": '{"error": "StoreError: no access"}'}))
    assert failed.finished and failed.report is None and failed.error == "StoreError: no access"
    garbage = insp.inspector_result(_pod("Failed", {"exitCode": 137, "reason": "OOMKilled", "message": ""}))
    assert garbage.error == "exit code 137, OOMKilled: no termination message"
    deadline = insp.inspector_result(_pod("Failed", reason="DeadlineExceeded", message="active deadline"))
    assert deadline.finished and deadline.error == "pod Failed: DeadlineExceeded active deadline"
    odd = insp.inspector_result(_pod("Succeeded", {"exitCode": 0, "message": '{"jobs": 3}'}))
    assert odd.error and odd.error.startswith("unexpected termination message")


def test_a_volume_jobs_last_checkpoint_comes_from_the_policy_status() -> None:
    assert volume_view(None) is None and volume_view({"name": "a", "committed": 0, "bytes": 0}) is None
    view = volume_view({"name": "a", "committed": 2, "bytes": 9, "newestStep": 40, "newestTime": "T",
                        "newestUri": "file:///mnt/checkpoints/a/step-40"})
    assert view is not None
    assert view.last_checkpoint == {"step": 40, "uri": "file:///mnt/checkpoints/a/step-40", "time": "T"}
    assert view.export_committed is None  # not listed: no verdict (worker 0's exit code stands)
    exported = volume_view({"name": "a", "newestStep": 40, "exportUri": "file:///mnt/x/export", "exportTime": "T"})
    assert exported is not None and exported.export_committed and exported.export_uri == "file:///mnt/x/export"


def test_names_labels_and_volume_ownership() -> None:
    assert insp_pod.inspector_name("nightly") == "nightly-inspector"
    long_a, long_b = "a" * 240 + ".x" * 6, "a" * 240 + ".y" * 6
    na, nb = insp_pod.inspector_name(long_a), insp_pod.inspector_name(long_b)
    assert len(na) <= 253 and len(nb) <= 253 and na != nb and na.endswith("-inspector")
    assert not na.rsplit("-", 2)[0].endswith((".", "-"))  # a DNS subdomain: no "x.-y"
    # a job name that cannot be a label value has no pods to be near; it must not break the pod
    pod = insp_pod.build_inspector_pod("p", NS, "u", spec(), [JobRef("j" * 70), JobRef("ok")], "img")
    term = pod["spec"]["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"]["labelSelector"]["matchExpressions"][0]["values"] == ["ok"]
    assert "affinity" not in insp_pod.build_inspector_pod("p", NS, "u", spec(), [JobRef("j" * 70)], "img")["spec"]
    # no recursive chown of the whole checkpoint volume on every pass
    assert pod["spec"]["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


def _policy(conditions: list[dict[str, Any]] | None = None, jobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "pv", "namespace": NS, "uid": "pol-uid"},
            "status": {"conditions": conditions or [], "jobs": jobs or []}}


def _inspector(phase: str, terminated: dict[str, Any] | None = None, uid: str = "pod-1", owner: str = "pol-uid",
               age_s: float = 5, **status: Any) -> dict[str, Any]:
    created = (NOW - dt.timedelta(seconds=age_s)).isoformat().replace("+00:00", "Z")
    return {"metadata": {"name": "pv-inspector", "uid": uid, "creationTimestamp": created,
                         "labels": {insp_pod.INSPECTOR_LABEL: owner}}, **_pod(phase, terminated, **status)}


def _report(**body: Any) -> dict[str, Any]:
    return {"exitCode": 0, "message": json.dumps(body)}


def test_a_volume_pass_collects_a_report_once_and_derives_the_uris() -> None:
    report = _report(jobs=[{"name": "a", "committed": 2, "bytes": 9, "newestStep": 40, "newestTime": "T",
                            "exportTime": "E"}], deleted={"a": [10, 20]}, deletedCount={"a": 2})
    vp = insp.plan_volume_pass(_policy(), spec(), _inspector("Succeeded", report), ["a"], True, NOW)
    assert vp.collect == "pv-inspector" and vp.succeeded and vp.start and vp.failure is None
    assert vp.fields["jobs"] == [{"name": "a", "committed": 2, "bytes": 9, "newestStep": 40, "newestTime": "T",
                                  "exportTime": "E",
                                  "newestUri": f"file://{CHECKPOINT_MOUNT_DIR}/team-a/{NS}/a/checkpoints/step-0000000040",
                                  "exportUri": f"file://{CHECKPOINT_MOUNT_DIR}/team-a/{NS}/a/export"}]
    assert vp.deleted == {"a": 2} and vp.deleted_steps == {"a": [10, 20]}
    assert vp.condition and vp.condition[:3] == ("Inspected", True, "InspectorSucceeded") and "pod-1" in vp.condition[3]
    # the operator wrote that status and stopped before deleting the pod: only the deletion is left
    cond = {"type": "Inspected", "status": "True", "reason": "InspectorSucceeded", "message": vp.condition[3]}
    again = insp.plan_volume_pass(_policy([cond]), spec(), _inspector("Succeeded", report), ["a"], True, NOW)
    assert again.collect == "pv-inspector" and again.condition is None and not again.fields and not again.deleted
    assert again.succeeded is None


def test_a_truncated_report_keeps_the_previous_entries_of_the_jobs_left_out() -> None:
    old = [{"name": "b", "committed": 7, "bytes": 70}, {"name": "gone", "committed": 1, "bytes": 1}]
    report = _report(jobs=[{"name": "a", "committed": 1, "bytes": 1}], deleted={}, deletedCount={}, truncated=1)
    vp = insp.plan_volume_pass(_policy(jobs=old), spec(), _inspector("Succeeded", report), ["a", "b", "c"], False, NOW)
    assert vp.fields["jobs"] == [{"name": "a", "committed": 1, "bytes": 1}, old[0]]  # c: no entry yet; gone: gone
    assert vp.condition and "1 job(s) did not fit" in vp.condition[3] and not vp.start


def test_a_volume_pass_reports_failures_waits_and_replaces_a_stuck_pod() -> None:
    failed = insp.plan_volume_pass(_policy(), spec(), _inspector("Failed", {"exitCode": 1, "message": '{"error": "E"}'}),
                                   [], True, NOW)
    assert failed.collect and failed.succeeded is False and failed.failure and "E" in failed.failure
    assert failed.condition and failed.condition[:3] == ("Inspected", False, "InspectorFailed") and failed.start
    creating = _inspector("Pending", containerStatuses=[{"name": "inspector", "state": {"waiting": {
        "reason": "ContainerCreating", "message": "Multi-Attach error for volume"}}}])
    waiting = insp.plan_volume_pass(_policy(), spec(), creating, [], True, NOW)
    assert waiting.collect is None and not waiting.start and waiting.succeeded is None
    assert waiting.condition == ("Inspected", "Unknown", "InspectorPending",
                                 "pod pv-inspector is Pending (ContainerCreating: Multi-Attach error for volume)")
    stuck = insp.plan_volume_pass(_policy(), spec(), _inspector("Pending", age_s=insp.STUCK_S + 1), [], True, NOW)
    assert stuck.collect == "pv-inspector" and stuck.start and stuck.succeeded is False
    assert stuck.condition and stuck.condition[2] == "InspectorStuck"
    # a pod of a deleted policy of the same name: left to the garbage collector, nothing started
    foreign = insp.plan_volume_pass(_policy(), spec(), _inspector("Running", owner="old-uid"), [], True, NOW)
    assert foreign == insp.VolumePass()
    assert insp.plan_volume_pass(_policy(), spec(), None, [], True, NOW) == insp.VolumePass(start=True)


def test_malformed_reports_are_failures() -> None:
    for body in ({"jobs": [{"committed": 1}]}, {"jobs": [], "deleted": {"a": "10"}},
                 {"jobs": [], "deletedCount": {"a": "many"}}, {"jobs": {}}):
        result = insp.inspector_result(_pod("Succeeded", {"exitCode": 0, "message": json.dumps(body)}))
        assert result.finished and result.report is None and result.error, body
