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
# stable; volumes keep their source free-form (dozens of source kinds, validated by the
# API server when the pod is created).

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


class EnvVar(ApiModel):
    """An environment variable (core/v1 EnvVar); valueFrom is passed through as given."""

    name: str = Field(min_length=1, description="Variable name.")
    value: str | None = Field(default=None, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        default=None, description="Source for the value (secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})


class Volume(ApiModel):
    """A pod volume: a name plus exactly one core/v1 volume source, passed through as given."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, description="Volume name, referenced by volumeMounts.")


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
