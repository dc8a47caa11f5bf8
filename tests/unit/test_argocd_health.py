"""Argo CD health checks: every health.lua under deploy/argocd/resource_customizations runs in
Lua 5.1 (Argo CD's gopher-lua is a 5.1 dialect) against every case of its health_test.yaml,
the way Argo CD's own resource_customizations tests do: ``obj`` is the object, the script
returns ``{status, message}``.

The testdata must be objects our API accepts, and the reasons the scripts single out must be
reasons the controllers really write, so the mapping cannot drift from the operator unseen."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
CUSTOMIZATIONS = REPO / "deploy" / "argocd" / "resource_customizations" / "kubeforge.dev"
KINDS = ("TrainingJob", "CheckpointPolicy", "InferenceService", "Dataset", "Flywheel")
HEALTH = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
#: What Argo CD's Lua VM does not offer a health script (it opens base, table, string, math).
SANDBOXED = ("io", "os", "debug", "require", "dofile", "loadfile", "load", "loadstring", "package")


def run_health(script: str, obj: dict[str, Any]) -> dict[str, Any]:
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    g = lua.globals()
    assert lua.eval("_VERSION") == "Lua 5.1"
    for name in SANDBOXED:
        g[name] = None
    g.obj = lua.table_from(obj, recursive=True)
    out = lua.execute(script)
    return {k: out[k] for k in ("status", "message") if out[k] is not None}


def cases() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for kind in KINDS:
        for case in yaml.safe_load((CUSTOMIZATIONS / kind / "health_test.yaml").read_text())["tests"]:
            out.append((kind, case["inputPath"], case["healthStatus"]))
    return out


def test_layout_is_argo_cds() -> None:
    for kind in KINDS:
        d = CUSTOMIZATIONS / kind
        assert (d / "health.lua").is_file() and (d / "health_test.yaml").is_file(), kind
        listed = {c["inputPath"] for c in yaml.safe_load((d / "health_test.yaml").read_text())["tests"]}
        on_disk = {f"testdata/{p.name}" for p in (d / "testdata").glob("*.yaml")}
        assert listed == on_disk, f"{kind}: testdata not covered by health_test.yaml: {on_disk ^ listed}"


@pytest.mark.parametrize("kind,input_path,expected", cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_health_case(kind: str, input_path: str, expected: dict[str, str]) -> None:
    d = CUSTOMIZATIONS / kind
    obj = yaml.safe_load((d / input_path).read_text())
    assert obj["kind"] == kind
    got = run_health((d / "health.lua").read_text(), obj)
    assert got == expected


def test_every_health_status_a_kind_needs_is_covered() -> None:
    seen: dict[str, set[str]] = {k: set() for k in KINDS}
    for kind, _, expected in cases():
        assert expected["status"] in HEALTH
        seen[kind].add(expected["status"])
    assert seen["TrainingJob"] == {"Healthy", "Progressing", "Degraded", "Suspended"}
    assert seen["InferenceService"] == {"Healthy", "Progressing", "Degraded", "Suspended"}
    assert seen["CheckpointPolicy"] == {"Healthy", "Progressing", "Degraded"}
    assert seen["Dataset"] == {"Healthy", "Progressing", "Degraded", "Suspended"}
    assert seen["Flywheel"] == {"Healthy", "Progressing", "Degraded", "Suspended"}


@pytest.mark.parametrize("kind,input_path", [(k, p) for k, p, _ in cases()], ids=lambda v: v)
def test_testdata_objects_are_valid(kind: str, input_path: str) -> None:
    from kubeforge import api

    obj = yaml.safe_load((CUSTOMIZATIONS / kind / input_path).read_text())
    getattr(api, f"{kind}Spec").model_validate(obj["spec"])
    if "status" in obj:
        getattr(api, f"{kind}Status").model_validate(obj["status"])


def test_reasons_the_scripts_name_are_written_by_the_controllers() -> None:
    controllers = "".join(p.read_text() for p in (REPO / "operator" / "kubeforge" / "controllers").rglob("*.py"))
    seen = 0
    for kind in KINDS:
        script = (CUSTOMIZATIONS / kind / "health.lua").read_text()
        named = set(re.findall(r'reason == "(\w+)"', script)) | set(re.findall(r"^\s+(\w+) = true,", script, re.MULTILINE))
        seen += len(named)
        for reason in named:
            assert f'"{reason}"' in controllers, f"{kind}/health.lua names reason {reason}, no controller writes it"
    assert seen >= 3, "the scripts name almost no reason: did their wording change?"


def test_flywheel_stages_and_outcomes_the_script_names_are_the_apis() -> None:
    from typing import get_args

    from kubeforge.api.flywheel import STAGES, Outcome

    script = (CUSTOMIZATIONS / "Flywheel" / "health.lua").read_text()
    stages = set(re.findall(r'stage == "(\w+)"', script))
    outcomes = set(re.findall(r'outcome == "(\w+)"', script))
    assert stages and outcomes, "the Flywheel script names no stage or outcome: did its wording change?"
    assert stages <= set(STAGES), stages - set(STAGES)
    assert outcomes <= set(get_args(Outcome)), outcomes - set(get_args(Outcome))


def test_flywheel_cases_cover_every_stage_a_cycle_reports_and_every_unpromoted_outcome() -> None:
    from typing import get_args

    from kubeforge.api.flywheel import Outcome

    d = CUSTOMIZATIONS / "Flywheel"
    stages: set[str] = set()
    outcomes: set[str] = set()
    for _, input_path, expected in (c for c in cases() if c[0] == "Flywheel"):
        status = yaml.safe_load((d / input_path).read_text()).get("status") or {}
        if expected["status"] == "Progressing" and status.get("stage"):
            stages.add(status["stage"])
        if expected["status"] == "Healthy" and status.get("cycles"):
            outcome = status["cycles"][-1]["outcome"]
            outcomes.add(outcome)
            assert expected["message"].startswith(f"cycle {status['cycles'][-1]['cycle']}: {outcome}"), input_path
            if outcome != "Promoted":
                assert "not promoted" in expected["message"], input_path
    assert {"Curating", "Training", "Evaluating", "Canary", "AwaitingPromotion", "RollingBack"} <= stages
    assert {"Promoted", "RolledBack", "Rejected", "Failed"} <= outcomes <= set(get_args(Outcome))


def test_a_script_error_is_not_hidden() -> None:
    script = (CUSTOMIZATIONS / "TrainingJob" / "health.lua").read_text()
    with pytest.raises(lua51.LuaError):
        run_health(script, {"kind": "TrainingJob", "status": {"observedGeneration": 1}})  # no metadata


def test_argocd_cm_patch_carries_the_same_scripts() -> None:
    patch = yaml.safe_load((REPO / "deploy" / "argocd" / "argocd-cm-health.yaml").read_text())["data"]
    assert set(patch) == {f"resource.customizations.health.kubeforge.dev_{k}" for k in KINDS}
    for kind in KINDS:
        assert patch[f"resource.customizations.health.kubeforge.dev_{kind}"] == (
            CUSTOMIZATIONS / kind / "health.lua").read_text(), f"copy {kind}/health.lua into argocd-cm-health.yaml"


def test_example_application_uses_server_side_apply_and_the_chart() -> None:
    app = yaml.safe_load((REPO / "deploy" / "argocd" / "application.yaml").read_text())
    assert app["kind"] == "Application"
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    assert (REPO / app["spec"]["source"]["path"] / "Chart.yaml").exists()
