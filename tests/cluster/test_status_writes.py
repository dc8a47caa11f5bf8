"""Status writes are conflict-safe against the real API server: ``k8s.update_status`` computes
the new status from what is stored and writes it only onto that version, so a write made in
between (another handler, another thread) is never reverted: it is read and built upon."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from devcluster import Cluster
from kubeforge import k8s
from kubeforge.api import InferenceService

from tests.fixtures.cluster import kubectl_json

pytestmark = pytest.mark.cluster


@pytest.fixture
def client(crds: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # the client reads KUBECONFIG when it is imported: point its default at the cluster's
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(crds.cfg.kubeconfig))
    k8s.api_client.cache_clear()
    yield
    k8s.api_client.cache_clear()


def test_a_write_made_in_between_is_built_upon_not_reverted(crds: Cluster, namespace: str, client: None) -> None:
    body = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "raced"},
            "spec": {"model": {"uri": "s3://kubeforge/models/x"}}}
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    k8s.patch_status(InferenceService.plural, namespace, "raced", {"replicas": 1})
    calls: list[dict[str, Any]] = []

    def compute(status: dict[str, Any]) -> dict[str, Any]:
        calls.append(status)
        if len(calls) == 1:  # another writer gets in between this read and the write
            k8s.patch_status(InferenceService.plural, namespace, "raced", {"readyReplicas": 1})
        return {"replicas": status.get("replicas", 0) + 1, "readyReplicas": status.get("readyReplicas", 0)}

    written = k8s.update_status(InferenceService.plural, namespace, "raced", compute)
    assert len(calls) == 2, "the conflict must make it read again"
    assert written == {"replicas": 2, "readyReplicas": 1}
    stored = kubectl_json(crds, "get", "inferenceservice", "raced", "-n", namespace)["status"]
    assert (stored["replicas"], stored["readyReplicas"]) == (2, 1)


def test_nothing_to_write_and_a_missing_object_write_nothing(crds: Cluster, namespace: str, client: None) -> None:
    assert k8s.update_status(InferenceService.plural, namespace, "absent", lambda st: {"replicas": 1}) is None
    body = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "same"},
            "spec": {"model": {"uri": "s3://kubeforge/models/x"}}}
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    version = kubectl_json(crds, "get", "inferenceservice", "same", "-n", namespace)["metadata"]["resourceVersion"]
    assert k8s.update_status(InferenceService.plural, namespace, "same", lambda st: None) is None
    assert kubectl_json(crds, "get", "inferenceservice", "same", "-n", namespace)["metadata"][
        "resourceVersion"] == version
