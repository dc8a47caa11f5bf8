"""The InferenceService's children and decisions, as pure functions (no cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeforge.api import InferenceServiceSpec
from kubeforge.controllers import workload
from kubeforge.controllers.inferenceservice import manifests as ch
from kubeforge.controllers.inferenceservice import plan as ctl
from kubeforge.controllers.inferenceservice.manifests import Owner, ResolvedModel
from kubeforge.store import ExportMarker

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
OWNER = Owner("chat", "team-a", "uid-1")
MODEL = ResolvedModel(uri="s3://kubeforge/ns/job/export", revision="2025-01-02T03:04:05Z", step=100,
                      s3_endpoint="http://minio:9000", s3_region="us-east-1", credentials_secret="s3-creds")


def spec(**over: Any) -> InferenceServiceSpec:
    base: dict[str, Any] = {"model": {"trainingJobRef": {"name": "job"}}}
    base.update(over)
    return InferenceServiceSpec.model_validate(base)


def container(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]["containers"][0]


def test_deployment_runs_the_server_on_the_resolved_model() -> None:
    dep = ch.build_deployment(OWNER, spec(engine={"shutdownTimeoutSeconds": 40, "numBlocks": 128}), MODEL)
    c = container(dep)
    assert c["command"] == ["python", "-m", "kubeforge_runtime.serve"]
    args = c["args"]
    assert args[args.index("--model") + 1] == MODEL.uri
    assert args[args.index("--shutdown-timeout") + 1] == "40"
    assert args[args.index("--num-blocks") + 1] == "128"
    assert args[args.index("--served-model-name") + 1] == "chat"
    assert "--kv-cache-memory-fraction" not in args
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["AWS_REGION"] == "us-east-1"
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert not any("SECRET" in e["name"] for e in c["env"]), "credentials only through envFrom"
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations[ch.REVISION_ANNOTATION] == MODEL.revision
    assert annotations[ch.MODEL_STEP_ANNOTATION] == "100"
    assert env["KUBEFORGE_MODEL_REVISION"] == MODEL.revision  # the server refuses any other export


def test_deployment_probes_drain_and_grace() -> None:
    s = spec(lifecycle={"startupTimeoutSeconds": 3600, "preStopSleepSeconds": 15}, engine={"shutdownTimeoutSeconds": 60})
    dep = ch.build_deployment(OWNER, s, MODEL)
    c, pod = container(dep), dep["spec"]["template"]["spec"]
    startup = c["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    # liveness on /livez, which stays 200 while loading and draining (a drain is never killed)
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez" and c["livenessProbe"]["failureThreshold"] >= 3
    assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": 15}}
    assert pod["terminationGracePeriodSeconds"] >= 15 + 60
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert dep["spec"]["progressDeadlineSeconds"] > 3600


def test_deployment_is_restricted_and_caches_the_model_on_an_emptydir() -> None:
    dep = ch.build_deployment(OWNER, spec(modelCacheSize="200Gi"), MODEL)
    c, pod = container(dep), dep["spec"]["template"]["spec"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-cache"]["emptyDir"] == {"sizeLimit": "200Gi"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[ch.MODEL_CACHE_DIR] == "model-cache" and mounts["/tmp"] == "tmp"
    args = c["args"]
    assert args[args.index("--download-dir") + 1] == ch.MODEL_CACHE_DIR


def test_gpus_toleration_and_product_affinity() -> None:
    dep = ch.build_deployment(OWNER, spec(gpus=2, gpuProduct="NVIDIA-H100-80GB-HBM3",
                                          resources={"cpu": "8", "memory": "64Gi"}), MODEL)
    c, pod = container(dep), dep["spec"]["template"]["spec"]
    assert c["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"}
    assert c["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert workload.GPU_TOLERATION in pod["tolerations"]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"] == [{"key": "nvidia.com/gpu.product", "operator": "In",
                                         "values": ["NVIDIA-H100-80GB-HBM3"]}]
    cpu_only = ch.build_deployment(OWNER, spec(gpus=0), MODEL)["spec"]["template"]["spec"]
    assert "tolerations" not in cpu_only and "affinity" not in cpu_only
    assert "nvidia.com/gpu" not in container({"spec": {"template": {"spec": cpu_only}}}).get("resources", {}).get(
        "limits", {})


def test_pvc_uri_mounts_the_claim_read_only() -> None:
    dep = ch.build_deployment(OWNER, spec(model={"uri": "pvc://models/llama-8b"}), ResolvedModel(uri="pvc://models/llama-8b"))
    c, pod = container(dep), dep["spec"]["template"]["spec"]
    assert c["args"][c["args"].index("--model") + 1] == "/mnt/models/models/llama-8b"
    assert {"name": "model-pvc", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]


def test_children_are_owned_and_named_deterministically() -> None:
    s = spec(autoscaling={"maxReplicas": 3})
    objs = [ch.build_deployment(OWNER, s, MODEL), ch.build_service(OWNER), ch.build_pdb(OWNER, s),
            ch.build_hpa(OWNER, s)]
    for obj in objs:
        assert obj is not None
        assert obj["metadata"]["name"] == "chat-server"
        ref = obj["metadata"]["ownerReferences"][0]
        assert ref == {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "InferenceService", "name": "chat",
                       "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}
    svc = ch.build_service(OWNER)
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP",
                                     "appProtocol": "http"}]
    assert svc["spec"]["selector"] == {"kubeforge.dev/inferenceservice": "chat"}
    assert ch.selector("chat") == "kubeforge.dev/inferenceservice=chat"
    assert ch.url(OWNER) == "http://chat-server.team-a.svc.cluster.local:8000"


def test_hpa_behavior_is_exactly_the_users_cooldowns_and_policies() -> None:
    s = spec(autoscaling={"minReplicas": 2, "maxReplicas": 9, "metric": "WaitingRequests", "target": 4,
                          "scaleUpCooldownSeconds": 7, "scaleDownCooldownSeconds": 123,
                          "scaleUpPolicies": [{"type": "Pods", "value": 2, "periodSeconds": 30}],
                          "scaleDownPolicies": [{"type": "Percent", "value": 10, "periodSeconds": 120},
                                                {"type": "Pods", "value": 1, "periodSeconds": 60}]})
    hpa = ch.build_hpa(OWNER, s)
    assert hpa is not None
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "InferenceService",
                                             "name": "chat"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 9)
    assert hpa["spec"]["behavior"] == {
        "scaleUp": {"stabilizationWindowSeconds": 7, "policies": [{"type": "Pods", "value": 2, "periodSeconds": 30}]},
        "scaleDown": {"stabilizationWindowSeconds": 123, "policies": [
            {"type": "Percent", "value": 10, "periodSeconds": 120}, {"type": "Pods", "value": 1, "periodSeconds": 60}]},
    }
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "vllm:num_requests_waiting"}, "target": {"type": "AverageValue", "averageValue": "4"}}}]


def test_hpa_defaults_still_write_both_windows_and_cpu_metric() -> None:
    hpa = ch.build_hpa(OWNER, spec(autoscaling={"maxReplicas": 2, "metric": "CPU", "target": 70}, resources={"cpu": "4"}))
    assert hpa is not None
    assert hpa["spec"]["behavior"] == {"scaleUp": {"stabilizationWindowSeconds": 0},
                                       "scaleDown": {"stabilizationWindowSeconds": 300}}
    assert hpa["spec"]["metrics"][0]["resource"] == {"name": "cpu", "target": {"type": "Utilization",
                                                                               "averageUtilization": 70}}
    assert ch.build_hpa(OWNER, spec()) is None


def test_pdb_selects_the_pods() -> None:
    pdb = ch.build_pdb(OWNER, spec(disruptionBudget={"maxUnavailable": 2}))
    assert pdb["spec"] == {"maxUnavailable": 2, "selector": {"matchLabels": {"kubeforge.dev/inferenceservice": "chat"}},
                           "unhealthyPodEvictionPolicy": "AlwaysAllow"}


def _deployment(replicas: int, ready: int, updated: int, gen: int = 1, seen: int = 1) -> dict[str, Any]:
    dep = ch.build_deployment(OWNER, spec(), MODEL)
    dep["metadata"]["generation"] = gen
    dep["status"] = {"replicas": replicas, "readyReplicas": ready, "updatedReplicas": updated,
                     "observedGeneration": seen}
    return dep


def test_availability_and_ready() -> None:
    model_ok = (True, "ExportFound", "ok")
    assert ctl.ready_condition(model_ok, ctl.availability(None, 1))[:2] == (False, "NoDeployment")
    assert ctl.ready_condition(model_ok, ctl.availability(_deployment(1, 0, 1), 1))[:2] == (False, "NoReplicaReady")
    assert ctl.ready_condition(model_ok, ctl.availability(_deployment(3, 2, 1), 2))[:2] == (False, "RollingOut")
    assert ctl.ready_condition(model_ok, ctl.availability(_deployment(2, 2, 2, gen=2, seen=1), 2))[:2] == (
        False, "RollingOut")
    assert ctl.ready_condition(model_ok, ctl.availability(_deployment(2, 2, 2), 2))[:2] == (True, "Serving")
    assert ctl.availability(_deployment(0, 0, 0), 0).available_reason == "ScaledToZero"
    waiting = (False, "WaitingForTrainingJob", "no export")
    assert ctl.ready_condition(waiting, ctl.availability(_deployment(2, 2, 2), 2))[:2] == (False, "WaitingForTrainingJob")


def _marker(time: str, step: int) -> ExportMarker:
    return ExportMarker(step=step, time=time, bytes=1, files={})


def test_follow_latest_and_pinned() -> None:
    newest = _marker("2025-02-01T00:00:00Z", 200)
    served = {"uri": MODEL.uri, "revision": "2025-01-01T00:00:00Z", "step": 100}
    assert ctl.choose_export("FollowLatest", served, newest) == ("2025-02-01T00:00:00Z", 200)
    assert ctl.choose_export("Pinned", served, newest) == ("2025-01-01T00:00:00Z", 100)
    assert ctl.choose_export("Pinned", None, newest) == ("2025-02-01T00:00:00Z", 200)


def test_model_read_back_from_the_deployment_rebuilds_the_same_template() -> None:
    """While the source cannot be resolved, the operator re-applies what runs: nothing rolls."""
    s = spec()
    dep = ch.build_deployment(OWNER, s, MODEL)
    assert ctl.model_of(dep) == MODEL
    assert ch.build_deployment(OWNER, s, ctl.model_of(dep) or MODEL) == dep
    assert ctl.model_of_status(dep) == {"uri": MODEL.uri, "revision": MODEL.revision, "step": 100}


def test_status_patch_carries_scale_selector_url_and_conditions() -> None:
    res = ctl.ModelResolution(True, "ExportFound", "found", MODEL)
    st = ctl.status_patch(OWNER, spec(), {}, 3, res, _deployment(1, 1, 1))
    assert st["selector"] == "kubeforge.dev/inferenceservice=chat" and st["observedGeneration"] == 3
    assert st["replicas"] == 1 and st["readyReplicas"] == 1 and st["url"].startswith("http://chat-server.")
    assert {c["type"]: c["status"] for c in st["conditions"]} == {"ModelReady": "True", "Available": "True",
                                                                  "Ready": "True"}
    assert st["model"]["revision"] == MODEL.revision


@pytest.mark.parametrize("path", sorted(REPO.glob("examples/0[34]-*.yaml")), ids=lambda p: p.name)
def test_examples_parse(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    s = InferenceServiceSpec.model_validate(doc["spec"])
    assert ch.build_deployment(OWNER, s, MODEL)["kind"] == "Deployment"


def test_an_exports_s3_addressing_reaches_the_servers_and_reads_back() -> None:
    import dataclasses

    virtual = dataclasses.replace(MODEL, s3_force_path_style=False)
    dep = ch.build_deployment(OWNER, spec(), virtual)
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEFORGE_S3_FORCE_PATH_STYLE"] == "false"
    assert ctl.model_of(dep) == virtual
    plain = ch.build_deployment(OWNER, spec(), MODEL)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "KUBEFORGE_S3_FORCE_PATH_STYLE" not in {e["name"] for e in plain}
