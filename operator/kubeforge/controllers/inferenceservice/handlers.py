"""InferenceService handlers: resolve the model (a URI, or the committed export of a
TrainingJob), server-side apply the Deployment, Service, PodDisruptionBudget and HPA built by
``manifests``, and write the status ``plan`` decides.

Handlers:
- create/update/resume of an InferenceService, and a periodic pass over those that follow a
  TrainingJob's export (the store has no watch: the pass re-reads the commit marker);
- events of the serving Deployments and pods, which refresh replicas and the Available/Ready
  conditions of their owner;
- with spec.logging, a periodic drift pass over the services that capture: it reads the
  servers' live prompt profiles and the served export's baseline through ``StoreAccess``
  (never in a reconcile, never waiting for S3) and writes status.drift, DriftDetected and
  ``kubeforge_drift_psi``.

The operator writes ``spec.replicas`` of nothing: the HPA and ``kubectl scale`` write it
through the scale subresource, and the Deployment follows it. State (the services that follow
an export, which are Ready) is the operator's, in ``memo.inferenceservices``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any, cast

import kopf

from kubeforge import k8s
from kubeforge.api import CheckpointPolicy, CheckpointPolicySpec, InferenceService, InferenceServiceSpec, TrainingJob
from kubeforge.api.common import API_VERSION, GROUP, VERSION, LocalObjectReference, condition
from kubeforge.api.contract import ENV_S3_ACCESS_KEY_ID, ENV_S3_SECRET_ACCESS_KEY, SERVING_PORT
from kubeforge.api.inferenceservice import CanaryRevision, DriftSettings, ModelSource
from kubeforge.controllers.background import Background, SideBySide
from kubeforge.controllers.inferenceservice import manifests
from kubeforge.controllers.inferenceservice.manifests import Owner, ResolvedCapture, ResolvedModel
from kubeforge.controllers.inferenceservice.plan import (
    DRIFT_INTERVAL_S,
    PROFILE_MAX_AGE_S,
    Baseline,
    CaptureResolution,
    DriftDecision,
    LiveProfiles,
    ModelResolution,
    RevisionView,
    StoreKey,
    baseline_uri,
    choose_export,
    decide_drift,
    drift_changed,
    drift_patch,
    drift_unreadable,
    model_of,
    model_of_status,
    profile_fits,
    resolve_capture,
    status_patch,
    traffic_status,
)
from kubeforge.controllers.pod_state import not_starting
from kubeforge.controllers.status import conditions_patch, parse_spec
from kubeforge.controllers.store_access import Reading, StoreAccess, shared_stores
from kubeforge.metrics import DRIFT_PSI, INFERENCESERVICE_READY, INFERENCESERVICES_READY, reconciling, remove_series
from kubeforge.settings import OperatorSettings
from kubeforge.store import NotFound, S3Options, StoreError, flywheel, open_backend, open_policy_store
from kubeforge.store.flywheel import Profile
from kubeforge.store.layout import utc_now
from kubeforge.store.report import job_run

log = logging.getLogger(__name__)
Key = tuple[str, str]
#: The first item of this controller's StoreAccess keys (the second is the service's key).
PROFILES_READ, BASELINE_READ = "inferenceservice-profiles", "inferenceservice-baseline"


@dataclasses.dataclass(frozen=True)
class DriftTarget:
    """What the drift pass reads for one capturing service: its capture directory and the
    model it serves (whose directory holds the baseline), each with its store's key."""

    owner: Owner
    settings: DriftSettings
    capture: ResolvedCapture
    capture_store: StoreKey
    model: ResolvedModel
    model_store: StoreKey | None


class InferenceServices:
    """The controller's state: the services that follow a TrainingJob's export (the export
    poll goes over them), whether each is Ready (the gauge), and those that capture (the
    drift pass goes over them)."""

    def __init__(self, settings: OperatorSettings, stores: StoreAccess | None = None) -> None:
        self.settings = settings
        self.following: set[Key] = set()
        self.ready: dict[Key, bool] = {}
        #: services seen deleted (until one of the name is seen again): a reconcile still running
        #: when its service went must not count it back
        self.deleted: set[Key] = set()
        #: which stores are down (shared with the other controllers): their reads fail fast
        self.stores = stores or StoreAccess()
        #: the export poll: services side by side, each at most once at a time
        self.passes: SideBySide[Key] = SideBySide("export-poll", settings.inferenceservice.export_poll_concurrency)
        #: services whose capture is resolved, and what their drift reading needs
        self.capturing: dict[Key, DriftTarget] = {}
        #: services with kubeforge_drift_psi series
        self.measured: set[Key] = set()
        #: guards ``capturing`` and ``measured`` (reconciles, the drift pass and store threads)
        self.lock = threading.Lock()
        self.drift_passes: SideBySide[Key] = SideBySide("drift", settings.inferenceservice.export_poll_concurrency)
        #: one drift reading applied at a time per service (the pass, and a read that finished)
        self.drift_locks: dict[Key, threading.Lock] = {}
        #: one reconciliation at a time per service: the role Deployments' events and the
        #: service's own run side by side, and the Service's selector must follow the last read
        self.reconcile_locks: dict[Key, threading.Lock] = {}

    def reconcile_lock(self, key: Key) -> threading.Lock:
        with self.lock:
            return self.reconcile_locks.setdefault(key, threading.Lock())

    def count_ready(self, owner: Owner, status: Mapping[str, Any]) -> None:
        if (owner.namespace, owner.name) in self.deleted:
            return  # a reconcile that ended after the service was deleted: it counts no more
        ready = condition(status.get("conditions"), "Ready")
        is_ready = bool(ready and ready["status"] == "True")
        self.ready[(owner.namespace, owner.name)] = is_ready
        INFERENCESERVICE_READY.labels(owner.namespace, owner.name).set(1 if is_ready else 0)
        INFERENCESERVICES_READY.set(sum(self.ready.values()))

    def forget(self, key: Key) -> None:
        """A deleted service neither follows an export nor counts as Ready any more, and its
        drift is no longer measured."""
        self.deleted.add(key)
        self.following.discard(key)
        if self.ready.pop(key, None) is not None:
            INFERENCESERVICE_READY.remove(*key)
        INFERENCESERVICES_READY.set(sum(self.ready.values()))
        self.stop_capture(key)
        self.drift_locks.pop(key, None)
        self.reconcile_locks.pop(key, None)

    def capture(self, key: Key, target: DriftTarget) -> None:
        """Measure ``key``'s drift from now on with ``target`` (a changed one is read afresh)."""
        with self.lock:
            if key in self.deleted:
                return  # a reconcile that ended after the service was deleted
            old = self.capturing.get(key)
            self.capturing[key] = target
        if old is not None and old != target:
            self.stores.forget(lambda k: _drift_read_of(k, key))

    def stop_capture(self, key: Key) -> None:
        """spec.logging removed, its store not resolved, or the service deleted: no drift
        reading, no gauge series, no cached answers."""
        with self.lock:
            self.capturing.pop(key, None)
            self.set_psi(key, {})
        self.stores.forget(lambda k: _drift_read_of(k, key))

    def set_psi(self, key: Key, psi: Mapping[str, float]) -> None:
        """kubeforge_drift_psi of ``key``: one series per feature measured, none when empty
        (call with ``lock`` held)."""
        for feature in flywheel.FEATURES:
            if feature in psi:
                DRIFT_PSI.labels(*key, feature).set(psi[feature])
            elif key in self.measured:
                remove_series(DRIFT_PSI, *key, feature)
        if psi:
            self.measured.add(key)
        else:
            self.measured.discard(key)


