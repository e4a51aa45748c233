"""What memory the machine has for KV pools: pynvml on NVIDIA GPUs, psutil on CPU.

The kernel asks this module, never torch, so the scheduling process stays torch-free.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceMemory:
    device: str          # "cpu" or "cuda:N"
    name: str
    total: int
    available: int


def cpu_memory() -> DeviceMemory:
    vm = psutil.virtual_memory()
    return DeviceMemory("cpu", "host memory", vm.total, vm.available)


def gpu_memories() -> list[DeviceMemory]:
    """Every NVIDIA GPU that NVML reports; [] when there is no driver or no GPU."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            out.append(DeviceMemory(f"cuda:{i}", name if isinstance(name, str) else name.decode(),
                                    int(mem.total), int(mem.free)))
        return out
    finally:
        pynvml.nvmlShutdown()


def select_device(requested: str = "auto") -> DeviceMemory:
    """'auto' takes the first GPU if there is one, else the CPU."""
    if requested == "cpu":
        return cpu_memory()
    gpus = gpu_memories()
    if requested == "auto":
        return gpus[0] if gpus else cpu_memory()
    for g in gpus:
        if g.device == requested or (requested == "cuda" and g.device == "cuda:0"):
            return g
    raise ValueError(f"device {requested!r} not found (GPUs seen: {[g.device for g in gpus] or 'none'})")
