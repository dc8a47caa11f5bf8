"""InferenceService controller against the real API server, kube-controller-manager (its
Deployment, ReplicaSet and HPA controllers) and the cluster's MinIO."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devcluster import Cluster
from kubeforge.store import Store, open_store, utc_now

from tests.fixtures.cluster import OperatorProcess, kubectl_json, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

API = "kubeforge.dev/v1alpha1"
MODEL_URI = "s3://kubeforge/models/tiny-llama"


def isvc(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": {"uri": MODEL_URI}, "gpus": 1}
    body.update(spec)
    return {"apiVersion": API, "kind": "InferenceService", "metadata": {"name": name}, "spec": body}


def apply(cluster: Cluster, ns: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))


def get(cluster: Cluster, ns: str, kind: str, name: str, *flags: str) -> dict[str, Any] | None:
    out = cluster.kubectl("get", kind, name, "-n", ns, "-o", "json", *flags, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def cond(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def isvc_condition(cluster: Cluster, ns: str, name: str, type_: str) -> dict[str, Any] | None:
    return cond(get(cluster, ns, "inferenceservice", name), type_)


def delete_isvc(cluster: Cluster, ns: str, name: str) -> None:
    """Deleted while the operator runs: a finalizer (there should be none) would still be released."""
    cluster.kubectl("delete", "inferenceservice", name, "-n", ns, "--timeout=60s", check=False)


@pytest.fixture
def isvc_operator(crds: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator, re-reading TrainingJob exports every 2 s instead of 30 s."""
    op = OperatorProcess(crds, tmp_path / "operator.log", namespaces=(namespace,),
                         extra_env={"KUBEFORGE_EXPORT_POLL_SECONDS": "2"})
    op.start()
    try:
        yield op
    finally:
        for item in kubectl_json(crds, "get", "inferenceservices", "-n", namespace).get("items", []):
            delete_isvc(crds, namespace, item["metadata"]["name"])
        op.stop()