def _drift_read_of(read_key: Hashable, key: Key) -> bool:
    """Whether a StoreAccess key is one of this service's drift reads."""
    return (isinstance(read_key, tuple) and len(read_key) >= 2 and read_key[0] in (PROFILES_READ, BASELINE_READ)
            and read_key[1] == key)


def _state(memo: kopf.Memo) -> InferenceServices:
    return cast(InferenceServices, memo.inferenceservices)


# ---------------------------------------------------------------------------- reads

def read_deployment(owner: Owner) -> dict[str, Any] | None:
    return k8s.get_or_none(k8s.apps().read_namespaced_deployment, manifests.child_name(owner.name), owner.namespace)


def read_stuck(owner: Owner) -> str | None:
    """Why the service's pods cannot start, if any cannot (image missing, crash loop...)."""
    return not_starting(k8s.list_pods(owner.namespace, manifests.selector(owner.name)))


def resolve_model(state: InferenceServices, owner: Owner, m: ModelSource,
                  served: dict[str, Any] | None) -> ModelResolution:
    """Where the model (spec.model, or a canary's or shadow's) is and whether it can be served;
    ``served`` is status.model as the existing Deployment says (for Pinned)."""
    secret = m.credentials_secret_ref.name if m.credentials_secret_ref else None
    if m.uri:
        return ModelResolution(True, "ModelURI", f"serving {m.uri}",
                               ResolvedModel(uri=m.uri, s3_endpoint=m.s3_endpoint, credentials_secret=secret),
                               (owner.namespace, m.uri) if m.uri.startswith("s3://") else None)
    assert m.training_job_ref is not None
    job_name = m.training_job_ref.name
    job = k8s.get_custom(owner.namespace, TrainingJob.plural, job_name)
    if job is None:
        return ModelResolution(False, "WaitingForTrainingJob", f"TrainingJob {job_name} does not exist")
    policy_ref = (job.get("spec") or {}).get("checkpointPolicyRef")
    if not policy_ref:
        return ModelResolution(False, "NoExportStore",
                               f"TrainingJob {job_name} has no checkpointPolicyRef, so its export has no store")
    policy = k8s.get_custom(owner.namespace, CheckpointPolicy.plural, policy_ref["name"])
    if policy is None:
        return ModelResolution(False, "WaitingForTrainingJob",
                               f"CheckpointPolicy {policy_ref['name']} of TrainingJob {job_name} does not exist")
    pspec = CheckpointPolicySpec.model_validate(policy["spec"])
    s3 = pspec.storage.s3
    if s3 is None:
        return ModelResolution(False, "UnsupportedStorage",
                               f"CheckpointPolicy {policy_ref['name']} stores on a volume; "
                               "serving an export needs S3 storage")
    refused = trainer_credentials_refused(state, m.credentials_secret_ref, policy_ref["name"],
                                          s3.credentials_secret_ref.name)
    if refused:
        return ModelResolution(False, "ReadOnlyCredentialsRequired", refused)
    try:
        secret_data = k8s.read_secret(owner.namespace, s3.credentials_secret_ref.name)
    except k8s.SecretForbidden as e:
        return ModelResolution(False, "SecretForbidden", str(e))
    store = open_policy_store(pspec, secret_data, state.settings.inferenceservice.store_retry_deadline_s)
    # the export of this object's run only: one of a deleted job of the same name is never served
    run = job_run(job)
    export_uri = store.export_uri(owner.namespace, run)
    try:  # fails fast while the store is down
        marker = state.stores.call((owner.namespace, policy_ref["name"]),
                                   lambda: store.export_marker(owner.namespace, run))
    except StoreError as e:
        return ModelResolution(False, "StoreUnreachable", f"reading the export marker at {export_uri}: {e}"
                                                          + _still_serving(served, export_uri))
    if marker is None:
        return ModelResolution(False, "WaitingForTrainingJob",
                               f"TrainingJob {job_name} (run {run}) has no committed export at {export_uri} yet"
                               + _still_serving(served, export_uri))
    if (served or {}).get("uri") != export_uri:
        served = None  # what runs is another run's export (or none): Pinned pins this run's first
    revision, step = choose_export(m.update_policy, served, marker)
    model = ResolvedModel(uri=export_uri, revision=revision, step=step,
                          s3_endpoint=m.s3_endpoint or s3.endpoint, s3_region=s3.region,
                          s3_force_path_style=s3.force_path_style,
                          credentials_secret=secret or s3.credentials_secret_ref.name)
    message = f"export of TrainingJob {job_name} committed {marker.time} (step {marker.step})"
    if revision != marker.time:
        message = (f"Pinned to revision {revision}; a newer export committed {marker.time} is not served "
                   "(pods started from now on refuse it: copy the pinned export and serve it by uri)")
    if secret is None:
        message += (f"; the pods use CheckpointPolicy {policy_ref['name']}'s read-write Secret "
                    f"{s3.credentials_secret_ref.name} (security.servingPolicyCredentials allows it)")
    elif secret == s3.credentials_secret_ref.name:
        # the operator cannot see what a key may do, only that it is the trainer's Secret
        message += (f"; spec.model.credentialsSecretRef names CheckpointPolicy {policy_ref['name']}'s own Secret "
                    f"{secret}, which can write and delete checkpoints: give the servers a read-only credential")
    return ModelResolution(True, "ExportFound", message, model, (owner.namespace, policy_ref["name"]))


