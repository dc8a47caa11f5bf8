"""What an InferenceService controller decides, as pure functions: which export to serve
(``choose_export``), what a running Deployment serves (``model_of``), where the servers
capture traffic (``resolve_capture``), what the live prompts' drift means (``decide_drift``),
and the whole status (``status_patch``) from the model's resolution and the Deployment's."""

from __future__ import annotations

import dataclasses
from typing import Any

from kubeforge.api import CheckpointPolicySpec, InferenceServiceSpec
from kubeforge.api.common import condition
from kubeforge.api.contract import ENV_S3_ENDPOINT, ENV_S3_FORCE_PATH_STYLE, ENV_S3_REGION, s3_force_path_style
from kubeforge.api.inferenceservice import DriftSettings, Logging
from kubeforge.controllers.inferenceservice import manifests
from kubeforge.controllers.inferenceservice.manifests import Owner, ResolvedCapture, ResolvedModel
from kubeforge.controllers.status import conditions_patch
from kubeforge.store import ExportMarker, flywheel, storage_uri
from kubeforge.store.flywheel import Profile

#: A StoreAccess key: a CheckpointPolicy's (namespace, name), or (namespace, URI) of a store
#: named by URI.
StoreKey = tuple[str, str]
#: Conditions that exist only with spec.logging.
CAPTURE_CONDITIONS = ("CaptureReady", "DriftDetected")
#: Live profiles not rewritten for this long are left out of the drift reading: their server
#: is gone (a server rewrites its profile every --profile-interval-seconds, 30 s by default).
PROFILE_MAX_AGE_S = 600.0
#: How often the operator reads every capturing service's profiles and baseline.
DRIFT_INTERVAL_S = 60.0


@dataclasses.dataclass(frozen=True)
class ModelResolution:
    """The ModelReady condition's inputs and, when resolved, the model the pods load."""

    ready: bool
    reason: str
    message: str
    model: ResolvedModel | None = None
    #: the model's store (where its baseline profile is read); None for a pvc:// model
    store: StoreKey | None = None


@dataclasses.dataclass(frozen=True)
class CaptureResolution:
    """The CaptureReady condition's inputs and, when resolved, where the servers capture."""

    ready: bool
    reason: str
    message: str
    capture: ResolvedCapture | None = None
    store: StoreKey | None = None


