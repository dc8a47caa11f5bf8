"""Dataset controller against the real API server, kwok nodes and the cluster's MinIO: the
capture shards and versions are real objects in the store; the curation pod is scheduled on a
kwok node, which runs nothing, so its exit is simulated by writing what the curate module
would have written (a committed version) and the pod status the kubelet would write."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import tarfile
import time
import uuid
from typing import Any

import pytest
from devcluster import Cluster
from kubeforge.api.common import condition
from kubeforge.store import FileDigest, open_store
from kubeforge.store.backends import ObjectBackend
from kubeforge.store.flywheel import (
    DatasetManifest,
    DatasetMarker,
    FilterCount,
    ShardMarker,
    dataset_prefix,
    shard_marker_key,
    shard_name,
    version_prefix,
)

from tests.cluster.test_trainingjob_controller import exit_pod
from tests.fixtures.cluster import OperatorProcess, kubectl_json, wait_for

pytestmark = pytest.mark.cluster
NAME = "chat-data"
SETTINGS_JSON = (
    '{"dedup":{"exact":true,"nearDuplicateThreshold":0.8,"numPerm":128,"shingleWords":5},'
    '"feedback":{"minScore":0.5,"requireFeedback":false},'
    '"filters":{"dropFinishReasons":[],"maxPromptChars":16000,"maxRepeatRatio":0.5,"maxTargetChars":16000,'
    '"minAlphaRatio":0.3,"minPromptChars":1,"minTargetChars":1,"scripts":["Latin"]},'
    '"redact":{"enabled":true,"patterns":[]},"split":{"evalPercent":10.0}}')


def ts(t: dt.datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Bucket:
    """A fresh root in the cluster's MinIO bucket, and the Secret that reaches it."""

    def __init__(self, c: Cluster, namespace: str) -> None:
        self.s3 = c.s3_settings()
        self.root = f"s3://{self.s3.get('KUBEFORGE_S3_BUCKET', 'kubeforge')}/datasets-{uuid.uuid4().hex[:8]}"
        self.backend: ObjectBackend = open_store(
            self.root, endpoint_url=self.s3["AWS_ENDPOINT_URL"], access_key_id=self.s3["AWS_ACCESS_KEY_ID"],
            secret_access_key=self.s3["AWS_SECRET_ACCESS_KEY"]).backend
        c.kubectl("create", "secret", "generic", "s3-creds", "-n", namespace,
                  f"--from-literal=AWS_ACCESS_KEY_ID={self.s3['AWS_ACCESS_KEY_ID']}",
                  f"--from-literal=AWS_SECRET_ACCESS_KEY={self.s3['AWS_SECRET_ACCESS_KEY']}")

    def shard(self, capture: str, records: int, seq: int, commit: bool = True) -> str:
        """A WebDataset tar of request records, and (unless not ``commit``) its marker, last."""
        first = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10 - seq)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(records):
                rid = f"cmpl-{seq:04d}{i:04d}"
                data = json.dumps({"type": "request", "id": rid, "time": ts(first), "prompt": f"question {i}",
                                   "completion": f"answer {i}", "finish_reason": "stop"}).encode()
                info = tarfile.TarInfo(f"{rid}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
        key = f"{capture}/requests/{shard_name(ts(first), 'chat-server-0', seq)}"
        self.backend.put_bytes(key, raw)
        if commit:
            marker = ShardMarker(kind="requests", writer="chat-server-0", records=records, bytes=len(raw),
                                 sha256=hashlib.sha256(raw).hexdigest(), first_time=ts(first),
                                 last_time=ts(first + dt.timedelta(seconds=20)), time=ts(dt.datetime.now(dt.UTC)))
            self.backend.put_bytes(shard_marker_key(key), marker.to_json())
        return key

    def commit_version(self, namespace: str, version: int, capture: str, shards: list[str], train: int,
                       eval_: int) -> None:
        """What the curate module leaves: the splits, the manifest, then the marker."""
        prefix = version_prefix(namespace, NAME, version)
        files = {}
        for split, data in (("train.tar", b"t" * 100), ("eval.tar", b"e" * 10)):
            self.backend.put_bytes(f"{prefix}/{split}", data)
            files[split] = FileDigest(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        now = ts(dt.datetime.now(dt.UTC))
        manifest = DatasetManifest(
            version=version, time=now, source=f"{self.root}/{capture}",
            source_shards=[k[len(capture) + 1:] for k in shards], window_start=now, window_end=now,
            filters=[FilterCount(name="exact_dedup", records_in=train + eval_ + 5, records_out=train + eval_)],
            records={"train": train, "eval": eval_}, dedup_ratio=0.125, content_sha256="cd" * 32)
        self.backend.put_bytes(f"{prefix}/manifest.json", manifest.to_json())
        self.backend.put_bytes(f"{prefix}/commit.json", DatasetMarker(
            version=version, time=now, bytes=110, files=files, records={"train": train, "eval": eval_}).to_json())


def dataset(bucket: Bucket, prefix: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": NAME},
            "spec": {"source": {"store": {"uri": bucket.root, "s3Endpoint": bucket.s3["AWS_ENDPOINT_URL"],
                                          "credentialsSecretRef": {"name": "s3-creds"}}, "prefix": prefix}, **spec}}


def status(c: Cluster, ns: str) -> dict[str, Any]:
    return kubectl_json(c, "get", "dataset", NAME, "-n", ns).get("status") or {}


def cond(c: Cluster, ns: str, type_: str) -> dict[str, Any]:
    return condition(status(c, ns).get("conditions"), type_) or {}


def events(c: Cluster, ns: str, reason: str) -> list[dict[str, Any]]:
    items = kubectl_json(c, "get", "events", "-n", ns, "--field-selector", "involvedObject.kind=Dataset")["items"]
    return [e for e in items if e.get("reason") == reason]


def curation_pods(c: Cluster, ns: str) -> list[dict[str, Any]]:
    return kubectl_json(c, "get", "pods", "-n", ns, "-l", f"kubeforge.dev/dataset={NAME}")["items"]


def metric(op: OperatorProcess, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in op.metrics().splitlines():
        if line.startswith(f"{name}{{") and line.split("}")[0][len(name) + 1:] == want:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_committed_shards_become_a_curation_pod_then_a_version(operator: OperatorProcess, namespace: str) -> None:
    c = operator.cluster
    bucket = Bucket(c, namespace)
    capture = f"{namespace}/chat/capture"
    s1 = bucket.shard(capture, 30, 0)
    s2 = bucket.shard(capture, 12, 1)
    bucket.shard(capture, 99, 2, commit=False)  # being written: not counted, not curated
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(dataset(bucket, capture)))

    pod = wait_for("the curation pod scheduled", lambda: [
        p for p in curation_pods(c, namespace) if p["spec"].get("nodeName")], 60)[0]
    assert pod["metadata"]["name"] == f"{NAME}-curate-v1"
    container = pod["spec"]["containers"][0]
    assert container["command"] == [
        "python", "-m", "kubeforge_runtime.curate", "--source", f"{bucket.root}/{capture}",
        "--output", f"{bucket.root}/{dataset_prefix(namespace, NAME)}", "--version", "1",
        "--settings", SETTINGS_JSON, "--s3-endpoint", bucket.s3["AWS_ENDPOINT_URL"]]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert pod["spec"]["restartPolicy"] == "Never" and pod["spec"]["activeDeadlineSeconds"] == 3600
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("Dataset", NAME)
    st = wait_for("status while curating", lambda: status(c, namespace).get("curating") and status(c, namespace), 30)
    assert st["curating"]["pod"] == f"{NAME}-curate-v1" and st["sourceRecords"] == 42 and st["pendingRecords"] == 42
    assert cond(c, namespace, "Curating")["status"] == "True"
    assert (cond(c, namespace, "Ready")["status"], cond(c, namespace, "Ready")["reason"]) == ("False", "Curating")
    time.sleep(3)
    assert len(curation_pods(c, namespace)) == 1, "never two curations at once"

    # the pod writes v1 and exits 0 (what kubeforge_runtime.curate does)
    bucket.commit_version(namespace, 1, capture, [s1, s2], train=37, eval_=4)
    exit_pod(c, namespace, f"{NAME}-curate-v1", 0, container="curate")
    st = wait_for("version 1 in status", lambda: status(c, namespace).get("newestVersion") == 1 and status(c, namespace), 30)
    uri = f"{bucket.root}/{version_prefix(namespace, NAME, 1)}"
    assert st["newestUri"] == uri and st["records"] == {"train": 37, "eval": 4} and st["dedupRatio"] == 0.125
    assert [v["version"] for v in st["versions"]] == [1] and st["versions"][0]["uri"] == uri
    assert st["pendingRecords"] == 0 and st["sourceRecords"] == 42 and "curating" not in st
    ready = cond(c, namespace, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "VersionCommitted")
    assert cond(c, namespace, "SourceEmpty")["status"] == "False"
    wait_for("the succeeded pod deleted", lambda: not curation_pods(c, namespace), 30)
    assert events(c, namespace, "CurationStarted") and events(c, namespace, "VersionCommitted")
    assert metric(operator, "kubeforge_dataset_records", namespace=namespace, dataset=NAME, split="train") == 37
    assert metric(operator, "kubeforge_dataset_curations_total", namespace=namespace, dataset=NAME,
                  outcome="succeeded") == 1

    # a failed curation: its termination message in the condition and a Warning, no hot loop
    c.kubectl("annotate", "dataset", NAME, "-n", namespace, "kubeforge.dev/curate=again-1")
    wait_for("v2 scheduled", lambda: [p for p in curation_pods(c, namespace)
                                      if p["metadata"]["name"] == f"{NAME}-curate-v2" and p["spec"].get("nodeName")], 30)
    assert status(c, namespace)["lastCurationRequest"] == "again-1"
    exit_pod(c, namespace, f"{NAME}-curate-v2", 1, "kubeforge: store error: s3: list: connection refused",
             container="curate")
    failed = wait_for("CurationFailed", lambda: cond(c, namespace, "Curating").get("reason") == "CurationFailed"
                      and cond(c, namespace, "Curating"), 30)
    assert "connection refused" in failed["message"] and "retry at" in failed["message"]
    warning = wait_for("CurationFailed event", lambda: events(c, namespace, "CurationFailed"), 30)[0]
    assert warning["type"] == "Warning" and "connection refused" in warning["message"]
    assert cond(c, namespace, "Ready")["status"] == "True", "version 1 still stands"
    time.sleep(5)
    pods = curation_pods(c, namespace)
    assert [p["status"]["phase"] for p in pods] == ["Failed"], "kept for its logs, not retried before the backoff"
    assert operator.proc is not None and operator.proc.poll() is None


def test_an_empty_prefix_is_source_empty_not_ready(operator: OperatorProcess, namespace: str) -> None:
    c = operator.cluster
    bucket = Bucket(c, namespace)
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(dataset(bucket, f"{namespace}/nobody/capture")))
    empty = wait_for("SourceEmpty", lambda: cond(c, namespace, "SourceEmpty").get("status") == "True"
                     and cond(c, namespace, "SourceEmpty"), 30)
    assert empty["reason"] == "NoCommittedRecords"
    ready = cond(c, namespace, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "SourceEmpty")
    assert status(c, namespace)["sourceRecords"] == 0
    wait_for("SourceEmpty event", lambda: events(c, namespace, "SourceEmpty"), 30)
    assert curation_pods(c, namespace) == []
    version = kubectl_json(c, "get", "dataset", NAME, "-n", namespace)["metadata"]["resourceVersion"]
    time.sleep(4)
    assert kubectl_json(c, "get", "dataset", NAME, "-n", namespace)["metadata"]["resourceVersion"] == version, \
        "a status the operator rewrites at every pass (its own write's event) would loop"
    assert len(events(c, namespace, "SourceEmpty")) == 1


def test_an_inference_services_capture_is_the_source(operator: OperatorProcess, namespace: str) -> None:
    c = operator.cluster
    bucket = Bucket(c, namespace)
    store = {"uri": bucket.root, "s3Endpoint": bucket.s3["AWS_ENDPOINT_URL"], "credentialsSecretRef": {"name": "s3-creds"}}
    body = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": NAME},
            "spec": {"source": {"inferenceServiceRef": {"name": "chat"}}}}
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    wait_for("InferenceServiceNotFound", lambda: cond(c, namespace, "Ready").get("reason") == "InferenceServiceNotFound", 30)
    service = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "chat"},
               "spec": {"model": {"uri": "s3://kubeforge/models/none", "credentialsSecretRef": {"name": "s3-creds"}},
                        "replicas": 0, "gpus": 0}}
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(service))
    wait_for("CaptureNotConfigured", lambda: cond(c, namespace, "Ready").get("reason") == "CaptureNotConfigured", 30)
    capture = f"{namespace}/chat/capture"
    bucket.shard(capture, 5, 0)
    service["spec"]["logging"] = {"store": store}
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(service))
    pod = wait_for("the curation pod", lambda: curation_pods(c, namespace), 30)[0]
    command = pod["spec"]["containers"][0]["command"]
    assert command[command.index("--source") + 1] == f"{bucket.root}/{capture}"
    assert command[command.index("--output") + 1] == f"{bucket.root}/{dataset_prefix(namespace, NAME)}"
    assert status(c, namespace)["sourceUri"] == f"{bucket.root}/{capture}"


