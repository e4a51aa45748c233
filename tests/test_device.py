"""Device discovery: psutil on the CPU, pynvml on NVIDIA GPUs (skipped without one)."""
import pytest

from llmos.kernel.mem.device import cpu_memory, gpu_memories, select_device
from llmos.kernel.mem.pool import parse_memory


def test_cpu_memory_is_real():
    m = cpu_memory()
    assert m.device == "cpu" and 0 < m.available <= m.total


def test_auto_selects_a_gpu_if_nvml_sees_one_else_the_cpu():
    chosen = select_device("auto")
    assert chosen.device == (gpu_memories()[0].device if gpu_memories() else "cpu")


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="not found"):
        select_device("cuda:97")


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_memories(), reason="no NVIDIA GPU visible to NVML")
def test_nvml_reports_gpu_memory():
    g = gpu_memories()[0]
    assert g.device == "cuda:0" and 0 < g.available <= g.total and g.name


@pytest.mark.parametrize("spec, want", [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1000", 1000),
                                        ("0.25", 250), (0.5, 500)])
def test_memory_specs(spec, want):
    assert parse_memory(spec, 1000) == want


def test_bad_memory_spec():
    with pytest.raises(ValueError):
        parse_memory("lots", 1000)