def resolve_capture(owner: Owner, logging: Logging, policy: CheckpointPolicySpec | None,
                    allow_policy_credentials: bool, policy_error: str | None = None) -> CaptureResolution:
    """Where ``logging.store`` puts the capture directory ``<root>/<namespace>/<name>/capture``,
    and with which Secret. ``policy``: the CheckpointPolicy ``logging.store.checkpointPolicyRef``
    names, as read (None: missing, or invalid and ``policy_error`` says why).

    Credentials follow the model's rule: ``logging.store.credentialsSecretRef`` when given;
    else the policy's Secret, which is the trainer's (it writes and deletes checkpoints), only
    where the operator's setting security.servingPolicyCredentials hands it to servers."""
    store = logging.store
    own = store.credentials_secret_ref.name if store.credentials_secret_ref else None
    prefix = flywheel.capture_prefix(owner.namespace, owner.name)
    rate = f"{logging.sample_rate:g} of requests"
    if store.uri:
        root = store.uri.rstrip("/")
        if own is None:  # the schema requires it with uri; an object stored before the rule may lack it
            return CaptureResolution(False, "CaptureCredentialsRequired",
                                     "logging.store.credentialsSecretRef must be set with logging.store.uri")
        capture = ResolvedCapture(uri=f"{root}/{prefix}", credentials_secret=own, s3_endpoint=store.s3_endpoint)
        return CaptureResolution(True, "CaptureStoreResolved", f"capturing {rate} to {capture.uri} (Secret {own})",
                                 capture, (owner.namespace, root))
    assert store.checkpoint_policy_ref is not None
    name = store.checkpoint_policy_ref.name
    if policy is None:
        if policy_error:
            return CaptureResolution(False, "CheckpointPolicyInvalid", policy_error)
        return CaptureResolution(False, "CheckpointPolicyNotFound", f"CheckpointPolicy {name} of logging.store does not exist")
    s3 = policy.storage.s3
    if s3 is None:
        return CaptureResolution(False, "StoreUnsupported",
                                 f"CheckpointPolicy {name} stores on a volume; capture needs S3 storage "
                                 "(logging.store: an S3 CheckpointPolicy or an s3:// uri)")
    policy_secret = s3.credentials_secret_ref.name
    if own is None and not allow_policy_credentials:
        return CaptureResolution(False, "CaptureCredentialsRequired", (
            f"logging.store.credentialsSecretRef must name a credential that may write the capture prefix {prefix}: "
            f"CheckpointPolicy {name}'s Secret {policy_secret} can write and delete checkpoints, so servers do not "
            "get it (unless the operator sets security.servingPolicyCredentials)"))
    secret = own or policy_secret
    capture = ResolvedCapture(uri=f"{storage_uri(policy)}/{prefix}", credentials_secret=secret,
                              s3_endpoint=s3.endpoint, s3_region=s3.region, s3_force_path_style=s3.force_path_style)
    message = f"capturing {rate} to {capture.uri} (CheckpointPolicy {name}'s storage)"
    if own is None:
        message += (f"; the servers use CheckpointPolicy {name}'s read-write Secret {policy_secret} "
                    "(security.servingPolicyCredentials allows it)")
    elif own == policy_secret:
        message += (f"; logging.store.credentialsSecretRef names CheckpointPolicy {name}'s own Secret {own}, which "
                    "can write and delete checkpoints: give the servers a credential limited to the capture prefix")
    else:
        message += f" with Secret {own}"
    return CaptureResolution(True, "CaptureStoreResolved", message, capture, (owner.namespace, name))


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
                 stuck: str | None = None, capture: CaptureResolution | None = None) -> dict[str, Any]:
    """The whole status: URL, selector, replicas, served model and the three conditions;
    ``stuck`` says why server pods cannot start (the kubelet's reasons). With spec.logging and
    ``capture`` also status.capture and CaptureReady (DriftDetected is the drift pass's, see
    ``decide_drift``; here it only starts Unknown); with spec.logging and no ``capture`` those
    stay as stored; without spec.logging they are removed."""
    avail = availability(deployment, spec.replicas, stuck)
    model_ready = (resolution.ready, resolution.reason, resolution.message)
    ready = ready_condition(model_ready, avail)
    updates: list[tuple[str, bool | str, str, str]] = [
        ("ModelReady", *model_ready),
        ("Available", avail.available, avail.available_reason, avail.available_message),
        ("Ready", *ready),
    ]
    if spec.logging is not None and capture is not None:
        updates.append(("CaptureReady", capture.ready, capture.reason, capture.message))
        drift = condition((status or {}).get("conditions"), "DriftDetected")
        if not capture.ready:
            updates.append(("DriftDetected", "Unknown", "CaptureNotReady", f"nothing is captured: {capture.message}"))
        elif drift is None or drift.get("reason") == "CaptureNotReady":
            updates.append(("DriftDetected", "Unknown", "NotMeasured", "no drift reading of the live prompts yet"))
    out = conditions_patch(status, generation, updates)
    out.update(url=manifests.url(owner), selector=manifests.selector(owner.name), replicas=avail.replicas,
               readyReplicas=avail.ready_replicas)
    if spec.logging is None:
        out["conditions"] = [c for c in out["conditions"] if c.get("type") not in CAPTURE_CONDITIONS]
        out.update(capture=None, drift=None)
    elif capture is not None and capture.capture is None:
        out.update(capture=None, drift=None)
    elif capture is not None and capture.capture is not None:
        out["capture"] = {"uri": capture.capture.uri, "sampleRate": spec.logging.sample_rate}
    served = served_model(deployment, resolution)
    if served is not None:
        out["model"] = served
    return out


def served_model(deployment: dict[str, Any] | None, resolution: ModelResolution) -> dict[str, Any] | None:
    """status.model of a revision: what its Deployment rolls out, else what was resolved."""
    served = model_of_status(deployment) if deployment is not None else None
    if served is None and resolution.model is not None:
        m = resolution.model
        served = {k: v for k, v in (("uri", m.uri), ("revision", m.revision), ("step", m.step)) if v is not None}
    return served


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


# ---------------------------------------------------------------------------- drift

@dataclasses.dataclass(frozen=True)
class LiveProfiles:
    """The live prompt profiles of a service's servers rewritten in the last
    PROFILE_MAX_AGE_S, as read from ``<capture>/profiles/``; ``skipped``: keys of profiles that
    did not parse or do not have the buckets of ``flywheel``."""

    profiles: tuple[Profile, ...] = ()
    skipped: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The served export's training-data profile (``flywheel.BASELINE_PROFILE_NAME``):
    ``uri`` None when the operator cannot read the model's directory (pvc://), ``profile``
    None when there is none there."""

    uri: str | None
    profile: Profile | None = None


@dataclasses.dataclass(frozen=True)
class DriftDecision:
    """DriftDetected, status.drift (None: left as stored) and the kubeforge_drift_psi series
    (empty: none while nothing is measured)."""

    status: str
    reason: str
    message: str
    drift: dict[str, Any] | None
    psi: dict[str, float] = dataclasses.field(default_factory=dict)


def profile_fits(profile: Profile) -> bool:
    """Whether a profile has ``flywheel``'s buckets (one of another layout cannot be merged)."""
    return (len(profile.prompt_length) == len(flywheel.PROMPT_LENGTH_EDGES) + 1
            and len(profile.token_frequency) == flywheel.TOKEN_BUCKETS)


def baseline_uri(model: ResolvedModel) -> str | None:
    """Where the served model's baseline profile is: in its export (or model) directory; None
    for a pvc:// model (the claim is mounted in the servers, never in the operator)."""
    if model.uri.startswith("pvc://"):
        return None
    return f"{model.uri.rstrip('/')}/{flywheel.BASELINE_PROFILE_NAME}"


def feature_psi(baseline: Profile, live: Profile) -> dict[str, float]:
    """``flywheel.profile_psi``, rounded, leaving out a feature that has no count on either
    side (prompts of no tokens have no token frequency)."""
    return {f: round(flywheel.psi(getattr(baseline, f), getattr(live, f)), 4) for f in flywheel.FEATURES
            if sum(getattr(baseline, f)) > 0 and sum(getattr(live, f)) > 0}


def decide_drift(settings: DriftSettings, live: LiveProfiles, baseline: Baseline, now: str) -> DriftDecision:
    """DriftDetected from the merged live profiles against the baseline: Unknown without a
    baseline (NoBaseline) or with fewer live prompts than minPrompts (NotEnoughPrompts); else
    True (MajorDrift) when a feature's PSI is above majorThreshold, False MinorDrift from
    minorThreshold, False Stable below it."""
    merged = flywheel.merged(p for p in live.profiles if profile_fits(p))
    servers = f"{len(live.profiles)} server profile(s)"
    if live.skipped:
        servers += f", {len(live.skipped)} unreadable skipped"
    unmeasured: dict[str, Any] = {"psi": {}, "level": None, "prompts": merged.prompts, "baseline": baseline.uri,
                                  "time": now}
    if baseline.uri is None:
        return DriftDecision("Unknown", "NoBaseline", "the model is not on S3 (pvc://): the operator cannot read its "
                             f"baseline profile {flywheel.BASELINE_PROFILE_NAME}", unmeasured)
    if baseline.profile is None or not profile_fits(baseline.profile) or baseline.profile.prompts == 0:
        why = "there is none" if baseline.profile is None else "it holds no prompts, or other buckets"
        return DriftDecision("Unknown", "NoBaseline", f"no baseline profile to compare with at {baseline.uri}: {why} "
                             "(the trainer writes it into the export from its training data)",
                             {**unmeasured, "baseline": None})
    psi = feature_psi(baseline.profile, merged) if merged.prompts >= settings.min_prompts else {}
    if not psi:
        return DriftDecision("Unknown", "NotEnoughPrompts", f"{merged.prompts} live prompts ({servers}), fewer than "
                             f"logging.drift.minPrompts={settings.min_prompts}", unmeasured)
    worst = max(psi, key=lambda f: psi[f])
    level = flywheel.psi_level(psi[worst], settings.minor_threshold, settings.major_threshold)
    values = ", ".join(f"{f} {v:.3f}" for f, v in sorted(psi.items()))
    detail = f"PSI {values} over {merged.prompts} live prompts ({servers}) against {baseline.uri}"
    drift = {**unmeasured, "psi": psi, "level": level}
    if level == "major":
        return DriftDecision("True", "MajorDrift", f"{detail}: {worst} above majorThreshold "
                             f"{settings.major_threshold:g}", drift, psi)
    if level == "minor":
        return DriftDecision("False", "MinorDrift", f"{detail}: {worst} from minorThreshold "
                             f"{settings.minor_threshold:g}, not above majorThreshold {settings.major_threshold:g}",
                             drift, psi)
    return DriftDecision("False", "Stable", f"{detail}: below minorThreshold {settings.minor_threshold:g}", drift, psi)


