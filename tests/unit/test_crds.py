"""The CRDs are rendered from the models and say what kubectl explain and admission need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeforge.api import GROUP, KINDS
from kubeforge.api.crdgen import crd, main, render_all

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_committed_crds_equal_what_make_crds_renders() -> None:
    assert main(["--check", "--out", str(REPO / "crds"), "--out", str(REPO / "charts/kubeforge/crds"),
                 "--reference", str(REPO / "docs/reference.md")]) == 0


def test_check_detects_a_stale_file(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path)]) == 0
    victim = next(tmp_path.glob("*.yaml"))
    victim.write_text(victim.read_text().replace("description", "descr", 1))
    assert main(["--check", "--out", str(tmp_path)]) == 1
    (tmp_path / f"{GROUP}_stale.yaml").write_text("x: 1\n")
    assert main(["--out", str(tmp_path)]) == 0
    assert not (tmp_path / f"{GROUP}_stale.yaml").exists()


def _walk(schema: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        out += _walk(sub, f"{path}.{name}")
    if "items" in schema:
        out += _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _walk(schema["additionalProperties"], f"{path}{{}}")
    return out


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_every_field_is_described_and_structural(kind: Any) -> None:
    root = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = root["properties"]["spec"]
    assert "x-kubernetes-preserve-unknown-fields" not in spec
    for path, node in _walk(spec, "spec") + _walk(root["properties"]["status"], "status"):
        named = not path.endswith(("[]", "{}"))
        assert not named or node.get("description"), f"{kind.kind} {path} has no description"
        assert "type" in node, f"{kind.kind} {path} has no type (not structural)"
        assert not {"anyOf", "oneOf", "$ref", "allOf"} & node.keys(), f"{kind.kind} {path} is not structural"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_names_columns_and_subresources(kind: Any) -> None:
    c = crd(kind)["spec"]
    assert c["names"]["categories"] == ["kubeforge"]
    # KServe owns isvc/ig/tm; Kubeflow's training kinds own tfjob/pytorchjob/trainjob names
    assert not set(c["names"]["shortNames"]) & {"isvc", "ig", "tm", "tfjob", "pytorchjob", "trainjob", "tj", "mpijob"}
    version = c["versions"][0]
    assert version["subresources"]["status"] == {}
    assert any(col["name"] == "Ready" for col in version["additionalPrinterColumns"])
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert "observedGeneration" in status


def test_inferenceservice_scale_subresource_points_at_string_selector() -> None:
    from kubeforge.api import InferenceService

    version = crd(InferenceService)["spec"]["versions"][0]
    scale = version["subresources"]["scale"]
    assert scale == {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                     "labelSelectorPath": ".status.selector"}
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["selector"]["type"] == "string"
    assert status["replicas"]["type"] == "integer"


def test_cross_field_rules_are_cel_with_must_messages() -> None:
    rules = [r for text in render_all().values() for p, n in _walk(
        yaml.safe_load(text)["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "")
        for r in n.get("x-kubernetes-validations", [])]
    assert len(rules) >= 5
    assert all(" must" in r["message"] for r in rules), rules


def test_spec_defaults_are_rendered_for_admission() -> None:
    from kubeforge.api import TrainingJob

    spec = crd(TrainingJob)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    fp = spec["properties"]["failurePolicy"]
    assert fp["default"] == {"maxRestarts": 3, "restartPolicy": "ReplaceFailed", "nodeFailureGraceSeconds": 30,
                             "insufficientCapacityTimeoutSeconds": 300, "disruptionWindowSeconds": 300}
    assert fp["properties"]["nodeFailureGraceSeconds"]["default"] == 30
    assert fp["properties"]["restartPolicy"]["enum"] == ["ReplaceFailed", "RestartGroup"]


def test_the_trainer_config_schema_is_the_trainers_own() -> None:
    """spec.trainer.config is typed from kubeforge_runtime.config: no free-form map, a null kept where it
    means something, the trainer's cross-field rules as CEL, and no defaults (the trainer owns them)."""
    from kubeforge.api import TrainingJob
    from kubeforge_runtime.config import TrainerConfig

    spec = crd(TrainingJob)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    config = spec["properties"]["trainer"]["properties"]["config"]
    assert set(config["properties"]) == set(TrainerConfig.model_fields)
    nodes = _walk(config, "config")
    assert not [p for p, n in nodes if n.get("x-kubernetes-preserve-unknown-fields")]
    assert not [p for p, n in nodes if "default" in n]
    nullable = {p for p, n in nodes if n.get("nullable")}
    assert nullable == {"config.train.grad_clip"}
    messages = [r["message"] for _, n in nodes for r in n.get("x-kubernetes-validations", [])]
    assert any("global_batch must be divisible by train.micro_batch" in m for m in messages)
    assert any("seq_len must not exceed" in m for m in messages)
    assert config["properties"]["optimizer"]["properties"]["betas"]["maxItems"] == 2
