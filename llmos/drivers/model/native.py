"""The model driver's C++ kernels (csrc/), compiled once per machine and cached.

Built at install time (`python -m llmos.drivers.model.native`, run by scripts/install.sh)
or on first use, into a folder keyed by the source, torch's version and this CPU's
model: the code is compiled with -march=native, so a cache copied to another CPU is
never picked up. Where no compiler is available the driver falls back to pure torch
(`load()` returns None and says why once); LLMOS_NATIVE=0 forces that fallback.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from pathlib import Path

log = logging.getLogger("llmos.model")
CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "paged_decode.cpp", CSRC / "layer_ops.cpp", CSRC / "quant_gemv.cpp", CSRC / "decode_stack.cpp",
           CSRC / "paged_prefill.cpp", CSRC / "w8a8.cpp"]   # compiled; its headers sit beside it
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_loaded: dict[str, object] = {}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line   # the model name on x86, else the feature flags
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir() -> Path:
    import torch

    key = hashlib.sha256()
    for src in sorted(p for p in CSRC.iterdir() if p.is_file()):   # the sources and their headers
        key.update(src.name.encode() + src.read_bytes())
    key.update(f"{torch.__version__}|{sys.version_info[:2]}|{cpu_model()}|{CFLAGS}".encode())
    root = Path(os.environ.get("LLMOS_NATIVE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                              Path.home() / ".cache") / "llmos" / "native")
    return root / key.hexdigest()[:16]


def stage_sources(where: Path) -> list[Path]:
    """Copies of csrc/ inside the build folder, the paths that build.ninja names. The folder is
    keyed by content, not by checkout: compiled from each checkout's own csrc/, a second clone
    (a CI run beside a work tree) rewrote build.ninja with its paths and ninja rebuilt all of
    it, minutes of a model driver's start on 2 cores. A copy is only written when missing or
    different, so its timestamp, and thus ninja's view, stays put."""
    staged = where / "src"
    staged.mkdir(parents=True, exist_ok=True)
    for src in sorted(CSRC.iterdir()):
        if not src.is_file():
            continue
        dst, data = staged / src.name, src.read_bytes()
        if not dst.exists() or dst.read_bytes() != data:
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, dst)   # whole or absent, for a driver building beside this one
    return [staged / s.name for s in SOURCES]


def _openmp_runtime() -> list[str]:
    """Link flags that give at::parallel_for torch's own OpenMP runtime. Without -fopenmp,
    ATen's parallel_for (inline, an omp pragma) silently runs on one thread; with the
    system's libgomp beside the copy the torch wheel bundles, two thread pools would spin
    against each other. Linking the bundled file makes the loader reuse the one in memory."""
    import torch

    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return [str(bundled[0])] if bundled else ["-fopenmp"]   # else torch uses the system's


def load(verbose: bool = False):
    """The compiled module (with .paged_decode), or None where it cannot be had."""
    if "ext" in _loaded:
        return _loaded["ext"]
    ext = None
    if os.environ.get("LLMOS_NATIVE", "1") != "0":
        try:
            from torch.utils import cpp_extension

            where = build_dir()
            sources = stage_sources(where)
            ext = cpp_extension.load(
                name="llmos_native", sources=[str(s) for s in sources], build_directory=str(where),
                extra_cflags=CFLAGS, extra_ldflags=_openmp_runtime(), verbose=verbose)
        except Exception as exc:  # no compiler, no ninja, a CPU the flags do not fit...
            log.warning("C++ kernels unavailable, using the pure torch path: %s: %s",
                        type(exc).__name__, str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else "")
    _loaded["ext"] = ext
    return ext


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(f"llmos native kernels: {'built' if load(verbose='-v' in sys.argv) else 'NOT available'} "
          f"in {build_dir()}")
