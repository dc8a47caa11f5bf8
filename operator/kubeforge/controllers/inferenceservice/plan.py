"""What an InferenceService controller decides, as pure functions: which export to serve
(``choose_export``), what a running Deployment serves (``model_of``), and the whole status
(``status_patch``) from the model's resolution and the Deployment's."""

from __future__ import annotations

import dataclasses
from typing import Any

from kubeforge.api import InferenceServiceSpec
from kubeforge.api.contract import ENV_S3_ENDPOINT, ENV_S3_FORCE_PATH_STYLE, ENV_S3_REGION, s3_force_path_style
from kubeforge.controllers.inferenceservice import manifests
from kubeforge.controllers.inferenceservice.manifests import Owner, ResolvedModel
from kubeforge.controllers.status import conditions_patch
from kubeforge.store import ExportMarker


@dataclasses.dataclass(frozen=True)
class ModelResolution:
    """The ModelReady condition's inputs and, when resolved, the model the pods load."""

    ready: bool
    reason: str
    message: str
    model: ResolvedModel | None = None


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
    uri = annotations.get(manifests.MODEL_URI_ANNOTATION)
    if not uri:
        return None
    container = next((c for c in template["spec"]["containers"] if c["name"] == manifests.CONTAINER), None)
    if container is None:
        return None
    env = {e["name"]: e.get("value") for e in container.get("env") or []}
    secret = next((s["secretRef"]["name"] for s in container.get("envFrom") or [] if "secretRef" in s), None)
    step = annotations.get(manifests.MODEL_STEP_ANNOTATION)
    return ResolvedModel(uri=uri, revision=annotations.get(manifests.REVISION_ANNOTATION),
                         step=int(step) if step is not None else None,
                         s3_endpoint=env.get(ENV_S3_ENDPOINT), s3_region=env.get(ENV_S3_REGION),
                         s3_force_path_style=s3_force_path_style(env[ENV_S3_FORCE_PATH_STYLE])
                         if env.get(ENV_S3_FORCE_PATH_STYLE) is not None else None,
                         credentials_secret=secret)


def status_patch(owner: Owner, spec: InferenceServiceSpec, status: Any, generation: int | None,
                 resolution: ModelResolution, deployment: dict[str, Any] | None,
                 stuck: str | None = None) -> dict[str, Any]:
    """The whole status: URL, selector, replicas, served model and the three conditions;
    ``stuck`` says why server pods cannot start (the kubelet's reasons)."""
    avail = availability(deployment, spec.replicas, stuck)
    model_ready = (resolution.ready, resolution.reason, resolution.message)
    ready = ready_condition(model_ready, avail)
    out = conditions_patch(status, generation, [
        ("ModelReady", *model_ready),
        ("Available", avail.available, avail.available_reason, avail.available_message),
        ("Ready", *ready),
    ])
    out.update(url=manifests.url(owner), selector=manifests.selector(owner.name), replicas=avail.replicas,
               readyReplicas=avail.ready_replicas)
    served = model_of_status(deployment) if deployment is not None else None
    if served is not None:
        out["model"] = served
    elif resolution.model is not None:
        m = resolution.model
        out["model"] = {k: v for k, v in (("uri", m.uri), ("revision", m.revision), ("step", m.step)) if v is not None}
    return out


@dataclasses.dataclass(frozen=True)
class Availability:
    """What the Deployment says about serving, as conditions' inputs."""

    replicas: int
    ready_replicas: int
    available: bool
    available_reason: str
    available_message: str
    rolled_out: bool


def availability(deployment: dict[str, Any] | None, wanted_replicas: int, stuck: str | None = None) -> Availability:
    """``stuck``: why server pods cannot start (pod_state.not_starting), shown while none is ready."""
    if deployment is None:
        return Availability(0, 0, False, "NoDeployment", "the serving Deployment does not exist yet", False)
    st = deployment.get("status") or {}
    replicas, ready = int(st.get("replicas") or 0), int(st.get("readyReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    gen_seen = (st.get("observedGeneration") or 0) >= (deployment["metadata"].get("generation") or 0)
    rolled_out = gen_seen and updated >= wanted_replicas and replicas == updated
    if wanted_replicas == 0:
        return Availability(replicas, ready, False, "ScaledToZero", "spec.replicas is 0", rolled_out)
    if ready == 0 and stuck:
        return Availability(replicas, ready, False, "ReplicasNotStarting", f"0/{wanted_replicas} replicas ready; {stuck}",
                            rolled_out)
    if ready == 0:
        return Availability(replicas, ready, False, "NoReplicaReady",
                            f"0/{wanted_replicas} replicas ready (loading the model or not scheduled)", rolled_out)
    return Availability(replicas, ready, True, "ReplicasReady", f"{ready}/{wanted_replicas} replicas ready", rolled_out)


def ready_condition(model_ready: tuple[bool, str, str], avail: Availability) -> tuple[bool, str, str]:
    """Ready: the wanted model is resolved, a replica serves, and the Deployment has rolled out."""
    ok, reason, message = model_ready
    if not ok:
        return False, reason, message
    if not avail.available:
        return False, avail.available_reason, avail.available_message
    if not avail.rolled_out:
        return False, "RollingOut", f"rolling out: {avail.available_message}"
    return True, "Serving", avail.available_message


def model_of_status(deployment: dict[str, Any]) -> dict[str, Any] | None:
    """status.model as the Deployment's pod template says: the model rolled out (or rolling)."""
    annotations = deployment["spec"]["template"]["metadata"].get("annotations") or {}
    if manifests.MODEL_URI_ANNOTATION not in annotations:
        return None
    out: dict[str, Any] = {"uri": annotations[manifests.MODEL_URI_ANNOTATION]}
    if manifests.REVISION_ANNOTATION in annotations:
        out["revision"] = annotations[manifests.REVISION_ANNOTATION]
    if manifests.MODEL_STEP_ANNOTATION in annotations:
        out["step"] = int(annotations[manifests.MODEL_STEP_ANNOTATION])
    return out
