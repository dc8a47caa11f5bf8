"""The children of an InferenceService as plain manifests (``build_*``, for server-side
apply): pure functions of the spec, the resolved model (and capture store) and the default
image → Deployment, Service, PodDisruptionBudget, HorizontalPodAutoscaler, NetworkPolicy.

Nothing here talks to the API server or the store; ``handlers.py`` reads, calls ``plan`` and
these, applies and patches status.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
from typing import Any

from kubeforge.api import InferenceService, InferenceServiceSpec
from kubeforge.api.common import API_VERSION
from kubeforge.api.contract import (
    DEFAULT_WORKLOAD_IMAGE,
    ENV_MODEL_REVISION,
    ENV_S3_ACCESS_KEY_ID,
    ENV_S3_ENDPOINT,
    ENV_S3_FORCE_PATH_STYLE,
    ENV_S3_REGION,
    ENV_S3_SECRET_ACCESS_KEY,
    SERVING_PORT,
)
from kubeforge.api.inferenceservice import Autoscaling, RatePolicy
from kubeforge.controllers import workload
from kubeforge.controllers.workload import (
    container_security,
    gpu_product_affinity,
    gpu_tolerations,
    off_gpu_placement,
    pod_security,
    workload_image,
)

#: Label every child carries; its value is the InferenceService's name. The stable pods' selector.
SERVICE_LABEL = "kubeforge.dev/inferenceservice"
#: On the children of the canary, the shadow and the router: which of them (a child without it
#: is the stable revision's, or the service's own).
ROLE_LABEL = "kubeforge.dev/role"
#: The selector of a canary's, shadow's or router's pods: ``<service>.<role>``. Those pods never
#: carry SERVICE_LABEL, so the stable Deployment's (immutable) selector never matches them.
ROLE_POD_LABEL = "kubeforge.dev/inferenceservice-role"
STABLE, CANARY, SHADOW, ROUTER = "stable", "canary", "shadow", "router"
ROUTER_CONTAINER = "router"
ROUTER_CONFIG_DIR = "/etc/kubeforge/router"
ROUTER_CONFIG_FILE = "config.json"
ROUTER_CONFIG_ANNOTATION = "kubeforge.dev/router-config-sha256"
ROUTER_MIN_PRE_STOP_S = 5
COMPONENT = "inference-server"
#: Pod-template annotation naming the served export revision: a new value rolls the pods.
REVISION_ANNOTATION = "kubeforge.dev/model-revision"
MODEL_URI_ANNOTATION = "kubeforge.dev/model-uri"
MODEL_STEP_ANNOTATION = "kubeforge.dev/model-step"
CONTAINER = "server"
PORT_NAME = "http"
#: Where the model is downloaded to (an emptyDir) and the scratch space (the root is read-only).
MODEL_CACHE_DIR = "/var/cache/kubeforge/models"
TMP_DIR = "/tmp"
PVC_MOUNT_ROOT = "/mnt/models"
#: vLLM's metric names, exposed per pod through the custom metrics API (see docs/autoscaling.md).
POD_METRICS = {"WaitingRequests": "vllm:num_requests_waiting", "RunningRequests": "vllm:num_requests_running"}
#: Seconds between SIGKILL's deadline and the end of the engine's own drain.
GRACE_MARGIN_S = 5
STARTUP_PROBE_PERIOD_S = 10
#: Capture credentials of the server (``python -m kubeforge_runtime.serve``): their own names,
#: from keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of the capture Secret, so that they never
#: meet the model store's credentials (envFrom AWS_*) in the same container.
ENV_CAPTURE_ACCESS_KEY_ID = "KUBEFORGE_CAPTURE_AWS_ACCESS_KEY_ID"
ENV_CAPTURE_SECRET_ACCESS_KEY = "KUBEFORGE_CAPTURE_AWS_SECRET_ACCESS_KEY"
#: The pod's name (downward API): the writer in capture shard and profile names.
ENV_POD_NAME = "KUBEFORGE_POD_NAME"
#: The HMAC key completion ids are signed with; the same on every replica of a service.
ENV_FEEDBACK_KEY = "KUBEFORGE_FEEDBACK_KEY"
ENV_API_KEY = "KUBEFORGE_API_KEY"
API_KEY_SECRET_KEY = "api-key"


@dataclasses.dataclass(frozen=True)
class Owner(workload.Owner):
    """The InferenceService the children belong to."""

    kind: str = InferenceService.kind


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """The model the pods load, with what they need to reach it."""

    uri: str
    revision: str | None = None
    step: int | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None
    #: the store's addressing (a TrainingJob's export: its policy's forcePathStyle); None: the default
    s3_force_path_style: bool | None = None
    credentials_secret: str | None = None


@dataclasses.dataclass(frozen=True)
class ResolvedCapture:
    """Where the servers capture traffic (``spec.logging`` resolved): the capture directory
    ``<store root>/<namespace>/<name>/capture`` and what reaches it: the servers' flags and the
    operator's own reads of the profiles."""

    uri: str
    credentials_secret: str
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_force_path_style: bool = True


