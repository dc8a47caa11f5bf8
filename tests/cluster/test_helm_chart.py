"""The Helm chart against the local control plane: lint --strict, the schema, every values
variant rendered and applied with --dry-run=server, install of the first released chart then
upgrade to the working tree then uninstall leaving nothing, and the operator running with
only its ServiceAccount's permissions reconciling every example without one RBAC denial.

Release names carry the test namespace, so the ClusterRoles of tests running side by side on
the shared cluster never collide."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import tools
import yaml
from devcluster import Cluster

from tests.fixtures.cluster import REPO, OperatorProcess, kubectl_json, wait_for

pytestmark = pytest.mark.cluster
CHART = REPO / "charts" / "kubeforge"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
KUBE_VERSION = tools.versions()["KUBERNETES_VERSION"]
DENIED = re.compile(r"\b403\b|forbidden|Not enough permissions", re.IGNORECASE)


def helm(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([str(tools.binary("helm")), "--kubeconfig", str(cluster.cfg.kubeconfig), *args],
                         capture_output=True, text=True, check=False, timeout=300)
    if check:
        assert out.returncode == 0, f"helm {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


def render(cluster: Cluster, release: str, namespace: str, *args: str) -> list[dict[str, Any]]:
    out = helm(cluster, "template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION, *args)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def release_of(namespace: str) -> str:
    return f"kf-{namespace}"


# ---------------------------------------------------------------------------- static


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "default")
def test_helm_lint_strict(cluster: Cluster, values: Path | None) -> None:
    out = helm(cluster, "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION,
               *(["-f", str(values)] if values else []), check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_values_schema_rejects_unknown_and_bad_values(cluster: Cluster) -> None:
    for bad, named in [(["--set", "logLevel=LOUD"], "logLevel"), (["--set", "nosuchkey=1"], "nosuchkey"),
                       (["--set", "rbac.wildcard=true"], "wildcard"), (["--set", "replicaCount=-1"], "replicaCount"),
                       (["--set", "metrics.prometheusRule.restartingFor=soon"], "restartingFor"),
                       (["--set", "watchNamespaces={Bad_Name}"], "watchNamespaces")]:
        out = helm(cluster, "template", "x", str(CHART), "--kube-version", KUBE_VERSION, *bad, check=False)
        assert out.returncode != 0 and named in out.stderr, (bad, out.stderr)
    out = helm(cluster, "template", "x", str(CHART), "--kube-version", KUBE_VERSION,
               "--set", "rbac.clusterWide=false", check=False)
    assert out.returncode != 0 and "watchNamespaces" in out.stderr


def test_schema_describes_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(v: Any, s: dict[str, Any], path: str) -> None:
        assert "type" in s, f"{path} has no type in values.schema.json"
        if isinstance(v, dict) and s.get("type") == "object" and "properties" in s:
            assert s.get("additionalProperties") is False or path in ("",), f"{path} accepts unknown keys"
            for k, sub in v.items():
                assert k in s["properties"], f"{path}.{k} is not in values.schema.json"
                walk(sub, s["properties"][k], f"{path}.{k}")

    walk(values, schema, "")


def test_rbac_has_no_wildcards_and_matches_the_mode(cluster: Cluster) -> None:
    docs = render(cluster, "x", "ops", "--set", "rbac.clusterWide=false", "--set", "watchNamespaces={a,b}")
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
    # the operator's ClusterRole; <fullname>-secret-reader is bound per namespace (docs/security.md)
    (cluster_role,) = (r for r in roles if r["kind"] == "ClusterRole" and r["metadata"]["name"] == "x-kubeforge")
    assert {res for rule in cluster_role["rules"] for res in rule["resources"]} == {
        "nodes", "namespaces", "customresourcedefinitions"}, "namespaced objects must come from the Roles"
    assert sorted(r["metadata"]["namespace"] for r in roles if r["kind"] == "Role") == ["a", "b"]
    wide = render(cluster, "x", "ops")
    assert not [d for d in wide if d["kind"] == "Role"]


def test_one_active_operator(cluster: Cluster) -> None:
    (single,) = (d for d in render(cluster, "x", "ops") if d["kind"] == "Deployment")
    assert single["spec"]["replicas"] == 1 and single["spec"]["strategy"]["type"] == "Recreate"
    assert not any(a.startswith("--peering") for a in single["spec"]["template"]["spec"]["containers"][0]["args"])
    docs = render(cluster, "x", "ops", "--set", "replicaCount=2")
    (ha,) = (d for d in docs if d["kind"] == "Deployment")
    assert "--peering=kubeforge" in ha["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {d["kind"] for d in docs} >= {"CustomResourceDefinition", "ClusterKopfPeering"}
    (role,) = (d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "x-kubeforge")
    assert "clusterkopfpeerings" in {res for rule in role["rules"] for res in rule["resources"]}
    # a ClusterRole with a namespace list: kopf peers through KopfPeering objects in those namespaces
    docs = render(cluster, "x", "ops", "--set", "replicaCount=2", "--set", "watchNamespaces={a}")
    (role,) = (d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "x-kubeforge")
    resources = {res for rule in role["rules"] for res in rule["resources"]}
    assert "kopfpeerings" in resources and "clusterkopfpeerings" not in resources
    assert [d["metadata"]["namespace"] for d in docs if d["kind"] == "KopfPeering"] == ["a"]


def test_no_service_link_variable_shadows_an_operator_setting(cluster: Cluster) -> None:
    """Found on the real nodes: released as "kubeforge" (as the docs do), the metrics Service
    made the kubelet inject KUBEFORGE_METRICS_PORT=tcp://..., and the operator crashed parsing it."""
    docs = render(cluster, "kubeforge", "kubeforge-system")
    (dep,) = (d for d in docs if d["kind"] == "Deployment")
    services = [d["metadata"]["name"] for d in docs if d["kind"] == "Service"]
    links = {f"{n.upper().replace('-', '_')}_{suffix}" for n in services for suffix in ("PORT", "SERVICE_HOST")}
    assert dep["spec"]["template"]["spec"].get("enableServiceLinks") is False or not any(
        link.startswith("KUBEFORGE_") for link in links), links