def read_capture(state: InferenceServices, owner: Owner, spec: InferenceServiceSpec) -> CaptureResolution | None:
    """spec.logging's store resolved (``plan.resolve_capture``); None without spec.logging.
    Only the API server is read: nothing here waits for S3."""
    lg = spec.logging
    if lg is None:
        return None
    policy, error = None, None
    ref = lg.store.checkpoint_policy_ref
    if ref is not None:
        body = k8s.get_custom(owner.namespace, CheckpointPolicy.plural, ref.name)
        if body is not None:
            try:
                policy = CheckpointPolicySpec.model_validate(body.get("spec") or {})
            except ValueError as e:
                error = f"CheckpointPolicy {ref.name} of logging.store is invalid: {e}"
    return resolve_capture(owner, lg, policy, state.settings.security.serving_policy_credentials, error)


def trainer_credentials_refused(state: InferenceServices, own: LocalObjectReference | None, policy: str,
                                policy_secret: str) -> str | None:
    """Why the servers of an export may not start without a credential of their own, or None.
    The CheckpointPolicy's Secret is the trainer's: it writes and deletes checkpoints, and a
    server only reads. It is used only where the operator's setting allows it."""
    if own is not None or state.settings.security.serving_policy_credentials:
        return None
    return (f"spec.model.credentialsSecretRef must name a read-only credential of the export's store: "
            f"CheckpointPolicy {policy}'s Secret {policy_secret} can write and delete checkpoints, so servers "
            "do not get it (unless the operator sets security.servingPolicyCredentials)")


