"""The curation pod of a Dataset version, as a pure manifest.

One pod per version, ``<dataset>-curate-v<N>``, runs ``python -m kubeforge_runtime.curate``
(the contract: .dev/flywheel-contract.md, "Curation") over the capture directory and writes
``v-<N>`` of the dataset directory on the same store; the version counts only once its
``commit.json`` exists, so a pod killed midway leaves nothing the controller counts.

- labelled with the Dataset's name, uid and the version; owned by the Dataset (deleting it
  deletes a running curation);
- restricted PodSecurity, no ServiceAccount token, never restarted, ``activeDeadlineSeconds``;
- store credentials only through ``envFrom`` of the Secret, never in the command;
- ``FallbackToLogsOnError``: the curate module prints its reason to stderr and exits, so the
  kubelet puts the log's tail in the pod's status, where the controller reads it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from kubeforge.api import Dataset, DatasetSpec
from kubeforge.controllers.workload import (
    MANAGED_BY,
    Owner,
    resources,
    s3_env,
    step_pod,
)

DATASET_LABEL = "kubeforge.dev/dataset"
DATASET_UID_LABEL = "kubeforge.dev/dataset-uid"
VERSION_LABEL = "kubeforge.dev/dataset-version"
#: The curation attempt of this version the pod is (1 for the first; a retry after a failure counts on).
ATTEMPT_ANNOTATION = "kubeforge.dev/curation-attempt"
COMPONENT = "dataset-curation"
CONTAINER = "curate"
#: What a curation pod asks for when the Dataset names no resources: MinHash over 100k
#: records fits in about 1 GiB.
DEFAULT_REQUESTS = {"cpu": "500m", "memory": "1Gi"}


@dataclasses.dataclass(frozen=True)
class SourceStore:
    """Where a Dataset reads and writes, resolved from its source: the S3 store root, the
    capture directory and the dataset directory under it (keys relative to the root), the
    Secret with the credentials, and how to reach the endpoint. ``store_key`` is the store as
    ``controllers.store_access`` knows it: the CheckpointPolicy's ``(namespace, name)``, or
    ``(namespace, root)`` for a store given by URI."""

    root: str
    capture: str
    output: str
    secret: str
    store_key: tuple[str, str]
    endpoint: str | None = None
    region: str | None = None
    force_path_style: bool = True

    @property
    def source_uri(self) -> str:
        return f"{self.root}/{self.capture}"

    @property
    def output_uri(self) -> str:
        return f"{self.root}/{self.output}"


def curation_pod_name(dataset: str, version: int) -> str:
    """``<dataset>-curate-v<version>`` (the API caps the Dataset's name so that this fits a label)."""
    return f"{dataset}-curate-v{version}"


def curation_settings(spec: DatasetSpec) -> str:
    """``spec.curation`` as the curate module's ``--settings`` document: camelCase, every key;
    ``dedup.nearDuplicates: false`` becomes the module's ``nearDuplicateThreshold: null``."""
    doc = spec.curation.model_dump(by_alias=True, mode="json")
    # the curate module's switch for the near-duplicate step is a null threshold
    if not doc["dedup"].pop("nearDuplicates"):
        doc["dedup"]["nearDuplicateThreshold"] = None
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def curation_command(spec: DatasetSpec, store: SourceStore, version: int) -> list[str]:
    command = ["python", "-m", "kubeforge_runtime.curate", "--source", store.source_uri,
               "--output", store.output_uri, "--version", str(version), "--settings", curation_settings(spec)]
    if store.endpoint:
        command += ["--s3-endpoint", store.endpoint]
    return command


def build_curation_pod(owner: Owner, spec: DatasetSpec, store: SourceStore, version: int, attempt: int,
                       image: str, deadline_s: int) -> dict[str, Any]:
    """The pod that curates ``version`` of the Dataset ``owner``."""
    env = s3_env(store.region, store.force_path_style)
    wanted = resources(spec.resources.cpu, spec.resources.memory) or {"requests": dict(DEFAULT_REQUESTS)}
    container: dict[str, Any] = {"name": CONTAINER, "image": image, "imagePullPolicy": spec.image_pull_policy,
                                 "command": curation_command(spec, store, version), "resources": wanted}
    labels = {**MANAGED_BY, "app.kubernetes.io/component": COMPONENT, DATASET_LABEL: owner.name,
              DATASET_UID_LABEL: owner.uid, VERSION_LABEL: str(version)}
    metadata = {"name": curation_pod_name(owner.name, version), "namespace": owner.namespace, "labels": labels,
                "annotations": {ATTEMPT_ANNOTATION: str(attempt)},
                "ownerReferences": [Owner(owner.name, owner.namespace, owner.uid, Dataset.kind).reference()]}
    return step_pod(metadata, container, store.secret, env, deadline_s)
