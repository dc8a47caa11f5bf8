"""Status writing shared by the controllers: observedGeneration and conditions, always."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from kubeforge.api.common import set_condition


def parse_spec(model: type[BaseModel], spec: Any) -> tuple[Any, str | None]:
    """The typed spec, or None and a message naming the offending fields.

    The API server validates at admission; this catches what only Python knows (and specs
    stored before a schema change)."""
    try:
        return model.model_validate(dict(spec or {})), None
    except ValidationError as e:
        parts = [f"spec.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        return None, "; ".join(parts)


def conditions_patch(status: Any, generation: int | None,
                     updates: list[tuple[str, bool | str, str, str]]) -> dict[str, Any]:
    """A status patch with observedGeneration and the given (type, status, reason, message)."""
    conds = list((status or {}).get("conditions") or [])
    for type_, st, reason, message in updates:
        conds = set_condition(conds, type_, st, reason, message, generation)
    return {"observedGeneration": generation, "conditions": conds}


def record_event(body: Any, reason: str, message: str, warning: bool = False) -> None:
    """A Kubernetes Event on the object for a decision the operator took.

    Goes through ``kopf.event``, which posts whatever the posting level: the level (WARNING,
    set at startup) only keeps kopf's own per-handler INFO chatter out of the Events."""
    import kopf

    kopf.event(body, type="Warning" if warning else "Normal", reason=reason, message=message)
