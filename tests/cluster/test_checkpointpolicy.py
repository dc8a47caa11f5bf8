"""CheckpointPolicy controller against the real API server and the cluster's MinIO: storage
checks as conditions (never a crash loop), per-job summaries from the store, retention; for a
volume, the same through the inspector pod that mounts the claim."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from devcluster import Cluster
from kubeforge.store import CommitMarker, open_store, utc_now

from tests.cluster.test_trainingjob_controller import exit_pod
from tests.fixtures.cluster import OperatorProcess, kubectl_json, wait_for

pytestmark = pytest.mark.cluster


def policy(name: str, endpoint: str, prefix: str, keep_last: int = 2, keep_every: int | None = 10) -> dict[str, Any]:
    retention: dict[str, Any] = {"keepLast": keep_last}
    if keep_every:
        retention["keepEvery"] = keep_every
    return {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "CheckpointPolicy", "metadata": {"name": name},
            "spec": {"schedule": {"everySteps": 10}, "retention": retention,
                     "storage": {"s3": {"bucket": "kubeforge", "prefix": prefix, "endpoint": endpoint,
                                        "credentialsSecretRef": {"name": "s3-creds"}}}}}


def condition(cluster: Cluster, ns: str, name: str, type_: str) -> dict[str, Any] | None:
    obj = kubectl_json(cluster, "get", "checkpointpolicy", name, "-n", ns)
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def reason_is(cluster: Cluster, ns: str, name: str, reason: str) -> bool:
    c = condition(cluster, ns, name, "Ready")
    return bool(c and c["reason"] == reason)


@pytest.fixture
def fast_operator(crds: Cluster, namespace: str, tmp_path: Path) -> Any:
    op = OperatorProcess(crds, tmp_path / "operator.log", namespaces=(namespace,),
                         extra_env={"KUBEFORGE_RETENTION_INTERVAL_SECONDS": "3"})
    op.start()
    yield op
    op.stop()


def test_a_new_policy_gets_its_status_at_once_not_at_the_next_retention_pass(operator: OperatorProcess,
                                                                            namespace: str) -> None:
    # the operator fixture keeps the default 60 s retention interval: only the create
    # handler can answer within 20 s
    c = operator.cluster
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(policy("p", "http://127.0.0.1:9", "t")))
    wait_for("SecretNotFound from the create handler", lambda: reason_is(c, namespace, "p", "SecretNotFound"), 20)


def test_storage_problems_are_conditions_then_ready(fast_operator: OperatorProcess, namespace: str) -> None:
    c = fast_operator.cluster
    s3 = c.s3_settings()
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(policy("p", s3["AWS_ENDPOINT_URL"], "t")))
    wait_for("SecretNotFound", lambda: reason_is(c, namespace, "p", "SecretNotFound"), 30)
    c.kubectl("create", "secret", "generic", "s3-creds", "-n", namespace, "--from-literal=AWS_ACCESS_KEY_ID=x")
    wait_for("SecretMissingKeys", lambda: reason_is(c, namespace, "p", "SecretMissingKeys"), 30)
    c.kubectl("delete", "secret", "s3-creds", "-n", namespace)
    c.kubectl("create", "secret", "generic", "s3-creds", "-n", namespace,
              f"--from-literal=AWS_ACCESS_KEY_ID={s3['AWS_ACCESS_KEY_ID']}",
              f"--from-literal=AWS_SECRET_ACCESS_KEY={s3['AWS_SECRET_ACCESS_KEY']}")
    wait_for("BucketReachable", lambda: reason_is(c, namespace, "p", "BucketReachable"), 30)
    ready = condition(c, namespace, "p", "Ready")
    assert ready and ready["status"] == "True"
    # an endpoint nobody listens on: a condition, not a crash loop
    c.kubectl("patch", "checkpointpolicy", "p", "-n", namespace, "--type=merge", "-p",
              json.dumps({"spec": {"storage": {"s3": {"endpoint": "http://127.0.0.1:9"}}}}))
    wait_for("BucketUnreachable", lambda: reason_is(c, namespace, "p", "BucketUnreachable"), 60)
    assert fast_operator.proc is not None and fast_operator.proc.poll() is None


def _commit(store: Any, ns: str, job: str, step: int, tmp: Path) -> None:
    f = tmp / f"shard-{step}.bin"
    f.write_bytes(b"x" * 100)
    digest = store.upload_checkpoint_file(ns, job, step, "shard-0.bin", f)
    store.write_marker(ns, job, CommitMarker(step=step, time=utc_now(), world_size=1, bytes=100,
                                             files={"shard-0.bin": digest}))


def test_retention_keeps_last_k_and_milestones_and_reports_jobs(fast_operator: OperatorProcess, namespace: str,
                                                                tmp_path: Path) -> None:
    c = fast_operator.cluster
    s3 = c.s3_settings()
    prefix = f"retention-{uuid.uuid4().hex[:6]}"
    c.kubectl("create", "secret", "generic", "s3-creds", "-n", namespace,
              f"--from-literal=AWS_ACCESS_KEY_ID={s3['AWS_ACCESS_KEY_ID']}",
              f"--from-literal=AWS_SECRET_ACCESS_KEY={s3['AWS_SECRET_ACCESS_KEY']}")
    store = open_store(f"s3://kubeforge/{prefix}", endpoint_url=s3["AWS_ENDPOINT_URL"],
                       access_key_id=s3["AWS_ACCESS_KEY_ID"], secret_access_key=s3["AWS_SECRET_ACCESS_KEY"])
    job = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "job-a"},
           "spec": {"checkpointPolicyRef": {"name": "p"}, "suspend": True}}
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))
    # the job's own run (issue 16 item 9), and what an earlier job-a left: never touched
    run = f"job-a/runs/{kubectl_json(c, 'get', 'trainingjob', 'job-a', '-n', namespace)['metadata']['uid']}"
    for step in range(5, 36, 5):  # 5, 10, ..., 35
        _commit(store, namespace, run, step, tmp_path)
        _commit(store, namespace, "job-a", step, tmp_path)
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(policy("p", s3["AWS_ENDPOINT_URL"], prefix)))

    def kept() -> list[int] | None:
        steps = [ck.step for ck in store.committed_checkpoints(namespace, run)]
        return steps if steps == [10, 20, 30, 35] else None

    wait_for("retention: last 2 + every 10th", kept, 60)
    status = wait_for("job summary in status", lambda: [
        j for j in (kubectl_json(c, "get", "checkpointpolicy", "p", "-n", namespace).get("status") or {}).get("jobs", [])
        if j.get("committed") == 4], 30)
    assert status[0] == {"name": "job-a", "run": run, "committed": 4, "bytes": 400, "newestStep": 35,
                         "newestTime": status[0]["newestTime"], "newestUri": store.checkpoint_uri(namespace, run, 35)}
    assert [ck.step for ck in store.committed_checkpoints(namespace, "job-a")] == list(range(5, 36, 5))
    # retention runs without a kopf timer, so the policy carries no finalizer and stays
    # deletable while the operator is down
    assert not kubectl_json(c, "get", "checkpointpolicy", "p", "-n", namespace)["metadata"].get("finalizers")
    wait_for("RetentionApplied event", lambda: kubectl_json(
        c, "get", "events", "-n", namespace, "--field-selector", "reason=RetentionApplied")["items"], 30)


def _volume_policy(claim: str) -> dict[str, Any]:
    return {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "CheckpointPolicy", "metadata": {"name": "pv"},
            "spec": {"schedule": {"everySteps": 1}, "retention": {"keepLast": 2, "keepEvery": 10},
                     "storage": {"volume": {"claimName": claim, "path": "/team"}}}}


def _run_inspector_locally(pod: dict[str, Any], claim_dir: Path, tmp: Path) -> tuple[int, str]:
    """The pod's exact command as a local process, the claim's mount point → ``claim_dir`` (and
    back in the message, so its URIs are what the pod itself would report)."""
    command = pod["spec"]["containers"][0]["command"]
    mount = pod["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    assert command[0] == "python"
    args = [sys.executable, *(a.replace(f"file://{mount}", f"file://{claim_dir}") for a in command[1:])]
    message = tmp / f"termination-{uuid.uuid4().hex[:6]}"
    proc = subprocess.run([*args, "--message-file", str(message)], capture_output=True, text=True, timeout=120)
    return proc.returncode, message.read_text().replace(f"file://{claim_dir}", f"file://{mount}")


def test_volume_policy_inspector_pod_applies_retention_and_reports(fast_operator: OperatorProcess, namespace: str,
                                                                  tmp_path: Path) -> None:
    c = fast_operator.cluster
    job = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "job-v"},
           "spec": {"checkpointPolicyRef": {"name": "pv"}, "suspend": True}}
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_volume_policy("ckpt")))
    wait_for("ClaimNotFound", lambda: reason_is(c, namespace, "pv", "ClaimNotFound"), 30)
    assert not kubectl_json(c, "get", "pods", "-n", namespace)["items"]  # nothing to mount yet

    # a claim bound to a PersistentVolume (the controller-manager binds them)
    pv_name = f"pv-{namespace}"
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
          "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                   "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(tmp_path / "pv")},
                   "claimRef": {"namespace": namespace, "name": "ckpt"}}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ckpt"},
           "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv_name,
                    "resources": {"requests": {"storage": "1Gi"}}}}
    c.kubectl("apply", "-f", "-", input=json.dumps(pv))
    try:
        c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pvc))
        wait_for("ClaimFound", lambda: reason_is(c, namespace, "pv", "ClaimFound"), 30)

        # what the workers wrote to the claim: 35 saves of job-v
        claim_dir = tmp_path / "claim"
        store = open_store(f"file://{claim_dir / 'team'}")
        run = f"job-v/runs/{kubectl_json(c, 'get', 'trainingjob', 'job-v', '-n', namespace)['metadata']['uid']}"
        for step in range(1, 36):
            _commit(store, namespace, run, step, tmp_path)

        pod = wait_for("inspector pod scheduled", lambda: [
            p for p in kubectl_json(c, "get", "pods", "-n", namespace)["items"]
            if p["metadata"]["name"] == "pv-inspector" and p["spec"].get("nodeName")], 60)[0]
        assert pod["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "ckpt"}
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "CheckpointPolicy"
        code, message = _run_inspector_locally(pod, claim_dir, tmp_path)
        assert code == 0, message
        first_uid = pod["metadata"]["uid"]
        exit_pod(c, namespace, "pv-inspector", code, message, container="inspector")

        def reported() -> list[dict[str, Any]]:
            body = kubectl_json(c, "get", "checkpointpolicy", "pv", "-n", namespace)
            return [j for j in (body.get("status") or {}).get("jobs", []) if j.get("committed") == 5]

        entry = wait_for("job summary from the inspector", reported, 30)[0]
        assert [ck.step for ck in store.committed_checkpoints(namespace, run)] == [10, 20, 30, 34, 35]
        uri = f"file:///mnt/checkpoints/team/{namespace}/{run}/checkpoints/step-0000000035"
        assert entry == {"name": "job-v", "run": run, "committed": 5, "bytes": 500, "newestStep": 35,
                         "newestTime": entry["newestTime"], "newestUri": uri}
        inspected = wait_for("Inspected", lambda: condition(c, namespace, "pv", "Inspected"), 30)
        assert inspected["status"] == "True" and inspected["reason"] == "InspectorSucceeded"
        assert first_uid in inspected["message"]
        wait_for("RetentionApplied event", lambda: kubectl_json(
            c, "get", "events", "-n", namespace, "--field-selector", "reason=RetentionApplied")["items"], 30)
        # the TrainingJob's lastCheckpoint comes from the policy's report
        last = wait_for("TrainingJob lastCheckpoint", lambda: (kubectl_json(
            c, "get", "trainingjob", "job-v", "-n", namespace).get("status") or {}).get("lastCheckpoint"), 30)
        assert last == {"step": 35, "uri": uri, "time": entry["newestTime"]}

        # the finished pod is deleted and the next pass starts a new one; a failing pass is a
        # condition and a Warning, and the last report stays
        nxt = wait_for("next inspector pod", lambda: [
            p for p in kubectl_json(c, "get", "pods", "-n", namespace)["items"]
            if p["metadata"]["name"] == "pv-inspector" and p["metadata"]["uid"] != first_uid
            and p["spec"].get("nodeName")], 60)[0]
        assert nxt["metadata"]["name"] == "pv-inspector"
        # from now on the namespace's quota refuses pods without a CPU limit (the inspector's)
        quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "cpu-limits"},
                 "spec": {"hard": {"limits.cpu": "4"}}}
        c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(quota))
        wait_for("quota in force", lambda: (kubectl_json(c, "get", "resourcequota", "cpu-limits", "-n", namespace)
                                            .get("status") or {}).get("hard"), 30)
        exit_pod(c, namespace, "pv-inspector", 1, '{"error": "StoreError: file:///mnt/checkpoints/team: not writable"}',
                 container="inspector")
        failed = wait_for("InspectorFailed event", lambda: kubectl_json(
            c, "get", "events", "-n", namespace, "--field-selector", "reason=InspectorFailed")["items"], 30)[0]
        assert failed["type"] == "Warning" and "not writable" in failed["message"]
        assert reported(), "the last good report must stay in status.jobs"
        # the next pass is refused by the quota: a condition, not a crash loop, and the rest stays
        refused = wait_for("InspectorNotCreated", lambda: (condition(c, namespace, "pv", "Inspected") or {}).get(
            "reason") == "InspectorNotCreated" and condition(c, namespace, "pv", "Inspected"), 30)
        assert refused["status"] == "False" and "limits.cpu" in refused["message"]
        ready = condition(c, namespace, "pv", "Ready")
        assert ready and ready["status"] == "True" and reported()
        assert fast_operator.proc is not None and fast_operator.proc.poll() is None
    finally:
        c.kubectl("delete", "pv", pv_name, "--wait=false", check=False)