def drift_unreadable(what: str, uri: str | None, error: str) -> DriftDecision:
    """DriftDetected Unknown while the profiles or the baseline cannot be read (and never
    were): status.drift keeps its last reading, the gauge goes."""
    return DriftDecision("Unknown", "ProfilesUnreadable" if what == "profiles" else "BaselineUnreadable",
                         f"reading the {what} at {uri}: {error}", None)


def drift_patch(status: Any, decision: DriftDecision) -> dict[str, Any]:
    """The status patch of one drift reading (None-valued fields remove the stored ones)."""
    out = conditions_patch(status, (status or {}).get("observedGeneration"),
                           [("DriftDetected", decision.status, decision.reason, decision.message)])
    if decision.drift is not None:
        out["drift"] = decision.drift
    return out


def drift_changed(old: dict[str, Any] | None, decision: DriftDecision) -> bool:
    """Whether a reading changes DriftDetected's status or reason (an Event and a log line)."""
    return (old or {}).get("status") != decision.status or (old or {}).get("reason") != decision.reason


# ---------------------------------------------------------------------------- traffic split

@dataclasses.dataclass(frozen=True)
class RevisionView:
    """What the handlers observed of a canary or a shadow: its share, how its model resolved,
    and its Deployment as stored (None until the model first resolves)."""

    percent: float
    resolution: ModelResolution
    deployment: dict[str, Any] | None
    #: why its pods cannot start (pod_state.not_starting), while none is ready
    stuck: str | None = None


def revision_status(view: RevisionView) -> dict[str, Any]:
    st = (view.deployment or {}).get("status") or {}
    model = served_model(view.deployment, view.resolution)
    ready = int(st.get("readyReplicas") or 0)
    message = None if view.resolution.ready else view.resolution.message
    if message is None and ready == 0:
        message = (f"no pod ready ({view.stuck})" if view.stuck else "no pod ready yet") + \
            "; its share goes to the stable revision"
    out: dict[str, Any] = {"percent": view.percent, "replicas": int(st.get("replicas") or 0),
                           "readyReplicas": ready, "message": message}
    if model is not None:
        out["model"] = model
    return out


def traffic_status(spec: InferenceServiceSpec, revisions: dict[str, RevisionView],
                   router: dict[str, Any] | None, to_router: bool,
                   draining: list[str] | None = None, router_pods_left: bool = False) -> dict[str, Any] | None:
    """status.traffic: None when neither a canary nor a shadow is set and nothing is left
    (``draining``: removed roles kept until no router pod can call them; while a router pod
    is left the status stays, so the next pass looks again)."""
    if not manifests.routed(spec) and not draining and router is None and not router_pods_left:
        return None
    return {"routed": to_router, "draining": sorted(draining or []),
            "routerReadyReplicas": int(((router or {}).get("status") or {}).get("readyReplicas") or 0),
            "canary": revision_status(revisions[manifests.CANARY]) if manifests.CANARY in revisions else None,
            "shadow": revision_status(revisions[manifests.SHADOW]) if manifests.SHADOW in revisions else None}
