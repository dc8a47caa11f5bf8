"""The API server rejects invalid resources at admission, naming the field and the rule."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from devcluster import Cluster

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def example(kind: str) -> dict[str, Any]:
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == kind:
                return copy.deepcopy(doc)
    raise LookupError(kind)


def _set(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    *parents, last = path.split(".")
    node = obj
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return obj


_DELETE = object()

# (kind, path to change, new value, text the error must contain)
INVALID = [
    ("TrainingJob", "spec.workers.minReplicas", "two", "spec.workers.minReplicas"),
    ("TrainingJob", "spec.workers.minReplicas", -1, "spec.workers.minReplicas"),
    ("TrainingJob", "spec.workers", {"minReplicas": 4, "maxReplicas": 2}, "minReplicas must be less than or equal"),
    ("TrainingJob", "spec.unknownField", 1, "unknownField"),
    ("TrainingJob", "spec.workers.gpusPerWorker", 100, "spec.workers.gpusPerWorker"),
    ("TrainingJob", "spec.failurePolicy.restartPolicy", "Sometimes", "spec.failurePolicy.restartPolicy"),
    ("TrainingJob", "spec.checkpointPolicyRef", {}, "spec.checkpointPolicyRef.name"),
    ("TrainingJob", "spec", _DELETE, "spec"),
    ("TrainingJob", "spec.trainer.imagePullPolicy", "Maybe", "spec.trainer.imagePullPolicy"),
    ("TrainingJob", "spec.pod.volumeMounts", [{"name": "data", "mountPath": "relative/path"}],
     "spec.pod.volumeMounts[0].mountPath"),
    ("TrainingJob", "spec.failurePolicy.nodeFailureGraceSeconds", -5, "spec.failurePolicy.nodeFailureGraceSeconds"),
    # a projected service account token would undo automountServiceAccountToken: false
    ("TrainingJob", "spec.pod.volumes", [{"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}],
     'unknown field "spec.pod.volumes[0].projected.sources[0].serviceAccountToken"'),
    ("CheckpointPolicy", "spec.storage.volume", {"claimName": "ckpt"}, "exactly one of s3 or volume must be set"),
    ("CheckpointPolicy", "spec.schedule", {"asyncSave": True}, "everySteps or everySeconds must be set"),
    ("CheckpointPolicy", "spec.storage.s3.bucket", "Bad_Bucket", "spec.storage.s3.bucket"),
    ("CheckpointPolicy", "spec.storage", _DELETE, "spec.storage"),
    ("CheckpointPolicy", "spec.retention.keepLast", 0, "spec.retention.keepLast"),
    ("CheckpointPolicy", "spec.schedule.everySteps", 1.5, "spec.schedule.everySteps"),
    ("InferenceService", "spec.model.uri", "s3://kubeforge/models/x", "exactly one of uri or trainingJobRef must be set"),
    ("InferenceService", "spec.model", {"uri": "http://example.com/model"}, "spec.model.uri"),
    ("InferenceService", "spec.autoscaling.minReplicas", 5, "minReplicas must be less than or equal"),
    ("InferenceService", "spec.autoscaling.metric", "GPU", "spec.autoscaling.metric"),
    ("InferenceService", "spec.replicas", -3, "spec.replicas"),
    ("InferenceService", "spec.engine", {"kvCacheMemoryFraction": 1.5}, "spec.engine.kvCacheMemoryFraction"),
    ("InferenceService", "spec.autoscaling", {"minReplicas": 1}, "spec.autoscaling.maxReplicas"),
    ("InferenceService", "spec.autoscaling.scaleUpPolicies", [{"type": "Nodes", "value": 1, "periodSeconds": 60}],
     "spec.autoscaling.scaleUpPolicies[0].type"),
    # volume and env sources are typed (issue 16 item 11): a source that reaches the node or the
    # network with the kubelet's rights is not in the schema, and valueFrom has four sources
    ("TrainingJob", "spec.pod.volumes", [{"name": "n", "nfs": {"server": "10.0.0.1", "path": "/"}}],
     "spec.pod.volumes[0].nfs"),
    ("TrainingJob", "spec.pod.volumes", [{"name": "two", "emptyDir": {}, "secret": {"secretName": "s"}}],
     "a volume must set exactly one source"),
    ("TrainingJob", "spec.pod.env", [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"},
                                                                "fieldRef": {"fieldPath": "metadata.name"}}}],
     "valueFrom must set exactly one of secretKeyRef"),
    ("TrainingJob", "spec.pod.env", [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s"}}}],
     "spec.pod.env[0].valueFrom.secretKeyRef.key"),
    ("InferenceService", "spec.network", {"allowedClients": [{}]},
     "a client must set podSelector, namespaceSelector or ipBlock"),
    # names the children cannot carry (a Service name is a DNS-1035 label): once accepted, such a
    # job retried a 422 forever while showing WaitingForWorkers
    ("TrainingJob", "metadata.name", "llama3.1-8b", "metadata.name of a TrainingJob must be a DNS-1035 label"),
    ("TrainingJob", "metadata.name", "7b-chat", "metadata.name of a TrainingJob must be a DNS-1035 label"),
    ("TrainingJob", "metadata.name", "j" * 52, "metadata.name of a TrainingJob must be at most 51 characters"),
    ("InferenceService", "metadata.name", "llama3.1-8b", "metadata.name of an InferenceService must be a DNS-1035"),
    ("InferenceService", "metadata.name", "7b-chat", "metadata.name of an InferenceService must be a DNS-1035 label"),
    ("InferenceService", "metadata.name", "s" * 57, "metadata.name of an InferenceService must be at most 56"),
]


# spec.trainer.config: (the trainer config, text the API server's error must contain). Each is also
# refused by the trainer itself (the second line), checked in the same test.
BAD_TRAINER_CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"train": {"steps": 5, "globl_batch": 8}}, 'unknown field "spec.trainer.config.train.globl_batch"'),
    ({"optimiser": {"lr": 1e-3}}, 'unknown field "spec.trainer.config.optimiser"'),
    ({"model": {"overrides": {"hiden_size": 64}}}, 'unknown field "spec.trainer.config.model.overrides.hiden_size"'),
    ({"optimizer": {"lr": -1e-3}}, "spec.trainer.config.optimizer.lr"),
    ({"optimizer": {"betas": [0.9]}}, "spec.trainer.config.optimizer.betas"),
    ({"optimizer": {"betas": [0.9, 1.5]}}, "optimizer.betas must each be in [0, 1)"),
    ({"train": {"global_batch": 10, "micro_batch": 4}}, "train.global_batch must be divisible by train.micro_batch"),
    ({"train": {"global_batch": 9}}, "train.global_batch must be divisible by train.micro_batch"),
    ({"model": {"preset": "gpt5"}}, "spec.trainer.config.model.preset"),
    ({"model": {"overrides": {"hidden_size": 130}}}, "hidden_size must be divisible by num_attention_heads"),
    ({"model": {"preset": "small", "overrides": {"num_key_value_heads": 3}}},
     "num_attention_heads must be divisible by num_key_value_heads"),
    ({"data": {"seq_len": 4096}}, "data.seq_len must not exceed the model's max_position_embeddings"),
    ({"data": {"seq_len": "long"}}, "spec.trainer.config.data.seq_len"),
    ({"parallelism": {"sharding": "zero3"}}, "spec.trainer.config.parallelism.sharding"),
    ({"schedule": {"warmup_steps": 500}, "train": {"steps": 10}}, "schedule.warmup_steps must not exceed train.steps"),
    ({"schedule": {"warmup_steps": 101}}, "schedule.warmup_steps must not exceed train.steps"),
]

GOOD_TRAINER_CONFIGS: list[dict[str, Any]] = [
    {},
    {"model": {"preset": "small"}, "data": {"seq_len": 1024}},
    {"model": {"overrides": {"max_position_embeddings": 4096}}, "data": {"seq_len": 4096}},
    {"train": {"global_batch": 12, "micro_batch": 3, "grad_clip": None}, "optimizer": {"betas": [0, 0.99]}},
    {"schedule": {"warmup_steps": 100}},
]


def _with_config(config: dict[str, Any]) -> dict[str, Any]:
    job = example("TrainingJob")
    job["spec"]["trainer"]["config"] = config
    return job


@pytest.mark.parametrize("config,expected", BAD_TRAINER_CONFIGS, ids=[e[:40] for _, e in BAD_TRAINER_CONFIGS])
def test_a_trainer_config_the_trainer_refuses_is_refused_at_admission(crds: Cluster, admission_ns: str,
                                                                       config: dict[str, Any], expected: str) -> None:
    from kubeforge_runtime.config import ConfigError, parse_config

    with pytest.raises(ConfigError):
        parse_config(config)
    out = crds.kubectl("create", "--dry-run=server", "-n", admission_ns, "-f", "-",
                       input=json.dumps(_with_config(config)), check=False)
    assert out.returncode != 0, f"accepted trainer config {config}"
    assert expected in out.stderr, out.stderr


@pytest.mark.parametrize("config", GOOD_TRAINER_CONFIGS, ids=[json.dumps(c)[:40] for c in GOOD_TRAINER_CONFIGS])
def test_a_trainer_config_the_trainer_takes_is_admitted_as_written(crds: Cluster, admission_ns: str,
                                                                   config: dict[str, Any]) -> None:
    from kubeforge_runtime.config import parse_config

    parse_config(config)
    out = crds.kubectl("create", "--dry-run=server", "-n", admission_ns, "-o", "json", "-f", "-",
                       input=json.dumps(_with_config(config)), check=False)
    assert out.returncode == 0, out.stderr
    # nothing defaulted, nothing pruned: the trainer gets the document as written (a null included)
    assert json.loads(out.stdout)["spec"]["trainer"]["config"] == config


@pytest.mark.parametrize("workers,group,admitted", [
    ({"minReplicas": 1, "maxReplicas": 2, "gpusPerWorker": 1}, 2, False),  # world 1 or 2: only 1 divides both
    ({"minReplicas": 1, "maxReplicas": 2, "gpusPerWorker": 4}, 2, True),   # world 4 or 8
    ({"minReplicas": 2, "maxReplicas": 2, "gpusPerWorker": 1}, 2, True),   # world 2
    ({"minReplicas": 2, "maxReplicas": 2, "gpusPerWorker": 1}, 3, False),
])
def test_the_hybrid_shard_group_must_divide_every_world_size_the_job_can_have(
        crds: Cluster, admission_ns: str, workers: dict[str, int], group: int, admitted: bool) -> None:
    job = _with_config({"parallelism": {"sharding": "hybrid", "shard_group_size": group}})
    job["spec"]["workers"].update(workers)
    out = crds.kubectl("create", "--dry-run=server", "-n", admission_ns, "-f", "-", input=json.dumps(job), check=False)
    assert (out.returncode == 0) == admitted, out.stderr
    if not admitted:
        assert "shard_group_size must divide the world size" in out.stderr, out.stderr


@pytest.fixture(scope="module")
def admission_ns(crds: Cluster) -> Iterator[str]:
    crds.kubectl("create", "namespace", "admission-tests", check=False)
    yield "admission-tests"
    crds.kubectl("delete", "namespace", "admission-tests", "--wait=false", check=False)


@pytest.mark.parametrize("kind,path,value,expected", INVALID,
                         ids=[f"{k}:{p}={v if v is not _DELETE else 'missing'}" for k, p, v, _ in INVALID])
def test_invalid_spec_is_rejected_naming_the_field(crds: Cluster, admission_ns: str, kind: str, path: str,
                                                   value: Any, expected: str) -> None:
    obj = _set(example(kind), path, value)
    out = crds.kubectl("create", "--dry-run=server", "-n", admission_ns, "-f", "-", input=json.dumps(obj), check=False)
    assert out.returncode != 0, f"accepted an invalid {kind} ({path}={value!r})"
    assert expected in out.stderr, out.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_admitted(crds: Cluster, admission_ns: str, path: Path) -> None:
    out = crds.kubectl("create", "--dry-run=server", "-n", admission_ns, "-f", str(path), check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("kind,name", [("TrainingJob", "j" * 51), ("TrainingJob", "llama3-8b"),
                                       ("InferenceService", "s" * 56), ("InferenceService", "chat-7b")])
def test_names_the_children_can_carry_are_admitted(crds: Cluster, admission_ns: str, kind: str, name: str) -> None:
    obj = _set(example(kind), "metadata.name", name)
    out = crds.kubectl("create", "--dry-run=server", "-n", admission_ns, "-f", "-", input=json.dumps(obj), check=False)
    assert out.returncode == 0, out.stderr


def test_admission_applies_model_defaults(crds: Cluster, admission_ns: str) -> None:
    out = crds.kubectl("create", "--dry-run=server", "-n", admission_ns, "-o", "json", "-f",
                       str(REPO / "examples/02-trainingjob-tiny.yaml"))
    spec = json.loads(out.stdout)["spec"]
    assert spec["failurePolicy"]["restartPolicy"] == "ReplaceFailed"
    assert spec["suspend"] is False
    assert spec["export"] == {"enabled": True}


def test_kubectl_explain_prints_field_descriptions(crds: Cluster) -> None:
    out = crds.kubectl("explain", "trainingjob.spec").stdout
    assert "What to train, on how many GPU nodes" in out
    assert "workers" in out and "Worker count range and shape." in out
    out = crds.kubectl("explain", "inferenceservice.spec.autoscaling.scaleDownCooldownSeconds").stdout
    assert "Scale-down stabilization window." in out


def test_short_names_and_category_resolve(crds: Cluster, admission_ns: str) -> None:
    for short in ("tjob", "ckptpol", "infsvc", "kubeforge"):
        out = crds.kubectl("get", short, "-n", admission_ns, check=False)
        assert out.returncode == 0, out.stderr
