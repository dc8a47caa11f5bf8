"""Issue 16 item 11, the pure parts: typed volume and env sources, hostPath refused by the
operator unless allowed, no API token in the workloads, the NetworkPolicies of every
TrainingJob and InferenceService, and the settings that govern them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubeforge.api import InferenceServiceSpec, TrainingJobSpec
from kubeforge.api.common import VOLUME_SOURCES
from kubeforge.api.contract import SERVING_PORT, TRAINER_METRICS_PORT
from kubeforge.api.crdgen import crd
from kubeforge.api.trainingjob import TrainingJob
from kubeforge.controllers.inferenceservice import manifests as ch
from kubeforge.controllers.trainingjob import manifests as tp
from kubeforge.controllers.trainingjob.plan import Observed, plan
from kubeforge.settings import OperatorSettings, SecuritySettings
from pydantic import ValidationError

pytestmark = pytest.mark.unit
TJ_OWNER = tp.Owner("llm", "team-a", "job-uid")
IS_OWNER = ch.Owner("chat", "team-a", "isvc-uid")
HOST_PATH = {"name": "node-root", "hostPath": {"path": "/"}}
PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def job(pod: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "llm", "namespace": "team-a", "uid": "job-uid", "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"workers": {"minReplicas": 1, "maxReplicas": 2, "gpusPerWorker": 0}, "pod": pod}, "status": {}}


# ---- typed sources ---------------------------------------------------------------------

def test_volume_schema_lists_only_restricted_sources_and_host_path() -> None:
    schema = crd(TrainingJob)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    volume = schema["properties"]["spec"]["properties"]["pod"]["properties"]["volumes"]["items"]
    assert not volume.get("x-kubernetes-preserve-unknown-fields"), "a volume must not accept any source"
    assert set(volume["properties"]) == {"name", *VOLUME_SOURCES}
    assert "nfs" not in volume["properties"] and "flexVolume" not in volume["properties"]
    (rule,) = volume["x-kubernetes-validations"]
    assert "exactly one source" in rule["message"] and rule["rule"].endswith("== 1")
    assert volume["properties"]["hostPath"]["properties"]["path"]["pattern"] == "^/"


@pytest.mark.parametrize("volume", [{"name": "n", "nfs": {"server": "10.0.0.1", "path": "/"}},
                                    {"name": "g", "gitRepo": {"repository": "https://example.com/x"}},
                                    {"name": "f", "flexVolume": {"driver": "x"}}])
def test_node_reaching_volume_sources_are_refused_by_the_model(volume: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as e:
        TrainingJobSpec.model_validate({"pod": {"volumes": [volume]}})
    assert "Extra inputs are not permitted" in str(e.value)


def test_a_projected_volume_cannot_mount_a_service_account_token() -> None:
    """automountServiceAccountToken: false means nothing if a volume can project any
    ServiceAccount's token of the namespace."""
    token = {"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "audience": "api"}}]}}
    with pytest.raises(ValidationError):
        TrainingJobSpec.model_validate({"pod": {"volumes": [token]}})
    ok = TrainingJobSpec.model_validate({"pod": {"volumes": [{"name": "c", "projected": {"sources": [
        {"configMap": {"name": "a"}}, {"secret": {"name": "b"}}], "defaultMode": 0o440}}]}})
    assert ok.pod.volumes[0].dump()["projected"] == {"sources": [{"configMap": {"name": "a"}}, {"secret": {"name": "b"}}],
                                                      "defaultMode": 0o440}
    schema = crd(TrainingJob)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    projected = schema["properties"]["spec"]["properties"]["pod"]["properties"]["volumes"]["items"]["properties"][
        "projected"]
    source = projected["properties"]["sources"]["items"]
    assert not projected.get("x-kubernetes-preserve-unknown-fields")
    assert "serviceAccountToken" not in source["properties"] and not source.get("x-kubernetes-preserve-unknown-fields")
    assert "exactly one of" in source["x-kubernetes-validations"][0]["message"]


def test_env_value_from_is_typed() -> None:
    ok = TrainingJobSpec.model_validate({"pod": {"env": [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}})
    assert ok.pod.env[0].dump() == {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    for bad in ({"secretKeyRef": {"name": "hf", "key": "token", "namespace": "kube-system"}},
                {"anythingElse": {"x": 1}}):
        with pytest.raises(ValidationError):
            TrainingJobSpec.model_validate({"pod": {"env": [{"name": "X", "valueFrom": bad}]}})
    schema = crd(TrainingJob)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    value_from = schema["properties"]["spec"]["properties"]["pod"]["properties"]["env"]["items"]["properties"][
        "valueFrom"]
    assert not value_from.get("x-kubernetes-preserve-unknown-fields")
    assert set(value_from["properties"]) == {"secretKeyRef", "configMapKeyRef", "fieldRef", "resourceFieldRef"}


# ---- hostPath: the operator's second line ----------------------------------------------

def test_host_path_job_fails_visibly_and_starts_no_pod() -> None:
    obs = Observed(job=job({"volumes": [HOST_PATH], "volumeMounts": [{"name": "node-root", "mountPath": "/host"}]}),
                   pods=[], nodes={})
    p = plan(obs)
    assert p.create == [] and p.children == []
    ready = next(c for c in p.status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "VolumeSourceRefused")
    assert "spec.pod.volumes[0].hostPath (node-root)" in ready["message"]
    assert "security.allowHostPathVolumes" in ready["message"]
    assert [(e.reason, e.warning) for e in p.events] == [("VolumeSourceRefused", True)]
    again = plan(Observed(job={**obs.job, "status": p.status}, pods=[], nodes={}))
    assert again.events == [], "the Event is posted once, not at every pass"


def test_host_path_is_allowed_by_the_operator_setting() -> None:
    obs = Observed(job={**job({"volumes": [HOST_PATH]}), "status": {"run": "llm/runs/job-uid"}}, pods=[], nodes={},
                   security=SecuritySettings(allow_host_path_volumes=True))
    p = plan(obs)
    workers = [m for m in p.create if m["metadata"]["labels"][tp.ROLE_LABEL] == tp.ROLE_WORKER]
    assert workers and HOST_PATH in workers[0]["spec"]["volumes"]


def test_workload_pods_never_mount_an_api_token() -> None:
    spec = TrainingJobSpec.model_validate({"pod": {"serviceAccountName": "irsa-writer"}})
    worker = tp.build_worker_pod(TJ_OWNER, spec, None, 0, 0)["spec"]
    rdzv = tp.build_rendezvous_pod(TJ_OWNER, spec)["spec"]
    for pod in (worker, rdzv):
        assert pod["serviceAccountName"] == "irsa-writer"
        assert pod["automountServiceAccountToken"] is False


# ---- NetworkPolicies -------------------------------------------------------------------

def test_trainingjob_network_policy_admits_only_the_jobs_own_pods() -> None:
    np = tp.build_network_policy(TJ_OWNER)
    assert np["metadata"]["name"] == "llm-network" and np["metadata"]["namespace"] == "team-a"
    assert np["metadata"]["ownerReferences"][0]["uid"] == "job-uid"
    assert np["metadata"]["labels"][tp.JOB_LABEL] == "llm"
    selector = {"matchLabels": {tp.JOB_LABEL: "llm"}}
    # the worker pods and the rendezvous store carry the label the policy selects and admits
    spec = TrainingJobSpec()
    for pod in (tp.build_worker_pod(TJ_OWNER, spec, None, 0, 0), tp.build_rendezvous_pod(TJ_OWNER, spec)):
        assert pod["metadata"]["labels"][tp.JOB_LABEL] == "llm"
    # no port list: the rendezvous port, and the ports NCCL and gloo pick, between the job's pods only
    assert np["spec"] == {"podSelector": selector, "policyTypes": ["Ingress"],
                          "ingress": [{"from": [{"podSelector": selector}]}]}
    scraped = tp.build_network_policy(TJ_OWNER, (PROMETHEUS,))
    assert scraped["spec"]["ingress"][1] == {"from": [PROMETHEUS],
                                             "ports": [{"port": TRAINER_METRICS_PORT, "protocol": "TCP"}]}


def test_trainingjob_plan_makes_the_policy_unless_the_setting_is_off() -> None:
    on = plan(Observed(job=job({}), pods=[], nodes={}))
    assert [c["metadata"]["name"] for c in on.children if c["kind"] == "NetworkPolicy"] == ["llm-network"]
    off = plan(Observed(job=job({}), pods=[], nodes={}, security=SecuritySettings(network_policies=False)))
    assert [c["kind"] for c in off.children if c["kind"] == "NetworkPolicy"] == []


def isvc(**over: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({"model": {"uri": "s3://m/x"}, **over})


def test_inferenceservice_network_policy_defaults_to_the_namespace() -> None:
    np = ch.build_network_policy(IS_OWNER, isvc())
    assert np["metadata"]["name"] == "chat-server" and np["metadata"]["ownerReferences"][0]["uid"] == "isvc-uid"
    assert np["spec"]["podSelector"] == {"matchLabels": ch.pod_labels("chat")}
    assert np["spec"]["ingress"] == [{"from": [{"podSelector": {}}],
                                      "ports": [{"port": SERVING_PORT, "protocol": "TCP"}]}]


def test_inferenceservice_network_policy_admits_the_listed_clients_and_scrapers() -> None:
    gateway = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}},
               "podSelector": {"matchLabels": {"app": "envoy"}}}
    spec = isvc(network={"allowedClients": [gateway, {"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/24"]}}]})
    np = ch.build_network_policy(IS_OWNER, spec, (PROMETHEUS,))
    peers = np["spec"]["ingress"][0]["from"]
    assert {"podSelector": {}} not in peers, "listing clients replaces the namespace default"
    assert peers[0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "gateway"}
    assert peers[0]["podSelector"]["matchLabels"] == {"app": "envoy"}
    assert peers[1] == {"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/24"]}}
    assert peers[2] == PROMETHEUS
    with pytest.raises(ValidationError):
        isvc(network={"allowedClients": [{"podSelector": {"matchLabels": {"a": "b"}}, "badKey": 1}]})


