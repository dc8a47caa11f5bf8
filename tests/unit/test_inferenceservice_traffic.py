"""An InferenceService's canary, shadow and router as pure functions: the revisions' children
never overlap the stable pods' selector, the router's config is what the router reads, who may
reach whom, and status.traffic."""

from __future__ import annotations

from typing import Any

import pytest
from kubeforge.api import InferenceServiceSpec
from kubeforge.controllers.inferenceservice import manifests as ch
from kubeforge.controllers.inferenceservice import plan as ctl
from kubeforge.controllers.inferenceservice.manifests import Owner, ResolvedCapture, ResolvedModel
from kubeforge_runtime.route.split import RouterConfig
from pydantic import ValidationError

pytestmark = pytest.mark.unit
OWNER = Owner("chat", "team-a", "uid-1")
STABLE = ResolvedModel(uri="s3://kubeforge/team-a/job/export", revision="2026-01-01T00:00:00.000Z")
CANDIDATE = ResolvedModel(uri="s3://kubeforge/team-a/job-ft/export", revision="2026-02-01T00:00:00.000Z")
CAPTURE = ResolvedCapture(uri="s3://kubeforge/team-a/chat/capture", credentials_secret="s3")


def spec(**over: Any) -> InferenceServiceSpec:
    base: dict[str, Any] = {"model": {"uri": STABLE.uri}, "replicas": 3,
                            "logging": {"store": {"uri": "s3://kubeforge", "credentialsSecretRef": {"name": "s3"}}}}
    base.update(over)
    return InferenceServiceSpec.model_validate(base)


