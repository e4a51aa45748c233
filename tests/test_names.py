"""One name, one place (issue 11.6): the kernel's state and class names and the CLI's views
come from llmos/names.py, and the CLI's views do not import the kernel to get them."""
from __future__ import annotations

from llmos import names
from llmos.cli import top
from llmos.kernel.policy import Priority
from llmos.kernel.requests import Request, State
from llmos.sampling_params import SamplingParams
from test_import_rules import MODULES


def test_the_kernels_states_are_the_names():
    assert tuple(s.value for s in State) == names.REQUEST_STATES
    req = Request(id="r", seq_id=1, model="m", tenant="t", params=SamplingParams())
    req.to(State.WAITING)
    assert req.summary().state == names.WAITING
    req.sched.preemptions = 1
    assert req.summary().state == names.PREEMPTED
    req.kv.swapped = True
    assert req.summary().state == names.SWAPPED


def test_the_kernels_classes_are_the_names():
    assert [Priority(i).class_name for i in range(len(names.PRIORITY_CLASSES))] == list(names.PRIORITY_CLASSES)


def test_top_lays_out_the_names():
    assert top.CLASSES == names.PRIORITY_CLASSES
    assert top.STATES == ("loading", "tokenizing", "waiting", "preempted", "swapped", "running", "finishing")


def test_names_and_the_cli_views_stand_apart_from_the_kernel():
    assert MODULES["llmos.names"] == set()
    for module in ("llmos.cli.top", "llmos.cli.main", "llmos.cli.jobs", "llmos.cli.format"):
        assert not [m for m in MODULES[module] if m.startswith("llmos.kernel")], module