def _without_empty(value: Any) -> Any:
    """``value`` as the API server stores it: without empty lists and empty ``matchLabels``.
    An empty selector itself means something (``podSelector: {}``: every pod of the namespace,
    ``namespaceSelector: {}``: every namespace) and is kept."""
    if isinstance(value, dict):
        kept = {k: _without_empty(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v != [] and not (k == "matchLabels" and v == {})}
    if isinstance(value, list):
        return [_without_empty(v) for v in value]
    return value


def _still_serving(served: dict[str, Any] | None, export_uri: str) -> str:
    """The note that running pods keep serving an earlier run's export until this run commits one."""
    uri = (served or {}).get("uri")
    if not uri or uri == export_uri:
        return ""
    return f"; the running pods keep serving {uri} (another run's export) until then"


# ---------------------------------------------------------------------------- writes

def sync_hpa(owner: Owner, spec: InferenceServiceSpec, body: dict[str, Any]) -> None:
    """Apply the HPA, or delete it when spec.autoscaling is gone; an Event for each change."""
    name = manifests.child_name(owner.name)
    existing = k8s.get_or_none(k8s.autoscaling().read_namespaced_horizontal_pod_autoscaler, name, owner.namespace)
    desired = manifests.build_hpa(owner, spec)
    if desired is None:
        if existing is not None:
            k8s.delete(k8s.autoscaling().delete_namespaced_horizontal_pod_autoscaler, name, owner.namespace)
            k8s.record_event(body, "AutoscalerRemoved", f"spec.autoscaling removed: deleted HPA {name}")
        return
    k8s.apply(desired)
    summary = (f"HPA {name}: {desired['spec']['minReplicas']}..{desired['spec']['maxReplicas']} replicas, "
               f"behavior {json.dumps(desired['spec']['behavior'], separators=(',', ':'))}")
    if existing is None:
        k8s.record_event(body, "AutoscalerCreated", summary)
    elif not _behavior_matches(existing["spec"].get("behavior") or {}, desired["spec"]["behavior"]) or (
            existing["spec"].get("minReplicas"), existing["spec"]["maxReplicas"]) != (
            desired["spec"]["minReplicas"], desired["spec"]["maxReplicas"]):
        k8s.record_event(body, "AutoscalerUpdated", summary)


def _apply_policy(state: InferenceServices, owner: Owner, spec: InferenceServiceSpec, body: dict[str, Any],
                  role: str, router_peer: bool) -> None:
    name = manifests.child_name(owner.name) if role == manifests.STABLE else manifests.role_child_name(owner.name, role)
    existing = k8s.get_or_none(k8s.networking().read_namespaced_network_policy, name, owner.namespace)
    security = state.settings.security
    # the router's counters are read by the operator (a Flywheel's guard rails)
    scrape = security.scrape_from + (security.operator_peers if role == manifests.ROUTER else ())
    desired = manifests.build_network_policy(owner, spec, scrape, role, router_peer=router_peer)
    k8s.apply(desired)
    peers = desired["spec"]["ingress"][0]["from"]
    stored = ((existing or {}).get("spec") or {}).get("ingress", [{}])[0].get("from")
    # the API server drops empty lists and maps (matchExpressions: [], except: []): compare without them
    if existing is None or _without_empty(stored) != _without_empty(peers):
        k8s.record_event(body, "NetworkPolicyApplied", f"NetworkPolicy {name}: port {SERVING_PORT} only from "
                         f"{json.dumps(peers, separators=(',', ':'))}")


def guard_new_roles(state: InferenceServices, owner: Owner, spec: InferenceServiceSpec, body: dict[str, Any],
                    existing: Mapping[str, dict[str, Any]]) -> None:
    """The policies of the roles spec wants and that have no Deployment yet, before their pods
    are made (a canary is never open to the namespace for a moment)."""
    if not state.settings.security.network_policies:
        return
    for role, wanted in ((manifests.CANARY, spec.canary), (manifests.SHADOW, spec.shadow),
                         (manifests.ROUTER, manifests.routed(spec) or None)):
        if wanted is not None and role not in existing:
            _apply_policy(state, owner, spec, body, role, router_peer=True)


def sync_network_policy(state: InferenceServices, owner: Owner, spec: InferenceServiceSpec, body: dict[str, Any],
                        live: frozenset[str] = frozenset(), gone: frozenset[str] = frozenset()) -> None:
    """Apply the servers' NetworkPolicy (an Event naming who may connect, when that changes),
    and the canary's, shadow's and router's while they live (``live``, from ``sync_traffic``:
    kept while a router pod may still call them, and the stable pods admit the router as long);
    delete a role's once its children are ``gone``, or all of them when the operator's setting
    turns them off. The many services without a canary make no call for the roles."""
    security = state.settings.security
    for role in (manifests.STABLE, manifests.CANARY, manifests.SHADOW, manifests.ROUTER):
        name = manifests.child_name(owner.name) if role == manifests.STABLE else manifests.role_child_name(owner.name, role)
        if not security.network_policies:
            if (role == manifests.STABLE or role in live or role in gone) and \
                    k8s.delete_network_policy(name, owner.namespace) and role == manifests.STABLE:
                k8s.record_event(body, "NetworkPolicyRemoved", f"deleted NetworkPolicy {name}: the operator makes none")
        elif role == manifests.STABLE or role in live:
            _apply_policy(state, owner, spec, body, role, router_peer=manifests.ROUTER in live)
        elif role in gone:
            k8s.delete_network_policy(name, owner.namespace)


def role_deployments(owner: Owner) -> dict[str, dict[str, Any]]:
    """The canary's, shadow's and router's Deployments that exist, by role (one LIST)."""
    listed = k8s.get_or_none(k8s.apps().list_namespaced_deployment, owner.namespace,
                             label_selector=f"{manifests.SERVICE_LABEL}={owner.name},{manifests.ROLE_LABEL}")
    out = {}
    for d in (listed or {}).get("items") or []:
        role = ((d.get("metadata") or {}).get("labels") or {}).get(manifests.ROLE_LABEL)
        if role:
            out[role] = d
    return out


def _ready(deployment: dict[str, Any] | None) -> bool:
    return int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0) > 0


def _rolled_out(router: dict[str, Any], pods: list[dict[str, Any]]) -> bool:
    """Every router pod, terminating ones included (a Deployment's status does not count
    those), runs the router's current config: none can call a revision the config dropped."""
    st = router.get("status") or {}
    want = int((router.get("spec") or {}).get("replicas") or 0)
    digest = ((router["spec"]["template"]["metadata"].get("annotations") or {})
              .get(manifests.ROUTER_CONFIG_ANNOTATION))
    return ((st.get("observedGeneration") or 0) >= (router["metadata"].get("generation") or 0)
            and int(st.get("updatedReplicas") or 0) == want and int(st.get("replicas") or 0) == want
            and all(((p.get("metadata") or {}).get("annotations") or {}).get(manifests.ROUTER_CONFIG_ANNOTATION)
                    == digest for p in pods))


def _delete_role(owner: Owner, role: str) -> None:
    """Delete a canary's, shadow's or router's Deployment and Service (the router's ConfigMap
    goes with the rest, once no router pod is left)."""
    name, ns = manifests.role_child_name(owner.name, role), owner.namespace
    if role != manifests.ROUTER:
        k8s.delete(k8s.core().delete_namespaced_service, name, ns)
    k8s.delete(k8s.apps().delete_namespaced_deployment, name, ns)


@dataclasses.dataclass(frozen=True)
class TrafficResult:
    status: dict[str, Any] | None
    #: roles whose pods exist or are wanted: their NetworkPolicies stay
    live: frozenset[str]
    #: roles removed in this pass
    gone: frozenset[str]


