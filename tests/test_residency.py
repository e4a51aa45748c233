"""Residency decisions on a fake clock: keep-alive expiry, LRU eviction, the refusal's numbers."""
from __future__ import annotations

import pytest

from llmos.keep_alive import FOREVER, parse_keep_alive
from llmos.kernel.residency import Residency, ResidencyTable

MiB = 2**20


def loaded(table: ResidencyTable, name: str, last_used: float, weights: int = 10 * MiB, kv: int = 10 * MiB,
           keep_alive: float = 300.0):
    r = table.get(name)
    r.state, r.last_used, r.weight_bytes, r.kv_bytes, r.keep_alive_s = Residency.LOADED, last_used, weights, kv, keep_alive
    return r


def test_a_free_slot_and_enough_memory_load_without_evicting():
    table = ResidencyTable(max_loaded=2)
    loaded(table, "a", 0.0)
    assert table.plan_load("b", 10 * MiB, 10 * MiB, device_free=100 * MiB).evict == []


def test_no_slot_evicts_the_least_recently_used_idle_model():
    table = ResidencyTable(max_loaded=2)
    loaded(table, "old", 1.0)
    loaded(table, "new", 5.0)
    plan = table.plan_load("c", MiB, MiB, device_free=100 * MiB)
    assert (plan.ok, plan.evict) == (True, ["old"])


def test_a_busy_model_is_never_evicted_and_the_refusal_names_it():
    table = ResidencyTable(max_loaded=1)
    loaded(table, "a", 0.0).busy = True
    plan = table.plan_load("b", MiB, MiB, device_free=100 * MiB)
    assert not plan.ok and plan.evict == []
    assert "1 model(s) are in memory (a)" in plan.reason and "--max-loaded-models" in plan.reason


def test_memory_limit_evicts_until_the_weights_and_kv_fit():
    table = ResidencyTable(max_loaded=4, memory_limit=100 * MiB)
    loaded(table, "a", 1.0, weights=30 * MiB, kv=10 * MiB)   # 40 MiB
    loaded(table, "b", 2.0, weights=30 * MiB, kv=10 * MiB)   # 40 MiB: 20 MiB left under the limit
    plan = table.plan_load("c", 40 * MiB, 10 * MiB, device_free=10**12)
    assert (plan.ok, plan.evict) == (True, ["a"])            # 60 MiB free after a: 50 fits
    assert table.plan_load("c", 90 * MiB, 10 * MiB, device_free=10**12).evict == ["a", "b"]   # exactly all of it
    plan = table.plan_load("c", 95 * MiB, 10 * MiB, device_free=10**12)
    assert (plan.ok, plan.evict) == (False, [])              # more than the limit: evict nobody for nothing
    assert plan.reason == "model 'c' needs 105.0 MiB (95.0 MiB weights + 10.0 MiB KV) but 100.0 MiB is free " \
                          "(--memory-limit 100.0 MiB)"


def test_too_big_for_the_device_says_so_with_the_numbers():
    table = ResidencyTable(max_loaded=2)
    loaded(table, "a", 0.0).busy = True
    plan = table.plan_load("big", 500 * MiB, 64 * MiB, device_free=200 * MiB)
    assert not plan.ok
    assert plan.reason == ("model 'big' needs 564.0 MiB (500.0 MiB weights + 64.0 MiB KV) but 200.0 MiB is free; "
                           "busy models hold the rest: a")


def test_keep_alive_expiry_skips_busy_pinned_and_loading_models():
    table = ResidencyTable(max_loaded=4)
    loaded(table, "idle", 0.0, keep_alive=60)
    loaded(table, "busy", 0.0, keep_alive=60).busy = True
    loaded(table, "pinned", 0.0, keep_alive=FOREVER)
    loaded(table, "now", 10.0, keep_alive=0)
    table.get("loading").state = Residency.LOADING
    assert table.expired(59.9) == ["now"]
    assert sorted(table.expired(60.0)) == ["idle", "now"]


@pytest.mark.parametrize("value, seconds", [
    (None, None), (0, 0.0), (30, 30.0), (2.5, 2.5), ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0),
    ("250ms", 0.25), ("0", 0.0), ("-1", FOREVER), (-5, FOREVER), ("1d", 86400.0), (" 10 ", 10.0)])
def test_keep_alive_forms(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", [True, "", "5x", "m", "5m3", "nan", float("nan"), 1e12, "1" * 40, [5], {"s": 1}])
def test_bad_keep_alive_is_a_clear_error(value):
    with pytest.raises(ValueError, match="keep_alive"):
        parse_keep_alive(value)


def test_max_loaded_below_one_is_refused():
    with pytest.raises(ValueError):
        ResidencyTable(max_loaded=0)


def test_the_router_keeps_a_prefix_on_one_replica_until_it_is_overloaded():
    from llmos.kernel.router import Router
    r = Router()
    r.set_replicas(["a", "b"])
    prefix = "system prompt " * 80
    first = r.pick(prefix + "q0", {"a": 0, "b": 0})
    other = "b" if first == "a" else "a"
    assert [r.pick(prefix + f"q{i}", {first: 3000, other: 0}) for i in range(1, 4)] == [first] * 3   # within balance
    assert r.pick(prefix + "q9", {first: 9000, other: 0}) == other         # overloaded: the least loaded
    assert r.pick("fresh text", {"a": 5, "b": 1}) == "b"                    # no prefix: the least loaded
    r.pick(prefix + "x", {"a": 0, "b": 0})
    assert r.pick(prefix + "y", {"a": 10, "b": 2}) == "b"                   # both hold it: the less loaded