def child_name(name: str) -> str:
    """Name of every child (Deployment, Service, PDB, HPA). Suffixed so that a TrainingJob of
    the same name (whose export is served here) keeps its own Service name."""
    return f"{name}-server"


def pod_labels(name: str) -> dict[str, str]:
    return {SERVICE_LABEL: name}


def labels(name: str) -> dict[str, str]:
    return {**pod_labels(name), "app.kubernetes.io/name": "kubeforge-inference-server",
            "app.kubernetes.io/instance": name, "app.kubernetes.io/component": COMPONENT,
            "app.kubernetes.io/managed-by": "kubeforge"}


def role_child_name(name: str, role: str) -> str:
    """``<name>-canary``, ``<name>-shadow``, ``<name>-router``; ``<name>-stable`` is the Service of
    the stable pods that the router calls (the stable Deployment stays ``<name>-server``)."""
    return f"{name}-{role}"


def role_pod_labels(name: str, role: str) -> dict[str, str]:
    return pod_labels(name) if role == STABLE else {ROLE_POD_LABEL: f"{name}.{role}"}


def role_selector(name: str, role: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(role_pod_labels(name, role).items()))


def role_labels(name: str, role: str) -> dict[str, str]:
    """Labels of a role's children (metadata: SERVICE_LABEL names the owner for the handlers)."""
    return {**labels(name), ROLE_LABEL: role}


def _role_template_labels(name: str, role: str) -> dict[str, str]:
    if role == STABLE:
        return labels(name)
    base = {k: v for k, v in labels(name).items() if k != SERVICE_LABEL}
    return {**base, **role_pod_labels(name, role), ROLE_LABEL: role}


def routed(spec: InferenceServiceSpec) -> bool:
    """A router fronts the revisions while a canary or a shadow is set."""
    return spec.canary is not None or spec.shadow is not None


def selector(name: str) -> str:
    """The pods' label selector as a string (status.selector, read by the scale subresource)."""
    return ",".join(f"{k}={v}" for k, v in sorted(pod_labels(name).items()))


def url(owner: Owner) -> str:
    return f"http://{child_name(owner.name)}.{owner.namespace}.svc.cluster.local:{SERVING_PORT}"


