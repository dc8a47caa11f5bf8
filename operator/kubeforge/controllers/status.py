"""Status writing shared by the controllers: observedGeneration and conditions, always."""

from __future__ import annotations

import datetime as dt
import logging
import socket
from typing import Any

import kubernetes
from pydantic import BaseModel, ValidationError

from kubeforge import kube
from kubeforge.api.common import API_VERSION, set_condition

log = logging.getLogger(__name__)


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
        "source": {"component": "kubeforge-operator", "host": socket.gethostname()},
        "reportingComponent": "kubeforge-operator", "reportingInstance": socket.gethostname(),
    }
    try:
        kube.core().create_namespaced_event(meta["namespace"], event)  # type: ignore[arg-type]  # dicts go as they are
    except kubernetes.client.ApiException as e:
        log.warning("could not post event %s on %s/%s: %s", reason, body["kind"], meta["name"], e.reason)