def test_workload_image_is_a_chart_value(cluster: Cluster) -> None:
    def env(*args: str) -> dict[str, str]:
        (dep,) = (d for d in render(cluster, "x", "ops", *args) if d["kind"] == "Deployment")
        return {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}

    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert env()["KUBEFORGE_WORKLOAD_IMAGE"] == f"ghcr.io/kubeforge/trainer:{app_version}"
    assert env("--set", "workloadImage.repository=mirror.example/kf/trainer", "--set", "workloadImage.tag=1-cpu")[
        "KUBEFORGE_WORKLOAD_IMAGE"] == "mirror.example/kf/trainer:1-cpu"


def test_operator_down_alert_needs_the_chart_scrape_job(cluster: Cluster) -> None:
    def alerts(*args: str) -> set[str]:
        (rule,) = (d for d in render(cluster, "x", "ops", "--set", "metrics.prometheusRule.enabled=true", *args)
                   if d["kind"] == "PrometheusRule")
        return {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}

    # without the ServiceMonitor no scrape job carries the label it matches: it would always fire
    assert "KubeforgeOperatorDown" not in alerts() and "KubeforgeCheckpointStale" in alerts()
    assert "KubeforgeOperatorDown" in alerts("--set", "metrics.serviceMonitor.enabled=true")


# ---------------------------------------------------------------------------- server-side dry-run


def _ensure_namespace(cluster: Cluster, name: str) -> None:
    if cluster.kubectl("get", "namespace", name, check=False).returncode != 0:
        cluster.kubectl("create", "namespace", name, check=False)
        cluster.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted",
                        "kubeforge.dev/test=true", "--overwrite")


def _install_crds_rendered(cluster: Cluster, docs: list[dict[str, Any]]) -> None:
    """CRDs the chart itself renders (kopf's peering) must exist before objects of their kinds
    can be dry-run; they are inert on a shared cluster."""
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    if crds:
        stream = "\n---\n".join(yaml.safe_dump(d) for d in crds)
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=stream)
        for d in crds:
            cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{d['metadata']['name']}")


@pytest.fixture(scope="module")
def monitoring_crds(crds: Cluster) -> Cluster:
    """prometheus-operator's CRDs (from its Go module) for ServiceMonitor, PodMonitor, PrometheusRule."""
    folder = tools.prometheus_operator_crds()
    files = [folder / f"monitoring.coreos.com_{k}.yaml" for k in ("servicemonitors", "podmonitors", "prometheusrules")]
    for f in files:
        crds.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(f))
        crds.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(f))
    return crds


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "default")
def test_rendered_chart_passes_server_side_dry_run(monitoring_crds: Cluster, namespace: str,
                                                   values: Path | None) -> None:
    cluster = monitoring_crds
    args = ["-f", str(values)] if values else []
    for ns in (yaml.safe_load(values.read_text()) or {}).get("watchNamespaces", []) if values else []:
        _ensure_namespace(cluster, ns)
    docs = render(cluster, release_of(namespace), namespace, *args)
    _install_crds_rendered(cluster, docs)
    stream = "\n---\n".join(yaml.safe_dump(d) for d in docs)
    out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=stream, check=False)
    assert out.returncode == 0, out.stderr
    assert "violate PodSecurity" not in out.stderr, out.stderr
    applied = len([line for line in out.stdout.splitlines() if "(server dry run)" in line])
    assert applied == len(docs), out.stdout


