"""The C++ kernels are built once per source and CPU, whichever checkout asks: a second clone
of the same sources (a CI run beside a work tree) must reuse the build, not recompile it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.drivers.model import native

needs_native = pytest.mark.skipif(native.load() is None, reason="the C++ kernels did not build here")


@needs_native
def test_a_second_checkout_of_the_same_sources_reuses_the_build(tmp_path):
    where = native.build_dir()
    built = (where / "llmos_native.so").stat().st_mtime_ns
    ninja = (where / "build.ninja").read_text()
    assert str(native.CSRC) not in ninja and str(where / "src") in ninja   # it names the staged copies
    other = tmp_path / "csrc"
    shutil.copytree(native.CSRC, other)
    later = (built // 10**9 + 60, built // 10**9 + 60)
    for f in other.iterdir():
        os.utime(f, later)   # a fresh clone's files are newer than the build
    code = ("import sys; from pathlib import Path; from llmos.drivers.model import native as n\n"
            f"n.CSRC = Path({str(other)!r}); n.SOURCES = [n.CSRC / s.name for s in n.SOURCES]\n"
            "assert n.load() is not None; print(n.build_dir())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()) == where
    assert (where / "llmos_native.so").stat().st_mtime_ns == built   # not rebuilt


@needs_native
def test_staging_writes_only_what_is_missing_or_different(tmp_path):
    staged = native.stage_sources(tmp_path)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "src").iterdir()}
    assert [p.name for p in staged] == [s.name for s in native.SOURCES]
    assert set(first) == {p.name for p in native.CSRC.iterdir() if p.is_file()}
    (tmp_path / "src" / "layer_ops.h").write_text("stale")
    native.stage_sources(tmp_path)
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "src").iterdir()}
    assert (tmp_path / "src" / "layer_ops.h").read_bytes() == (native.CSRC / "layer_ops.h").read_bytes()
    assert {k: v for k, v in again.items() if k != "layer_ops.h"} == \
        {k: v for k, v in first.items() if k != "layer_ops.h"}
