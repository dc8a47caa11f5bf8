"""Pieces every kind shares: the base model, conditions, references, CEL rules.

Python attributes are snake_case; the Kubernetes names are camelCase aliases. Models parse
what the API server stored (``Model.model_validate(body["spec"])``) and render back with
``by_alias=True``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "kubeforge.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "kubeforge"


@dataclasses.dataclass(frozen=True)
class Rule:
    """A CEL ``x-kubernetes-validations`` entry; ``message`` says what must hold."""

    rule: str
    message: str
    field_path: str | None = None
    reason: str | None = None

    def render(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


class ApiModel(BaseModel):
    """Base of every schema object: camelCase on the wire, unknown fields forbidden.

    ``cel_rules`` hold cross-field rules the API server enforces at admission.
    ``free_form`` names fields whose content is another component's (a Kubernetes volume
    source, the trainer's own config) and is kept as is.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    cel_rules: ClassVar[tuple[Rule, ...]] = ()

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


#: A DNS-1035 label (what a Service name must be): lowercase letters, digits and '-', starting
#: with a letter and ending with a letter or digit; no '.'.
DNS_1035_LABEL = "^[a-z]([-a-z0-9]*[a-z0-9])?$"


def dns_label_name_rules(kind: str, max_length: int, why: str) -> tuple[Rule, ...]:
    """``metadata.name`` of a kind whose children are named ``<name><suffix>`` Services or
    hostnames: a DNS-1035 label, at most ``max_length`` characters."""
    a = "an" if kind[0] in "AEIOU" else "a"
    return (
        Rule(f"self.metadata.name.matches('{DNS_1035_LABEL}')",
             f"metadata.name of {a} {kind} must be a DNS-1035 label (lowercase letters, digits and '-', "
             f"starting with a letter, no '.'): {why}", reason="FieldValueInvalid"),
        Rule(f"size(self.metadata.name) <= {max_length}",
             f"metadata.name of {a} {kind} must be at most {max_length} characters: {why}", reason="FieldValueInvalid"),
    )


class Kind:
    """A custom resource kind: its names and the models of its spec and status.

    The class docstring of a subclass is the kind's description (``kubectl explain``)."""

    kind: ClassVar[str]
    plural: ClassVar[str]
    short_names: ClassVar[tuple[str, ...]]
    spec_model: ClassVar[type[ApiModel]]
    status_model: ClassVar[type[ApiModel]]
    printer_columns: ClassVar[tuple[dict[str, str], ...]]
    scale: ClassVar[dict[str, str] | None] = None
    #: Rules on ``self.metadata.name`` (the names the children derive from it must be valid).
    name_rules: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def singular(cls) -> str:
        return cls.kind.lower()


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """One observation of the object's state, per Kubernetes API conventions."""

    type: str = Field(description="Condition type, e.g. Ready; unique within the list.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable detail of the last transition.")
    last_transition_time: str | None = Field(default=None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="The .metadata.generation this was set for.")


class LocalObjectReference(ApiModel):
    """A reference to an object in the same namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the referenced object.")


class StatusBase(ApiModel):
    """What every kind's status carries."""

    observed_generation: int | None = Field(default=None, description="The .metadata.generation last reconciled.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Current state observations, keyed by type. Ready summarises the object.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(conditions: list[dict[str, Any]], type_: str, status: bool | str, reason: str,
                  message: str = "", generation: int | None = None) -> list[dict[str, Any]]:
    """Return ``conditions`` with ``type_`` set; lastTransitionTime changes only on a status change."""
    st = status if isinstance(status, str) else ("True" if status else "False")
    out = [dict(c) for c in conditions]
    for c in out:
        if c.get("type") == type_:
            if c.get("status") != st:
                c["lastTransitionTime"] = now_rfc3339()
            c.update(status=st, reason=reason, message=message)
            if generation is not None:
                c["observedGeneration"] = generation
            return out
    new: dict[str, Any] = {"type": type_, "status": st, "reason": reason, "message": message, "lastTransitionTime": now_rfc3339()}
    if generation is not None:
        new["observedGeneration"] = generation
    out.append(new)
    return out


def condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


# Kubernetes objects the pod-template overrides carry. Typed where the shape is small and
# stable, and always where a choice decides what the pod can reach: volume sources are the
# PodSecurity "restricted" list (plus hostPath, which the chart's admission policy and the
# operator refuse unless an admin allows it); env sources are the four core/v1 ones.

