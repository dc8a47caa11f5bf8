"""The active replica among kopf peers (issue 16 item 1): kopf's rule read off the peering
object's status, and background loops that skip their passes while this replica is standby."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from kubeforge.controllers.background import Background
from kubeforge.controllers.peering import Peering, highest_other, is_active

pytestmark = pytest.mark.unit
NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)


def peer(priority: int, seen_s_ago: float = 1, lifetime: int = 60) -> dict[str, object]:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - dt.timedelta(seconds=seen_s_ago)).isoformat()}


def test_the_highest_live_priority_is_the_active_one() -> None:
    status = {"pod-a": peer(900), "pod-b": peer(100)}
    assert is_active(status, 900, NOW) and not is_active(status, 100, NOW)
    assert highest_other(status, 100, NOW) == 900
    # a dead peer (lastseen + lifetime in the past) outranks nobody
    dead = {"pod-a": peer(900, seen_s_ago=120), "pod-b": peer(100)}
    assert is_active(dead, 100, NOW) and highest_other(dead, 100, NOW) is None
    assert is_active({}, 5, NOW)  # alone: active
    assert is_active({"odd": {"lastseen": "not a time"}, "b": peer(1)}, 5, NOW)  # garbage is skipped


def test_standalone_is_always_active() -> None:
    p = Peering(None, 0, None)
    assert p.active and p.refresh() and p.state == "active"


def test_background_passes_run_only_in_the_active_replica() -> None:
    active = {"now": False}
    runs: dict[str, int] = {"gated": 0, "always": 0}

    async def go() -> None:
        bg = Background(active=lambda: active["now"])

        async def gated() -> None:
            runs["gated"] += 1

        async def always() -> None:
            runs["always"] += 1

        bg.every("gated", 0.01, gated)
        bg.every("always", 0.01, always, always=True)
        await asyncio.sleep(0.2)
        standby = dict(runs)
        active["now"] = True
        await asyncio.sleep(0.2)
        await bg.stop()
        assert standby["gated"] == 0 and standby["always"] > 3, standby
        assert runs["gated"] > 3, runs

    asyncio.run(go())
