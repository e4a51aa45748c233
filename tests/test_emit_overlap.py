"""The kernel plans step N+1 before it hands out step N's tokens (issue 12, item 4): the
progressed requests of a step are emitted right after the next plan is sent, so their
delivery overlaps the model's next forward. ModelEngine with the scripted model driver of
test_step_isolation (real StepPlan/StepResult messages, a real shared-memory pool)."""
from __future__ import annotations

import asyncio

import pytest

from llmos.config import DaemonConfig
from llmos.kernel import engine as engine_module
from llmos.kernel import run_ahead
from llmos.kernel.engine import ModelEngine
from test_step_isolation import INFO, ScriptedDriver, request, result, run_until


@pytest.fixture
def timeline_engine(monkeypatch):
    """An engine whose driver and front door both write to one timeline:
    ("plan", step_id, seq_ids) when a plan is sent, ("emit", [(request id, tokens so far)]).
    Without run-ahead (test_run_ahead.py), so that every plan is sent after its predecessor's result."""
    monkeypatch.setattr(run_ahead, "ENABLED", False)
    made = []

    def make():
        events: list[tuple] = []
        driver = ScriptedDriver(result)

        def send(peer, msg):
            if type(msg).__name__ == "StepPlan":
                events.append(("plan", msg.step_id, sorted(msg.seq_ids.tolist())))
            driver.send(peer, msg)

        def on_outputs(engine, out):
            assert not out.failed, out.failed
            events.append(("emit", [(r.id, list(r.output.ids)) for r in out.progressed]))
        config = DaemonConfig(models=["t"], device="cpu", swap_memory="0", max_batched_tokens=64)
        engine = ModelEngine("t-overlap", "t", config, lambda info, device: {"kv_budget_bytes": 64 * 16 * 32},
                             send, on_outputs)
        driver.engine = engine
        engine.driver_up(INFO)
        engine.pool_mapped(None)
        made.append(engine)
        return engine, events

    yield make
    for e in made:
        e.pool.release()


def run_one(engine, max_tokens: int = 4):
    req = request(1, max_tokens=max_tokens)

    async def scenario():
        engine.submit(req)
        await run_until(engine, lambda: req.output.finish_reason is not None and not engine._held)
    asyncio.run(scenario())
    return req


def test_step_n_is_emitted_after_step_n_plus_1_is_planned(timeline_engine):
    engine, events = timeline_engine()
    req = run_one(engine)
    assert req.output.ids == [4, 5, 6, 7] and req.output.finish_reason == "length"
    kinds = [e[0] for e in events]
    # prefill + 3 decodes = 4 plans; every step's tokens go out once, each after the next
    # plan except the last, which goes out when nothing is left to plan.
    assert kinds == ["plan", "plan", "emit", "plan", "emit", "plan", "emit", "emit"]
    emitted = [e[1] for e in events if e[0] == "emit"]
    assert emitted == [[("r1", [4])], [("r1", [4, 5])], [("r1", [4, 5, 6])], [("r1", [4, 5, 6, 7])]]
    # Three steps followed their predecessor at once: three gaps measured, none idle.
    assert engine.stats.gaps == 3 and engine.stats.gap_s >= 0
    engine.scheduler.check_integrity()
    assert engine.scheduler.pool.num_used == 0


def test_without_overlap_each_step_is_emitted_before_the_next_plan(timeline_engine, monkeypatch):
    monkeypatch.setattr(engine_module, "EMIT_OVERLAP", False)
    engine, events = timeline_engine()
    req = run_one(engine)
    assert req.output.ids == [4, 5, 6, 7]
    assert [e[0] for e in events] == ["plan", "emit"] * 4


def test_outputs_held_when_the_driver_goes_away_are_still_delivered(timeline_engine):
    """A step lost with its driver: the previous step's tokens were handed out when its plan
    left, and the lost step is replayed without repeating or losing a token."""
    engine, events = timeline_engine()
    req = request(1, max_tokens=4)
    lost = {"done": False}
    real_send = engine._send

    def send_then_lose(peer, msg):
        real_send(peer, msg)
        if type(msg).__name__ == "StepPlan" and msg.step_id == 3 and not lost["done"]:
            lost["done"] = True
            engine.driver_down()   # before its answer: the step is lost, the answer is ignored
            asyncio.get_running_loop().call_soon(engine.pool_mapped, None)
    engine._send = send_then_lose

    async def scenario():
        engine.submit(req)
        await run_until(engine, lambda: req.output.finish_reason is not None and not engine._held)
    asyncio.run(scenario())
    assert req.output.ids == [4, 5, 6, 7]
    assert [e[1] for e in events if e[0] == "plan"] == [1, 2, 3, 4, 5] and len(engine.recoveries) == 1
    emitted = [e[1][0][1] for e in events if e[0] == "emit"]
    assert emitted == [[4], [4, 5], [4, 5, 6], [4, 5, 6, 7]]