def _metadata(owner: Owner, annotations: dict[str, str] | None = None, role: str | None = None) -> dict[str, Any]:
    """A child's metadata; with ``role`` one of the canary's, shadow's or router's (or the
    ``<name>-stable`` Service)."""
    meta: dict[str, Any] = {
        "name": child_name(owner.name) if role is None else role_child_name(owner.name, role),
        "namespace": owner.namespace, "labels": labels(owner.name) if role is None else role_labels(owner.name, role),
        "ownerReferences": [owner.reference()],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


def termination_grace_seconds(spec: InferenceServiceSpec) -> int:
    """preStop sleep, then the engine's drain, then a margin before SIGKILL."""
    return spec.lifecycle.pre_stop_sleep_seconds + spec.engine.shutdown_timeout_seconds + GRACE_MARGIN_S


def _pvc_source(uri: str) -> tuple[str, str]:
    """``pvc://claim/path`` → (claim, path inside the mounted claim)."""
    claim, _, path = uri.removeprefix("pvc://").partition("/")
    return claim, f"{PVC_MOUNT_ROOT}/{claim}/{path}".rstrip("/")


def server_args(name: str, spec: InferenceServiceSpec, model: ResolvedModel,
                capture: ResolvedCapture | None = None) -> list[str]:
    """The flags of ``python -m kubeforge_runtime.serve`` (see its ``--help``); the capture
    flags only with ``capture`` (spec.logging resolved)."""
    e = spec.engine
    model_arg = _pvc_source(model.uri)[1] if model.uri.startswith("pvc://") else model.uri
    args = ["--model", model_arg, "--served-model-name", name, "--host", "0.0.0.0", "--port", str(SERVING_PORT),
            "--download-dir", MODEL_CACHE_DIR, "--shutdown-timeout", str(e.shutdown_timeout_seconds),
            "--max-num-seqs", str(e.max_num_seqs), "--max-num-batched-tokens", str(e.max_num_batched_tokens),
            "--max-queue-len", str(e.max_queue_length), "--block-size", str(e.block_size), "--dtype", e.dtype]
    if e.max_model_len is not None:
        args += ["--max-model-len", str(e.max_model_len)]
    if e.num_blocks is not None:
        args += ["--num-blocks", str(e.num_blocks)]
    if e.kv_cache_memory_fraction is not None:
        args += ["--kv-cache-memory-fraction", str(e.kv_cache_memory_fraction)]
    if not e.enable_prefix_caching:
        args.append("--no-enable-prefix-caching")
    if capture is not None and spec.logging is not None:
        args += capture_args(spec, capture)
    return args


def capture_args(spec: InferenceServiceSpec, capture: ResolvedCapture) -> list[str]:
    """The server's capture, feedback and drift flags (.dev/flywheel-contract.md, "Server").
    The served revision reaches the records through KUBEFORGE_MODEL_REVISION (``_env``)."""
    lg = spec.logging
    assert lg is not None
    args = ["--capture-uri", capture.uri]
    if capture.s3_endpoint:
        args += ["--capture-s3-endpoint", capture.s3_endpoint]
    if capture.s3_region:
        args += ["--capture-s3-region", capture.s3_region]
    if not capture.s3_force_path_style:
        args.append("--no-capture-s3-force-path-style")
    args += ["--capture-sample-rate", str(lg.sample_rate)]
    if lg.redact.enabled:
        for pattern in lg.redact.patterns:
            args += ["--capture-redact-pattern", f"{pattern.name}={pattern.regex}"]
    else:
        args.append("--no-capture-redact")
    args += ["--capture-max-record-bytes", str(lg.max_record_bytes),
             "--capture-shard-seconds", str(lg.shard_seconds),
             "--feedback-ttl-seconds", str(lg.feedback_ttl_seconds),
             "--drift-window", str(lg.drift.window_prompts)]
    return args


def derived_feedback_key(uid: str) -> str:
    """The feedback key of a service without an API key: hex(HMAC-SHA256(metadata.uid,
    "kubeforge-feedback")).

    Every replica must verify the completion ids any other replica issued, so the key must be
    the same on all of them and survive rollouts; deriving it from the object's uid needs no
    Secret to be created, rotated or garbage-collected, and a service deleted and created again
    under the same name gets a new key (its old ids stop verifying). The trade-off: whoever can
    read the InferenceService (its uid) or its Deployment (this value) can mint ids that verify,
    so the key only keeps ids from being guessed by clients, not forged by cluster readers. A
    forged id still joins no captured request. With spec.apiKeySecretRef the API key is the
    feedback key instead (``_capture_env``): then ids cannot be forged without the key that
    /v1/feedback demands anyway."""
    return hmac.new(uid.encode(), b"kubeforge-feedback", hashlib.sha256).hexdigest()


def _secret_key(secret: str, key: str) -> dict[str, Any]:
    return {"secretKeyRef": {"name": secret, "key": key}}


def _capture_env(owner: Owner, spec: InferenceServiceSpec, capture: ResolvedCapture) -> list[dict[str, Any]]:
    """The capture credentials under their own names, the writer's name, and the feedback key
    (the API key's Secret where there is one, else ``derived_feedback_key``)."""
    feedback: dict[str, Any] = (
        {"name": ENV_FEEDBACK_KEY, "valueFrom": _secret_key(spec.api_key_secret_ref.name, API_KEY_SECRET_KEY)}
        if spec.api_key_secret_ref else {"name": ENV_FEEDBACK_KEY, "value": derived_feedback_key(owner.uid)})
    return [
        {"name": ENV_CAPTURE_ACCESS_KEY_ID, "valueFrom": _secret_key(capture.credentials_secret, ENV_S3_ACCESS_KEY_ID)},
        {"name": ENV_CAPTURE_SECRET_ACCESS_KEY,
         "valueFrom": _secret_key(capture.credentials_secret, ENV_S3_SECRET_ACCESS_KEY)},
        {"name": ENV_POD_NAME, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
        feedback,
    ]


def _env(owner: Owner, spec: InferenceServiceSpec, model: ResolvedModel,
         capture: ResolvedCapture | None = None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "HOME", "value": TMP_DIR}, {"name": "PYTHONUNBUFFERED", "value": "1"}]
    if model.revision:
        env.append({"name": ENV_MODEL_REVISION, "value": model.revision})
    if model.s3_endpoint:
        env.append({"name": ENV_S3_ENDPOINT, "value": model.s3_endpoint})
    if model.s3_region:
        env.append({"name": ENV_S3_REGION, "value": model.s3_region})
    if model.s3_force_path_style is not None:
        env.append({"name": ENV_S3_FORCE_PATH_STYLE, "value": "true" if model.s3_force_path_style else "false"})
    if spec.api_key_secret_ref:
        env.append({"name": ENV_API_KEY, "valueFrom": _secret_key(spec.api_key_secret_ref.name, API_KEY_SECRET_KEY)})
    if capture is not None and spec.logging is not None:
        env += _capture_env(owner, spec, capture)
    return env + [v.dump() for v in spec.env]


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": PORT_NAME}, "periodSeconds": period, "timeoutSeconds": 5,
            "failureThreshold": failures, "successThreshold": 1}


