"""Issue 16 item 11 against the real API server: every TrainingJob and InferenceService gets
its NetworkPolicy (owned, so it goes with the object, and made again when deleted), the
servers of an export do not get the trainer's read-write Secret, and a hostPath job the
operator refuses says so in its status and an Event."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from devcluster import Cluster

from tests.fixtures.cluster import OperatorProcess, kubectl_json, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]
API = "kubeforge.dev/v1alpha1"


def apply(cluster: Cluster, ns: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))


def get(cluster: Cluster, ns: str, kind: str, name: str) -> dict[str, Any] | None:
    out = cluster.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def store_objects(cluster: Cluster) -> list[dict[str, Any]]:
    s3 = cluster.s3_settings()
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-trainer"}, "type": "Opaque",
              "stringData": {"AWS_ACCESS_KEY_ID": s3["AWS_ACCESS_KEY_ID"],
                             "AWS_SECRET_ACCESS_KEY": s3["AWS_SECRET_ACCESS_KEY"]}}
    policy = {"apiVersion": API, "kind": "CheckpointPolicy", "metadata": {"name": "ckpt"},
              "spec": {"schedule": {"everySteps": 50},
                       "storage": {"s3": {"bucket": s3["KUBEFORGE_S3_BUCKET"], "prefix": f"sec/{uuid.uuid4().hex[:8]}",
                                          "endpoint": s3["AWS_ENDPOINT_URL"],
                                          "credentialsSecretRef": {"name": "s3-trainer"}}}}}
    job = {"apiVersion": API, "kind": "TrainingJob", "metadata": {"name": "tiny"},
           "spec": {"workers": {"gpusPerWorker": 0}, "checkpointPolicyRef": {"name": "ckpt"}, "suspend": True}}
    return [secret, policy, job]


def reasons(cluster: Cluster, ns: str, name: str) -> set[str]:
    events = kubectl_json(cluster, "get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}")
    return {e["reason"] for e in events["items"]}


def test_network_policies_are_owned_and_come_back(operator: OperatorProcess, namespace: str) -> None:
    c = operator.cluster
    for obj in store_objects(c):
        apply(c, namespace, obj)
    apply(c, namespace, {"apiVersion": API, "kind": "InferenceService", "metadata": {"name": "chat"},
                         "spec": {"model": {"uri": "s3://kubeforge/models/x"}, "gpus": 0,
                                  "network": {"allowedClients": [{"podSelector": {"matchLabels": {"app": "gw"}}}]}}})
    job_np = wait_for("the job's NetworkPolicy", lambda: get(c, namespace, "networkpolicy", "tiny-network"), 60)
    uid = (get(c, namespace, "trainingjob", "tiny") or {})["metadata"]["uid"]
    assert [r["uid"] for r in job_np["metadata"]["ownerReferences"]] == [uid]
    assert job_np["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"kubeforge.dev/job-name": "tiny"}}}]}]
    isvc_np = wait_for("the service's NetworkPolicy", lambda: get(c, namespace, "networkpolicy", "chat-server"), 60)
    assert isvc_np["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app": "gw"}}}]
    assert isvc_np["spec"]["ingress"][0]["ports"] == [{"port": 8000, "protocol": "TCP"}]
    wait_for("NetworkPolicyApplied event", lambda: "NetworkPolicyApplied" in reasons(c, namespace, "chat"), 30)
    for name in ("tiny-network", "chat-server"):
        before = (get(c, namespace, "networkpolicy", name) or {})["metadata"]["uid"]
        c.kubectl("delete", "networkpolicy", name, "-n", namespace)
        wait_for(f"{name} made again", lambda name=name, before=before: (
            x := get(c, namespace, "networkpolicy", name)) and x["metadata"]["uid"] != before, 60)


def test_export_servers_need_a_credential_of_their_own(operator: OperatorProcess, namespace: str) -> None:
    c = operator.cluster
    for obj in store_objects(c):
        apply(c, namespace, obj)
    apply(c, namespace, {"apiVersion": API, "kind": "InferenceService", "metadata": {"name": "chat"},
                         "spec": {"model": {"trainingJobRef": {"name": "tiny"}}, "gpus": 0}})
    refused = wait_for("ModelReady False", lambda: (x := condition(get(c, namespace, "inferenceservice", "chat"),
                                                                   "ModelReady")) and x, 30)
    assert (refused["status"], refused["reason"]) == ("False", "ReadOnlyCredentialsRequired"), refused
    assert "spec.model.credentialsSecretRef must name a read-only credential" in refused["message"]
    assert "s3-trainer" in refused["message"]
    wait_for("a Warning event", lambda: "ReadOnlyCredentialsRequired" in reasons(c, namespace, "chat"), 30)
    assert get(c, namespace, "deployment", "chat-server") is None
    c.kubectl("patch", "inferenceservice", "chat", "-n", namespace, "--type=merge", "-p",
              json.dumps({"spec": {"model": {"credentialsSecretRef": {"name": "s3-reader"}}}}))
    waiting = wait_for("past the credential check", lambda: (x := condition(
        get(c, namespace, "inferenceservice", "chat"), "ModelReady")) and x["reason"] != refused["reason"] and x, 30)
    assert waiting["reason"] == "WaitingForTrainingJob", waiting


def test_a_host_path_job_is_refused_visibly(operator: OperatorProcess, namespace: str, tmp_path: Path) -> None:
    c = operator.cluster
    apply(c, namespace, {"apiVersion": API, "kind": "TrainingJob", "metadata": {"name": "hp"},
                         "spec": {"workers": {"gpusPerWorker": 0},
                                  "pod": {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]}}})
    ready = wait_for("Ready False", lambda: (x := condition(get(c, namespace, "trainingjob", "hp"), "Ready")) and x, 30)
    assert (ready["status"], ready["reason"]) == ("False", "VolumeSourceRefused"), ready
    assert "spec.pod.volumes[0].hostPath (root)" in ready["message"]
    wait_for("the Event", lambda: "VolumeSourceRefused" in reasons(c, namespace, "hp"), 30)
    assert not kubectl_json(c, "get", "pods", "-n", namespace, "-l", "kubeforge.dev/job-name=hp")["items"]
