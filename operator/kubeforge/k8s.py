"""The Kubernetes API as the controllers use it, in one place: the client (in-cluster
credentials in a pod, the kubeconfig elsewhere), reads that answer None for a missing object,
server-side apply under one field manager, deletes that ignore a missing object, status
patches (with a resourceVersion precondition when asked), Secrets and Events.

Reads come back as the API server sent them (camelCase dicts), the form the pure plans take.
kopf keeps its own connection for watching."""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any, cast

import kubernetes

from kubeforge.api.common import API_VERSION, GROUP, VERSION

log = logging.getLogger(__name__)

#: The field manager of every server-side apply and status write of the operator.
FIELD_MANAGER = "kubeforge"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
#: Who posts the operator's Events.
COMPONENT = "kubeforge-operator"

Object = dict[str, Any]


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


def apps() -> kubernetes.client.AppsV1Api:
    return kubernetes.client.AppsV1Api(api_client())


def autoscaling() -> kubernetes.client.AutoscalingV2Api:
    return kubernetes.client.AutoscalingV2Api(api_client())


def policy() -> kubernetes.client.PolicyV1Api:
    return kubernetes.client.PolicyV1Api(api_client())


def networking() -> kubernetes.client.NetworkingV1Api:
    return kubernetes.client.NetworkingV1Api(api_client())


def get_or_none(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Object | None:
    """The object (or list) as the API server sent it; None on 404."""
    try:
        return cast(Object, json.loads(call(*args, _preload_content=False, **kwargs).data))
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise


def get_custom(namespace: str, plural: str, name: str) -> Object | None:
    """One of our custom resources, or None."""
    return get_or_none(custom().get_namespaced_custom_object, GROUP, VERSION, namespace, plural, name)


def list_custom(namespace: str, plural: str, selector: str | None = None) -> list[Object]:
    kwargs = {"label_selector": selector} if selector else {}
    listed = get_or_none(custom().list_namespaced_custom_object, GROUP, VERSION, namespace, plural, **kwargs)
    return list((listed or {}).get("items") or [])


def patch_custom(namespace: str, plural: str, name: str, body: Mapping[str, Any],
                 resource_version: str | None = None) -> bool:
    """Merge-patch one of our resources (spec or metadata; None deletes a field). With
    ``resource_version`` only onto that version: False when it changed meanwhile (or is gone)."""
    patch: Object = dict(body)
    if resource_version is not None:
        patch["metadata"] = {**dict(patch.get("metadata") or {}), "resourceVersion": resource_version}
    try:
        custom().patch_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, patch, _content_type=MERGE)
    except kubernetes.client.ApiException as e:
        if e.status == 404 or (resource_version is not None and e.status == 409):
            return False
        raise
    return True


def list_pods(namespace: str, selector: str) -> list[Object]:
    listed = get_or_none(core().list_namespaced_pod, namespace, label_selector=selector)
    return list((listed or {}).get("items") or [])


def _apply_call(kind: str) -> Callable[..., Any]:
    calls: dict[str, Callable[[], Callable[..., Any]]] = {
        "ConfigMap": lambda: core().patch_namespaced_config_map,
        "Service": lambda: core().patch_namespaced_service,
        "Deployment": lambda: apps().patch_namespaced_deployment,
        "PodDisruptionBudget": lambda: policy().patch_namespaced_pod_disruption_budget,
        "HorizontalPodAutoscaler": lambda: autoscaling().patch_namespaced_horizontal_pod_autoscaler,
        "NetworkPolicy": lambda: networking().patch_namespaced_network_policy,
    }
    return calls[kind]()


def apply(obj: Object) -> Object:
    """Server-side apply as ``kubeforge`` (forced): creates, updates what changed, and removes
    the fields we stop sending. Returns the object as stored."""
    meta = obj["metadata"]
    resp = _apply_call(obj["kind"])(meta["name"], meta["namespace"], obj, field_manager=FIELD_MANAGER, force=True,
                                    _content_type=APPLY, _preload_content=False)
    return cast(Object, json.loads(resp.data))


def create(call: Callable[..., Any], namespace: str, obj: Object) -> bool:
    """Create ``obj``; False when it exists already (409)."""
    try:
        call(namespace, obj)
    except kubernetes.client.ApiException as e:
        if e.status == 409:
            return False
        raise
    return True


def delete(call: Callable[..., Any], *args: Any, ignore: tuple[int, ...] = (404,), **kwargs: Any) -> bool:
    """Delete, ignoring a missing object (and the statuses in ``ignore``); False when ignored."""
    try:
        call(*args, **kwargs)
    except kubernetes.client.ApiException as e:
        if e.status in ignore:
            return False
        raise
    return True


def delete_pod(name: str, namespace: str, uid: str | None = None, force: bool = False) -> bool:
    """Delete a pod (only the incarnation ``uid`` when given: a 409 then means it is gone);
    ``force`` skips the grace period, for a pod on a lost node."""
    grace = 0 if force else None
    body = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(uid=uid),
                                             grace_period_seconds=grace) if uid else None
    return delete(core().delete_namespaced_pod, name, namespace, body=body, grace_period_seconds=grace,
                  ignore=(404, 409))


def patch_status(plural: str, namespace: str, name: str, status: Mapping[str, Any],
                 resource_version: str | None = None) -> bool:
    """Merge-patch ``status`` of one of our resources. With ``resource_version`` the write
    applies only to that version: False when the object changed meanwhile (or is gone)."""
    body: Object = {"status": dict(status)}
    if resource_version is not None:
        body["metadata"] = {"resourceVersion": resource_version}
    try:
        custom().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, plural, name, body,
                                                       _content_type=MERGE)
    except kubernetes.client.ApiException as e:
        if resource_version is not None and e.status in (404, 409):
            return False
        raise
    return True


def update_status(plural: str, namespace: str, name: str,
                  compute: Callable[[dict[str, Any]], dict[str, Any] | None], attempts: int = 5) -> dict[str, Any] | None:
    """Read the object, ``compute`` its new status from what is stored (None: nothing to
    write), write it only onto that version; on a conflict read and compute again. A write
    never reverts one made in between (by another handler or thread). Returns what was
    written, or None (nothing to write, or the object is gone)."""
    for _ in range(attempts):
        obj = get_custom(namespace, plural, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None
        status = compute(dict(obj.get("status") or {}))
        if status is None:
            return None
        if patch_status(plural, namespace, name, status, resource_version=obj["metadata"]["resourceVersion"]):
            return status
    raise RuntimeError(f"status of {plural}/{namespace}/{name} kept changing under {attempts} writes")


class SecretForbidden(Exception):
    """The operator may not read a Secret: the chart grants Secret reads only in the namespaces
    it was told of (rbac.secretNamespaces, the watchNamespaces)."""

    def __init__(self, namespace: str, name: str) -> None:
        super().__init__(f"the operator may not get Secret {name} in namespace {namespace} (403): add {namespace} "
                         "to the chart's rbac.secretNamespaces (or bind the ClusterRole <release>-secret-reader there)")


def read_secret(namespace: str, name: str) -> dict[str, str] | None:
    """The Secret's data, decoded; None when it does not exist. ``SecretForbidden`` when the
    operator may not read it."""
    try:
        secret = core().read_namespaced_secret(name, namespace)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        if e.status == 403:
            raise SecretForbidden(namespace, name) from e
        raise
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def delete_network_policy(name: str, namespace: str) -> bool:
    """Delete a NetworkPolicy the operator made; False when there was none."""
    return delete(networking().delete_namespaced_network_policy, name, namespace)


def record_event(body: Mapping[str, Any], reason: str, message: str, warning: bool = False) -> None:
    """A Kubernetes Event on the object for a decision the operator took.

    Posted with the API client rather than kopf's posting queue, so it works from any thread
    and whatever kopf's posting level (WARNING at startup, to keep kopf's per-handler chatter
    out of the Events). A failure to post is logged, never raised: the decision stands."""
    meta = body["metadata"]
    now = dt.datetime.now(dt.UTC).isoformat()
    event = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": body.get("apiVersion", API_VERSION), "kind": body["kind"],
                           "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
        "reason": reason, "message": message[:1000], "type": "Warning" if warning else "Normal",
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        "source": {"component": COMPONENT, "host": socket.gethostname()},
        "reportingComponent": COMPONENT, "reportingInstance": socket.gethostname(),
    }
    try:
        core().create_namespaced_event(meta["namespace"], cast(Any, event))  # dicts go as they are
    except kubernetes.client.ApiException as e:
        log.warning("could not post event %s on %s/%s: %s", reason, body["kind"], meta["name"], e.reason)