def test_children_have_the_contract_fields_and_are_admitted_restricted(isvc_operator: OperatorProcess,
                                                                       namespace: str) -> None:
    c = isvc_operator.cluster
    apply(c, namespace, isvc("chat", replicas=2, gpuProduct="NVIDIA-H100-80GB-HBM3",
                             model={"uri": MODEL_URI, "credentialsSecretRef": {"name": "s3"},
                                    "s3Endpoint": "http://minio:9000"},
                             lifecycle={"preStopSleepSeconds": 7}, engine={"shutdownTimeoutSeconds": 20}))
    # Ready needs both pods Running+Ready (kwok) on GPU nodes: the namespace enforces PodSecurity
    # restricted, so a pod template that broke it would never get a pod created
    ready = wait_for("Ready", lambda: (cond_ := isvc_condition(c, namespace, "chat", "Ready")) and
                     cond_["status"] == "True" and cond_, 150)
    assert ready["reason"] == "Serving"
    obj = get(c, namespace, "inferenceservice", "chat")
    assert obj is not None
    st = obj["status"]
    assert st["url"] == f"http://chat-server.{namespace}.svc.cluster.local:8000"
    assert st["selector"] == "kubeforge.dev/inferenceservice=chat"
    assert (st["replicas"], st["readyReplicas"]) == (2, 2)
    assert st["model"] == {"uri": MODEL_URI}
    assert st["observedGeneration"] == obj["metadata"]["generation"]
    assert {x["type"]: x["status"] for x in st["conditions"]} == {"ModelReady": "True", "Available": "True",
                                                                  "Ready": "True"}

    dep = get(c, namespace, "deployment", "chat-server")
    assert dep is not None
    pod = dep["spec"]["template"]["spec"]
    ctr = pod["containers"][0]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert ctr["lifecycle"]["preStop"] == {"sleep": {"seconds": 7}}
    assert pod["terminationGracePeriodSeconds"] >= 7 + 20
    assert ctr["startupProbe"]["httpGet"]["path"] == "/health" and ctr["readinessProbe"]["httpGet"]["path"] == "/health"
    assert ctr["envFrom"] == [{"secretRef": {"name": "s3"}}]
    assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"} in ctr["env"]
    owner = dep["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("InferenceService", "chat", obj["metadata"]["uid"])
    managed = (get(c, namespace, "deployment", "chat-server", "--show-managed-fields") or {})["metadata"]
    assert any(m["manager"] == "kubeforge" and m["operation"] == "Apply" for m in managed["managedFields"])

    pods = kubectl_json(c, "get", "pods", "-n", namespace, "-l", "kubeforge.dev/inferenceservice=chat")["items"]
    assert len(pods) == 2
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert all(n.startswith("gpu-node-") for n in nodes), nodes

    svc = get(c, namespace, "service", "chat-server")
    assert svc is not None and svc["spec"]["ports"][0]["name"] == "http" and svc["spec"]["ports"][0]["port"] == 8000
    pdb = get(c, namespace, "poddisruptionbudget", "chat-server")
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == 1
    # the disruption controller counts our pods: the budget selects them
    wait_for("PDB counts the pods", lambda: ((get(c, namespace, "poddisruptionbudget", "chat-server") or {})
                                             .get("status", {}).get("currentHealthy") == 2), 30)
    assert get(c, namespace, "horizontalpodautoscaler", "chat-server") is None

    # a child deleted by hand comes back on the next reconcile (a spec change triggers one)
    c.kubectl("delete", "service", "chat-server", "-n", namespace)
    c.kubectl("patch", "inferenceservice", "chat", "-n", namespace, "--type=merge", "-p",
              json.dumps({"spec": {"engine": {"maxNumSeqs": 8}}}))
    wait_for("Service recreated", lambda: get(c, namespace, "service", "chat-server"), 30)
    dep = wait_for("engine flag rolled", lambda: (d := get(c, namespace, "deployment", "chat-server")) and
                   "8" == d["spec"]["template"]["spec"]["containers"][0]["args"][
                       d["spec"]["template"]["spec"]["containers"][0]["args"].index("--max-num-seqs") + 1] and d, 30)


def _behavior(cluster: Cluster, ns: str) -> dict[str, Any] | None:
    hpa = get(cluster, ns, "horizontalpodautoscaler", "chat-server")
    return hpa["spec"].get("behavior") if hpa else None


def _policies(b: dict[str, Any], direction: str) -> list[dict[str, Any]]:
    return b[direction].get("policies", [])


def test_hpa_behavior_holds_exactly_the_cooldowns_updates_and_is_removed(isvc_operator: OperatorProcess,
                                                                          namespace: str) -> None:
    c = isvc_operator.cluster
    up = [{"type": "Pods", "value": 3, "periodSeconds": 20}]
    down = [{"type": "Percent", "value": 25, "periodSeconds": 90}, {"type": "Pods", "value": 1, "periodSeconds": 45}]
    apply(c, namespace, isvc("chat", autoscaling={
        "minReplicas": 1, "maxReplicas": 6, "metric": "WaitingRequests", "target": 3,
        "scaleUpCooldownSeconds": 17, "scaleDownCooldownSeconds": 241,
        "scaleUpPolicies": up, "scaleDownPolicies": down}))
    b = wait_for("HPA", lambda: _behavior(c, namespace), 30)
    assert b["scaleUp"]["stabilizationWindowSeconds"] == 17 and _policies(b, "scaleUp") == up
    assert b["scaleDown"]["stabilizationWindowSeconds"] == 241 and _policies(b, "scaleDown") == down
    hpa = get(c, namespace, "horizontalpodautoscaler", "chat-server")
    assert hpa is not None
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": API, "kind": "InferenceService", "name": "chat"}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm:num_requests_waiting"

    # change the cooldowns and the policies: the HPA follows exactly, old policies gone
    new_down = [{"type": "Pods", "value": 2, "periodSeconds": 30}]
    c.kubectl("patch", "inferenceservice", "chat", "-n", namespace, "--type=merge", "-p", json.dumps(
        {"spec": {"autoscaling": {"scaleUpCooldownSeconds": 5, "scaleDownCooldownSeconds": 600,
                                  "scaleDownPolicies": new_down, "maxReplicas": 4}}}))
    b = wait_for("HPA updated", lambda: (x := _behavior(c, namespace)) and
                 x["scaleDown"]["stabilizationWindowSeconds"] == 600 and x, 30)
    assert b["scaleUp"]["stabilizationWindowSeconds"] == 5 and _policies(b, "scaleUp") == up
    assert _policies(b, "scaleDown") == new_down
    assert (get(c, namespace, "horizontalpodautoscaler", "chat-server") or {})["spec"]["maxReplicas"] == 4
    # the Event follows the apply: the HPA can be seen first
    wait_for("AutoscalerCreated and AutoscalerUpdated Events", lambda: {"AutoscalerCreated", "AutoscalerUpdated"} <= {
        e["reason"] for e in kubectl_json(c, "get", "events", "-n", namespace, "--field-selector",
                                          "involvedObject.name=chat")["items"]}, 15)

    c.kubectl("patch", "inferenceservice", "chat", "-n", namespace, "--type=json", "-p",
              json.dumps([{"op": "remove", "path": "/spec/autoscaling"}]))
    wait_for("HPA removed", lambda: get(c, namespace, "horizontalpodautoscaler", "chat-server") is None, 30)


def test_kubectl_scale_and_the_real_hpa_can_scale_our_resource(isvc_operator: OperatorProcess,
                                                                namespace: str) -> None:
    c = isvc_operator.cluster
    apply(c, namespace, isvc("chat", gpus=0, resources={"cpu": "500m"}))
    wait_for("Deployment", lambda: get(c, namespace, "deployment", "chat-server"), 30)
    c.kubectl("scale", "inferenceservice/chat", "-n", namespace, "--replicas=3")
    wait_for("Deployment at 3", lambda: (get(c, namespace, "deployment", "chat-server") or {})
             .get("spec", {}).get("replicas") == 3, 30)
    wait_for("status.replicas 3 ready", lambda: (get(c, namespace, "inferenceservice", "chat") or {})
             .get("status", {}).get("readyReplicas") == 3, 60)
    scale = json.loads(c.kubectl("get", "--raw",
                                 f"/apis/{API}/namespaces/{namespace}/inferenceservices/chat/scale").stdout)
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == "kubeforge.dev/inferenceservice=chat"

    # the real HPA controller (kube-controller-manager, 5 s sync) reads /scale and the selector;
    # with no CPU metrics here it cannot compute a recommendation but must be able to scale
    c.kubectl("patch", "inferenceservice", "chat", "-n", namespace, "--type=merge", "-p", json.dumps(
        {"spec": {"autoscaling": {"minReplicas": 1, "maxReplicas": 5, "metric": "CPU", "target": 60}}}))

    def able() -> dict[str, Any] | None:
        hpa = get(c, namespace, "horizontalpodautoscaler", "chat-server")
        x = cond(hpa, "AbleToScale")
        return x if x and x["status"] == "True" else None

    able_to_scale = wait_for("AbleToScale=True", able, 60)
    assert able_to_scale["reason"] in ("SucceededGetScale", "ReadyForNewScale", "SucceededRescale")
    # the operator never wrote spec.replicas: the HPA (without metrics) left it, and so did we
    obj = get(c, namespace, "inferenceservice", "chat", "--show-managed-fields")
    assert obj is not None and obj["spec"]["replicas"] == 3
    managers = {m["manager"] for m in obj["metadata"]["managedFields"] if "f:replicas" in json.dumps(m)}
    assert "kubeforge" not in " ".join(managers), managers


# ---------------------------------------------------------------------------- TrainingJob exports

def s3_objects(cluster: Cluster, ns: str, prefix: str) -> list[dict[str, Any]]:
    s3 = cluster.s3_settings()
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}, "type": "Opaque",
              "stringData": {"AWS_ACCESS_KEY_ID": s3["AWS_ACCESS_KEY_ID"],
                             "AWS_SECRET_ACCESS_KEY": s3["AWS_SECRET_ACCESS_KEY"]}}
    policy = {"apiVersion": API, "kind": "CheckpointPolicy", "metadata": {"name": "ckpt"},
              "spec": {"schedule": {"everySteps": 50},
                       "storage": {"s3": {"bucket": s3["KUBEFORGE_S3_BUCKET"], "prefix": prefix,
                                          "endpoint": s3["AWS_ENDPOINT_URL"], "credentialsSecretRef": {"name": "s3"}}}}}
    # suspended: this test needs the job's identity and store, not its workers
    job = {"apiVersion": API, "kind": "TrainingJob", "metadata": {"name": "tiny"},
           "spec": {"workers": {"gpusPerWorker": 1}, "checkpointPolicyRef": {"name": "ckpt"}, "suspend": True}}
    return [secret, policy, job]


