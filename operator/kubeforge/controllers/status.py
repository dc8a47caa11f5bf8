"""Status pieces every controller writes: the typed spec (or why not) and conditions with
observedGeneration. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from kubeforge.api.common import set_condition

M = TypeVar("M", bound=BaseModel)
#: (type, status, reason, message) of one condition.
Condition = tuple[str, bool | str, str, str]


def parse_spec(model: type[M], spec: Mapping[str, Any] | None) -> tuple[M, None] | tuple[None, str]:
    """The typed spec, or None and a message naming the offending fields.

    The API server validates at admission; this catches what only Python knows (and specs
    stored before a schema change)."""
    try:
        return model.model_validate(dict(spec or {})), None
    except ValidationError as e:
        parts = [f"spec.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        return None, "; ".join(parts)


def conditions_patch(status: Mapping[str, Any] | None, generation: int | None,
                     updates: list[Condition]) -> dict[str, Any]:
    """A status patch with observedGeneration and the given (type, status, reason, message)."""
    conds = list((status or {}).get("conditions") or [])
    for type_, st, reason, message in updates:
        conds = set_condition(conds, type_, st, reason, message, generation)
    return {"observedGeneration": generation, "conditions": conds}
