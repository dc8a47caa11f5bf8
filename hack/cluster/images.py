"""Our images, built here without Docker or a registry: a Debian base made by debootstrap,
`podman build` of operator/Dockerfile and trainer_image/Dockerfile.cpu on it, Python wheels
from a local wheel folder (no network inside the build), and an import into each real
node's containerd.

Everything is cached outside the repo under ``$KUBEFORGE_CACHE``:

- ``images/base-<hash>.done``: the base (its hash covers the suite and the package list);
- ``wheels/<hash>/``: the wheels of the images' dependencies (hash of pyproject.toml);
- podman's storage (``podman/``): images are tagged ``localhost/kubeforge/<name>:<hash>``,
  the hash covering the Dockerfile, the build context and the base, so an unchanged input
  is never rebuilt and a changed one gets a new tag (pods never run a stale build).

    python hack/cluster/images.py build       # build what is missing, print the tags
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tools

SUITE = "bookworm"
#: What the runtime base carries: Python for the venvs and what `useradd` needs.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
#: What the build base adds: a compiler for the kernels' prebuilt builds (final stages have none).
BUILD_PACKAGES = ("gcc", "libc6-dev")
#: The build context the Dockerfiles see (the same list as .dockerignore).
CONTEXT = ("pyproject.toml", "README.md", "operator", "trainer_image")


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """One of our images: its name and Dockerfile, relative to the repo."""

    name: str
    dockerfile: str
    #: a stage tagged beside the image (``<name>-<stage>:<tag>``) so that pruning the
    #: untagged intermediates keeps its layers: the trainer's torch layer takes minutes to build
    cache_stage: str | None = None


OPERATOR = ImageSpec("operator", "operator/Dockerfile")
TRAINER = ImageSpec("trainer", "trainer_image/Dockerfile.cpu", cache_stage="deps")
ALL = (OPERATOR, TRAINER)


class ImageBuildError(RuntimeError):
    """A build failed; the message names the Dockerfile step."""


def cache_dir() -> Path:
    return tools.cache_root() / "images"


def podman(*args: str) -> list[str]:
    """podman with its storage in our cache (nothing under /var/lib/containers), cgroupfs
    (no systemd here) and runc."""
    root = tools.cache_root() / "podman"
    return ["podman", "--root", str(root / "storage"), "--runroot", str(root / "run"), "--cgroup-manager", "cgroupfs",
            "--events-backend", "file", "--runtime", shutil.which("runc") or "runc", *args]


def _exists(tag: str) -> bool:
    return subprocess.run(podman("image", "exists", tag), capture_output=True).returncode == 0


def apt_mirror() -> str:
    """The Debian mirror this host's apt uses (debootstrap fetches from the same place)."""
    texts = []
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.sources")),
              *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if f.is_file():
            texts.append(f.read_text())
    for text in texts:
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            if "security" not in m.group(1):
                return m.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+" + SUITE + r"\s", text, re.M):
            return m.group(1)
    raise RuntimeError("no Debian mirror found in /etc/apt/sources.list*: debootstrap needs one")


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:12]


def base_images(log: Path) -> tuple[str, str]:
    """The bases (build, runtime): one ``debootstrap --variant=minbase`` with BASE_PACKAGES and
    BUILD_PACKAGES imported as the build base, then the build packages purged and the same
    root imported as the runtime base."""
    digest = _digest(SUITE, *BASE_PACKAGES, *BUILD_PACKAGES)
    build_tag, runtime_tag = (f"localhost/kubeforge/{n}:{SUITE}-{digest}" for n in ("base-build", "base"))
    if _exists(build_tag) and _exists(runtime_tag):
        return build_tag, runtime_tag
    t0 = time.monotonic()
    print(f">> images: debootstrap {SUITE} base (about a minute)", file=sys.stderr, flush=True)
    root = cache_dir() / "rootfs"
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        def run(cmd: list[str], **kw: object) -> None:
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, **kw)  # type: ignore[call-overload]

        def clean_and_import(tag: str) -> None:
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for f in (root / cache).glob("*"):
                    if f.is_file():
                        f.unlink()
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            run(podman("import", "--change", "CMD=/bin/bash", "-", tag), stdin=tar.stdout)
            if tar.wait():
                raise RuntimeError("tar of the debootstrap root failed")

        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES + BUILD_PACKAGES)}", SUITE,
             str(root), apt_mirror()])
        clean_and_import(build_tag)
        run(["chroot", str(root), "apt-get", "purge", "-y", "-qq", "--auto-remove", *BUILD_PACKAGES])
        clean_and_import(runtime_tag)
    shutil.rmtree(root, ignore_errors=True)
    print(f">> images: bases in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    return build_tag, runtime_tag


def wheels(log: Path) -> Path:
    """Wheels of everything the images install, downloaded once on the host (pip's own cache
    makes that quick after `make install`), so the builds run with no network."""
    pyproject = (tools.REPO / "pyproject.toml").read_text()
    out = tools.cache_root() / "wheels" / _digest(pyproject, f"{sys.version_info[:2]}")
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(">> images: downloading the wheels the images install", file=sys.stderr, flush=True)
    with open(log, "ab") as f:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(out), "setuptools>=69", "wheel",
                        f"{tools.REPO}[operator,runtime]"], check=True, stdout=f, stderr=subprocess.STDOUT)
    for own in out.glob("kubeforge-*"):
        own.unlink()  # the images install the project from their build context
    (out / ".complete").touch()
    for old in out.parent.iterdir():  # the wheels of an older pyproject.toml
        if old != out:
            shutil.rmtree(old, ignore_errors=True)
    print(f">> images: wheels in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    return out


def _context_files() -> list[Path]:
    files: list[Path] = []
    for entry in CONTEXT:
        p = tools.REPO / entry
        if p.is_file():
            files.append(p)
        else:
            files += sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts
                            and not f.name.endswith((".pyc", ".egg-info")) and ".egg-info" not in str(f))
    return files