def job_store(cluster: Cluster, prefix: str) -> Store:
    s3 = cluster.s3_settings()
    return open_store(f"s3://{s3['KUBEFORGE_S3_BUCKET']}/{prefix}", endpoint_url=s3["AWS_ENDPOINT_URL"],
                      access_key_id=s3["AWS_ACCESS_KEY_ID"], secret_access_key=s3["AWS_SECRET_ACCESS_KEY"])


def fake_export(directory: Path, tag: str) -> Path:
    """Files shaped like an export; the operator only reads the commit marker."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "tag": tag}))
    (directory / "model.safetensors").write_bytes(tag.encode() * 64)
    return directory


def served_args(cluster: Cluster, ns: str) -> list[str] | None:
    dep = get(cluster, ns, "deployment", "chat-server")
    return dep["spec"]["template"]["spec"]["containers"][0]["args"] if dep else None


def template_revision(cluster: Cluster, ns: str) -> str | None:
    dep = get(cluster, ns, "deployment", "chat-server")
    return (dep["spec"]["template"]["metadata"].get("annotations") or {}).get("kubeforge.dev/model-revision") \
        if dep else None


def test_training_job_ref_waits_for_the_export_then_follows_it(isvc_operator: OperatorProcess, namespace: str,
                                                              tmp_path: Path) -> None:
    c = isvc_operator.cluster
    prefix = f"isvc-tests/{uuid.uuid4().hex[:8]}"
    for obj in s3_objects(c, namespace, prefix):
        apply(c, namespace, obj)
    apply(c, namespace, isvc("chat", model={"trainingJobRef": {"name": "tiny"}, "updatePolicy": "FollowLatest",
                                            "credentialsSecretRef": {"name": "s3"}}))
    waiting = wait_for("ModelReady False", lambda: isvc_condition(c, namespace, "chat", "ModelReady"), 30)
    assert (waiting["status"], waiting["reason"]) == ("False", "WaitingForTrainingJob"), waiting
    assert "no committed export" in waiting["message"]
    ready = isvc_condition(c, namespace, "chat", "Ready")
    assert ready and (ready["status"], ready["reason"]) == ("False", "WaitingForTrainingJob")
    assert get(c, namespace, "deployment", "chat-server") is None
    # polled without a finalizer: a stopped operator must not block deleting the service
    assert not (get(c, namespace, "inferenceservice", "chat") or {})["metadata"].get("finalizers")

    store = job_store(c, prefix)
    # the export an earlier TrainingJob named tiny left (the layout of before runs had uids) is
    # not this job's: never served (issue 16 item 9; the old code served it at once)
    store.write_export(namespace, "tiny", fake_export(tmp_path / "predecessor", "old"), step=900)
    time.sleep(5)  # two export polls
    assert get(c, namespace, "deployment", "chat-server") is None
    assert "no committed export" in (isvc_condition(c, namespace, "chat", "ModelReady") or {})["message"]
    run = f"tiny/runs/{(get(c, namespace, 'trainingjob', 'tiny') or {})['metadata']['uid']}"
    # an export still being written (files, no marker) is not served
    store.backend.put_file(f"{namespace}/{run}/export/config.json", fake_export(tmp_path / "partial", "p") / "config.json")
    marker = store.write_export(namespace, run, fake_export(tmp_path / "e1", "one"), step=100)
    export_uri = store.export_uri(namespace, run)
    args = wait_for("Deployment with the export", lambda: served_args(c, namespace), 30)
    assert args[args.index("--model") + 1] == export_uri
    assert template_revision(c, namespace) == marker.time
    st = wait_for("ModelReady True", lambda: (x := get(c, namespace, "inferenceservice", "chat")) and
                  (cond(x, "ModelReady") or {}).get("status") == "True" and x["status"], 30)
    assert st["model"] == {"uri": export_uri, "revision": marker.time, "step": 100}
    env = {e["name"]: e.get("value") for e in (get(c, namespace, "deployment", "chat-server") or {})
           ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ENDPOINT_URL"] == c.s3_settings()["AWS_ENDPOINT_URL"]

    # FollowLatest: a newer export rolls the pod template (marker times have 1 s resolution)
    wait_for("a new second", lambda: utc_now() != marker.time, 5, 0.1)
    newer = store.write_export(namespace, run, fake_export(tmp_path / "e2", "two"), step=200)
    wait_for("rolled to the newer export", lambda: template_revision(c, namespace) == newer.time, 30)
    # the Event is posted after the children are applied: the template can be seen first
    wait_for("a ModelRolloutStarted Event", lambda: "ModelRolloutStarted" in {
        e["reason"] for e in kubectl_json(c, "get", "events", "-n", namespace, "--field-selector",
                                          "involvedObject.name=chat")["items"]}, 15)

    # Pinned: a newer export is reported, not rolled out
    c.kubectl("patch", "inferenceservice", "chat", "-n", namespace, "--type=merge", "-p",
              json.dumps({"spec": {"model": {"updatePolicy": "Pinned"}}}))
    wait_for("Pinned observed", lambda: (x := get(c, namespace, "inferenceservice", "chat")) and
             x["status"].get("observedGeneration") == x["metadata"]["generation"], 30)
    wait_for("a new second", lambda: utc_now() != newer.time, 5, 0.1)
    newest = store.write_export(namespace, run, fake_export(tmp_path / "e3", "three"), step=300)
    pinned = wait_for("Pinned message", lambda: (x := isvc_condition(c, namespace, "chat", "ModelReady")) and
                      "Pinned" in x["message"] and x, 30)
    assert newest.time in pinned["message"]
    assert template_revision(c, namespace) == newer.time
    assert (get(c, namespace, "inferenceservice", "chat") or {})["status"]["model"]["revision"] == newer.time