def test_serving_pods_mount_no_api_token() -> None:
    dep = ch.build_deployment(IS_OWNER, isvc(serviceAccountName="reader"), ch.ResolvedModel(uri="s3://m/x"))
    assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


# ---- settings ------------------------------------------------------------------------

def test_security_settings_from_the_environment() -> None:
    default = OperatorSettings.from_env({}).security
    assert default == SecuritySettings(allow_host_path_volumes=False, network_policies=True, scrape_from=(),
                                       serving_policy_credentials=False)
    s = OperatorSettings.from_env({"KUBEFORGE_ALLOW_HOST_PATH_VOLUMES": "true", "KUBEFORGE_NETWORK_POLICIES": "false",
                                   "KUBEFORGE_SCRAPE_FROM": '[{"namespaceSelector": {}}]',
                                   "KUBEFORGE_SERVING_POLICY_CREDENTIALS": "true"}).security
    assert s == SecuritySettings(True, False, ({"namespaceSelector": {}},), True)
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kf"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubeforge"}}}
    s = OperatorSettings.from_env({"KUBEFORGE_OPERATOR_PEERS": json.dumps([peer])}).security
    assert s.operator_peers == (peer,)
    with pytest.raises(ValueError, match="KUBEFORGE_OPERATOR_PEERS"):
        OperatorSettings.from_env({"KUBEFORGE_OPERATOR_PEERS": "[1]"})
    with pytest.raises(ValueError, match="KUBEFORGE_SCRAPE_FROM"):
        OperatorSettings.from_env({"KUBEFORGE_SCRAPE_FROM": '{"namespaceSelector": {}}'})


