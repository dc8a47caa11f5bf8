"""The chart's least-privilege defaults (issue 16 item 11), rendered with the project's helm:
no Secret reads outside the namespaces it is told of, the operator's NetworkPolicy on,
NetworkPolicy verbs for the workloads' policies, the hostPath admission policy, and the
operator's security settings from the values."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tools
import yaml

pytestmark = pytest.mark.unit
CHART = Path(__file__).resolve().parents[2] / "charts" / "kubeforge"


def render(*sets: str, check: bool = True) -> list[dict[str, Any]]:
    args = [str(tools.binary("helm")), "template", "kf", str(CHART), "-n", "ops", "--kube-version", "1.35.0"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def grants(docs: list[dict[str, Any]], resource: str) -> list[tuple[str, str, str]]:
    """(kind, name, namespace) of every (Cluster)Role granting ``resource``."""
    return [(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace", "")) for d in docs
            if d["kind"] in ("Role", "ClusterRole") and any(resource in r["resources"] for r in d["rules"])]


def bindings_of(docs: list[dict[str, Any]], role: str) -> list[tuple[str, str]]:
    return [(d["kind"], d["metadata"].get("namespace", "")) for d in docs
            if d["kind"] in ("RoleBinding", "ClusterRoleBinding") and d["roleRef"]["name"] == role]


def test_default_install_reads_no_secret_anywhere() -> None:
    docs = render()
    assert grants(docs, "secrets") == [("ClusterRole", "kf-kubeforge-secret-reader", "")]
    assert bindings_of(docs, "kf-kubeforge-secret-reader") == [], "the reader is bound only where asked"
    (main,) = (d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "kf-kubeforge")
    assert not any("secrets" in r["resources"] for r in main["rules"])


def test_secret_reads_follow_the_namespaces_named() -> None:
    watched = render("watchNamespaces={team-a,team-b}")
    assert bindings_of(watched, "kf-kubeforge-secret-reader") == [("RoleBinding", "team-a"), ("RoleBinding", "team-b")]
    named = render("watchNamespaces={team-a,team-b}", "rbac.secretNamespaces={team-a}")
    assert bindings_of(named, "kf-kubeforge-secret-reader") == [("RoleBinding", "team-a")]
    wide = render("rbac.secretsClusterWide=true")
    assert bindings_of(wide, "kf-kubeforge-secret-reader") == [("ClusterRoleBinding", "")]
    roles = render("rbac.clusterWide=false", "watchNamespaces={team-a}")
    assert ("Role", "kf-kubeforge", "team-a") in grants(roles, "secrets")
    assert bindings_of(roles, "kf-kubeforge-secret-reader") == []


@pytest.mark.parametrize("sets", [(), ("rbac.clusterWide=false", "watchNamespaces={team-a}")], ids=["cluster", "roles"])
def test_operator_may_manage_network_policies(sets: tuple[str, ...]) -> None:
    docs = render(*sets)
    rules = [r for d in docs if d["kind"] in ("Role", "ClusterRole") for r in d["rules"]
             if "networkpolicies" in r["resources"]]
    assert rules and rules[0]["apiGroups"] == ["networking.k8s.io"]
    assert set(rules[0]["verbs"]) == {"get", "list", "watch", "create", "patch", "delete"}


def test_operator_network_policy_is_on_by_default() -> None:
    (np,) = (d for d in render() if d["kind"] == "NetworkPolicy")
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert not [d for d in render("networkPolicy.enabled=false") if d["kind"] == "NetworkPolicy"]


def test_host_path_admission_policy_unless_allowed() -> None:
    docs = render("watchNamespaces={team-a}")
    (policy,) = (d for d in docs if d["kind"] == "ValidatingAdmissionPolicy")
    (binding,) = (d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding")
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["trainingjobs"]
    assert "hostPath" in policy["spec"]["validations"][0]["expression"]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a"]
    allowed = render("security.allowHostPathVolumes=true")
    assert not [d for d in allowed if d["kind"].startswith("ValidatingAdmissionPolicy")]


def env_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    (dep,) = (d for d in docs if d["kind"] == "Deployment")
    return {e["name"]: e.get("value", "") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_security_values_reach_the_operator() -> None:
    env = env_of(render())
    assert (env["KUBEFORGE_ALLOW_HOST_PATH_VOLUMES"], env["KUBEFORGE_NETWORK_POLICIES"],
            env["KUBEFORGE_SERVING_POLICY_CREDENTIALS"], json.loads(env["KUBEFORGE_SCRAPE_FROM"])) == (
        "false", "true", "false", [])
    env = env_of(render("security.allowHostPathVolumes=true", "workloadNetworkPolicies.enabled=false",
                        "security.servingPolicyCredentials=true",
                        "workloadNetworkPolicies.scrapeFrom[0].namespaceSelector.matchLabels.team=monitoring"))
    assert (env["KUBEFORGE_ALLOW_HOST_PATH_VOLUMES"], env["KUBEFORGE_NETWORK_POLICIES"],
            env["KUBEFORGE_SERVING_POLICY_CREDENTIALS"]) == ("true", "false", "true")
    assert json.loads(env["KUBEFORGE_SCRAPE_FROM"]) == [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}]
