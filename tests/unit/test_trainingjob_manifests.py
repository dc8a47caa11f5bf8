"""The TrainingJob's children as built, without a cluster: the pod contract of DESIGN.md."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from kubeforge.api import CheckpointPolicySpec, TrainingJobSpec
from kubeforge.api.contract import (
    CHECKPOINT_MOUNT_DIR,
    ENV_CHECKPOINT_POLICY,
    ENV_CHECKPOINT_URI,
    ENV_CONFIG_FILE,
    ENV_S3_ENDPOINT,
    RENDEZVOUS_PORT,
)
from kubeforge.controllers import workload
from kubeforge.controllers.trainingjob import manifests as tp
from kubeforge.settings import OperatorSettings

pytestmark = pytest.mark.unit
OWNER = tp.Owner("llm", "team-a", "1234-uid")
S3_POLICY = CheckpointPolicySpec.model_validate({
    "schedule": {"everySteps": 50}, "retention": {"keepLast": 2},
    "storage": {"s3": {"bucket": "ckpt", "prefix": "runs", "endpoint": "http://minio:9000",
                       "credentialsSecretRef": {"name": "s3-creds"}}}})
VOLUME_POLICY = CheckpointPolicySpec.model_validate({
    "schedule": {"everySteps": 50}, "storage": {"volume": {"claimName": "ckpt-pvc", "path": "/jobs"}}})


def spec(**over: Any) -> TrainingJobSpec:
    base: dict[str, Any] = {"workers": {"minReplicas": 2, "maxReplicas": 4, "gpusPerWorker": 8,
                                        "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
                            "trainer": {"config": {"model": {"preset": "tiny"}}}}
    base.update(over)
    return TrainingJobSpec.model_validate(base)


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def test_worker_command_is_elastic_torchrun_against_the_rendezvous_store() -> None:
    pod = tp.build_worker_pod(OWNER, spec(), S3_POLICY, 1, 0)
    cmd = pod["spec"]["containers"][0]["command"]
    assert cmd[:3] == ["python", "-m", "kubeforge_runtime.train.launch"]
    assert "--nnodes=2:4" in cmd and "--nproc-per-node=8" in cmd and "--rdzv-backend=c10d" in cmd
    assert f"--rdzv-endpoint=llm-rdzv.llm.team-a.svc:{RENDEZVOUS_PORT}" in cmd
    assert "--rdzv-id=1234-uid" in cmd and "--rdzv-conf=is_host=false" in cmd and "--max-restarts=3" in cmd
    assert "--shutdown-timeout=285" in cmd  # inside terminationGracePeriodSeconds (300)
    assert cmd[-4:] == ["-m", "kubeforge_runtime.train", "--config", "/etc/kubeforge/trainer.yaml"]
    assert env_of(pod)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_worker_pod_identity_labels_and_owner() -> None:
    pod = tp.build_worker_pod(OWNER, spec(), None, 3, 7)
    meta = pod["metadata"]
    assert meta["name"] == "llm-worker-3"
    assert meta["labels"][tp.JOB_LABEL] == "llm" and meta["labels"][tp.INDEX_LABEL] == "3"
    assert meta["labels"][tp.ATTEMPT_LABEL] == "7"
    assert meta["ownerReferences"][0]["uid"] == "1234-uid" and meta["ownerReferences"][0]["controller"]
    assert pod["spec"]["hostname"] == "llm-worker-3" and pod["spec"]["subdomain"] == "llm"
    assert pod["spec"]["restartPolicy"] == "Never"


def test_worker_pod_gpus_tolerations_affinity_security() -> None:
    pod = tp.build_worker_pod(OWNER, spec(failurePolicy={"nodeFailureGraceSeconds": 45}), None, 0, 0)
    ps = pod["spec"]
    c = ps["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert workload.GPU_TOLERATION in ps["tolerations"]
    for taint in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        assert {"key": taint, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 45} in ps["tolerations"]
    term = ps["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"][0] == {"key": "nvidia.com/gpu.product", "operator": "In",
                                           "values": ["NVIDIA-H100-80GB-HBM3"]}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    assert ps["securityContext"]["runAsNonRoot"] and ps["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    shm = next(v for v in ps["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert ps["terminationGracePeriodSeconds"] == 300
    assert c["ports"][0]["containerPort"] == 9400


def test_s3_policy_reaches_the_pod_as_env_and_credentials_only_through_envfrom() -> None:
    pod = tp.build_worker_pod(OWNER, spec(), S3_POLICY, 0, 0)
    c = pod["spec"]["containers"][0]
    env = env_of(pod)
    assert env[ENV_CHECKPOINT_URI] == "s3://ckpt/runs"
    assert json.loads(env[ENV_CHECKPOINT_POLICY])["schedule"]["everySteps"] == 50
    assert env[ENV_S3_ENDPOINT] == "http://minio:9000"
    assert env[ENV_CONFIG_FILE] == "/etc/kubeforge/trainer.yaml"
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert not any("SECRET" in k for k in env)


def test_volume_policy_mounts_the_claim() -> None:
    pod = tp.build_worker_pod(OWNER, spec(), VOLUME_POLICY, 0, 0)
    assert env_of(pod)[ENV_CHECKPOINT_URI] == f"file://{CHECKPOINT_MOUNT_DIR}/jobs"
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt-pvc"}} in pod["spec"]["volumes"]
    assert "envFrom" not in pod["spec"]["containers"][0]


def test_user_additions_are_merged_not_replacing_ours() -> None:
    s = spec(pod={"env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
                  "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "corpus"}}],
                  "volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
                  "nodeSelector": {"pool": "a"}, "tolerations": [{"key": "x", "operator": "Exists"}],
                  "priorityClassName": "high", "schedulerName": "volcano"})
    ps = tp.build_worker_pod(OWNER, s, None, 0, 0)["spec"]
    assert env_of({"spec": ps})["NCCL_DEBUG"] == "INFO"
    assert {v["name"] for v in ps["volumes"]} >= {"data", "dshm", "trainer-config"}
    assert ps["nodeSelector"] == {"pool": "a"} and ps["priorityClassName"] == "high"
    assert ps["schedulerName"] == "volcano" and {"key": "x", "operator": "Exists"} in ps["tolerations"]
    assert workload.GPU_TOLERATION in ps["tolerations"]


def test_cpu_only_workers_run_one_process_and_no_gpu_toleration() -> None:
    pod = tp.build_worker_pod(OWNER, spec(workers={"gpusPerWorker": 0}), None, 0, 0)
    assert "--nproc-per-node=1" in pod["spec"]["containers"][0]["command"]
    assert "nvidia.com/gpu" not in pod["spec"]["containers"][0]["resources"].get("limits", {})
    assert workload.GPU_TOLERATION not in pod["spec"]["tolerations"]


def test_rendezvous_pod_prefers_non_gpu_nodes_and_is_reachable_by_stable_name() -> None:
    pod = tp.build_rendezvous_pod(OWNER, spec())
    ps = pod["spec"]
    assert pod["metadata"]["name"] == "llm-rdzv" and ps["hostname"] == "llm-rdzv" and ps["subdomain"] == "llm"
    preferred = ps["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0]["preference"]["matchExpressions"] == [
        {"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}]
    # a cluster of GPU nodes only still runs it
    assert workload.GPU_TOLERATION in ps["tolerations"]
    assert "nvidia.com/gpu" not in json.dumps(ps["containers"][0]["resources"])
    assert ps["containers"][0]["command"][:3] == ["python", "-m", "kubeforge_runtime.rendezvous"]
    svc = tp.build_headless_service(OWNER)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert svc["spec"]["selector"] == {tp.JOB_LABEL: "llm"}  # selects workers and the store


def test_config_map_holds_the_trainer_config_with_export_from_the_spec() -> None:
    cm = tp.build_config_map(OWNER, spec(export={"enabled": False}))
    config = yaml.safe_load(cm["data"]["trainer.yaml"])
    assert config["model"] == {"preset": "tiny"} and config["export"] == {"enabled": False}


def test_workload_image_is_the_resources_own_else_the_operators_setting() -> None:
    def image(s: TrainingJobSpec, env: dict[str, str]) -> str:
        default = OperatorSettings.from_env(env).images.workload
        return str(tp.build_worker_pod(OWNER, s, None, 0, 0, default)["spec"]["containers"][0]["image"])

    assert image(spec(), {}) == "ghcr.io/kubeforge/trainer:0.1.0"
    mirror = {"KUBEFORGE_WORKLOAD_IMAGE": "mirror.example/kf/trainer:0.1.0-cpu"}
    assert image(spec(), mirror) == "mirror.example/kf/trainer:0.1.0-cpu"
    default = OperatorSettings.from_env(mirror).images.workload
    assert tp.build_rendezvous_pod(OWNER, spec(), default)["spec"]["containers"][0]["image"] == (
        "mirror.example/kf/trainer:0.1.0-cpu")
    assert image(spec(trainer={"image": "own/image:1"}), mirror) == "own/image:1"


def test_the_policys_s3_addressing_reaches_the_workers() -> None:
    def path_style(policy: CheckpointPolicySpec | None) -> str | None:
        env = tp.build_worker_pod(OWNER, spec(), policy, 0, 0)["spec"]["containers"][0]["env"]
        return next((e["value"] for e in env if e["name"] == "KUBEFORGE_S3_FORCE_PATH_STYLE"), None)

    assert path_style(S3_POLICY) == "true"
    virtual = S3_POLICY.model_copy(deep=True)
    assert virtual.storage.s3 is not None
    virtual.storage.s3.force_path_style = False
    assert path_style(virtual) == "false"
    assert path_style(VOLUME_POLICY) is None and path_style(None) is None