# ---------------------------------------------------------------------------- install, upgrade, uninstall


def _first_released_chart(dest: Path) -> Path:
    """The chart as first committed (the 0.1.0 skeleton users may have installed)."""
    first = subprocess.run(["git", "-C", str(REPO), "log", "--diff-filter=A", "--format=%H", "--",
                            "charts/kubeforge/Chart.yaml"], capture_output=True, text=True, check=True).stdout.split()[-1]
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", first, "charts/kubeforge"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "charts" / "kubeforge"


def _left_behind(cluster: Cluster, namespace: str, release: str) -> list[str]:
    out = cluster.kubectl("get", "deployment,serviceaccount,service,role,rolebinding,configmap", "-n", namespace,
                          "-l", f"app.kubernetes.io/instance={release}", "-o", "name").stdout.split()
    for kind in ("clusterrole", "clusterrolebinding"):
        if cluster.kubectl("get", kind, release, check=False).returncode == 0:
            out.append(f"{kind}/{release}")
    return out


def test_install_upgrade_uninstall(crds: Cluster, namespace: str, tmp_path: Path) -> None:
    release = release_of(namespace)
    fullname = f"{release}-kubeforge"
    old = _first_released_chart(tmp_path)
    try:
        # --skip-crds: the cluster has the current CRDs (Helm never upgrades crds/ anyway)
        helm(crds, "install", release, str(old), "-n", namespace, "--skip-crds", "--wait", "--timeout", "120s",
             "--set", "watchNamespaces={" + namespace + "}")
        helm(crds, "upgrade", release, str(CHART), "-n", namespace, "--wait", "--timeout", "120s",
             "--set", "watchNamespaces={" + namespace + "}", "--set", "rbac.clusterWide=false")
        deploy = kubectl_json(crds, "get", "deployment", fullname, "-n", namespace)
        pod_spec = deploy["spec"]["template"]["spec"]
        assert pod_spec["securityContext"]["runAsNonRoot"] is True
        assert f"--namespace={namespace}" in pod_spec["containers"][0]["args"]
        assert deploy["spec"]["strategy"]["type"] == "Recreate"
        wait_for("operator pod available (kwok)", lambda: kubectl_json(
            crds, "get", "deployment", fullname, "-n", namespace)["status"].get("availableReplicas") == 1, 90)
        role = kubectl_json(crds, "get", "role", fullname, "-n", namespace)
        assert any("trainingjobs" in r["resources"] for r in role["rules"])
        cluster_role = kubectl_json(crds, "get", "clusterrole", fullname)
        assert not any("pods" in r["resources"] for r in cluster_role["rules"]), "upgrade must narrow the ClusterRole"
        history = json.loads(helm(crds, "history", release, "-n", namespace, "-o", "json").stdout)
        assert [h["status"] for h in history] == ["superseded", "deployed"]
    finally:
        out = helm(crds, "uninstall", release, "-n", namespace, "--wait", check=False)
    assert out.returncode == 0, out.stderr
    assert _left_behind(crds, namespace, release) == []
    for kind in ("clusterrole", "clusterrolebinding"):
        assert crds.kubectl("get", kind, fullname, check=False).returncode != 0, f"{kind} {fullname} left behind"


# ---------------------------------------------------------------------------- the operator with its own permissions


def _token_kubeconfig(cluster: Cluster, namespace: str, sa: str, path: Path) -> Path:
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(cluster.cfg.kubeconfig.read_text())
    server = admin["clusters"][0]["cluster"]
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "sa",
           "clusters": [{"name": "local", "cluster": server}],
           "users": [{"name": sa, "user": {"token": token}}],
           "contexts": [{"name": "sa", "context": {"cluster": "local", "user": sa, "namespace": namespace}}]}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _s3_secret(cluster: Cluster, namespace: str) -> None:
    s3 = cluster.s3_settings()
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kubeforge-s3", "namespace": namespace},
              "data": {k: base64.b64encode(s3[k].encode()).decode()
                       for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(secret))


def _observed(cluster: Cluster, namespace: str, resource: str) -> bool:
    obj = kubectl_json(cluster, "get", resource, "-n", namespace)
    return (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]