def _pod_spec(owner: Owner, spec: InferenceServiceSpec, container: dict[str, Any], volumes: list[dict[str, Any]],
              role: str) -> dict[str, Any]:
    """What a server's and a router's pods share: drain timing, no API token, restricted, spread."""
    return {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security(),
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": role_pod_labels(owner.name, role)}}],
    }


def build_deployment(owner: Owner, spec: InferenceServiceSpec, model: ResolvedModel,
                     default_image: str = DEFAULT_WORKLOAD_IMAGE,
                     capture: ResolvedCapture | None = None, role: str = STABLE) -> dict[str, Any]:
    """The serving Deployment. Replicas follow spec.replicas (which the HPA and `kubectl scale`
    write through the scale subresource); a rolling update surges one pod and never removes a
    ready one first, so no request is dropped while a new model revision rolls out. With
    ``capture`` (spec.logging resolved) the servers capture traffic there; without it (no
    spec.logging, or its store not resolved: CaptureReady False) they capture nothing.

    ``role`` canary or shadow: the same server for that revision's model, ``<name>-<role>``
    with its own pod labels and its fixed replicas; a shadow never captures (its answers are
    never shown to a user, so they are not data)."""
    if role == SHADOW:
        capture = None
    revision = None if role == STABLE else (spec.canary if role == CANARY else spec.shadow)
    replicas = spec.replicas if revision is None else revision.replicas
    startup_failures = math.ceil(spec.lifecycle.startup_timeout_seconds / STARTUP_PROBE_PERIOD_S)
    volumes: list[dict[str, Any]] = [
        {"name": "model-cache", "emptyDir": {"sizeLimit": spec.model_cache_size} if spec.model_cache_size else {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "model-cache", "mountPath": MODEL_CACHE_DIR},
                                    {"name": "tmp", "mountPath": TMP_DIR}]
    if model.uri.startswith("pvc://"):
        claim, _ = _pvc_source(model.uri)
        volumes.append({"name": "model-pvc", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model-pvc", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": workload_image(spec.image, default_image),
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["python", "-m", "kubeforge_runtime.serve"],
        "args": server_args(owner.name, spec, model, capture),
        "env": _env(owner, spec, model, capture),
        "ports": [{"name": PORT_NAME, "containerPort": SERVING_PORT, "protocol": "TCP"}],
        "resources": workload.resources(spec.resources.cpu, spec.resources.memory, spec.gpus),
        # /health answers 200 only once the model is loaded and warmed, and 503 again while
        # draining. Liveness is /livez: 200 while loading and draining, 503 only once the
        # engine is broken (its thread died, or steps kept failing: a sticky CUDA error), so
        # the kubelet restarts a server that would otherwise answer 500 forever.
        "startupProbe": _probe("/health", STARTUP_PROBE_PERIOD_S, startup_failures),
        "readinessProbe": _probe("/health", 5, 2),
        "livenessProbe": _probe("/livez", 10, 3),
        "lifecycle": {"preStop": {"sleep": {"seconds": spec.lifecycle.pre_stop_sleep_seconds}}},
        "volumeMounts": mounts,
        "securityContext": container_security(read_only_root=True),
    }
    secret = model.credentials_secret
    if secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    pod_annotations = {MODEL_URI_ANNOTATION: model.uri, "prometheus.io/scrape": "true",
                       "prometheus.io/port": str(SERVING_PORT), "prometheus.io/path": "/metrics"}
    if model.revision:
        pod_annotations[REVISION_ANNOTATION] = model.revision
    if model.step is not None:
        pod_annotations[MODEL_STEP_ANNOTATION] = str(model.step)
    pod_spec = _pod_spec(owner, spec, container, volumes, role)
    tolerations = gpu_tolerations(spec.gpus) + [t.dump() for t in spec.tolerations]
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    affinity = gpu_product_affinity(spec.gpu_product)
    if affinity:
        pod_spec["affinity"] = affinity
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(owner, role=None if role == STABLE else role),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": role_pod_labels(owner.name, role)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            # a pod may legitimately take the whole startup budget: only then is the rollout stuck
            "progressDeadlineSeconds": spec.lifecycle.startup_timeout_seconds + 600,
            "revisionHistoryLimit": 5,
            "template": {"metadata": {"labels": _role_template_labels(owner.name, role),
                                      "annotations": pod_annotations},
                         "spec": pod_spec},
        },
    }


