"""spec.canary and spec.shadow against the real API server, controller-manager and kwok pods:
the children appear with disjoint selectors, the Service moves to the router only once a
router pod is ready, a new share rolls the routers, removing the canary alone keeps it until
the routers run the config without it, and removing both returns the Service to the stable
pods and leaves no child behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from devcluster import Cluster
from kubeforge.controllers.inferenceservice import manifests as ch
from kubeforge_runtime.route.split import RouterConfig

from tests.cluster.test_inferenceservice_controller import apply, get, isvc, isvc_operator  # noqa: F401
from tests.fixtures.cluster import OperatorProcess, kubectl_json, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]
CANDIDATE = "s3://kubeforge/models/tiny-llama-ft"


def names(c: Cluster, ns: str, kind: str) -> set[str]:
    return {o["metadata"]["name"] for o in kubectl_json(c, "get", kind, "-n", ns)["items"]}


def selector(c: Cluster, ns: str) -> dict[str, str]:
    svc = get(c, ns, "service", "chat-server")
    return dict((svc or {}).get("spec", {}).get("selector") or {})


def traffic(c: Cluster, ns: str) -> dict[str, Any]:
    return dict(((get(c, ns, "inferenceservice", "chat") or {}).get("status") or {}).get("traffic") or {})


def router_digest(c: Cluster, ns: str) -> str:
    dep = get(c, ns, "deployment", "chat-router")
    assert dep is not None
    return str(dep["spec"]["template"]["metadata"]["annotations"][ch.ROUTER_CONFIG_ANNOTATION])


def test_a_canary_and_a_shadow_come_and_go(isvc_operator: OperatorProcess, namespace: str,  # noqa: F811
                                           tmp_path: Path) -> None:
    c = isvc_operator.cluster
    body = isvc("chat", canary={"model": {"uri": CANDIDATE}, "trafficPercent": 20},
                shadow={"model": {"uri": CANDIDATE}, "samplePercent": 50})
    apply(c, namespace, body)
    routed = {ch.ROLE_POD_LABEL: "chat.router"}
    wait_for("the Service on a ready router", lambda: selector(c, namespace) == routed and traffic(c, namespace)
             .get("routed") is True, 150)
    assert {"chat-server", "chat-canary", "chat-shadow", "chat-router"} <= names(c, namespace, "deployments")
    assert {"chat-server", "chat-stable", "chat-canary", "chat-shadow"} <= names(c, namespace, "services")
    assert "chat-router" in names(c, namespace, "poddisruptionbudgets")
    cm = get(c, namespace, "configmap", "chat-router")
    assert cm is not None
    cfg = RouterConfig.model_validate_json(cm["data"][ch.ROUTER_CONFIG_FILE])
    assert cfg.canary is not None and cfg.canary.percent == 20 and cfg.shadow is not None
    # the stable pods are only the stable Deployment's
    stable = kubectl_json(c, "get", "pods", "-n", namespace, "-l", ch.selector("chat"))["items"]
    assert {p["metadata"]["ownerReferences"][0]["name"].rsplit("-", 1)[0] for p in stable} == {"chat-server"}
    pods_of = {r: kubectl_json(c, "get", "pods", "-n", namespace, "-l", ch.role_selector("chat", r))["items"]
               for r in (ch.CANARY, ch.SHADOW, ch.ROUTER)}
    assert all(pods_of.values()), pods_of
    digest = router_digest(c, namespace)

    # a new share rolls the routers
    body["spec"]["canary"]["trafficPercent"] = 50
    apply(c, namespace, body)
    wait_for("the router rolled to the new share", lambda: router_digest(c, namespace) != digest, 60)
    wait_for("status.traffic.canary.percent 50", lambda: (traffic(c, namespace).get("canary") or {}).get(
        "percent") == 50, 60)

    # the canary alone goes: it is deleted once the routers run the config without it
    del body["spec"]["canary"]
    apply(c, namespace, body)
    wait_for("the canary deleted", lambda: "chat-canary" not in names(c, namespace, "deployments"), 120)
    current = router_digest(c, namespace)
    for p in kubectl_json(c, "get", "pods", "-n", namespace, "-l", ch.role_selector("chat", ch.ROUTER))["items"]:
        assert (p["metadata"].get("annotations") or {})[ch.ROUTER_CONFIG_ANNOTATION] == current, p["metadata"]
    cm = get(c, namespace, "configmap", "chat-router")
    assert cm is not None and RouterConfig.model_validate_json(cm["data"][ch.ROUTER_CONFIG_FILE]).canary is None
    assert selector(c, namespace) == routed

    # both gone: the Service back on the stable pods, no child of a role left
    del body["spec"]["shadow"]
    apply(c, namespace, body)
    wait_for("status.traffic gone", lambda: not traffic(c, namespace), 120)
    assert selector(c, namespace) == {ch.SERVICE_LABEL: "chat"}
    left = {k: {n for n in names(c, namespace, k) if n.startswith(("chat-canary", "chat-shadow", "chat-router",
                                                                      "chat-stable"))}
            for k in ("deployments", "services", "configmaps", "networkpolicies", "poddisruptionbudgets")}
    assert not any(left.values()), left
    reasons = {e["reason"] for e in kubectl_json(c, "get", "events", "-n", namespace, "--field-selector",
                                                 "involvedObject.name=chat")["items"]}
    assert {"CanaryStarted", "ShadowStarted", "TrafficRouted", "CanaryPercentChanged", "CanaryRemoved",
            "RouterRemoved", "TrafficUnrouted", "ShadowRemoved"} <= reasons, reasons
    print(json.dumps(sorted(reasons)))