def sync_traffic(state: InferenceServices, owner: Owner, spec: InferenceServiceSpec, body: dict[str, Any],
                 capture: ResolvedCapture | None, existing: Mapping[str, dict[str, Any]]) -> TrafficResult:
    """Apply or remove the canary, the shadow and the router, in an order that drops nothing:

    - the Service selects the router while a router pod is ready, else the stable pods (until
      the router is ready, and whenever every router pod is down, the stable pods answer);
    - when canary and shadow both go, the Service returns to the stable pods first, then the
      router Deployment is deleted (its pods drain what they hold), and only once no router pod
      is left do the revisions, ``<name>-stable``, the ConfigMap and the policies go;
    - when one of them goes while the other stays, its children stay until every router pod
      runs the new config (the routers' rollout is complete).

    What exists is read from the cluster (one LIST of the role Deployments; the router's pods
    only when there is one), never from the status, so a lost status write orphans nothing."""
    image = state.settings.images.workload
    old = (body.get("status") or {}).get("traffic") or {}
    ns = owner.namespace
    router_pods = k8s.list_pods(ns, manifests.role_selector(owner.name, manifests.ROUTER)) \
        if existing or old else []
    views: dict[str, RevisionView] = {}
    for role, rev in ((manifests.CANARY, spec.canary), (manifests.SHADOW, spec.shadow)):
        if rev is None:
            continue
        title = role.capitalize()
        current = existing.get(role)
        resolution = resolve_model(state, owner, rev.model, model_of_status(current) if current else None)
        model = resolution.model or (model_of(current) if current is not None else None)
        percent = rev.traffic_percent if isinstance(rev, CanaryRevision) else rev.sample_percent
        deployment = current
        if model is not None:
            deployment = k8s.apply(manifests.build_deployment(owner, spec, model, image, capture, role=role))
            k8s.apply(manifests.build_role_service(owner, role))
            if current is None:
                k8s.record_event(body, f"{title}Started", f"{role} {model.uri} at {percent:g} %")
        elif current is None and not old.get(role):
            k8s.record_event(body, f"{title}Waiting", f"spec.{role}.model: {resolution.message}", warning=True)
        before = (old.get(role) or {}).get("percent")
        if current is not None and before is not None and before != percent:
            k8s.record_event(body, f"{title}PercentChanged", f"{role}: {before:g} % -> {percent:g} %")
        stuck = not_starting(k8s.list_pods(ns, manifests.role_selector(owner.name, role))) \
            if deployment is not None and not int((deployment.get("status") or {}).get("readyReplicas") or 0) else None
        views[role] = RevisionView(percent, resolution, deployment, stuck)

    router = existing.get(manifests.ROUTER)
    routing = manifests.routed(spec)
    if routing:
        k8s.apply(manifests.build_role_service(owner, manifests.STABLE))
        k8s.apply(manifests.build_router_configmap(owner, spec))
        router = k8s.apply(manifests.build_router_deployment(owner, spec, image))
        k8s.apply(manifests.build_pdb(owner, spec, manifests.ROUTER))
    to_router = routing and _ready(router)
    service_name = manifests.child_name(owner.name)
    k8s.apply(manifests.build_service(owner, to_router))
    if to_router and not old.get("routed"):
        k8s.record_event(body, "TrafficRouted", f"Service {service_name} now selects the router "
                         f"{manifests.role_child_name(owner.name, manifests.ROUTER)}: "
                         f"{manifests.router_config_json(owner, spec)}")
    elif old.get("routed") and not to_router:
        why = "spec.canary and spec.shadow removed" if not routing else "no router pod is ready"
        k8s.record_event(body, "TrafficUnrouted", f"Service {service_name} selects the stable pods again: {why}",
                         warning=routing)
    if not routing and router is not None:
        _delete_role(owner, manifests.ROUTER)  # after the Service switch: its pods drain what they hold
        k8s.record_event(body, "RouterRemoved", "deleting the router; the canary and shadow go once its pods are gone")
    quiet = not routing and router is None and not router_pods
    safe = quiet or (routing and router is not None and _rolled_out(router, router_pods))
    gone, draining = set(), []
    for role in (manifests.CANARY, manifests.SHADOW):
        if role in views or not (role in existing or old.get(role) or role in (old.get("draining") or [])):
            continue
        if safe:
            _delete_role(owner, role)
            gone.add(role)
            if role in existing:
                k8s.record_event(body, f"{role.capitalize()}Removed",
                                 f"spec.{role} removed: deleted its Deployment and Service")
        else:
            draining.append(role)
    if quiet and (existing or old):
        for role in (manifests.CANARY, manifests.SHADOW):
            if role not in views:
                k8s.delete(k8s.core().delete_namespaced_service, manifests.role_child_name(owner.name, role), ns)
                gone.add(role)
        k8s.delete(k8s.core().delete_namespaced_service, manifests.role_child_name(owner.name, manifests.STABLE), ns)
        k8s.delete(k8s.core().delete_namespaced_config_map, manifests.role_child_name(owner.name, manifests.ROUTER), ns)
        k8s.delete(k8s.policy().delete_namespaced_pod_disruption_budget,
                   manifests.role_child_name(owner.name, manifests.ROUTER), ns)
        gone.add(manifests.ROUTER)
    live = set(views) | set(draining)
    if routing or router_pods or router is not None:
        live.add(manifests.ROUTER)
    return TrafficResult(traffic_status(spec, views, router, to_router, draining, bool(router_pods)),
                         frozenset(live), frozenset(gone))


def _behavior_matches(observed: dict[str, Any], desired: dict[str, Any]) -> bool:
    """True when every field we set has that value (the API server fills in the rest)."""
    for direction, rules in desired.items():
        seen = observed.get(direction) or {}
        if any(seen.get(k) != v for k, v in rules.items()):
            return False
    return True


def _write_status(owner: Owner, compute: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any] | None:
    """Conflict-safe: ``compute`` gets the stored status, and runs again if it changed before the write."""
    return k8s.update_status(InferenceService.plural, owner.namespace, owner.name, compute)


def _events_for_transition(body: dict[str, Any], old: Mapping[str, Any] | None, new: dict[str, Any],
                           old_revision: str | None, new_model: ResolvedModel | None) -> None:
    before = condition((old or {}).get("conditions"), "ModelReady") or {}
    after = condition(new["conditions"], "ModelReady") or {}
    if (before.get("status"), before.get("reason")) != (after["status"], after["reason"]):
        k8s.record_event(body, after["reason"], after["message"], warning=after["status"] != "True")
    if new_model is not None and new_model.revision and old_revision and new_model.revision != old_revision:
        k8s.record_event(body, "ModelRolloutStarted",
                         f"rolling out export revision {new_model.revision} (was {old_revision})")
    _capture_events(body, old, new)


