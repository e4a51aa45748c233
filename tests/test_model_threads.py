"""The model driver's OpenMP and oneDNN setup: applied before torch loads, never over the user's."""
import subprocess
import sys

from llmos.drivers.model.threads import configure_cpu_env, physical_cores


def test_a_bounded_spin_is_the_default_and_the_users_choice_wins():
    env = {}
    assert configure_cpu_env(env) == {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "100000",
                                      "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "8"}
    assert configure_cpu_env(mine) == {}
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "8"}
    # a shared machine's PASSIVE must not get a spin count, which would make its threads spin
    shared = {"OMP_WAIT_POLICY": "PASSIVE"}
    configure_cpu_env(shared)
    assert shared["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in shared
    counted = {"GOMP_SPINCOUNT": "1000"}
    configure_cpu_env(counted)
    assert counted["GOMP_SPINCOUNT"] == "1000" and "OMP_WAIT_POLICY" not in counted


def test_the_driver_module_does_not_load_torch_before_it_configures_openmp():
    # OpenMP reads its environment when torch loads it: the driver's entry module must not
    # import torch at import time, or configure_cpu_env() would come too late.
    code = "import sys, llmos.drivers.model.__main__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_one_thread_per_usable_core():
    import os
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))