def test_missing_secret_and_volume_store_are_conditions(operator: OperatorProcess, namespace: str) -> None:
    c = operator.cluster
    body = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": NAME},
            "spec": {"source": {"store": {"uri": "s3://kubeforge/none", "credentialsSecretRef": {"name": "absent"}},
                                "prefix": "x/capture"}}}
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    wait_for("SecretNotFound", lambda: cond(c, namespace, "Ready").get("reason") == "SecretNotFound", 30)
    wait_for("SecretNotFound event", lambda: events(c, namespace, "SecretNotFound"), 30)
    policy = {"apiVersion": "kubeforge.dev/v1alpha1", "kind": "CheckpointPolicy", "metadata": {"name": "on-volume"},
              "spec": {"schedule": {"everySteps": 10}, "storage": {"volume": {"claimName": "ckpt"}}}}
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(policy))
    body["spec"]["source"]["store"] = {"checkpointPolicyRef": {"name": "on-volume"}}
    c.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    ready = wait_for("StoreUnsupported", lambda: cond(c, namespace, "Ready").get("reason") == "StoreUnsupported"
                     and cond(c, namespace, "Ready"), 30)
    assert "spec.source.store.checkpointPolicyRef" in ready["message"] and ready["status"] == "False"
    assert curation_pods(c, namespace) == []