CANARY = {"model": {"uri": CANDIDATE.uri}, "trafficPercent": 20, "replicas": 2}
SHADOW = {"model": {"uri": CANDIDATE.uri}, "samplePercent": 50}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_the_revisions_pods_never_match_the_stable_selector_and_the_stable_deployment_is_unchanged() -> None:
    s = spec(canary=CANARY, shadow=SHADOW)
    stable = ch.build_deployment(OWNER, s, STABLE, capture=CAPTURE)
    assert stable == ch.build_deployment(OWNER, spec(), STABLE, capture=CAPTURE)
    stable_selector = stable["spec"]["selector"]["matchLabels"]
    seen = []
    for role in (ch.CANARY, ch.SHADOW):
        dep = ch.build_deployment(OWNER, s, CANDIDATE, capture=CAPTURE, role=role)
        assert dep["metadata"]["name"] == f"chat-{role}"
        # the handlers find the owner by SERVICE_LABEL on the object, the role by ROLE_LABEL
        assert dep["metadata"]["labels"][ch.SERVICE_LABEL] == "chat"
        assert dep["metadata"]["labels"][ch.ROLE_LABEL] == role
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert not matches(stable_selector, pod_labels)
        assert matches(dep["spec"]["selector"]["matchLabels"], pod_labels)
        assert not matches(dep["spec"]["selector"]["matchLabels"], stable["spec"]["template"]["metadata"]["labels"])
        seen.append(dep)
    canary, shadow = seen
    assert canary["spec"]["replicas"] == 2 and shadow["spec"]["replicas"] == 1
    args = canary["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == CANDIDATE.uri and "--capture-uri" in args
    # the canary answers users (its traffic is data); a shadow's answers are never seen
    assert "--capture-uri" not in shadow["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not matches(canary["spec"]["selector"]["matchLabels"], shadow["spec"]["template"]["metadata"]["labels"])


def test_the_router_config_is_what_the_router_reads() -> None:
    s = spec(canary=CANARY, shadow=SHADOW, routing={"sessionHeader": "x-user"})
    cfg = RouterConfig.model_validate(ch.router_config(OWNER, s))
    assert cfg.stable.url == "http://chat-stable.team-a.svc.cluster.local:8000" and cfg.stable.revision == "stable"
    assert cfg.canary is not None and cfg.canary.percent == 20 and cfg.canary.url.startswith("http://chat-canary.")
    assert cfg.shadow is not None and cfg.shadow.percent == 50 and cfg.session_header == "x-user"
    cm = ch.build_router_configmap(OWNER, s)
    assert RouterConfig.model_validate_json(cm["data"][ch.ROUTER_CONFIG_FILE]) == cfg
    only_canary = RouterConfig.model_validate(ch.router_config(OWNER, spec(canary=CANARY)))
    assert only_canary.shadow is None


def test_the_router_deployment_rolls_when_its_config_changes() -> None:
    s = spec(canary=CANARY)
    dep = ch.build_router_deployment(OWNER, s, "img:1")
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert dep["metadata"]["name"] == "chat-router" and dep["spec"]["replicas"] == 2
    assert c["command"] == ["python", "-m", "kubeforge_runtime.route"] and c["image"] == "img:1"
    assert c["args"][:2] == ["--config", f"{ch.ROUTER_CONFIG_DIR}/{ch.ROUTER_CONFIG_FILE}"]
    assert pod["spec"]["volumes"][0] == {"name": "config", "configMap": {"name": "chat-router"}}
    assert "nvidia.com/gpu" not in str(c["resources"])  # a CPU pod, allowed onto GPU nodes
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    before = pod["metadata"]["annotations"][ch.ROUTER_CONFIG_ANNOTATION]
    after = ch.build_router_deployment(OWNER, spec(canary={**CANARY, "trafficPercent": 50}), "img:1")
    assert after["spec"]["template"]["metadata"]["annotations"][ch.ROUTER_CONFIG_ANNOTATION] != before
    assert pod["metadata"]["labels"][ch.ROLE_POD_LABEL] == "chat.router"
    assert ch.SERVICE_LABEL not in pod["metadata"]["labels"]


def test_the_routers_have_their_own_disruption_budget() -> None:
    pdb = ch.build_pdb(OWNER, spec(canary=CANARY), ch.ROUTER)
    assert pdb["metadata"]["name"] == "chat-router" and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == {ch.ROLE_POD_LABEL: "chat.router"}
    assert ch.build_pdb(OWNER, spec()) == ch.build_pdb(OWNER, spec(canary=CANARY))  # the stable one unchanged


def test_the_service_selects_the_router_or_the_stable_pods() -> None:
    stable_pods = ch.build_deployment(OWNER, spec(), STABLE)["spec"]["template"]["metadata"]["labels"]
    router_pods = ch.build_router_deployment(OWNER, spec(canary=CANARY))["spec"]["template"]["metadata"]["labels"]
    plain, routed = ch.build_service(OWNER), ch.build_service(OWNER, to_router=True)
    assert plain["metadata"]["name"] == routed["metadata"]["name"] == "chat-server"
    assert matches(plain["spec"]["selector"], stable_pods) and not matches(plain["spec"]["selector"], router_pods)
    assert matches(routed["spec"]["selector"], router_pods) and not matches(routed["spec"]["selector"], stable_pods)
    to_stable = ch.build_role_service(OWNER, ch.STABLE)
    assert to_stable["metadata"]["name"] == "chat-stable" and to_stable["spec"]["selector"] == plain["spec"]["selector"]


def test_who_may_reach_whom() -> None:
    s = spec(canary=CANARY, network={"allowedClients": [{"podSelector": {"matchLabels": {"app": "web"}}}]})
    scrape = ({"namespaceSelector": {"matchLabels": {"name": "monitoring"}}},)
    router_peer = {"podSelector": {"matchLabels": {ch.ROLE_POD_LABEL: "chat.router"}}}
    web = {"podSelector": {"matchLabels": {"app": "web"}, "matchExpressions": []}}

    def peers(role: str, sp: InferenceServiceSpec = s) -> list[dict[str, Any]]:
        return list(ch.build_network_policy(OWNER, sp, scrape, role)["spec"]["ingress"][0]["from"])

    assert peers(ch.STABLE) == [web, router_peer, *scrape]
    assert peers(ch.ROUTER) == [web, *scrape]
    assert peers(ch.CANARY) == [router_peer, *scrape]  # only through the router
    assert peers(ch.STABLE, spec()) == [{"podSelector": {}}, *scrape]  # unrouted: as before
    # while a router pod drains after canary and shadow went, the stable pods still admit it
    drained = ch.build_network_policy(OWNER, spec(), scrape, ch.STABLE, router_peer=True)["spec"]["ingress"][0]["from"]
    assert router_peer in drained
    pol = ch.build_network_policy(OWNER, s, scrape, ch.CANARY)
    assert pol["metadata"]["name"] == "chat-canary"
    assert pol["spec"]["podSelector"]["matchLabels"] == {ch.ROLE_POD_LABEL: "chat.canary"}


def test_traffic_status() -> None:
    s = spec(canary=CANARY)
    dep = ch.build_deployment(OWNER, s, CANDIDATE, role=ch.CANARY)
    dep["status"] = {"replicas": 2, "readyReplicas": 1}
    ok = ctl.ModelResolution(True, "ModelURI", "serving", CANDIDATE)
    router = {"status": {"readyReplicas": 2}}
    st = ctl.traffic_status(s, {ch.CANARY: ctl.RevisionView(20, ok, dep)}, router, True)
    assert st == {"routed": True, "draining": [], "routerReadyReplicas": 2, "shadow": None,
                  "canary": {"percent": 20, "replicas": 2, "readyReplicas": 1, "message": None,
                             "model": {"uri": CANDIDATE.uri, "revision": CANDIDATE.revision}}}
    waiting = ctl.ModelResolution(False, "WaitingForTrainingJob", "TrainingJob ft does not exist")
    st = ctl.traffic_status(s, {ch.CANARY: ctl.RevisionView(20, waiting, None)}, None, False)
    assert st is not None and st["routed"] is False and st["canary"]["message"] == "TrainingJob ft does not exist"
    dep["status"] = {"replicas": 1, "readyReplicas": 0}
    st = ctl.traffic_status(s, {ch.CANARY: ctl.RevisionView(20, ok, dep, "ImagePullBackOff")}, router, True)
    assert st is not None and st["canary"]["message"] == (
        "no pod ready (ImagePullBackOff); its share goes to the stable revision")
    assert ctl.traffic_status(spec(), {}, None, False) is None
    # canary and shadow removed, the router's pods still draining: the status says what waits
    st = ctl.traffic_status(spec(), {}, None, False, [ch.CANARY])
    assert st is not None and st["draining"] == ["canary"] and st["routed"] is False


@pytest.mark.parametrize(("over", "field"), [
    ({"canary": {**CANARY, "trafficPercent": 120}}, "trafficPercent"),
    ({"shadow": {**SHADOW, "samplePercent": -1}}, "samplePercent"),
    ({"canary": {"trafficPercent": 10}}, "model"),
    ({"routing": {"sessionHeader": "x user"}}, "sessionHeader"),
])
def test_bad_traffic_fields_name_the_field(over: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        spec(**over)


def test_the_canary_example_parses_and_is_routed() -> None:
    import yaml
    from kubeforge.controllers.inferenceservice.manifests import routed

    from tests.fixtures.cluster import REPO

    doc = yaml.safe_load((REPO / "examples/09-inferenceservice-canary.yaml").read_text())
    s = InferenceServiceSpec.model_validate(doc["spec"])
    assert routed(s) and s.canary is not None and s.canary.traffic_percent == 10
    assert RouterConfig.model_validate(ch.router_config(Owner(doc["metadata"]["name"], "ns", "u"), s)).shadow