class SecretReference(LocalObjectReference):
    """A Secret in the same namespace."""


class Toleration(ApiModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(default=None, description="Taint key the toleration applies to; empty matches all keys.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, description="Taint value the toleration matches.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects.")
    toleration_seconds: int | None = Field(default=None, ge=0, description="How long a NoExecute taint is tolerated.")


def exactly_one(fields: tuple[str, ...]) -> str:
    """CEL: exactly one of ``fields`` is set (a sum, cheaper for the API server's cost budget
    than a list with exists_one)."""
    return " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields) + " == 1"


class KeySelector(ApiModel):
    """A key of a Secret or ConfigMap in the pod's own namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret or ConfigMap.")
    key: str = Field(min_length=1, description="The key whose value is used.")
    optional: bool | None = Field(default=None, description="Start the pod even when the object or key is missing.")


class FieldSelector(ApiModel):
    """A field of the pod (core/v1 ObjectFieldSelector), e.g. metadata.name or status.podIP."""

    field_path: str = Field(min_length=1, description="Path of the field, e.g. metadata.name.")
    api_version: str | None = Field(default=None, description="API version the path is in (default v1).")


class ResourceFieldSelector(ApiModel):
    """A resource request or limit of a container (core/v1 ResourceFieldSelector)."""

    resource: str = Field(min_length=1, description="e.g. limits.cpu or requests.memory.")
    container_name: str | None = Field(default=None, description="Container; default the one the variable is in.")
    divisor: str | None = Field(default=None, description="Unit the value is divided by, e.g. 1Mi.")


class EnvVarSource(ApiModel):
    """Where a variable's value comes from: exactly one core/v1 source. A Secret or ConfigMap
    can only be one of the pod's own namespace (Kubernetes resolves no other)."""

    secret_key_ref: KeySelector | None = Field(default=None, description="A key of a Secret in this namespace.")
    config_map_key_ref: KeySelector | None = Field(default=None, description="A key of a ConfigMap in this namespace.")
    field_ref: FieldSelector | None = Field(default=None, description="A field of the pod.")
    resource_field_ref: ResourceFieldSelector | None = Field(default=None, description=(
        "A resource request or limit of a container."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(exactly_one(("secretKeyRef", "configMapKeyRef", "fieldRef", "resourceFieldRef")),
             "valueFrom must set exactly one of secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef",
             reason="FieldValueInvalid"),
    )


class EnvVar(ApiModel):
    """An environment variable (core/v1 EnvVar): a literal value or one typed source."""

    name: str = Field(min_length=1, description="Variable name.")
    value: str | None = Field(default=None, description="Literal value.")
    value_from: EnvVarSource | None = Field(default=None, description=(
        "Source for the value: secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("!has(self.value) || !has(self.valueFrom)", "value and valueFrom must not both be set",
             reason="FieldValueInvalid"),
    )


def _source(description: str) -> Any:
    """A volume source kept as given (its fields are the Kubernetes API's, checked by the API
    server when the pod is created)."""
    return Field(default=None, description=description, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


class HostPathVolumeSource(ApiModel):
    """A directory of the node (core/v1 HostPathVolumeSource). Refused unless the operator
    allows hostPath volumes (Helm value ``security.allowHostPathVolumes``)."""

    path: str = Field(pattern=r"^/", description="Absolute path on the node.")
    type: Literal["", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice",
                  "BlockDevice"] | None = Field(default=None, description="What must be at path.")


#: What a projected volume may combine: a service account token is not among them (the
#: workloads call no Kubernetes API, and ``automountServiceAccountToken: false`` would mean
#: nothing if a volume could mount any ServiceAccount's token of the namespace).
PROJECTION_SOURCES = ("secret", "configMap", "downwardAPI", "clusterTrustBundle")


class VolumeProjection(ApiModel):
    """One source of a projected volume (core/v1 VolumeProjection), without serviceAccountToken."""

    secret: dict[str, Any] | None = _source("Keys of a Secret of this namespace (core/v1 SecretProjection).")
    config_map: dict[str, Any] | None = _source("Keys of a ConfigMap of this namespace (core/v1 ConfigMapProjection).")
    downward_api: dict[str, Any] | None = Field(
        default=None, alias="downwardAPI", description="Fields of the pod as files (core/v1 DownwardAPIProjection).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    cluster_trust_bundle: dict[str, Any] | None = _source(
        "CA certificates of ClusterTrustBundles (core/v1 ClusterTrustBundleProjection).")

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(exactly_one(PROJECTION_SOURCES),
             "a projected volume's source must set exactly one of " + ", ".join(PROJECTION_SOURCES) +
             " (serviceAccountToken is refused: the workloads get no API credential)", reason="FieldValueInvalid"),
    )


class ProjectedVolumeSource(ApiModel):
    """Secrets, ConfigMaps, the downward API and trust bundles in one directory (core/v1
    ProjectedVolumeSource); no service account token."""

    sources: list[VolumeProjection] = Field(default_factory=list, max_length=32, description="What to project.")
    default_mode: int | None = Field(default=None, ge=0, le=511, description="Mode bits of the files (0-0777).")


#: The volume sources a worker may use (PodSecurity "restricted" allows exactly these), and
#: hostPath, allowed only by the operator's setting. Any other source (nfs, iscsi, rbd,
#: flexVolume, gitRepo, ...) reaches the node or the network on the kubelet's authority and
#: is not in the schema.
VOLUME_SOURCES = ("configMap", "secret", "emptyDir", "persistentVolumeClaim", "projected", "downwardAPI",
                  "csi", "ephemeral", "hostPath")


class Volume(ApiModel):
    """A pod volume: a name plus exactly one source of the PodSecurity "restricted" list, or a
    hostPath where the operator allows it."""

    name: str = Field(min_length=1, description="Volume name, referenced by volumeMounts.")
    config_map: dict[str, Any] | None = _source("A ConfigMap of this namespace (core/v1 ConfigMapVolumeSource).")
    secret: dict[str, Any] | None = _source("A Secret of this namespace (core/v1 SecretVolumeSource).")
    empty_dir: dict[str, Any] | None = _source("Scratch space of the pod (core/v1 EmptyDirVolumeSource).")
    persistent_volume_claim: dict[str, Any] | None = _source(
        "A PersistentVolumeClaim of this namespace (core/v1 PersistentVolumeClaimVolumeSource).")
    projected: ProjectedVolumeSource | None = Field(default=None, description=(
        "Secrets, ConfigMaps, the downward API and trust bundles in one directory (core/v1); a "
        "serviceAccountToken source is refused."))
    downward_api: dict[str, Any] | None = Field(
        default=None, alias="downwardAPI", description="Fields of the pod as files (core/v1 DownwardAPIVolumeSource).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    csi: dict[str, Any] | None = _source("An inline ephemeral CSI volume (core/v1 CSIVolumeSource).")
    ephemeral: dict[str, Any] | None = _source(
        "A claim made and deleted with the pod (core/v1 EphemeralVolumeSource).")
    host_path: HostPathVolumeSource | None = Field(default=None, description=(
        "A directory of the node. Refused at admission and by the operator unless the operator allows "
        "hostPath volumes (Helm value security.allowHostPathVolumes, default false): it gives the pod the node."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(exactly_one(VOLUME_SOURCES),
             "a volume must set exactly one source, of " + ", ".join(VOLUME_SOURCES) +
             " (other sources reach the node or the network with the kubelet's rights and are refused)",
             reason="FieldValueInvalid"),
    )

    def source(self) -> str:
        """The name of the source this volume sets (the first, were several set)."""
        dumped = self.dump()
        return next((s for s in VOLUME_SOURCES if s in dumped), "")


class VolumeMount(ApiModel):
    """Where a volume is mounted in the worker container (core/v1 VolumeMount)."""

    name: str = Field(min_length=1, description="Name of a volume in volumes.")
    mount_path: str = Field(pattern=r"^/", description="Absolute path in the container.")
    read_only: bool | None = Field(default=None, description="Mount read-only.")
    sub_path: str | None = Field(default=None, description="Sub-path of the volume to mount.")


class ComputeResources(ApiModel):
    """CPU and memory per pod, beside the GPUs."""

    cpu: str | None = Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)?m?$", description="CPU request and limit, e.g. 8 or 500m.")
    memory: str | None = Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$",
                               description="Memory request and limit, e.g. 64Gi.")


class LabelSelectorRequirement(ApiModel):
    """One requirement of a label selector (metav1 LabelSelectorRequirement)."""

    key: str = Field(min_length=1, description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="How key and values relate.")
    values: list[str] = Field(default_factory=list, description="Values for In and NotIn; empty otherwise.")


class LabelSelector(ApiModel):
    """A label selector (metav1 LabelSelector); empty selects everything."""

    match_labels: dict[str, str] = Field(default_factory=dict, description="Labels that must all match.")
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, description=(
        "Requirements that must all hold."))


class IPBlock(ApiModel):
    """Addresses outside the cluster's pods (networking/v1 IPBlock)."""

    cidr: str = Field(min_length=1, description="A CIDR, e.g. 10.0.0.0/8.")
    except_: list[str] = Field(default_factory=list, alias="except", description="CIDRs inside cidr to leave out.")


class NetworkPeer(ApiModel):
    """Who may connect (networking/v1 NetworkPolicyPeer): pods by label, in this namespace or
    in the namespaces a namespaceSelector picks, or an ipBlock."""

    pod_selector: LabelSelector | None = Field(default=None, description=(
        "Pods by label; alone: in this namespace, with namespaceSelector: in those namespaces."))
    namespace_selector: LabelSelector | None = Field(default=None, description=(
        "Namespaces by label (kubernetes.io/metadata.name is every namespace's name); all their pods unless "
        "podSelector narrows them."))
    ip_block: IPBlock | None = Field(default=None, description="Addresses, e.g. of an ingress controller's nodes.")

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("has(self.podSelector) || has(self.namespaceSelector) || has(self.ipBlock)",
             "a client must set podSelector, namespaceSelector or ipBlock", reason="FieldValueRequired"),
        Rule("!has(self.ipBlock) || (!has(self.podSelector) && !has(self.namespaceSelector))",
             "ipBlock must not be set together with podSelector or namespaceSelector", reason="FieldValueInvalid"),
    )


class StoreRef(ApiModel):
    """Where flywheel data (captured traffic, feedback, datasets) lives: exactly one of a
    CheckpointPolicy's S3 storage or an S3 URI with its own credentials."""

    checkpoint_policy_ref: LocalObjectReference | None = Field(default=None, description=(
        "Use this CheckpointPolicy's S3 storage (bucket, prefix, endpoint). Its Secret is used only where "
        "credentialsSecretRef is empty and the operator's setting allows handing policy credentials to that "
        "workload (serving pods: security.servingPolicyCredentials)."))
    uri: str | None = Field(default=None, pattern=r"^s3://[a-z0-9][a-z0-9.\-]*[a-z0-9](/.*)?$", description=(
        "s3://bucket/prefix: the store root."))
    credentials_secret_ref: LocalObjectReference | None = Field(default=None, description=(
        "Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY that may write under the store root "
        "(required with uri)."))
    s3_endpoint: str | None = Field(default=None, pattern=r"^https?://", description=(
        "S3-compatible endpoint URL with uri (empty means AWS); with checkpointPolicyRef the policy's."))

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule("has(self.checkpointPolicyRef) != has(self.uri)", "exactly one of checkpointPolicyRef or uri must be set",
             reason="FieldValueInvalid"),
        Rule("!has(self.uri) || has(self.credentialsSecretRef)", "credentialsSecretRef must be set with uri",
             field_path=".credentialsSecretRef", reason="FieldValueRequired"),
        Rule("!has(self.s3Endpoint) || has(self.uri)",
             "s3Endpoint must be set only with uri (a CheckpointPolicy names its own endpoint)", field_path=".s3Endpoint",
             reason="FieldValueForbidden"),
    )


class RedactPattern(ApiModel):
    """A user redaction rule: matches of `regex` become the placeholder <NAME>."""

    name: str = Field(pattern=r"^[A-Z][A-Z0-9_]{0,31}$", description=(
        "Placeholder name, e.g. EMPLOYEE_ID for <EMPLOYEE_ID>: uppercase letters, digits and '_'."))
    regex: str = Field(min_length=1, max_length=1024, description="Python regular expression (re syntax).")


class Redaction(ApiModel):
    """PII redaction: emails, phone numbers, credit-card-like numbers (Luhn-checked) and API-key-like
    strings become <EMAIL>, <PHONE>, <CREDIT_CARD>, <API_KEY>; plus the user's patterns."""

    enabled: bool = Field(default=True, description="Redact before anything is written.")
    patterns: list[RedactPattern] = Field(default_factory=list, max_length=64, description="Extra patterns.")
