"""What the kubelet says of pods that cannot start, for the conditions of the kinds that own
them: pure, shared by the TrainingJob and InferenceService controllers."""

from __future__ import annotations

from typing import Any

#: Container states of a pod that will not start by waiting (the kubelet's reasons).
STUCK_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                           "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
                           "CrashLoopBackOff"})


def _short(message: str, limit: int) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else "..." + message[-limit:]


def not_starting(pods: list[dict[str, Any]], limit: int = 200) -> str | None:
    """Why some pods cannot start, in the kubelet's words ("pod p: ImagePullBackOff: ..."; for a
    crash loop, how the last run ended), or None."""
    found = []
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") not in STUCK_REASONS:
                continue
            detail = f": {_short(waiting['message'], limit)}" if waiting.get("message") else ""
            last = (cs.get("lastState") or {}).get("terminated") or {}
            if last:
                ended = last.get("message") or last.get("reason") or ""
                detail += f" (last run exited {last.get('exitCode')}{': ' + _short(ended, limit) if ended else ''})"
            found.append(f"pod {pod['metadata']['name']}: {waiting['reason']}{detail}")
    return "; ".join(sorted(found)) or None
