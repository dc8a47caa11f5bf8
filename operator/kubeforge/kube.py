"""The Kubernetes API client the controllers share: in-cluster credentials in a pod, the
kubeconfig (``KUBECONFIG``) elsewhere. kopf keeps its own connection for watching."""

from __future__ import annotations

import functools
import json
from typing import Any

import kubernetes


@functools.cache
def api_client() -> kubernetes.client.ApiClient:
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    return kubernetes.client.ApiClient()


def core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client())


def custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client())


def get_json(call: Any, *args: Any, **kwargs: Any) -> Any:
    """The object as the API server sent it (camelCase dicts), None on 404."""
    try:
        return json.loads(call(*args, _preload_content=False, **kwargs).data)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise
