"""How the model driver's compute threads and oneDNN's caches behave on the CPU.

Set up before torch is imported: OpenMP and oneDNN read their environment once, when they start.
"""
from __future__ import annotations

import os

# How OpenMP's threads wait at the barrier after each of a step's ~1,000 parallel regions.
# Sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a futex wake-up per region, and on a VM
# the wake of a halted vCPU is slow: on a quiet 2-core AMD EPYC the daemon ran one int4
# stream at 23 tok/s with passive waits and 51 tok/s with a bounded spin (100,000 spins, then
# sleep), 146 -> 286 tok/s at 32 streams (benchmarks/peers.py, docs/model-driver.md). Spinning
# without bound is ruinous where other processes need the cores: a spinning thread waits for
# a descheduled peer, and on 2 cores under load bf16 decode went from 0.11 s a step (passive)
# to 1.3-2.6 s. So the default is the bounded spin, and a machine shared with other CPU-heavy
# work should set OMP_WAIT_POLICY=PASSIVE (the tests do; so do replicas, which share cores).
SPIN_ENV = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "100000"}
#
# oneDNN, and ideep above it (torch's mkldnn ops), keep a compiled primitive for every linear
# shape and every number of tokens a step has seen, up to 1,024 each; rare step sizes keep
# arriving for a long time, so the driver's memory crept up ~100 MiB over 15-20 minutes of
# mixed traffic. 30-minute soaks (docs/benchmarks.md), RSS per driver incarnation after
# warm-up: +11.9% / +5.2% at the defaults (~860 MiB); +3.0% / -1.1% with oneDNN's cache at
# 256 (~760 MiB); +2.9% / -6.2% with both at 64 (~490 MiB). Throughput at 32 streams with
# both at 64, quiet machine: 322 / 322 tok/s against 315 / 306 with oneDNN's at 256 alone.
DEFAULT_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}


def configure_cpu_env(env=os.environ) -> dict:
    """Give OpenMP and oneDNN our defaults where the user set nothing; returns what was
    applied. Must run before torch (and so libgomp and oneDNN) is loaded in this process."""
    applied = {}
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:   # the user's wait policy stands whole
        env.update(SPIN_ENV)
        applied.update(SPIN_ENV)
    for key, value in DEFAULT_ENV.items():
        if key not in env:
            env[key] = applied[key] = value
    return applied


def physical_cores() -> int:
    """Torch threads to use: one per physical core we may run on."""
    try:
        import psutil
        n = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover
        n = None
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Hyperthreads share the matmul units; more torch threads than cores only adds contention.
    return max(1, min(n or avail, avail))
