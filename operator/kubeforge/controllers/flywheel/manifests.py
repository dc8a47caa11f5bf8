"""A Flywheel's children, as pure manifests: the candidate TrainingJob of a cycle, the
evaluation pod that scores it, and the InferenceService patches that put it in shadow or
canary, promote it or take it away.

- The candidate job ``<flywheel>-c<cycle>`` is labelled with the Flywheel and the cycle but
  not owned by it: a promoted candidate's export is what the InferenceService serves, and
  deleting the Flywheel must not take it away. Its name is fixed per cycle, so an operator
  restarted mid-cycle finds the job it created instead of starting a second one.
- The evaluation pod ``<flywheel>-eval-c<cycle>`` (owned by the Flywheel) runs
  ``python -m kubeforge_runtime.evaluate`` and commits its report under
  ``<store>/<namespace>/<flywheel>/evaluation/cycle-<N>`` (``kubeforge.store.evaluation``);
  restricted PodSecurity, no ServiceAccount token, credentials only through ``envFrom``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from kubeforge.api import Flywheel, FlywheelSpec, TrainingJob
from kubeforge.api.common import API_VERSION
from kubeforge.api.inferenceservice import ModelSource
from kubeforge.controllers.workload import (
    MANAGED_BY,
    Owner,
    resources,
    s3_env,
    step_pod,
)
from kubeforge.store.evaluation import cycle_dir_name, evaluation_prefix

FLYWHEEL_LABEL = "kubeforge.dev/flywheel"
FLYWHEEL_UID_LABEL = "kubeforge.dev/flywheel-uid"
CYCLE_LABEL = "kubeforge.dev/flywheel-cycle"
COMPONENT = "flywheel-evaluation"
CONTAINER = "evaluate"
#: Scoring the tiny models needs little; a real one asks through spec.evaluation.resources.
DEFAULT_REQUESTS = {"cpu": "500m", "memory": "1Gi"}
#: Held by a Flywheel while the InferenceService carries its candidate: deleting the Flywheel
#: first takes the candidate away (all traffic back on the stable revision).
FINALIZER = "kubeforge.dev/flywheel-rollout"


@dataclasses.dataclass(frozen=True)
class EvalStore:
    """Where the evaluation reads and writes: the training CheckpointPolicy's S3 store."""

    root: str
    secret: str
    store_key: tuple[str, str]
    endpoint: str | None = None
    region: str | None = None
    force_path_style: bool = True

    def report_dir(self, namespace: str, flywheel: str, cycle: int) -> str:
        """The report's directory, relative to the root."""
        return f"{evaluation_prefix(namespace, flywheel)}/{cycle_dir_name(cycle)}"


def job_name(flywheel: str, cycle: int) -> str:
    return f"{flywheel}-c{cycle}"


def eval_pod_name(flywheel: str, cycle: int) -> str:
    return f"{flywheel}-eval-c{cycle}"


def candidate_job(owner: Owner, spec: FlywheelSpec, cycle: int, dataset: str, version: int,
                  stable_job: str) -> dict[str, Any]:
    """The TrainingJob of ``cycle``: the template, trained on ``version`` of ``dataset``,
    from the export of ``stable_job``."""
    body = spec.training.template.dump()
    body.pop("ttlSecondsAfterFinished", None)
    body["data"] = {"datasetRef": {"name": dataset, "version": version}}
    body["initFrom"] = {"trainingJobRef": {"name": stable_job}}
    labels = {**MANAGED_BY, FLYWHEEL_LABEL: owner.name, FLYWHEEL_UID_LABEL: owner.uid, CYCLE_LABEL: str(cycle)}
    return {"apiVersion": API_VERSION, "kind": TrainingJob.kind,
            "metadata": {"name": job_name(owner.name, cycle), "namespace": owner.namespace, "labels": labels},
            "spec": body}