def _capture_events(body: dict[str, Any], old: Mapping[str, Any] | None, new: dict[str, Any]) -> None:
    """An Event when CaptureReady changes, when what is captured changes (status.capture), and
    when capture stops because spec.logging went."""
    before = condition((old or {}).get("conditions"), "CaptureReady") or {}
    after = condition(new["conditions"], "CaptureReady")
    if after is None:
        if before:
            k8s.record_event(body, "CaptureStopped", "spec.logging removed: the servers capture nothing and "
                             "/v1/feedback answers 501")
        return
    if (before.get("status"), before.get("reason")) != (after["status"], after["reason"]):
        k8s.record_event(body, after["reason"], after["message"], warning=after["status"] != "True")
    elif after["status"] == "True" and (old or {}).get("capture") != new.get("capture"):
        k8s.record_event(body, "CaptureChanged", after["message"])


def track_capture(state: InferenceServices, owner: Owner, spec: InferenceServiceSpec,
                  capture: CaptureResolution | None, resolution: ModelResolution) -> None:
    """Register what the drift pass reads for this service, or stop measuring it. While the
    model cannot be resolved (the store is down, say) the model of the last resolution stays."""
    key = (owner.namespace, owner.name)
    if spec.logging is None or capture is None or capture.capture is None or capture.store is None:
        state.stop_capture(key)
        return
    old = state.capturing.get(key)
    if resolution.model is not None:
        model, model_store = resolution.model, resolution.store
    elif old is not None:
        model, model_store = old.model, old.model_store
    else:
        return  # nothing is served yet: nothing to compare with
    state.capture(key, DriftTarget(owner, spec.logging.drift, capture.capture, capture.store, model, model_store))


# ---------------------------------------------------------------------------- handlers