def test_network_policy_peers_compare_as_the_api_server_stores_them() -> None:
    """The NetworkPolicyApplied Event is posted when the peers change, not at every export poll:
    the API server drops the empty lists our dump has."""
    from kubeforge.controllers.inferenceservice.handlers import _without_empty

    spec = InferenceServiceSpec.model_validate({"model": {"uri": "s3://b/m"}, "network": {"allowedClients": [
        {"podSelector": {"matchLabels": {"app": "gw"}}}]}})
    desired = ch.build_network_policy(IS_OWNER, spec, ())["spec"]["ingress"][0]["from"]
    as_stored = [{"podSelector": {"matchLabels": {"app": "gw"}}}]
    assert _without_empty(desired) == _without_empty(as_stored)
    assert _without_empty(desired) != _without_empty([{"podSelector": {"matchLabels": {"app": "other"}}}])



def test_empty_selectors_are_peers_not_noise() -> None:
    from kubeforge.controllers.inferenceservice.handlers import _without_empty

    namespace = [{"podSelector": {}}]
    everyone = [{"namespaceSelector": {}}]
    assert _without_empty(namespace) != _without_empty(everyone)
    assert _without_empty([{"podSelector": {"matchLabels": {}, "matchExpressions": []}}]) == namespace


def test_a_volume_whose_source_was_dropped_fails_the_job_visibly() -> None:
    """Stored before admission refused it, an nfs volume or a projected serviceAccountToken
    reads back without its source (the API server prunes unknown fields): the job fails saying
    so, instead of retrying a pod the API server refuses."""
    for volume in ({"name": "data"}, {"name": "t", "projected": {"sources": [{}]}}):
        p = plan(Observed(job=job({"volumes": [volume]}), pods=[], nodes={}))
        assert p.create == []
        ready = next(c for c in p.status["conditions"] if c["type"] == "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "VolumeSourceRefused"), ready
        assert "no volume source this operator accepts is left" in ready["message"]
