"""Flywheel controller against the real API server, kwok nodes and the cluster's MinIO, with
the Dataset and TrainingJob controllers of the same operator: a Flywheel waits on a missing
InferenceService with a condition naming it; a manual trigger asks the Dataset for a version
(its curation pod's exit is simulated as in test_dataset_controller), the cycle trains on the
version committed for it, from the served job's export, under a name fixed by the cycle; an
operator restarted mid-cycle does not start a second job; deleting the Flywheel mid-training
deletes the unfinished candidate job and then lets the Flywheel go (its finalizer)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml
from kubeforge.api.common import condition

from tests.cluster.test_dataset_controller import NAME as DATASET
from tests.cluster.test_dataset_controller import Bucket, curation_pods, dataset
from tests.cluster.test_inferenceservice_controller import apply, get, isvc, s3_objects
from tests.cluster.test_trainingjob_controller import exit_pod
from tests.fixtures.cluster import REPO, OperatorProcess, kubectl_json, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]
NAME = "chat-fw"


def flywheel(**overrides: Any) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples/10-flywheel.yaml").read_text())
    doc["metadata"]["name"] = NAME
    spec = doc["spec"]
    spec["inferenceServiceRef"] = {"name": "chat"}
    spec["datasetRef"] = {"name": DATASET}
    spec["trigger"] = {}
    # the candidate's identity is what this test needs, not its workers
    spec["training"]["template"]["checkpointPolicyRef"] = {"name": "ckpt"}
    spec["training"]["template"]["suspend"] = True
    spec.update(overrides)
    return doc


def fw_status(c: Any, ns: str) -> dict[str, Any]:
    return (get(c, ns, "flywheel", NAME) or {}).get("status") or {}


def fw_cond(c: Any, ns: str, type_: str) -> dict[str, Any]:
    return condition(fw_status(c, ns).get("conditions"), type_) or {}


def fw_events(c: Any, ns: str) -> set[str]:
    items = kubectl_json(c, "get", "events", "-n", ns, "--field-selector", "involvedObject.kind=Flywheel")["items"]
    return {e["reason"] for e in items}


def candidate_jobs(c: Any, ns: str) -> list[dict[str, Any]]:
    return kubectl_json(c, "get", "trainingjobs", "-n", ns, "-l", f"kubeforge.dev/flywheel={NAME}")["items"]


def test_a_cycle_asks_for_a_version_and_trains_one_candidate_on_it(operator: OperatorProcess, namespace: str) -> None:
    c = operator.cluster
    bucket = Bucket(c, namespace)
    capture = f"{namespace}/chat/capture"
    for obj in s3_objects(c, namespace, f"flywheel-tests/{namespace}"):
        apply(c, namespace, obj)
    apply(c, namespace, flywheel())
    waiting = wait_for("Ready False", lambda: fw_cond(c, namespace, "Ready").get("status") == "False"
                       and fw_cond(c, namespace, "Ready"), 30)
    assert waiting["reason"] == "InferenceServiceNotFound" and "InferenceService chat does not exist" in waiting["message"]

    apply(c, namespace, isvc("chat", model={"trainingJobRef": {"name": "tiny"}, "credentialsSecretRef": {"name": "s3"}}))
    waiting = wait_for("DatasetNotFound", lambda: fw_cond(c, namespace, "Ready").get("reason") == "DatasetNotFound"
                       and fw_cond(c, namespace, "Ready"), 30)
    assert DATASET in waiting["message"]
    shard = bucket.shard(capture, 30, 0)
    apply(c, namespace, dataset(bucket, capture, schedule={}))
    # the Dataset curates its first version on its own; the cycle waits for a version of its own
    wait_for("the first curation pod", lambda: [p for p in curation_pods(c, namespace) if p["spec"].get("nodeName")], 60)
    bucket.commit_version(namespace, 1, capture, [shard], train=27, eval_=3)
    exit_pod(c, namespace, f"{DATASET}-curate-v1", 0, container="curate")
    wait_for("Ready", lambda: fw_cond(c, namespace, "Ready").get("status") == "True", 60)
    assert fw_status(c, namespace).get("stage") == "Idle" and not candidate_jobs(c, namespace)

    shard2 = bucket.shard(capture, 12, 1)
    wait_for("records pending", lambda: ((get(c, namespace, "dataset", DATASET) or {}).get("status") or {})
             .get("pendingRecords") == 12, 60)
    c.kubectl("annotate", "flywheel", NAME, "-n", namespace, "kubeforge.dev/run-cycle=1")
    st = wait_for("Curating", lambda: fw_status(c, namespace).get("stage") == "Curating" and fw_status(c, namespace), 30)
    request = f"{NAME}-{get(c, namespace, 'flywheel', NAME)['metadata']['uid'][:8]}-c1"  # type: ignore[index]
    assert st["cycle"] == 1 and st["curationRequest"] == request and st["lastRunRequest"] == "1"
    ds = wait_for("the curate annotation", lambda: (x := get(c, namespace, "dataset", DATASET)) and
                  (x["metadata"].get("annotations") or {}).get("kubeforge.dev/curate") == request and x, 30)
    assert ds is not None
    wait_for("the v2 curation pod", lambda: [p for p in curation_pods(c, namespace)
                                             if p["metadata"]["name"] == f"{DATASET}-curate-v2"
                                             and p["spec"].get("nodeName")], 60)
    assert fw_status(c, namespace)["stage"] == "Curating", "the cycle waits for the version it asked for"
    bucket.commit_version(namespace, 2, capture, [shard, shard2], train=37, eval_=4)
    exit_pod(c, namespace, f"{DATASET}-curate-v2", 0, container="curate")

    job = wait_for("the candidate job", lambda: candidate_jobs(c, namespace), 60)[0]
    assert job["metadata"]["name"] == f"{NAME}-c1" and job["metadata"]["labels"]["kubeforge.dev/flywheel-cycle"] == "1"
    assert job["spec"]["data"] == {"datasetRef": {"name": DATASET, "version": 2}}
    assert job["spec"]["initFrom"] == {"trainingJobRef": {"name": "tiny"}}
    assert "ownerReferences" not in job["metadata"]
    st = wait_for("Training", lambda: fw_status(c, namespace).get("stage") == "Training"
                  and fw_status(c, namespace)["cycles"][-1].get("trainingJob") and fw_status(c, namespace), 30)
    record = st["cycles"][-1]
    assert record["datasetVersion"] == 2 and record["trigger"] == "kubeforge.dev/run-cycle=1"
    assert fw_cond(c, namespace, "Cycling")["status"] == "True"
    assert fw_cond(c, namespace, "CandidateServing")["status"] == "False"
    assert {"CycleStarted", "TrainingStarted"} <= wait_for(
        "Events", lambda: (r := fw_events(c, namespace)) >= {"CycleStarted", "TrainingStarted"} and r, 15)
    printed = c.kubectl("get", "flywheel", NAME, "-n", namespace).stdout
    assert "Training" in printed.splitlines()[1]

    # an operator restarted mid-cycle picks the cycle up and starts no second job
    uid = job["metadata"]["uid"]
    operator.stop()
    operator.start()
    c.kubectl("annotate", "flywheel", NAME, "-n", namespace, "--overwrite", "kubeforge.dev/touch=1")
    wait_for("a pass after the restart", lambda: fw_status(c, namespace).get("observedGeneration") is not None, 30)
    time.sleep(5)
    jobs = candidate_jobs(c, namespace)
    assert [(j["metadata"]["name"], j["metadata"]["uid"]) for j in jobs] == [(f"{NAME}-c1", uid)]
    assert fw_status(c, namespace)["stage"] == "Training" and fw_status(c, namespace)["cycle"] == 1

    # deleted mid-training: the finalizer held since the cycle began lets it go once the
    # unfinished candidate job is deleted
    assert "kubeforge.dev/flywheel-rollout" in get(c, namespace, "flywheel", NAME)["metadata"]["finalizers"]  # type: ignore[index]
    c.kubectl("delete", "flywheel", NAME, "-n", namespace, "--timeout=60s")
    wait_for("the candidate job deleted", lambda: not [j for j in candidate_jobs(c, namespace)
                                                      if not j["metadata"].get("deletionTimestamp")], 30)
    wait_for("the CandidateDeleted Event", lambda: "CandidateDeleted" in fw_events(c, namespace), 15)
    assert json.loads(c.kubectl("get", "inferenceservice", "chat", "-n", namespace, "-o", "json").stdout)["spec"].get(
        "canary") is None
