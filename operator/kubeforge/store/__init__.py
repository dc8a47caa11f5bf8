"""The checkpoint store, shared by the operator and the trainer (no torch, no kopf).

Layout under a store root (``s3://bucket/prefix`` or ``file:///path``)::

    <namespace>/<run>/checkpoints/step-0000000042/...        sharded checkpoint files
    <namespace>/<run>/checkpoints/step-0000000042/commit.json marker, written last
    <namespace>/<run>/export/...  + export/commit.json       Hugging Face model, own marker

where ``<run>`` is ``<job>/runs/<uid>`` (one TrainingJob object), or ``<job>`` for a run that
started before runs were keyed by uid (``layout.py`` says why). Every ``job`` argument below
is such a run key.

A checkpoint exists only once its marker does (step, time, world size, bytes, per-file size
and sha256); without one it is never restored and is deleted after a grace period.

API (what the operator and the trainer call)::

    store = open_store(uri, endpoint_url=None, region=None, force_path_style=True,
                       access_key_id=None, secret_access_key=None, **S3Options fields)
    store.check()                                        # raises StoreError: bucket/dir unreachable
    store.list_checkpoints(ns, job) -> list[CheckpointInfo]   # committed and not, oldest first
    store.committed_checkpoints(ns, job) -> list[CheckpointInfo]
    store.newest_committed(ns, job) -> CheckpointInfo | None  # .step .marker.time .marker.world_size
    store.checkpoint_uri(ns, job, step) -> str
    store.summary(ns, job) -> CheckpointSummary          # committed, bytes, newest_step, newest_time, incomplete
    store.read_marker(ns, job, step) -> CommitMarker | None
    store.write_marker(ns, job, marker)                  # the commit; files must be durable first
    store.verify(ns, job, step) -> list[str]             # problems; [] means every file matches
    store.delete(ns, job, step)                          # marker first, then the files
    store.export_marker(ns, job) -> ExportMarker | None
    store.export_uri(ns, job) -> str
    store.write_export(ns, job, local_dir, step) -> ExportMarker
    store.download_export(ns, job, dest) -> ExportMarker
    store.runs(ns, job_name) -> list[str]                # run keys of every object of that name
    store.resume_source(ns, job_name, run=None, step=None, exclude=own_run) -> ResumeSource
                                                         # raises ResumeSourceError naming spec.resumeFrom

    storage_uri(policy_spec) -> str                      # the root a CheckpointPolicy names
    open_policy_store(policy_spec, secret_data, retry_deadline_s) -> Store

    plan = plan_retention(store.list_checkpoints(ns, job), keep_last=K, keep_every=M,
                          protected_steps={restoring_step}, incomplete_grace_seconds=3600)
    store.apply_retention(ns, job, plan) -> list[int]    # deleted steps
    store.write_restore_lease(ns, job, step, reader=None)  # reader: another run resuming from job
    store.restoring_steps(ns, job) -> set[int]           # every fresh lease: what retention keeps

Errors: ``StoreError`` (unreachable after retries, access denied), ``NotFound``,
``CorruptCheckpoint`` (a file does not match its marker).
"""

from kubeforge.store.backends import NotFound, ObjectInfo, S3Options, StoreError, open_backend
from kubeforge.store.layout import (
    EXPORT_PENDING_NAME,
    MARKER_NAME,
    CheckpointInfo,
    CommitMarker,
    ExportMarker,
    FileDigest,
    begin_local_export,
    checkpoint_prefix,
    commit_local_export,
    export_prefix,
    job_prefix,
    parse_run_key,
    run_key,
    step_dir_name,
    utc_now,
)
from kubeforge.store.policy import CREDENTIAL_KEYS, open_policy_store, storage_uri
from kubeforge.store.retention import RetentionPlan, plan_retention
from kubeforge.store.store import (
    CheckpointSummary,
    CorruptCheckpoint,
    ResumeSource,
    ResumeSourceError,
    Store,
    open_store,
)

__all__ = [
    "CREDENTIAL_KEYS", "EXPORT_PENDING_NAME", "MARKER_NAME", "CheckpointInfo", "CheckpointSummary", "CommitMarker", "CorruptCheckpoint", "ExportMarker",
    "FileDigest", "NotFound", "ObjectInfo", "ResumeSource", "ResumeSourceError", "RetentionPlan", "S3Options", "Store", "StoreError",
    "begin_local_export", "checkpoint_prefix", "commit_local_export", "export_prefix", "job_prefix", "open_backend", "open_policy_store", "open_store", "parse_run_key", "plan_retention",
    "run_key", "step_dir_name", "storage_uri", "utc_now",
]