@pytest.mark.parametrize("cluster_wide", [False, True], ids=["roles", "clusterrole"])
def test_operator_with_its_serviceaccount_reconciles_examples_without_denials(
        crds: Cluster, namespace: str, tmp_path: Path, cluster_wide: bool) -> None:
    release = release_of(namespace)
    fullname = f"{release}-kubeforge"
    helm(crds, "install", release, str(CHART), "-n", namespace, "--set", "watchNamespaces={" + namespace + "}",
         "--set", f"rbac.clusterWide={str(cluster_wide).lower()}", "--set", "replicaCount=0")
    op = OperatorProcess(crds, tmp_path / "operator.log", namespaces=(namespace,),
                         extra_env={"KUBECONFIG": str(_token_kubeconfig(crds, namespace, fullname,
                                                                         tmp_path / "sa.kubeconfig")),
                                    "KUBEFORGE_RETENTION_INTERVAL_SECONDS": "5"})
    try:
        whoami = subprocess.run([str(tools.binary("kubectl")), "--kubeconfig", str(tmp_path / "sa.kubeconfig"),
                                 "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"],
                                capture_output=True, text=True, check=True).stdout
        assert whoami == f"system:serviceaccount:{namespace}:{fullname}"
        _s3_secret(crds, namespace)
        op.start()
        for example in EXAMPLES:
            crds.kubectl("apply", "-n", namespace, "-f", str(example))
        log_path = tmp_path / "operator.log"

        def no_denials() -> bool:
            denials = [line for line in log_path.read_text(errors="replace").splitlines() if DENIED.search(line)]
            assert not denials, "RBAC denials:\n" + "\n".join(denials[:20])
            return True

        names = [f"{d['kind'].lower()}.kubeforge.dev/{d['metadata']['name']}"
                 for f in EXAMPLES for d in yaml.safe_load_all(f.read_text()) if d]
        for res in names:
            wait_for(f"{res} observed", lambda res=res: no_denials() and _observed(crds, namespace, res), 90)
        # the paths that delete: suspending a job deletes its pods, dropping autoscaling deletes the HPA
        wait_for("worker pods", lambda: crds.kubectl("get", "pods", "-n", namespace, "-l",
                                                     "kubeforge.dev/job-name=tiny-llama", "-o", "name").stdout, 60)
        wait_for("HPA", lambda: crds.kubectl("get", "hpa", "-n", namespace, "-o", "name").stdout, 60)
        crds.kubectl("patch", "trainingjob.kubeforge.dev/tiny-llama", "-n", namespace, "--type=merge",
                     "-p", '{"spec": {"suspend": true}}')
        crds.kubectl("patch", "inferenceservice.kubeforge.dev/tiny-llama", "-n", namespace, "--type=json",
                     "-p", '[{"op": "remove", "path": "/spec/autoscaling"}]')
        wait_for("job suspended", lambda: kubectl_json(crds, "get", "trainingjob.kubeforge.dev/tiny-llama", "-n",
                                                       namespace).get("status", {}).get("phase") == "Suspended", 60)
        wait_for("worker pods deleted", lambda: not crds.kubectl(
            "get", "pods", "-n", namespace, "-l", "kubeforge.dev/job-name=tiny-llama,kubeforge.dev/role=worker",
            "-o", "name").stdout, 60)
        wait_for("HPA deleted", lambda: not crds.kubectl("get", "hpa", "-n", namespace, "-o", "name").stdout, 60)
        # a volume policy: its store inspector pod is created and read back (claim unbound here: Pending)
        crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ckpt"},
             "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}))
        crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(
            {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "CheckpointPolicy", "metadata": {"name": "on-volume"},
             "spec": {"schedule": {"everySteps": 10}, "storage": {"volume": {"claimName": "ckpt"}}}}))
        wait_for("inspector pending", lambda: no_denials() and any(
            c.get("type") == "Inspected" and c.get("reason") == "InspectorPending"
            for c in (kubectl_json(crds, "get", "checkpointpolicy", "on-volume", "-n", namespace).get("status") or {})
            .get("conditions", [])), 90)
        events = kubectl_json(crds, "get", "events", "-n", namespace)["items"]
        assert any(e["reason"] == "AutoscalerRemoved" for e in events), "events were not posted"
        no_denials()
    finally:
        # while the operator and its Role live: kopf removes the finalizers it added
        crds.kubectl("delete", "kubeforge", "--all", "-n", namespace, "--timeout=60s", check=False)
        op.stop()
        helm(crds, "uninstall", release, "-n", namespace, check=False)


def test_argocd_application_values_fit_the_chart(cluster: Cluster, tmp_path: Path) -> None:
    app = yaml.safe_load((REPO / "deploy" / "argocd" / "application.yaml").read_text())
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(app["spec"]["source"]["helm"]["valuesObject"]))
    kinds = {d["kind"] for d in render(cluster, "kubeforge", "kubeforge-system", "-f", str(values))}
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds
