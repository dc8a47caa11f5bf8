"""InferenceService controller: resolves the model (a URI, or the committed export of a
TrainingJob), server-side applies the Deployment, Service, PodDisruptionBudget and HPA
built by ``inferenceservice_children``, and reports status.

Handlers:
- create/update/resume of an InferenceService, and a poll for those that follow a
  TrainingJob's export (the store has no watch: the poll re-reads the commit marker);
- events of the serving Deployments, which refresh replicas and the Available/Ready
  conditions of their owner.

The operator writes ``spec.replicas`` of nothing: the HPA and ``kubectl scale`` write it
through the scale subresource, and the Deployment follows it.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import dataclasses
import json
import logging
import os
from typing import Any, cast

import kopf
import kubernetes

from kubeforge import kube
from kubeforge.api import CheckpointPolicySpec, InferenceService, InferenceServiceSpec, TrainingJob
from kubeforge.api.common import GROUP, VERSION, condition
from kubeforge.api.contract import ENV_S3_ENDPOINT, ENV_S3_REGION
from kubeforge.controllers import inferenceservice_children as children
from kubeforge.controllers.checkpointpolicy import storage_uri
from kubeforge.controllers.inferenceservice_children import Owner, ResolvedModel
from kubeforge.controllers.pod_state import not_starting
from kubeforge.controllers.status import conditions_patch, parse_spec, record_event
from kubeforge.metrics import INFERENCESERVICES_READY, reconciling
from kubeforge.store import ExportMarker, StoreError, open_store

FIELD_MANAGER = "kubeforge"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """How the InferenceService controller polls what it cannot watch."""

    #: How often a TrainingJob's export commit marker is re-read (a newer export rolls out
    #: within this long under FollowLatest).
    export_poll_interval_s: float = 30.0
    #: A failing store is given up on quickly: the next poll tries again.
    store_retry_deadline_s: float = 10.0

    @classmethod
    def from_env(cls) -> InferenceSettings:
        env = os.environ
        return cls(
            export_poll_interval_s=float(env.get("KUBEFORGE_EXPORT_POLL_SECONDS", cls.export_poll_interval_s)),
            store_retry_deadline_s=float(env.get("KUBEFORGE_STORE_RETRY_DEADLINE_SECONDS",
                                                 cls.store_retry_deadline_s)),
        )


SETTINGS = InferenceSettings.from_env()


@dataclasses.dataclass(frozen=True)
class ModelResolution:
    """The ModelReady condition's inputs and, when resolved, the model the pods load."""

    ready: bool
    reason: str
    message: str
    model: ResolvedModel | None = None


# ---------------------------------------------------------------------------- pure decisions

def choose_export(update_policy: str, served: dict[str, Any] | None, newest: ExportMarker) -> tuple[str, int | None]:
    """(revision, step) to serve. FollowLatest serves the newest committed export; Pinned keeps
    what the pods were first given (the newest only when nothing is served yet)."""
    if update_policy == "Pinned" and served and served.get("revision"):
        return served["revision"], served.get("step")
    return newest.time, newest.step


def model_of(deployment: dict[str, Any]) -> ResolvedModel | None:
    """The model an existing Deployment serves, read back from it: used to keep serving (and
    following spec.replicas) while the model source cannot be resolved, e.g. the store is down."""
    template = deployment["spec"]["template"]
    annotations = template["metadata"].get("annotations") or {}
    uri = annotations.get(children.MODEL_URI_ANNOTATION)
    if not uri:
        return None
    container = next((c for c in template["spec"]["containers"] if c["name"] == children.CONTAINER), None)
    if container is None:
        return None
    env = {e["name"]: e.get("value") for e in container.get("env") or []}
    secret = next((s["secretRef"]["name"] for s in container.get("envFrom") or [] if "secretRef" in s), None)
    step = annotations.get(children.MODEL_STEP_ANNOTATION)
    return ResolvedModel(uri=uri, revision=annotations.get(children.REVISION_ANNOTATION),
                         step=int(step) if step is not None else None,
                         s3_endpoint=env.get(ENV_S3_ENDPOINT), s3_region=env.get(ENV_S3_REGION),
                         credentials_secret=secret)


def status_patch(owner: Owner, spec: InferenceServiceSpec, status: Any, generation: int | None,
                 resolution: ModelResolution, deployment: dict[str, Any] | None,
                 stuck: str | None = None) -> dict[str, Any]:
    """The whole status: URL, selector, replicas, served model and the three conditions;
    ``stuck`` says why server pods cannot start (the kubelet's reasons)."""
    avail = children.availability(deployment, spec.replicas, stuck)
    model_ready = (resolution.ready, resolution.reason, resolution.message)
    ready = children.ready_condition(model_ready, avail)
    out = conditions_patch(status, generation, [
        ("ModelReady", *model_ready),
        ("Available", avail.available, avail.available_reason, avail.available_message),
        ("Ready", *ready),
    ])
    out.update(url=children.url(owner), selector=children.selector(owner.name), replicas=avail.replicas,
               readyReplicas=avail.ready_replicas)
    served = children.model_of_status(deployment) if deployment is not None else None
    if served is not None:
        out["model"] = served
    elif resolution.model is not None:
        m = resolution.model
        out["model"] = {k: v for k, v in (("uri", m.uri), ("revision", m.revision), ("step", m.step)) if v is not None}
    return out


# ---------------------------------------------------------------------------- reads

def _apps() -> kubernetes.client.AppsV1Api:
    return kubernetes.client.AppsV1Api(kube.api_client())


def _autoscaling() -> kubernetes.client.AutoscalingV2Api:
    return kubernetes.client.AutoscalingV2Api(kube.api_client())


def _policy() -> kubernetes.client.PolicyV1Api:
    return kubernetes.client.PolicyV1Api(kube.api_client())


def _raw(call: Any, *args: Any) -> dict[str, Any] | None:
    """A read as a plain dict (camelCase, as the API server sent it); None on 404."""
    try:
        resp = call(*args, _preload_content=False)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise
    return cast(dict[str, Any], json.loads(resp.data))


def read_deployment(owner: Owner) -> dict[str, Any] | None:
    return _raw(_apps().read_namespaced_deployment, children.child_name(owner.name), owner.namespace)


def read_stuck(owner: Owner) -> str | None:
    """Why the service's pods cannot start, if any cannot (image missing, crash loop...)."""
    pods = kubernetes.client.CoreV1Api(kube.api_client()).list_namespaced_pod(
        owner.namespace, label_selector=children.selector(owner.name), _preload_content=False)
    return not_starting(list(json.loads(pods.data).get("items") or []))


def _read_custom(namespace: str, plural: str, name: str) -> dict[str, Any] | None:
    try:
        return cast(dict[str, Any], kube.custom().get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name))
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise


def _read_secret(namespace: str, name: str) -> dict[str, str]:
    try:
        secret = kube.core().read_namespaced_secret(name, namespace)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return {}
        raise
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def resolve_model(owner: Owner, spec: InferenceServiceSpec, served: dict[str, Any] | None) -> ModelResolution:
    """Where the model is and whether it can be served; ``served`` is status.model as the
    existing Deployment says (for Pinned)."""
    m = spec.model
    secret = m.credentials_secret_ref.name if m.credentials_secret_ref else None
    if m.uri:
        return ModelResolution(True, "ModelURI", f"serving {m.uri}",
                               ResolvedModel(uri=m.uri, s3_endpoint=m.s3_endpoint, credentials_secret=secret))
    assert m.training_job_ref is not None
    job_name = m.training_job_ref.name
    job = _read_custom(owner.namespace, TrainingJob.plural, job_name)
    if job is None:
        return ModelResolution(False, "WaitingForTrainingJob", f"TrainingJob {job_name} does not exist")
    policy_ref = (job.get("spec") or {}).get("checkpointPolicyRef")
    if not policy_ref:
        return ModelResolution(False, "NoExportStore",
                               f"TrainingJob {job_name} has no checkpointPolicyRef, so its export has no store")
    policy = _read_custom(owner.namespace, "checkpointpolicies", policy_ref["name"])
    if policy is None:
        return ModelResolution(False, "WaitingForTrainingJob",
                               f"CheckpointPolicy {policy_ref['name']} of TrainingJob {job_name} does not exist")
    pspec = CheckpointPolicySpec.model_validate(policy["spec"])
    s3 = pspec.storage.s3
    if s3 is None:
        return ModelResolution(False, "UnsupportedStorage",
                               f"CheckpointPolicy {policy_ref['name']} stores on a volume; "
                               "serving an export needs S3 storage")
    creds = _read_secret(owner.namespace, s3.credentials_secret_ref.name)
    store = open_store(storage_uri(pspec), endpoint_url=s3.endpoint, region=s3.region,
                       force_path_style=s3.force_path_style, access_key_id=creds.get("AWS_ACCESS_KEY_ID"),
                       secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"),
                       retry_deadline_s=SETTINGS.store_retry_deadline_s)
    export_uri = store.export_uri(owner.namespace, job_name)
    try:
        marker = store.export_marker(owner.namespace, job_name)
    except StoreError as e:
        return ModelResolution(False, "StoreUnreachable", f"reading the export marker at {export_uri}: {e}")
    if marker is None:
        return ModelResolution(False, "WaitingForTrainingJob",
                               f"TrainingJob {job_name} has no committed export at {export_uri} yet")
    revision, step = choose_export(m.update_policy, served, marker)
    model = ResolvedModel(uri=export_uri, revision=revision, step=step,
                          s3_endpoint=m.s3_endpoint or s3.endpoint, s3_region=s3.region,
                          credentials_secret=secret or s3.credentials_secret_ref.name)
    message = f"export of TrainingJob {job_name} committed {marker.time} (step {marker.step})"
    if revision != marker.time:
        message = (f"Pinned to revision {revision}; a newer export committed {marker.time} is not served "
                   "(pods started from now on refuse it: copy the pinned export and serve it by uri)")
    return ModelResolution(True, "ExportFound", message, model)


# ---------------------------------------------------------------------------- writes