def _service_spec(selector_labels: dict[str, str]) -> dict[str, Any]:
    return {"type": "ClusterIP", "selector": selector_labels,
            "ports": [{"name": PORT_NAME, "port": SERVING_PORT, "targetPort": PORT_NAME, "protocol": "TCP",
                       "appProtocol": "http"}]}


def build_service(owner: Owner, to_router: bool = False) -> dict[str, Any]:
    """ClusterIP Service on the named port; the OpenAI API and /metrics share it. It selects the
    stable pods, or with ``to_router`` (a canary or shadow is set and a router pod is ready) the
    router's pods."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(owner),
            "spec": _service_spec(role_pod_labels(owner.name, ROUTER if to_router else STABLE))}


def build_role_service(owner: Owner, role: str) -> dict[str, Any]:
    """``<name>-stable``, ``<name>-canary``, ``<name>-shadow``: what the router calls."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(owner, role=role),
            "spec": _service_spec(role_pod_labels(owner.name, role))}


def role_url(owner: Owner, role: str) -> str:
    return f"http://{role_child_name(owner.name, role)}.{owner.namespace}.svc.cluster.local:{SERVING_PORT}"


def router_config(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    """The router's config file (``kubeforge_runtime.route.split.RouterConfig``); the
    revisions are named by role, the ``revision`` label of the router's metrics."""
    doc: dict[str, Any] = {"stable": {"url": role_url(owner, STABLE), "revision": STABLE},
                           "session_header": spec.routing.session_header}
    if spec.canary is not None:
        doc["canary"] = {"url": role_url(owner, CANARY), "revision": CANARY, "percent": spec.canary.traffic_percent}
    if spec.shadow is not None:
        doc["shadow"] = {"url": role_url(owner, SHADOW), "revision": SHADOW, "percent": spec.shadow.sample_percent}
    return doc


def router_config_json(owner: Owner, spec: InferenceServiceSpec) -> str:
    return json.dumps(router_config(owner, spec), sort_keys=True, separators=(",", ":"))


def build_router_configmap(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(owner, role=ROUTER),
            "data": {ROUTER_CONFIG_FILE: router_config_json(owner, spec)}}


def build_router_deployment(owner: Owner, spec: InferenceServiceSpec,
                            default_image: str = DEFAULT_WORKLOAD_IMAGE) -> dict[str, Any]:
    """The router in front of the revisions (``python -m kubeforge_runtime.route``), a small
    CPU pod of the serving image. Its config's digest is a pod annotation: a new share or a
    removed canary rolls the routers (surge one, never remove a ready one first), and the
    routers also reread the mounted file when the kubelet updates it."""
    digest = hashlib.sha256(router_config_json(owner, spec).encode()).hexdigest()
    drain = spec.engine.shutdown_timeout_seconds
    container: dict[str, Any] = {
        "name": ROUTER_CONTAINER,
        "image": workload_image(spec.image, default_image),
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["python", "-m", "kubeforge_runtime.route"],
        "args": ["--config", f"{ROUTER_CONFIG_DIR}/{ROUTER_CONFIG_FILE}", "--host", "0.0.0.0",
                 "--port", str(SERVING_PORT), "--shutdown-timeout", str(drain)],
        "ports": [{"name": PORT_NAME, "containerPort": SERVING_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        # ready while the stable revision answers /health through <name>-stable
        "readinessProbe": _probe("/health", 2, 2),
        "livenessProbe": _probe("/metrics", 10, 3),
        # the Service leaves a router before it is deleted; the sleep covers the endpoints' update
        "lifecycle": {"preStop": {"sleep": {"seconds": max(ROUTER_MIN_PRE_STOP_S,
                                                           spec.lifecycle.pre_stop_sleep_seconds)}}},
        "volumeMounts": [{"name": "config", "mountPath": ROUTER_CONFIG_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": TMP_DIR}],
        "securityContext": container_security(read_only_root=True),
    }
    volumes = [{"name": "config", "configMap": {"name": role_child_name(owner.name, ROUTER)}},
               {"name": "tmp", "emptyDir": {}}]
    pod_spec = {**_pod_spec(owner, spec, container, volumes, ROUTER), **off_gpu_placement(),
                "terminationGracePeriodSeconds": max(ROUTER_MIN_PRE_STOP_S, spec.lifecycle.pre_stop_sleep_seconds)
                + drain + GRACE_MARGIN_S}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(owner, role=ROUTER),
        "spec": {
            "replicas": spec.routing.replicas,
            "selector": {"matchLabels": role_pod_labels(owner.name, ROUTER)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 5,
            "template": {"metadata": {"labels": _role_template_labels(owner.name, ROUTER),
                                      "annotations": {ROUTER_CONFIG_ANNOTATION: digest,
                                                      "prometheus.io/scrape": "true",
                                                      "prometheus.io/port": str(SERVING_PORT),
                                                      "prometheus.io/path": "/metrics"}},
                         "spec": pod_spec},
        },
    }


def build_pdb(owner: Owner, spec: InferenceServiceSpec, role: str = STABLE) -> dict[str, Any]:
    """Node drains take at most maxUnavailable serving pods at a time; pods that never became
    ready may always be evicted (they serve nothing, and would otherwise block a drain).
    ``role`` router: one router pod at a time (a drain never takes the split away)."""
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, role=None if role == STABLE else role),
        "spec": {"maxUnavailable": spec.disruption_budget.max_unavailable if role == STABLE else 1,
                 "selector": {"matchLabels": role_pod_labels(owner.name, role)},
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
    }


def allowed_clients(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    """spec.network.allowedClients as NetworkPolicyPeers; empty: every pod of the namespace."""
    return [c.dump() for c in spec.network.allowed_clients] or [{"podSelector": {}}]


def build_network_policy(owner: Owner, spec: InferenceServiceSpec,
                         scrape_from: tuple[dict[str, Any], ...] = (), role: str = STABLE,
                         router_peer: bool | None = None) -> dict[str, Any]:
    """Ingress to the serving pods only on the server port, only from the allowed clients and
    the operator's scrape sources (Prometheus reads /metrics on that port; the HPA reads
    Prometheus through prometheus-adapter, never the pods). Egress stays open: the servers reach
    the model's store and, with spec.logging, the capture store.

    With a router: the stable pods also admit the router's pods (``router_peer``, by default
    while spec routes; the handlers keep it while a router pod drains); the router's pods
    (``role`` router) admit the clients; a canary's or shadow's pods admit only the router (and
    scrapes)."""
    router = [{"podSelector": {"matchLabels": role_pod_labels(owner.name, ROUTER)}}]
    if router_peer is None:
        router_peer = routed(spec)
    if role in (CANARY, SHADOW):
        peers = router
    else:
        peers = allowed_clients(spec) + (router if role == STABLE and router_peer else [])
    peers = peers + [dict(p) for p in scrape_from]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _metadata(owner, role=None if role == STABLE else role),
        "spec": {"podSelector": {"matchLabels": role_pod_labels(owner.name, role)}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": peers, "ports": [{"port": SERVING_PORT, "protocol": "TCP"}]}]},
    }


def _policies(policies: list[RatePolicy]) -> list[dict[str, Any]]:
    return [{"type": p.type, "value": p.value, "periodSeconds": p.period_seconds} for p in policies]


def hpa_behavior(a: Autoscaling) -> dict[str, Any]:
    """Exactly the user's cooldowns (stabilization windows) and rate policies; both directions
    are always written, so the HPA never falls back to a silent default window."""
    up: dict[str, Any] = {"stabilizationWindowSeconds": a.scale_up_cooldown_seconds}
    down: dict[str, Any] = {"stabilizationWindowSeconds": a.scale_down_cooldown_seconds}
    if a.scale_up_policies:
        up["policies"] = _policies(a.scale_up_policies)
    if a.scale_down_policies:
        down["policies"] = _policies(a.scale_down_policies)
    return {"scaleUp": up, "scaleDown": down}


def hpa_metric(a: Autoscaling) -> dict[str, Any]:
    if a.metric == "CPU":
        return {"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": a.target}}}
    return {"type": "Pods", "pods": {"metric": {"name": POD_METRICS[a.metric]},
                                     "target": {"type": "AverageValue", "averageValue": str(a.target)}}}


def build_hpa(owner: Owner, spec: InferenceServiceSpec) -> dict[str, Any] | None:
    """The HPA, scaling this InferenceService through its scale subresource (not the
    Deployment: the operator would then fight it); None without spec.autoscaling."""
    a = spec.autoscaling
    if a is None:
        return None
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _metadata(owner),
        "spec": {
            "scaleTargetRef": {"apiVersion": API_VERSION, "kind": InferenceService.kind, "name": owner.name},
            "minReplicas": a.min_replicas, "maxReplicas": a.max_replicas,
            "metrics": [hpa_metric(a)],
            "behavior": hpa_behavior(a),
        },
    }
