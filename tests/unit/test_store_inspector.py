"""The store inspector of volume-backed CheckpointPolicies: the pass it runs in its pod
(retention + report, ``python -m kubeforge.store.inspector``), the pod the operator makes for
it, and how the operator reads its termination message back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubeforge.api import CheckpointPolicySpec
from kubeforge.api.contract import CHECKPOINT_MOUNT_DIR
from kubeforge.controllers import checkpointpolicy_inspector as insp
from kubeforge.controllers.trainingjob import volume_view
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
    assert sorted(msg["deleted"]["llama"]) == sorted(set(range(1, 36)) - {7, 10, 20, 30, 34, 35})
    assert msg["jobs"] == [
        {"name": "llama", "committed": 6, "bytes": 60, "newestStep": 35, "newestTime": "2026-11-27T00:00:35Z",
         "newestUri": f"file://{root}/{NS}/llama/checkpoints/step-0000000035"},
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
    jobs = [{"name": f"job-{i:03d}", "committed": 3, "bytes": 10**12, "newestStep": 10**6,
             "newestUri": "file:///mnt/checkpoints/" + "x" * 60} for i in range(100)]
    text = fit_message({"jobs": jobs, "deleted": {"job-000": [1, 2], "job-099": [3]}})
    body = json.loads(text)
    assert len(text.encode()) <= MESSAGE_LIMIT
    assert body["truncated"] == 100 - len(body["jobs"]) > 0
    assert body["jobs"] == jobs[:len(body["jobs"])] and body["deleted"] == {"job-000": [1, 2]}
    small = {"jobs": jobs[:2], "deleted": {}}
    assert json.loads(fit_message(small)) == small


def spec(**retention: Any) -> CheckpointPolicySpec:
    return CheckpointPolicySpec.model_validate({
        "schedule": {"everySteps": 10}, "retention": {"keepLast": 2, **retention},
        "storage": {"volume": {"claimName": "ckpt", "path": "/team-a"}}})


def test_the_inspector_pod_mounts_the_claim_where_workers_do_and_runs_the_pass(tmp_path: Path) -> None:
    pod = insp.inspector_pod("nightly", NS, "uid-1", spec(keepEvery=10), [JobRef("llama", 40), JobRef("b")],
                             "registry/trainer:1")
    assert pod["metadata"]["name"] == "nightly-inspector"
    assert pod["metadata"]["labels"][insp.INSPECTOR_LABEL] == "uid-1"
    assert pod["metadata"]["annotations"][insp.POLICY_ANNOTATION] == "nightly"
    assert pod["metadata"]["ownerReferences"] == [{"apiVersion": "kubeforge.dev/v1alpha1", "kind": "CheckpointPolicy",
                                                   "name": "nightly", "uid": "uid-1", "controller": True}]
    ps = pod["spec"]
    c = ps["containers"][0]
    assert ps["restartPolicy"] == "Never" and ps["activeDeadlineSeconds"] == insp.DEADLINE_S
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
    assert "affinity" not in insp.inspector_pod("nightly", NS, "uid-1", spec(), [], "img")["spec"]


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
