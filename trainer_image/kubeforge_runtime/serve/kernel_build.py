"""Building the native ops' library (``csrc/``) with the host's C compiler, and finding an
image's prebuilt copies. No torch here: an image's build stage runs ``python -m
kubeforge_runtime.serve.kernel_build --prebuild DIR`` with the system Python and a compiler,
and the final image (no compiler) carries only DIR. ``paged_attention`` loads the result."""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.c"
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC")
#: The layer's elementwise ops (``csrc/layer_ops.c``), in the same library: no fast-math and
#: no fused multiply-adds, so they round as torch's ops do.
LAYER_OPS_SOURCE = SOURCE.with_name("layer_ops.c")
LAYER_OPS_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC")
#: The projections' GEMM over prepacked weights (``csrc/gemm.c``): fused multiply-adds.
GEMM_SOURCE = SOURCE.with_name("gemm.c")
GEMM_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fPIC", "-Wno-psabi")
#: Every source of the library with its flags.
SOURCES = ((SOURCE, FLAGS), (LAYER_OPS_SOURCE, LAYER_OPS_FLAGS), (GEMM_SOURCE, GEMM_FLAGS))
ENV_CACHE = "KUBEFORGE_KERNEL_CACHE"
ENV_PREBUILT = "KUBEFORGE_KERNEL_PREBUILT"
#: Prebuilt targets per machine, best first, with the CPU flags each needs.
TARGETS: dict[str, list[tuple[str, frozenset[str]]]] = {
    "x86_64": [("x86-64-v3", frozenset({"avx2", "fma", "bmi2", "movbe"})),
               ("x86-64-v2", frozenset({"sse4_2", "popcnt", "ssse3"}))],
}


class KernelUnavailable(RuntimeError):
    pass


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise KernelUnavailable("no C compiler (cc/gcc, or $CC) on this host")
    return cc


def _compile(cc: str, march: str | None, lib: Path) -> None:
    """Compile each source with its flags (``-march=native`` replaced by ``march``), then link
    without ``-ffast-math``: linked with it, the library would pull in crtfastmath.o, which
    switches the whole process to flush-subnormals-to-zero on load."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        steps, objs = [], []
        for source, source_flags in SOURCES:
            obj = Path(tmp) / f"{source.stem}.o"
            flags = [f for f in source_flags if f != "-march=native"] + ([f"-march={march}"] if march else [])
            steps.append([cc, *flags, "-c", "-o", str(obj), str(source)])
            objs.append(str(obj))
        steps.append([cc, "-shared", "-o", str(out), *objs, "-lm"])
        for cmd in steps:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except OSError as e:
                raise KernelUnavailable(f"{cc}: {e}") from e
            if proc.returncode != 0:
                raise KernelUnavailable(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        os.replace(out, lib)  # atomic: a concurrent build of the same key is harmless


def prebuild(dest: Path) -> list[Path]:
    """Portable builds for an image (no -march=native: the image runs on other CPUs)."""
    cc = _compiler()
    out = []
    for target, _ in TARGETS.get(platform.machine(), [("generic", frozenset())]):
        lib = dest / f"paged_attention-{target}.so"
        _compile(cc, target if target != "generic" else None, lib)
        out.append(lib)
    return out


def find_prebuilt() -> Path | None:
    root = os.environ.get(ENV_PREBUILT)
    if not root:
        return None
    flags = set(_cpu_flags().split())
    for target, needs in TARGETS.get(platform.machine(), [("generic", frozenset())]):
        lib = Path(root) / f"paged_attention-{target}.so"
        if needs <= flags and lib.is_file():
            return lib
    return None


def build(cache_dir: Path | None = None) -> Path:
    """Compile the kernel (once per source, flags and CPU); its shared library's path."""
    cc = _compiler()
    source = b"".join(src.read_bytes() for src, _ in SOURCES)
    flags = "|".join(" ".join(f) for _, f in SOURCES)
    key = hashlib.sha256(source + flags.encode() + b"link-separately" + cc.encode() + _cpu_flags().encode()).hexdigest()[:16]
    cache = cache_dir or Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "kubeforge" / "kernels")
    lib = cache / f"paged_attention-{key}.so"
    if lib.is_file():
        return lib
    _compile(cc, "native", lib)
    log.info("built the paged-attention kernel %s", lib)
    return lib


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build the native ops' library")
    ap.add_argument("--prebuild", type=Path, required=True, help="directory for portable builds (image build stage)")
    for built in prebuild(ap.parse_args().prebuild):
        print(built)
