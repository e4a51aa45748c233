"""A step that fails fails its requests, not the model (issue 10, point 2 and 3): ModelEngine
with a scripted model driver (the real StepPlan/StepResult messages through its send and
step_result calls) and a real shared-memory KV pool."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from llmos import protocol
from llmos.config import DaemonConfig
from llmos.kernel import engine as engine_module
from llmos.kernel import run_ahead
from llmos.kernel.engine import MAX_BAD_RESULTS, ModelEngine
from llmos.kernel.requests import Request, State
from llmos.sampling_params import SamplingParams

VOCAB = 100
INFO = protocol.ModelInfo(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32", vocab_size=VOCAB,
                          max_model_len=64, weight_bytes=0, eos_token_ids=[0], model_type="llama", model_dir="/none")


class ScriptedDriver:
    """Answers each StepPlan with `answer(plan)`; records the plans."""

    def __init__(self, answer):
        self.answer, self.plans = answer, []
        self.engine: ModelEngine | None = None

    def send(self, peer: str, msg) -> None:
        if isinstance(msg, protocol.StepPlan):
            self.plans.append(msg)
            reply = self.answer(msg)
            asyncio.get_running_loop().call_soon(self.engine.step_result, reply)


def result(plan, tokens=None, seq_ids=None) -> protocol.StepResult:
    sampled = plan.seq_ids[plan.sample == 1]
    n = len(sampled)
    # The next token depends on the position, so a lost or repeated token would show.
    toks = tokens if tokens is not None else (plan.start_pos + plan.num_new)[plan.sample == 1] % VOCAB + 1
    return protocol.StepResult(step_id=plan.step_id, seq_ids=sampled if seq_ids is None else seq_ids,
                               tokens=np.asarray(toks, np.int32), logprobs=np.zeros(n, np.float32),
                               top_ids=np.zeros((n, 0), np.int32), top_lps=np.zeros((n, 0), np.float32),
                               forward_ms=1.0)


@pytest.fixture
def released_engines():
    """Engines whose shared-memory pools are released after the test."""
    engines: list[ModelEngine] = []
    yield engines
    for e in engines:
        e.pool.release()


def engine_for(driver, name: str, keep: list) -> tuple[ModelEngine, dict]:
    """A ModelEngine over a real shared-memory pool whose model driver is `driver` (its send
    answers through engine.step_result), appended to `keep`; returns it and the Failures it
    emitted, by request id."""
    failures: dict[str, object] = {}
    config = DaemonConfig(models=["t"], device="cpu", swap_memory="0", max_batched_tokens=64)
    engine = ModelEngine(name, "t", config, lambda info, device: {"kv_budget_bytes": 64 * 16 * 32},
                         driver.send, lambda e, out: failures.update((r.id, f) for r, f in out.failed))
    driver.engine = engine
    engine.driver_up(INFO)
    engine.pool_mapped(None)
    keep.append(engine)
    return engine, failures


@pytest.fixture
def make_engine(monkeypatch, released_engines):
    """Without run-ahead, so that each plan is answered before the next is made (the scripted
    answers go to the plans in turn); test_run_ahead.py covers steps sent ahead."""
    monkeypatch.setattr(run_ahead, "ENABLED", False)

    def make(answer):
        driver = ScriptedDriver(answer)
        engine, failures = engine_for(driver, "t-isolation", released_engines)
        return engine, driver, failures
    return make


def request(i: int, max_tokens: int = 4) -> Request:
    req = Request(id=f"r{i}", seq_id=i, model="t", tenant="local", params=SamplingParams(temperature=0.0))
    req.prompt_ids, req.max_tokens = [5, 6, 7], max_tokens
    return req


async def run_until(engine, cond, steps=200):
    task = asyncio.ensure_future(engine.run())
    try:
        for _ in range(steps):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not reached")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_step_that_raises_fails_its_requests_and_the_next_request_is_served(make_engine, monkeypatch):
    engine, driver, failures = make_engine(result)
    real_plan, calls = engine_module.build_plan, []

    def plan_once_broken(*args):   # the first step blows up while being planned, as top_k=2**31 did
        calls.append(1)
        if len(calls) == 1:
            raise OverflowError("Python integer 2147483648 out of bounds for int32")
        return real_plan(*args)
    monkeypatch.setattr(engine_module, "build_plan", plan_once_broken)

    async def scenario():
        bad = request(1)
        engine.submit(bad)
        await run_until(engine, lambda: bad.output.finish_reason == "error")
        failure = failures["r1"]
        assert failure.status == 500 and failure.code == "internal_error"
        assert "OverflowError" in failure.message and engine.step_crashes == 1
        assert engine.scheduler.pool.num_used == 0           # its blocks are back
        good = request(2)
        engine.submit(good)
        await run_until(engine, lambda: good.output.finish_reason is not None)
        assert good.output.finish_reason == "length" and good.output.ids == [4, 5, 6, 7]
        engine.scheduler.check_integrity()
    asyncio.run(scenario())


def test_a_result_that_does_not_answer_its_plan_is_a_lost_step(make_engine):
    answers = iter([lambda p: result(p, seq_ids=p.seq_ids + 1000),      # someone else's sequences
                    lambda p: result(p, tokens=[VOCAB + 5]),              # outside the vocabulary
                    result, result, result, result])
    engine, driver, failures = make_engine(lambda plan: next(answers)(plan))

    async def scenario():
        req = request(1)
        engine.submit(req)
        await run_until(engine, lambda: req.output.finish_reason is not None)
        # Nothing of the two bad answers was applied: the prompt was planned three times.
        assert [p.num_new.tolist() for p in driver.plans[:3]] == [[3], [3], [3]]
        assert req.output.ids == [4, 5, 6, 7] and engine.bad_results_total == 2
        assert engine.scheduler.pool.num_used == 0
    asyncio.run(scenario())


def test_a_driver_that_keeps_answering_badly_fails_the_step_not_the_model(make_engine):
    state = {"bad": True}
    engine, driver, failures = make_engine(lambda p: result(p, tokens=[-1] * int(p.sample.sum())) if state["bad"]
                                       else result(p))

    async def scenario():
        req = request(1)
        engine.submit(req)
        await run_until(engine, lambda: req.output.finish_reason == "error")
        assert len(driver.plans) == MAX_BAD_RESULTS and "invalid results" in failures["r1"].message
        state["bad"] = False
        good = request(2)
        engine.submit(good)
        await run_until(engine, lambda: good.output.finish_reason is not None)
        assert good.output.ids == [4, 5, 6, 7] and good.state is State.FINISHING
    asyncio.run(scenario())