def apply(obj: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply as field manager ``kubeforge``; fields we stop sending are removed."""
    name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
    calls = {
        "Deployment": _apps().patch_namespaced_deployment,
        "Service": kube.core().patch_namespaced_service,
        "PodDisruptionBudget": _policy().patch_namespaced_pod_disruption_budget,
        "HorizontalPodAutoscaler": _autoscaling().patch_namespaced_horizontal_pod_autoscaler,
    }
    resp: Any = calls[obj["kind"]](name, ns, obj, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY,
                              _preload_content=False)
    return cast(dict[str, Any], json.loads(resp.data))


def sync_hpa(owner: Owner, spec: InferenceServiceSpec, body: Any) -> None:
    """Apply the HPA, or delete it when spec.autoscaling is gone; an Event for each change."""
    name = children.child_name(owner.name)
    existing = _raw(_autoscaling().read_namespaced_horizontal_pod_autoscaler, name, owner.namespace)
    desired = children.build_hpa(owner, spec)
    if desired is None:
        if existing is not None:
            try:
                _autoscaling().delete_namespaced_horizontal_pod_autoscaler(name, owner.namespace)
            except kubernetes.client.ApiException as e:
                if e.status != 404:
                    raise
            record_event(body, "AutoscalerRemoved", f"spec.autoscaling removed: deleted HPA {name}")
        return
    apply(desired)
    summary = (f"HPA {name}: {desired['spec']['minReplicas']}..{desired['spec']['maxReplicas']} replicas, "
               f"behavior {json.dumps(desired['spec']['behavior'], separators=(',', ':'))}")
    if existing is None:
        record_event(body, "AutoscalerCreated", summary)
    elif not _behavior_matches(existing["spec"].get("behavior") or {}, desired["spec"]["behavior"]) or (
            existing["spec"].get("minReplicas"), existing["spec"]["maxReplicas"]) != (
            desired["spec"]["minReplicas"], desired["spec"]["maxReplicas"]):
        record_event(body, "AutoscalerUpdated", summary)


def _behavior_matches(observed: dict[str, Any], desired: dict[str, Any]) -> bool:
    """True when every field we set has that value (the API server fills in the rest)."""
    for direction, rules in desired.items():
        seen = observed.get(direction) or {}
        if any(seen.get(k) != v for k, v in rules.items()):
            return False
    return True


def _patch_status(owner: Owner, status: dict[str, Any]) -> None:
    kube.custom().patch_namespaced_custom_object_status(GROUP, VERSION, owner.namespace, InferenceService.plural,
                                                        owner.name, {"status": status}, _content_type=MERGE)


_READY: dict[tuple[str, str], bool] = {}


def _count_ready(owner: Owner, status: dict[str, Any]) -> None:
    ready = condition(status.get("conditions"), "Ready")
    _READY[(owner.namespace, owner.name)] = bool(ready and ready["status"] == "True")
    INFERENCESERVICES_READY.set(sum(_READY.values()))


def _events_for_transition(body: Any, old: Any, new: dict[str, Any], old_revision: str | None,
                           new_model: ResolvedModel | None) -> None:
    before = condition((old or {}).get("conditions"), "ModelReady") or {}
    after = condition(new["conditions"], "ModelReady") or {}
    if (before.get("status"), before.get("reason")) != (after["status"], after["reason"]):
        record_event(body, after["reason"], after["message"], warning=after["status"] != "True")
    if new_model is not None and new_model.revision and old_revision and new_model.revision != old_revision:
        record_event(body, "ModelRolloutStarted",
                     f"rolling out export revision {new_model.revision} (was {old_revision})")


# ---------------------------------------------------------------------------- handlers

def _reconcile(body: Any, spec: Any, status: Any, meta: Any, namespace: str | None, patch: kopf.Patch, logger: Any) -> None:
    with reconciling(InferenceService.kind):
        parsed, error = parse_spec(InferenceServiceSpec, spec)
        generation = meta.get("generation")
        assert namespace is not None, "InferenceService is namespaced"
        owner = Owner(meta["name"], namespace, meta["uid"])
        if error:
            logger.warning("invalid spec: %s", error)
            patch.status.update(conditions_patch(status, generation, [("Ready", False, "InvalidSpec", error)]))
            return
        deployment = read_deployment(owner)
        served = children.model_of_status(deployment) if deployment is not None else None
        resolution = resolve_model(owner, parsed, served)
        model = resolution.model
        if model is None and deployment is not None:
            model = model_of(deployment)  # keep serving what runs, and keep following spec.replicas
        if model is not None:
            deployment = apply(children.build_deployment(owner, parsed, model))
        apply(children.build_service(owner))
        apply(children.build_pdb(owner, parsed))
        sync_hpa(owner, parsed, body)
        new = status_patch(owner, parsed, status, generation, resolution, deployment, read_stuck(owner))
        _events_for_transition(body, status, new, (served or {}).get("revision"), resolution.model)
        if not resolution.ready:
            logger.info("model not ready: %s", resolution.message)
        # written here, not through kopf's patch after the handler: the Deployment's pods may
        # have turned ready meanwhile, and their events found no status to update; a re-read
        # after the write leaves no such gap
        _patch_status(owner, new)
        fresh = status_patch(owner, parsed, new, generation, resolution, read_deployment(owner), read_stuck(owner))
        if fresh != new:
            _patch_status(owner, fresh)
        _count_ready(owner, fresh)


@kopf.on.resume(GROUP, VERSION, InferenceService.plural)
@kopf.on.create(GROUP, VERSION, InferenceService.plural)
@kopf.on.update(GROUP, VERSION, InferenceService.plural, field="spec")
def reconcile(body: Any, spec: Any, status: Any, meta: Any, namespace: str | None, patch: kopf.Patch,
              logger: Any, **_: Any) -> None:
    _reconcile(body, spec, status, meta, namespace, patch, logger)


# The store has no watch, so services that follow a TrainingJob's export are re-reconciled on
# a poll. Not a kopf timer: kopf puts a finalizer on every object a timer runs for, and a
# finalizer left behind by a stopped operator blocks deleting the service and its namespace.
_FOLLOWING: set[tuple[str, str]] = set()
_POLLER: list[asyncio.Task[None]] = []
log = logging.getLogger(__name__)


@kopf.on.event(GROUP, VERSION, InferenceService.plural)
def track_followers(event: Any, spec: Any, name: str | None, namespace: str | None, **_: Any) -> None:
    if name is None or namespace is None:
        return
    key = (namespace, name)
    if event.get("type") != "DELETED" and (spec or {}).get("model", {}).get("trainingJobRef"):
        _FOLLOWING.add(key)
    else:
        _FOLLOWING.discard(key)


def repoll(namespace: str, name: str) -> None:
    """One reconciliation outside kopf's handlers: the same function, status patched here."""
    body = _read_custom(namespace, InferenceService.plural, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    patch = kopf.Patch()
    _reconcile(body, body.get("spec"), body.get("status") or {}, body["metadata"], namespace, patch, log)
    if patch.get("status"):
        _patch_status(Owner(name, namespace, body["metadata"]["uid"]), dict(patch["status"]))


async def _poll_exports(interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval_s)
        for namespace, name in sorted(_FOLLOWING):
            try:
                # the copied context carries kopf's event queue, so Events still get posted
                await loop.run_in_executor(None, contextvars.copy_context().run, repoll, namespace, name)
            except Exception:  # noqa: BLE001 - one service's failure must not stop the others' polls
                log.exception("re-reconciling InferenceService %s/%s failed", namespace, name)


@kopf.on.startup()
async def start_export_poll(**_: Any) -> None:
    _POLLER.append(asyncio.create_task(_poll_exports(SETTINGS.export_poll_interval_s)))


@kopf.on.cleanup()
async def stop_export_poll(**_: Any) -> None:
    while _POLLER:
        _POLLER.pop().cancel()


@kopf.on.event("apps", "v1", "deployments",
               labels={"app.kubernetes.io/managed-by": "kubeforge", "app.kubernetes.io/component": children.COMPONENT})
def deployment_changed(event: Any, body: Any, namespace: str | None, logger: Any, **_: Any) -> None:
    """Replicas and availability follow the Deployment between reconciliations."""
    name = (body.get("metadata", {}).get("labels") or {}).get(children.SERVICE_LABEL)
    if not name or namespace is None:
        return
    refresh_availability(namespace, name, None if event.get("type") == "DELETED" else dict(body))


@kopf.on.event("", "v1", "pods", labels={children.SERVICE_LABEL: kopf.PRESENT})
def server_pod_changed(body: Any, namespace: str | None, **_: Any) -> None:
    """A server pod that cannot start changes no Deployment field: its reason reaches the
    conditions from here."""
    name = (body.get("metadata", {}).get("labels") or {}).get(children.SERVICE_LABEL)
    if name and namespace is not None:
        refresh_availability(namespace, name, read_deployment(Owner(name, namespace, "")))


def refresh_availability(namespace: str, name: str, deployment: dict[str, Any] | None) -> None:
    """Rewrite the availability part of the status from ``deployment`` and the pods."""
    isvc = _read_custom(namespace, InferenceService.plural, name)
    if isvc is None or isvc["metadata"].get("deletionTimestamp"):
        return
    parsed, error = parse_spec(InferenceServiceSpec, isvc.get("spec"))
    if error:
        return
    owner = Owner(name, namespace, isvc["metadata"]["uid"])
    status = isvc.get("status") or {}
    model_cond = condition(status.get("conditions"), "ModelReady")
    if model_cond is None:
        return  # not reconciled yet: the reconcile handler writes the first status
    resolution = ModelResolution(model_cond["status"] == "True", model_cond["reason"], model_cond["message"])
    new = status_patch(owner, parsed, status, status.get("observedGeneration"), resolution, deployment,
                       read_stuck(owner))
    if new != {k: status.get(k) for k in new}:
        _patch_status(owner, new)
        _count_ready(owner, new)
