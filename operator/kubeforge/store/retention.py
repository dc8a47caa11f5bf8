"""Which checkpoints a policy keeps: a pure function over what the store lists.

Kept apart from any I/O so the rules (keep the last K, every M-th step, always the newest
loadable, never one a job restores from, never count a step a restore could not load) are tested exhaustively without a store, and the
operator can show a plan before it applies it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence

from kubeforge.store.layout import CheckpointInfo


@dataclasses.dataclass(frozen=True)
class RetentionPlan:
    """Steps to keep and to delete; ``delete_incomplete`` are uncommitted leftovers past the grace;
    ``unloadable`` are committed steps a restore failed on, left alone and counted for nothing."""

    keep: tuple[int, ...]
    delete: tuple[int, ...]
    delete_incomplete: tuple[int, ...]
    unloadable: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.delete and not self.delete_incomplete


def plan_retention(checkpoints: Sequence[CheckpointInfo], *, keep_last: int, keep_every: int | None = None,
                   protected_steps: Iterable[int] = (), incomplete_grace_seconds: float = 3600.0,
                   now: dt.datetime | None = None) -> RetentionPlan:
    """Decide what stays.

    Loadable checkpoints kept: the ``keep_last`` newest, every step that is a multiple of
    ``keep_every``, the newest loadable one whatever the numbers say, and every step in
    ``protected_steps`` (a running job's restore source). A committed step a restore could
    not load (``CheckpointInfo.unloadable``) is neither counted among the kept nor deleted:
    counted, it would push out the only step the job can resume from (keepLast=1, [100,
    200 broken] → a commit of 150 would otherwise delete 100 and 150 and keep 200); deleted,
    a transient read error would cost a good checkpoint. Incomplete checkpoints (no marker)
    are deleted once their newest object is older than the grace, unless protected: a
    checkpoint being written right now is incomplete too.
    """
    if keep_last < 1:
        raise ValueError("keep_last must be >= 1")
    if keep_every is not None and keep_every < 1:
        raise ValueError("keep_every must be >= 1")
    now = now or dt.datetime.now(dt.UTC)
    protected = set(protected_steps)
    committed = sorted(c.step for c in checkpoints if c.loadable)
    unloadable = tuple(sorted(c.step for c in checkpoints if c.committed and not c.loadable))
    keep = set(committed[-keep_last:]) | (protected & set(committed))
    if keep_every:
        keep |= {s for s in committed if s % keep_every == 0}
    delete = [s for s in committed if s not in keep]
    grace = dt.timedelta(seconds=incomplete_grace_seconds)
    stale = [c.step for c in checkpoints
             if not c.committed and c.step not in protected and now - c.modified > grace]
    return RetentionPlan(keep=tuple(sorted(keep)), delete=tuple(delete), delete_incomplete=tuple(sorted(stale)),
                         unloadable=unloadable)
