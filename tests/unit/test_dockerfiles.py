"""The Dockerfiles, checked without a Docker engine: pinned bases, multi-stage with no build
tools or pip in the final stage, a fixed non-root UID equal to the one the pods run as, the
entrypoints the controllers put into pod specs, and a build context (the files each
Dockerfile COPYs) from which the package really builds and contains those entrypoints."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "operator" / "Dockerfile"
WORKLOAD = (REPO / "trainer_image" / "Dockerfile", REPO / "trainer_image" / "Dockerfile.cpu")
ALL = (OPERATOR, *WORKLOAD)
BUILD_TOOLS = ("build-essential", "gcc", "g++", "make", "git", "cmake", "python3-dev", "python3.12-dev",
               "python3-pip", "curl", "wget")


@dataclasses.dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments)


def parse(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for line in logical:
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "ARG" and not stages:  # a build arg for FROM lines: its default is the published base
            name, _, default = args.strip().partition("=")
            global_args[name] = default
            continue
        if op == "FROM":
            args = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], args)
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, []))
        else:
            assert stages, f"{path}: {op} before FROM"
            stages[-1].instructions.append((op, args.strip()))
    return stages


def final(path: Path) -> Stage:
    return parse(path)[-1]


def values(stage: Stage, op: str) -> list[str]:
    return [args for o, args in stage.instructions if o == op]


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(REPO)))
def test_bases_are_pinned_and_multi_stage(path: Path) -> None:
    stages = parse(path)
    assert len(stages) >= 2, "build in one stage, copy the result into a clean final stage"
    for s in stages:
        _, _, tag = s.base.partition(":")
        if "@sha256:" in s.base or s.base in {earlier.name for earlier in stages}:
            continue  # a digest, or built on an earlier stage
        assert tag and tag != "latest", f"{s.base}: pin an exact tag or a digest"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{s.base}: the tag must name a patch release"
    assert all(s.name != "build" for s in lineage(path)), "the final stage must not build on the build stage"
    assert any(args.startswith("--from=") for args in values(stages[-1], "COPY")), "final stage copies the build"


def lineage(path: Path) -> list[Stage]:
    """The final stage and the stages it is built on (``FROM <stage>``), base first: what the
    image holds."""
    stages = parse(path)
    chain = [stages[-1]]
    while (up := next((s for s in stages if s.name == chain[0].base), None)) is not None:
        chain.insert(0, up)
    return chain


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(REPO)))
def test_final_stage_has_no_build_tools(path: Path) -> None:
    # the final stage may build on a dependencies stage (the CPU image shares its torch layer
    # so): what the image holds is that whole lineage, which has no compiler and no pip
    chain = lineage(path)
    runs = [r for stage in chain for r in values(stage, "RUN")]
    for i, run in enumerate(runs):
        if "pip install" in run:
            assert any(re.search(r"pip uninstall -y [^&]*\bpip\b", later) for later in runs[i:]), \
                f"the image installs with pip and keeps pip: {run}"
        if "apt-get install" in run:
            assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run, run
            words = set(shlex.split(run.replace("&&", " ")))
            assert not words & set(BUILD_TOOLS), f"build tools in the final stage: {words & set(BUILD_TOOLS)}"
    for run in (r for s in parse(path) for r in values(s, "RUN")):
        assert not re.search(r"(curl|wget)[^|]*\|\s*(ba)?sh", run), f"piping a download into a shell: {run}"
    assert not any(re.match(r"https?://", a) for s in parse(path) for a in values(s, "ADD")), "ADD of a URL"


def _user(path: Path) -> tuple[int, int]:
    users = values(final(path), "USER")
    assert users, f"{path}: the final stage must set USER"
    m = re.fullmatch(r"(\d+):(\d+)", users[-1])
    assert m, f"USER must be a numeric UID:GID (PodSecurity checks runAsNonRoot on numbers): {users[-1]}"
    return int(m[1]), int(m[2])


def test_operator_runs_as_the_uid_the_chart_sets() -> None:
    uid, gid = _user(OPERATOR)
    assert uid != 0 and gid != 0
    deployment = (REPO / "charts" / "kubeforge" / "templates" / "deployment.yaml").read_text()
    values_yaml = (REPO / "charts" / "kubeforge" / "values.yaml").read_text()
    assert f"runAsUser: {uid}" in values_yaml + deployment
    assert values(final(OPERATOR), "ENTRYPOINT") == ['["kubeforge-operator"]']


@pytest.mark.parametrize("path", WORKLOAD, ids=lambda p: p.name)
def test_workload_image_runs_as_the_uid_the_controllers_set(path: Path) -> None:
    from kubeforge.controllers import workload

    uid, gid = _user(path)
    assert uid != 0 and gid == uid
    assert workload.pod_security()["runAsUser"] == uid
    assert workload.RUN_AS_USER == uid
    env = " ".join(values(final(path), "ENV"))
    assert "PATH=/opt/venv/bin:" in env, "`python` in the pod's command must be the venv's python"


def controller_modules() -> set[str]:
    """Modules the controllers start with ``python -m`` in the pods they build."""
    found: set[str] = set()
    for src in (REPO / "operator" / "kubeforge" / "controllers").rglob("*.py"):
        found |= set(re.findall(r'"python", "-m", "(kubeforge_runtime[\w.]*)"', src.read_text()))
    return found


def test_controllers_start_modules_that_exist() -> None:
    modules = controller_modules()
    assert {"kubeforge_runtime.serve", "kubeforge_runtime.train.launch"} <= modules, modules
    for m in modules | {"kubeforge_runtime.train"}:
        base = REPO / "trainer_image" / Path(*m.split("."))
        assert (base / "__main__.py").exists() or base.with_suffix(".py").exists(), f"{m} is not runnable"


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().split()
    assert lines[lines.index("**")] == "**", "ignore everything by default"
    for path in ALL:
        for s in parse(path):
            for args in values(s, "COPY"):
                if args.startswith("--from="):
                    continue
                for src in shlex.split(args)[:-1]:
                    top = src.split("/")[0]
                    assert f"!{top}" in lines or f"!{top}/" in lines, f"{path.name} copies {src}, ignored"
                    assert (REPO / src).exists(), f"{path.name} copies {src}, which does not exist"


def _stage_context(path: Path, dest: Path) -> None:
    """Copy what the build stage COPYs, as Docker would (directories with their contents)."""
    stages = parse(path)
    build = next((s for s in stages if s.name == "build"), stages[0])
    for op, args in build.instructions:
        if op != "COPY" or args.startswith("--from="):
            continue
        *srcs, target = shlex.split(args)
        into = dest / target
        for src in srcs:
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, into, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            elif target.endswith("/") or len(srcs) > 1:
                into.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / src, into / Path(src).name)
            else:
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / src, into)


@pytest.mark.parametrize("path,must_hold", [
    (OPERATOR, ["kubeforge/main.py", "kubeforge/controllers/trainingjob/handlers.py"]),
    (WORKLOAD[1], ["kubeforge_runtime/serve/__main__.py", "kubeforge_runtime/train/launch.py",
                   "kubeforge_runtime/rendezvous.py", "kubeforge/store/__init__.py",
                   "kubeforge_runtime/serve/csrc/paged_attention.c"]),
], ids=["operator", "trainer-cpu"])
def test_build_context_builds_a_wheel_with_the_entrypoints(path: Path, must_hold: list[str],
                                                           tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    _stage_context(path, ctx)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(ctx)], check=False,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("kubeforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for want in must_hold:
        assert want in names, f"{want} missing from the wheel built from {path.name}'s context"
    if path == OPERATOR:
        assert not any(n.startswith("kubeforge_runtime/") and not n.endswith("__init__.py") for n in names)
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        assert "kubeforge-operator = kubeforge.main:main" in zipfile.ZipFile(wheel).read(entry).decode()