def reconcile_service(state: InferenceServices, body: dict[str, Any], logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """One reconciliation: resolve, apply the children, write the status (here, not through
    kopf's patch after the handler: the Deployment's pods may have turned ready meanwhile, and
    their events found no status to update; a re-read after the write leaves no such gap)."""
    meta = body["metadata"]
    lock = state.reconcile_lock((meta["namespace"], meta["name"]))
    if not lock.acquire(blocking=False):
        # another pass ran meanwhile: what this one read may be older than what it wrote
        lock.acquire()
        fresh = k8s.get_custom(meta["namespace"], InferenceService.plural, meta["name"])
        if fresh is None or fresh["metadata"].get("deletionTimestamp"):
            lock.release()
            return
        body, meta = fresh, fresh["metadata"]
    try:
        _reconcile_locked(state, body, logger)
    finally:
        lock.release()


def _reconcile_locked(state: InferenceServices, body: dict[str, Any],
                      logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    meta, status = body["metadata"], body.get("status") or {}
    with reconciling(InferenceService.kind):
        parsed, error = parse_spec(InferenceServiceSpec, body.get("spec"))
        generation = meta.get("generation")
        owner = Owner(meta["name"], meta["namespace"], meta["uid"])
        if parsed is None:
            logger.warning("invalid spec: %s", error)
            _write_status(owner, lambda st: conditions_patch(st, generation, [("Ready", False, "InvalidSpec", str(error))]))
            return
        existing = role_deployments(owner)
        if manifests.ROUTER in existing:
            # first of all (any later step may fail): the Service selects a router only while
            # one of its pods is ready
            k8s.apply(manifests.build_service(owner, manifests.routed(parsed) and _ready(existing[manifests.ROUTER])))
        deployment = read_deployment(owner)
        served = model_of_status(deployment) if deployment is not None else None
        resolution = resolve_model(state, owner, parsed.model, served)
        capture = read_capture(state, owner, parsed)
        model = resolution.model
        if model is None and deployment is not None:
            model = model_of(deployment)  # keep serving what runs, and keep following spec.replicas
        if model is not None:
            deployment = k8s.apply(manifests.build_deployment(owner, parsed, model, state.settings.images.workload,
                                                              capture.capture if capture else None))
        k8s.apply(manifests.build_pdb(owner, parsed))
        sync_hpa(owner, parsed, body)
        guard_new_roles(state, owner, parsed, body, existing)
        result = sync_traffic(state, owner, parsed, body, capture.capture if capture else None, existing)
        sync_network_policy(state, owner, parsed, body, result.live, result.gone)
        traffic = result.status
        track_capture(state, owner, parsed, capture, resolution)
        stuck = read_stuck(owner)

        def whole(st: dict[str, Any], dep: dict[str, Any] | None, why: str | None) -> dict[str, Any]:
            return {**status_patch(owner, parsed, st, generation, resolution, dep, why, capture), "traffic": traffic}
        new = whole(status, deployment, stuck)
        _events_for_transition(body, status, new, (served or {}).get("revision"), resolution.model)
        if not resolution.ready:
            logger.info("model not ready: %s", resolution.message)
        if capture is not None and not capture.ready:
            logger.info("capture not ready: %s", capture.message)
        written = _write_status(owner, lambda st: whole(st, deployment, stuck)) or new
        deployment, stuck = read_deployment(owner), read_stuck(owner)

        def fresh(st: dict[str, Any]) -> dict[str, Any] | None:
            out = whole(st, deployment, stuck)
            return out if out != {k: st.get(k) for k in out} else None
        state.count_ready(owner, _write_status(owner, fresh) or written)


@kopf.on.resume(GROUP, VERSION, InferenceService.plural)
@kopf.on.create(GROUP, VERSION, InferenceService.plural)
@kopf.on.update(GROUP, VERSION, InferenceService.plural, field="spec")
def reconcile(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    reconcile_service(_state(memo), _plain(body), logger)


def _plain(body: kopf.Body) -> dict[str, Any]:
    """kopf's live view of the object as the plain dict the reads give."""
    return cast(dict[str, Any], json.loads(json.dumps(dict(body))))


@kopf.on.event(GROUP, VERSION, InferenceService.plural)
def track_followers(type: str | None, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, memo: kopf.Memo,
                    **_: Any) -> None:
    key = (str(meta["namespace"]), str(meta["name"]))
    state = _state(memo)
    if type == "DELETED" or meta.get("deletionTimestamp"):
        state.forget(key)
        return
    state.deleted.discard(key)
    # the export poll also passes over services with a canary or a shadow: their models may
    # come from exports, and their routing converges without an event to wake it
    if (spec.get("model") or {}).get("trainingJobRef") or spec.get("canary") or spec.get("shadow") or \
            status.get("traffic"):
        state.following.add(key)
    else:
        state.following.discard(key)


def repoll(state: InferenceServices, namespace: str, name: str) -> None:
    """One reconciliation outside kopf's handlers: the same function."""
    body = k8s.get_custom(namespace, InferenceService.plural, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    reconcile_service(state, body, log)


async def _poll_exports(state: InferenceServices) -> None:
    """Every following service side by side: one whose store is dead delays no other."""
    await state.passes.run(sorted(state.following), lambda key: repoll(state, *key),
                           state.settings.inferenceservice.export_poll_interval_s)


async def _measure_drifts(state: InferenceServices) -> None:
    """Every capturing service side by side (each only starts reads and applies answers)."""
    await state.drift_passes.run(sorted(state.capturing), lambda key: measure_drift(state, key), DRIFT_INTERVAL_S)


@kopf.on.startup()
async def start_export_poll(memo: kopf.Memo, **_: Any) -> None:
    settings = cast(OperatorSettings, memo.settings)
    state = memo.inferenceservices = InferenceServices(settings, shared_stores(memo))
    background = cast(Background, memo.background)
    background.close_with(state.passes.close)
    background.close_with(state.drift_passes.close)
    background.every("inferenceservice-export-poll", settings.inferenceservice.export_poll_interval_s,
                     lambda: _poll_exports(state))
    background.every("inferenceservice-drift", DRIFT_INTERVAL_S, lambda: _measure_drifts(state))


CHILD_LABELS = {"app.kubernetes.io/managed-by": "kubeforge", "app.kubernetes.io/component": manifests.COMPONENT}


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_LABELS)
def deployment_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Replicas and availability follow the Deployment between reconciliations; a deleted one
    is made again."""
    name = body.metadata.labels.get(manifests.SERVICE_LABEL)
    namespace = body.metadata.namespace
    if not name or namespace is None:
        return
    if type == "DELETED":
        recreate(_state(memo), namespace, name, "Deployment")
        return
    if body.metadata.labels.get(manifests.ROLE_LABEL):
        # a canary's, shadow's or router's pods turned ready (or not): status.traffic, and the
        # Service's switch to a ready router, are the reconciliation's
        repoll(_state(memo), namespace, name)
        return
    refresh_availability(_state(memo), namespace, name, _plain(body))


@kopf.on.event("", "v1", "services", labels=CHILD_LABELS)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=CHILD_LABELS)
@kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers", labels=CHILD_LABELS)
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=CHILD_LABELS)
def child_deleted(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A deleted Service, PodDisruptionBudget, HPA or NetworkPolicy of a service is applied again."""
    name = body.metadata.labels.get(manifests.SERVICE_LABEL)
    if type == "DELETED" and name and body.metadata.namespace is not None:
        recreate(_state(memo), body.metadata.namespace, name, str(body.get("kind", "child")))


def recreate(state: InferenceServices, namespace: str, name: str, kind: str) -> None:
    """Converge after a child was deleted (by anyone): reconcile the service again; nothing
    happens when the service itself is going away (its children go with it)."""
    body = k8s.get_custom(namespace, InferenceService.plural, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    log.info("%s of InferenceService %s/%s was deleted: applying it again", kind, namespace, name)
    reconcile_service(state, body, log)


@kopf.on.event("", "v1", "pods", labels={manifests.ROLE_POD_LABEL: kopf.PRESENT})
def role_pod_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A canary's, shadow's or router's pod went: a removal waiting for the router's pods to
    drain goes on."""
    service = str(body.metadata.labels.get(manifests.ROLE_POD_LABEL, "")).rpartition(".")[0]
    if type == "DELETED" and service and body.metadata.namespace is not None:
        repoll(_state(memo), body.metadata.namespace, service)


@kopf.on.event("", "v1", "pods", labels={manifests.SERVICE_LABEL: kopf.PRESENT})
def server_pod_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A server pod that cannot start changes no Deployment field: its reason reaches the
    conditions from here."""
    name = body.metadata.labels.get(manifests.SERVICE_LABEL)
    namespace = body.metadata.namespace
    if name and namespace is not None:
        refresh_availability(_state(memo), namespace, name, read_deployment(Owner(name, namespace, "")))


def refresh_availability(state: InferenceServices, namespace: str, name: str,
                         deployment: dict[str, Any] | None) -> None:
    """Rewrite the availability part of the status from ``deployment`` and the pods."""
    isvc = k8s.get_custom(namespace, InferenceService.plural, name)
    if isvc is None or isvc["metadata"].get("deletionTimestamp"):
        return
    parsed, _error = parse_spec(InferenceServiceSpec, isvc.get("spec"))
    if parsed is None:
        return
    owner = Owner(name, namespace, isvc["metadata"]["uid"])
    stuck = read_stuck(owner)

    def availability(status: dict[str, Any]) -> dict[str, Any] | None:
        model_cond = condition(status.get("conditions"), "ModelReady")
        if model_cond is None:
            return None  # not reconciled yet: the reconcile handler writes the first status
        resolution = ModelResolution(model_cond["status"] == "True", model_cond["reason"], model_cond["message"])
        new = status_patch(owner, parsed, status, status.get("observedGeneration"), resolution, deployment, stuck)
        return new if new != {k: status.get(k) for k in new} else None

    written = _write_status(owner, availability)
    if written is not None:
        state.count_ready(owner, written)


# ---------------------------------------------------------------------------- drift

def _s3_options(endpoint: str | None, region: str | None, force_path_style: bool | None,
                secret: Mapping[str, str], deadline_s: float) -> S3Options:
    return S3Options(endpoint_url=endpoint, region=region,
                     force_path_style=True if force_path_style is None else force_path_style,
                     access_key_id=secret.get(ENV_S3_ACCESS_KEY_ID),
                     secret_access_key=secret.get(ENV_S3_SECRET_ACCESS_KEY), retry_deadline_s=deadline_s)


def _secret(namespace: str, name: str | None) -> dict[str, str]:
    """A credentials Secret's data; a missing one is an error of its own (not a store outage)."""
    if name is None:
        return {}
    data = k8s.read_secret(namespace, name)
    if data is None:
        raise LookupError(f"Secret {name} does not exist")
    return data


def read_live_profiles(namespace: str, capture: ResolvedCapture, deadline_s: float) -> LiveProfiles:
    """The servers' live profiles under ``<capture>/profiles/`` rewritten in the last
    PROFILE_MAX_AGE_S (in a store thread: raises ``StoreError`` when the store fails)."""
    backend = open_backend(capture.uri, _s3_options(capture.s3_endpoint, capture.s3_region,
                                                    capture.s3_force_path_style,
                                                    _secret(namespace, capture.credentials_secret), deadline_s))
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=PROFILE_MAX_AGE_S)
    profiles: list[Profile] = []
    skipped: list[str] = []
    for info in backend.list(flywheel.PROFILES):
        if not info.key.endswith(".json") or info.modified < cutoff:
            continue
        try:
            profile = Profile.model_validate_json(backend.get_bytes(info.key))
        except NotFound:
            continue  # its pod's profile went between the listing and the read
        except ValueError:
            skipped.append(info.key)
            continue
        if profile_fits(profile):
            profiles.append(profile)
        else:
            skipped.append(info.key)
    return LiveProfiles(tuple(profiles), tuple(skipped))


def read_baseline(namespace: str, model: ResolvedModel, deadline_s: float) -> Baseline:
    """The served model's baseline profile (in a store thread), or that there is none."""
    uri = baseline_uri(model)
    assert uri is not None
    backend = open_backend(model.uri, _s3_options(model.s3_endpoint, model.s3_region, model.s3_force_path_style,
                                                  _secret(namespace, model.credentials_secret), deadline_s))
    try:
        data = backend.get_bytes(flywheel.BASELINE_PROFILE_NAME)
    except NotFound:
        return Baseline(uri, None)
    return Baseline(uri, Profile.model_validate_json(data))


def _drift_decision(target: DriftTarget, live: Reading[LiveProfiles],
                    baseline: Reading[Baseline]) -> DriftDecision | None:
    """What the newest answers say; None while one was never read (nor failed)."""
    if live.value is None and live.error:
        return drift_unreadable("profiles", target.capture.uri, live.error)
    if baseline.value is None and baseline.error:
        return drift_unreadable("baseline", baseline_uri(target.model), baseline.error)
    if live.value is None or baseline.value is None:
        return None
    return decide_drift(target.settings, live.value, baseline.value, utc_now())


def measure_drift(state: InferenceServices, key: Key) -> None:
    """One drift reading of a capturing service: start the reads that are due (in the stores'
    own threads, never waited for) and apply what their newest answers say. A read that
    finishes applies its answer at once (``on_done``)."""
    target = state.capturing.get(key)
    if target is None:
        return
    namespace = key[0]
    deadline = state.settings.inferenceservice.store_retry_deadline_s
    max_age = DRIFT_INTERVAL_S / 2  # every pass reads again

    def done() -> None:
        measure_drift(state, key)

    live = state.stores.read(target.capture_store, (PROFILES_READ, key, target.capture.uri),
                             lambda: read_live_profiles(namespace, target.capture, deadline), max_age=max_age,
                             on_done=done)
    if target.model_store is None or baseline_uri(target.model) is None:
        baseline: Reading[Baseline] = Reading(Baseline(None))
    else:
        baseline = state.stores.read(target.model_store, (BASELINE_READ, key, target.model.uri),
                                     lambda: read_baseline(namespace, target.model, deadline), max_age=max_age,
                                     on_done=done)
    decision = _drift_decision(target, live, baseline)
    if decision is not None:
        with state.drift_locks.setdefault(key, threading.Lock()):
            apply_drift(state, target, decision)


def apply_drift(state: InferenceServices, target: DriftTarget, decision: DriftDecision) -> None:
    """Write status.drift and DriftDetected, set the gauge; an Event and a log line when the
    condition's status or reason changes."""
    owner = target.owner
    key = (owner.namespace, owner.name)
    before: dict[str, Any] = {}

    def compute(st: dict[str, Any]) -> dict[str, Any] | None:
        nonlocal before
        with state.lock:  # a reading in flight must not put back what a reconcile just removed
            if state.capturing.get(key) != target:
                return None
        before = condition(st.get("conditions"), "DriftDetected") or {}
        out = drift_patch(st, decision)
        return out if out != {k: st.get(k) for k in out} else None

    written = _write_status(owner, compute)
    with state.lock:
        if state.capturing.get(key) != target:
            return  # logging removed or changed, or the service deleted, meanwhile
        state.set_psi(key, decision.psi)
    if written is None or not drift_changed(before, decision):
        return
    body = {"apiVersion": API_VERSION, "kind": InferenceService.kind,
            "metadata": {"name": owner.name, "namespace": owner.namespace, "uid": owner.uid}}
    k8s.record_event(body, decision.reason, decision.message, warning=decision.reason == "MajorDrift")
    log.log(logging.WARNING if decision.reason == "MajorDrift" else logging.INFO,
            "InferenceService %s/%s: DriftDetected %s (%s): %s", *key, decision.status, decision.reason,
            decision.message)
