"""Sharded, asynchronous, verified checkpoints of a training run over ``kubeforge.store``.

The trainer's whole interface::

    from kubeforge_runtime.checkpoint import CheckpointManager
    mgr = CheckpointManager.from_env(root_uri_or_None, policy_dict_or_None, rank, world_size)
    restored_step = mgr.restore(model, optimizer, extra)          # int | None, fills in place
    mgr.maybe_save(step, model, optimizer, extra, force=False)    # every N steps / T seconds
    mgr.save(step, model, optimizer, extra, blocking=True)        # SIGTERM, end of training
    mgr.wait()                                                    # wait for an in-flight save
    mgr.export_uri, mgr.store                                     # the job's export location

``root_uri`` is the store root of the pod contract (``KUBEFORGE_CHECKPOINT_URI``:
``s3://bucket/prefix`` or ``file:///path``); the job's namespace and name come from
``KUBEFORGE_JOB_NAMESPACE``/``KUBEFORGE_JOB_NAME`` unless passed. ``None`` disables
checkpointing: every call is then a cheap no-op, so the loop needs no ``if``.

``extra`` is the run's small global state (step, tokens seen, data cursor, LR schedule, RNG
states): it must be the same on every rank: DCP keeps one copy per key (from whichever rank it
picks) and every rank gets that copy back. It is pickled, so the store must be trusted.
"""

from kubeforge_runtime.checkpoint.manager import CheckpointManager, CheckpointSettings

__all__ = ["CheckpointManager", "CheckpointSettings"]
