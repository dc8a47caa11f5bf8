"""A CheckpointPolicy's store: where its root is and how the operator opens it. Shared by the
controllers of the three kinds (a TrainingJob reads its lastCheckpoint there, an
InferenceService a TrainingJob's export)."""

from __future__ import annotations

from collections.abc import Mapping

from kubeforge.api import CheckpointPolicySpec
from kubeforge.api.contract import CHECKPOINT_MOUNT_DIR, ENV_S3_ACCESS_KEY_ID, ENV_S3_SECRET_ACCESS_KEY
from kubeforge.store.store import Store, open_store

#: Keys the credentials Secret must hold (they reach the workers through envFrom).
CREDENTIAL_KEYS = (ENV_S3_ACCESS_KEY_ID, ENV_S3_SECRET_ACCESS_KEY)


def storage_uri(spec: CheckpointPolicySpec, volume_mount: str = CHECKPOINT_MOUNT_DIR) -> str:
    """The store root the workers write to: ``s3://bucket/prefix`` or a path in the mounted claim."""
    if spec.storage.s3:
        return f"s3://{spec.storage.s3.bucket}/{spec.storage.s3.prefix.strip('/')}".rstrip("/")
    assert spec.storage.volume is not None
    return f"file://{volume_mount}/{spec.storage.volume.path.strip('/')}".rstrip("/")


def open_policy_store(spec: CheckpointPolicySpec, secret: Mapping[str, str] | None, retry_deadline_s: float) -> Store:
    """The policy's S3 store opened with the credentials Secret's data; a failing store is
    given up on after ``retry_deadline_s`` (the operator's next pass tries again)."""
    s3 = spec.storage.s3
    assert s3 is not None, "only S3 storage is opened by the operator (a volume is mounted in the pods)"
    creds = secret or {}
    return open_store(storage_uri(spec), endpoint_url=s3.endpoint, region=s3.region,
                      force_path_style=s3.force_path_style, access_key_id=creds.get(ENV_S3_ACCESS_KEY_ID),
                      secret_access_key=creds.get(ENV_S3_SECRET_ACCESS_KEY), retry_deadline_s=retry_deadline_s)
