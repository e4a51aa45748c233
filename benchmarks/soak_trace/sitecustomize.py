"""Used by benchmarks/soak.py --trace-kernel (put on PYTHONPATH of llmosd): starts tracemalloc
in the first process that sees LLMOS_SOAK_TRACEMALLOC_DIR (the kernel; the variable is removed
so the drivers it spawns do not trace) and dumps a snapshot there on each SIGUSR2."""
import os

_dir = os.environ.pop("LLMOS_SOAK_TRACEMALLOC_DIR", None)
if _dir:
    import signal
    import tracemalloc

    tracemalloc.start(int(os.environ.pop("LLMOS_SOAK_TRACEMALLOC_FRAMES", "1") or 1))
    _count = [0]

    def _dump(signum, frame):
        _count[0] += 1
        path = os.path.join(_dir, f"kernel-{_count[0]}.tracemalloc")
        tracemalloc.take_snapshot().dump(path + ".part")
        os.replace(path + ".part", path)

    signal.signal(signal.SIGUSR2, _dump)