def evaluation_settings(spec: FlywheelSpec) -> str:
    """``spec.evaluation`` as the evaluate module's ``--settings`` document."""
    ev = spec.evaluation
    doc = {"maxRecords": ev.max_records, "shortAnswerWords": ev.short_answer_words,
           "maxNewTokens": ev.max_new_tokens, "batchSize": ev.batch_size, "tieMargin": ev.tie_margin,
           "gate": {k: r.dump() for k, r in sorted(ev.gate.items())}}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def evaluation_command(spec: FlywheelSpec, store: EvalStore, namespace: str, flywheel: str, cycle: int,
                       candidate_uri: str, baseline_uri: str, dataset_dir: str, dataset_version: int) -> list[str]:
    command = ["python", "-m", "kubeforge_runtime.evaluate", "--model", candidate_uri, "--baseline", baseline_uri,
               "--dataset", dataset_dir, "--dataset-version", str(dataset_version)]
    if spec.evaluation.golden_uri:
        command += ["--golden", spec.evaluation.golden_uri]
    command += ["--output", f"{store.root}/{store.report_dir(namespace, flywheel, cycle)}",
                "--settings", evaluation_settings(spec)]
    if store.endpoint:
        command += ["--s3-endpoint", store.endpoint]
    return command


def evaluation_pod(owner: Owner, spec: FlywheelSpec, store: EvalStore, cycle: int, image: str,
                   command: list[str]) -> dict[str, Any]:
    ev = spec.evaluation
    env = s3_env(store.region, store.force_path_style)
    container: dict[str, Any] = {
        "name": CONTAINER, "image": image, "imagePullPolicy": spec.training.template.trainer.image_pull_policy,
        "command": command,
        "resources": resources(ev.resources.cpu, ev.resources.memory) or {"requests": dict(DEFAULT_REQUESTS)}}
    labels = {**MANAGED_BY, "app.kubernetes.io/component": COMPONENT, FLYWHEEL_LABEL: owner.name,
              FLYWHEEL_UID_LABEL: owner.uid, CYCLE_LABEL: str(cycle)}
    metadata = {"name": eval_pod_name(owner.name, cycle), "namespace": owner.namespace, "labels": labels,
                "ownerReferences": [Owner(owner.name, owner.namespace, owner.uid, Flywheel.kind).reference()]}
    return step_pod(metadata, container, store.secret, env, ev.deadline_seconds)


def candidate_model(stable: ModelSource, job: str) -> dict[str, Any]:
    """The candidate's model source on the InferenceService: its job's export, pinned, with the
    stable model's credentials and endpoint."""
    out: dict[str, Any] = {"trainingJobRef": {"name": job}, "updatePolicy": "Pinned"}
    if stable.credentials_secret_ref is not None:
        out["credentialsSecretRef"] = stable.credentials_secret_ref.dump()
    if stable.s3_endpoint:
        out["s3Endpoint"] = stable.s3_endpoint
    return out


def shadow_patch(stable: ModelSource, job: str, percent: float) -> dict[str, Any]:
    return {"spec": {"canary": None, "shadow": {"model": candidate_model(stable, job), "samplePercent": percent}}}


def canary_patch(stable: ModelSource, job: str, percent: float) -> dict[str, Any]:
    return {"spec": {"shadow": None, "canary": {"model": candidate_model(stable, job), "trafficPercent": percent}}}


def promote_patch(stable: ModelSource, job: str) -> dict[str, Any]:
    """The candidate becomes the main model (its pods roll with no dropped request; the
    stable's update policy carries over), and the extra revisions go."""
    model = candidate_model(stable, job)
    model["updatePolicy"] = stable.update_policy
    return {"spec": {"model": model, "canary": None, "shadow": None}}


def rollback_patch() -> dict[str, Any]:
    return {"spec": {"canary": None, "shadow": None}}


def carries(isvc_spec: dict[str, Any], job: str) -> bool:
    """Whether the InferenceService's canary or shadow serves ``job``'s export."""
    for role in ("canary", "shadow"):
        ref = (((isvc_spec.get(role) or {}).get("model") or {}).get("trainingJobRef") or {}).get("name")
        if ref == job:
            return True
    return False