def image_tag(spec: ImageSpec, base: str) -> str:
    """``localhost/kubeforge/<name>:<hash of the Dockerfile, the context and the base>``."""
    h = hashlib.sha256(base.encode())
    for f in [tools.REPO / spec.dockerfile, *_context_files()]:
        h.update(str(f.relative_to(tools.REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return f"localhost/kubeforge/{spec.name}:{h.hexdigest()[:12]}"


def build(spec: ImageSpec, log: Path | None = None, cold_tag: str | None = None) -> str:
    """Build ``spec`` unless its tag exists; returns the tag. Progress (each Dockerfile step)
    goes to stderr; a failure raises naming the step that failed. ``cold_tag``: build under
    that tag with no layer cache (bench/e2e.py times it)."""
    log = log or cache_dir() / f"build-{spec.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    build_base, base = base_images(log)
    tag = cold_tag or image_tag(spec, base)
    if not cold_tag and _exists(tag):
        return tag
    wheel_dir = wheels(log)
    t0 = time.monotonic()
    print(f">> images: building {tag} from {spec.dockerfile}", file=sys.stderr, flush=True)
    common = ["--network", "none", "--pull=never", "-f", spec.dockerfile,
              "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"BUILD_BASE_IMAGE={build_base}",
              "--build-arg", "PIP_INSTALL_ARGS=--no-index --find-links /wheels", "--volume", f"{wheel_dir}:/wheels:ro"]
    if spec.cache_stage and not cold_tag:
        _run_build(spec, podman("build", *common, "--target", spec.cache_stage, "-t", stage_tag(tag, spec.cache_stage),
                                "."), log, t0)
    _run_build(spec, podman("build", *(["--no-cache"] if cold_tag else []), *common, "-t", tag, "."), log, t0)
    print(f">> images: {tag} in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    return tag


def size(tag: str) -> int:
    """The image's unpacked size in bytes (what a node's snapshots take)."""
    out = subprocess.run(podman("image", "inspect", "--format", "{{.Size}}", tag), capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


def stage_tag(tag: str, stage: str) -> str:
    """``localhost/kubeforge/trainer:abc`` → ``localhost/kubeforge/trainer-deps:abc``."""
    repo, version = tag.rsplit(":", 1)
    return f"{repo}-{stage}:{version}"


def _run_build(spec: ImageSpec, cmd: list[str], log: Path, t0: float) -> None:
    """One podman build; each Dockerfile step is printed, a failure names the step."""
    step = ""
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, cwd=tools.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            f.write(line.encode())
            f.flush()
            tail = (tail + [line.rstrip()])[-25:]
            if re.match(r"(\[\d+/\d+\] )?STEP ", line):
                step = line.strip()
                print(f"   {spec.name} [{time.monotonic() - t0:5.0f}s] {step[:110]}", file=sys.stderr, flush=True)
        if proc.wait():
            raise ImageBuildError(f"building {spec.dockerfile} failed at Dockerfile step {step!r}:\n"
                                  + "\n".join(tail) + f"\n(full log: {log})")


def pause_image() -> str:
    """The pod sandbox image: our static ``pause`` (hack/cluster/kubernetes/cmd/pause) alone."""
    binary = tools.binary("pause")
    tag = f"localhost/kubeforge/pause:{_digest(binary.read_bytes())}"
    if _exists(tag):
        return tag
    ctx = cache_dir() / "pause-context"
    shutil.rmtree(ctx, ignore_errors=True)
    ctx.mkdir(parents=True)
    shutil.copy2(binary, ctx / "pause")
    (ctx / "Containerfile").write_text('FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n')
    subprocess.run(podman("build", "--network", "none", "-t", tag, str(ctx)), check=True, capture_output=True)
    return tag


def prune(keep: set[str]) -> None:
    """Remove older tags of our images and the untagged intermediates no tag builds on; the
    bases, ``keep`` and their cache stages stay (and with them every layer a rebuild reuses).
    Without this the store grows by the torch layer (~6 GB) at every change of the trainer's
    dependencies."""
    keep = keep | {stage_tag(k, s.cache_stage) for k in keep for s in ALL
                   if s.cache_stage and k.startswith(f"localhost/kubeforge/{s.name}:")}
    repos = {k.rsplit(":", 1)[0] for k in keep}
    listed = subprocess.run(podman("images", "--format", "{{.Repository}}:{{.Tag}}"), capture_output=True, text=True)
    for tag in listed.stdout.split():
        if tag.rsplit(":", 1)[0] in repos and tag not in keep:
            subprocess.run(podman("rmi", tag), capture_output=True)
    subprocess.run(podman("image", "prune", "--force"), capture_output=True)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] != ["build"]:
        print(__doc__)
        return 2
    try:
        tags = [build(spec) for spec in ALL]
        prune(set(tags))
        print("\n".join(tags))
        print(f"images: {tools.disk_report()}", file=sys.stderr)
    except (ImageBuildError, subprocess.CalledProcessError, RuntimeError) as e:
        print(f"image build failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
