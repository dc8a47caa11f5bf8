"""Which replica is the active one, for the work kopf does not gate (issue 16 item 1).

With ``--peering`` kopf pauses a replica's handlers while a live peer of higher priority
exists. Each replica draws a priority of its own (``main``), so exactly one is active. kopf
does not pause our background loops (retention, the export poll, the TrainingJob queue's
requeues), though. This module reads the same peering object kopf keeps
(``ClusterKopfPeering`` or, when the operator watches namespaces, the ``KopfPeering`` of the
first one), and applies kopf's rule: active while no live peer has a higher priority. The
background loops skip their passes while this replica is not active. The answer shows in
``kubeforge_operator_active``, a log line at each change and the ``peering`` probe of
``/healthz``.

A standby replica stays healthy: restarting it would help nobody.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from kubeforge import k8s

log = logging.getLogger("kubeforge.peering")
GROUP, VERSION = "kopf.dev", "v1"


def _live(info: Mapping[str, Any], now: dt.datetime) -> bool:
    try:
        seen = dt.datetime.fromisoformat(str(info["lastseen"]))
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=dt.UTC)
        return seen + dt.timedelta(seconds=int(info.get("lifetime", 60))) > now
    except (KeyError, ValueError, TypeError):
        return False


def highest_other(status: Mapping[str, Any], priority: int, now: dt.datetime | None = None) -> int | None:
    """The highest priority among the live peers other than us (ours is unique), or None."""
    now = now or dt.datetime.now(dt.UTC)
    others = []
    for info in status.values():
        if isinstance(info, Mapping) and _live(info, now):
            try:
                other = int(info.get("priority", 0))
            except (TypeError, ValueError):
                continue
            if other != priority:
                others.append(other)
    return max(others) if others else None


def is_active(status: Mapping[str, Any], priority: int, now: dt.datetime | None = None) -> bool:
    """kopf's rule: active while no live peer has a higher priority."""
    other = highest_other(status, priority, now)
    return other is None or other < priority


class Peering:
    """This replica's standing among its peers; ``refresh`` reads the peering object."""

    def __init__(self, name: str | None, priority: int, namespace: str | None) -> None:
        self.name, self.priority, self.namespace = name, priority, namespace
        #: standalone (no peering) is always active; with peering, standby until the first read
        self.active = name is None

    def read(self) -> Mapping[str, Any] | None:
        assert self.name is not None
        api = k8s.custom()
        if self.namespace:
            obj = k8s.get_or_none(api.get_namespaced_custom_object, GROUP, VERSION, self.namespace,
                                  "kopfpeerings", self.name)
        else:
            obj = k8s.get_or_none(api.get_cluster_custom_object, GROUP, VERSION, "clusterkopfpeerings", self.name)
        return None if obj is None else dict(obj.get("status") or {})

    def refresh(self) -> bool:
        """Read the peering object; returns whether this replica is active. A failed read keeps
        the last answer (the API server being away is no reason to start or stop loops)."""
        if self.name is None:
            return True
        try:
            status = self.read()
        except Exception as e:  # noqa: BLE001 - logged, the last answer stands
            log.warning("peering %s unreadable (%s); still %s", self.name, e, self.state)
            return self.active
        if status is None:
            log.warning("peering object %s not found; still %s", self.name, self.state)
            return self.active
        active = is_active(status, self.priority)
        if active != self.active:
            other = highest_other(status, self.priority)
            log.info("this replica (priority %d) is now %s; the highest other live peer has priority %s",
                     self.priority, "active" if active else "standby", other)
            self.active = active
        return self.active

    @property
    def state(self) -> str:
        return "active" if self.active else "standby"
