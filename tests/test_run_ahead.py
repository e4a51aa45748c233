"""The kernel sends decode step N+1 while the model driver computes step N (kernel/run_ahead.py,
issue 12 item 4): ModelEngine with a scripted model driver that fills a following plan's tokens
from its own last result, as ModelRunner does, and whose next token depends on the input token
and its position, so a wrong or stale input shows in the output. Real StepPlan/StepResult
messages, a real shared-memory pool; each scenario is compared with run-ahead off."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from llmos import protocol
from llmos.kernel import run_ahead
from llmos.kernel.engine import ModelEngine
from llmos.kernel.requests import Request, State
from llmos.sampling_params import SamplingParams
from test_step_isolation import INFO, VOCAB, engine_for, released_engines, run_until  # noqa: F401

EOS = INFO.eos_token_ids[0]


class FollowingDriver:
    """Answers each plan in order with a token per sampled sequence: f(last input token,
    position), or `eos_at[seq_id]` at that position. A plan that follows step N takes the
    tokens it sampled in N, and fails (StepFailed) if N is not its last answer."""

    def __init__(self):
        self.engine: ModelEngine | None = None
        self.plans: list[protocol.StepPlan] = []
        self.last: tuple[int, dict[int, int]] | None = None
        self.eos_at: dict[int, int] = {}
        self.spoil: set[int] = set()       # step ids answered with someone else's sequences
        self.on_step: dict[int, object] = {}   # step id -> called as that step is answered

    def send(self, peer: str, msg) -> None:
        if isinstance(msg, protocol.StepPlan):
            self.plans.append(msg)
            asyncio.get_running_loop().call_soon(self.engine.step_result, self.answer(msg))

    def answer(self, plan: protocol.StepPlan):
        if plan.step_id in self.on_step:
            self.on_step[plan.step_id]()
        followed, self.last = self.last, None
        tokens = plan.tokens.copy()
        if plan.follows:
            if followed is None or followed[0] != plan.follows:
                return protocol.StepFailed(step_id=plan.step_id, error="nothing to follow")
            tokens = np.asarray([followed[1][int(q)] for q in plan.seq_ids], np.int32)
        ends = np.cumsum(plan.num_new) - 1
        out = []
        for i, sid in enumerate(plan.seq_ids.tolist()):
            if plan.sample[i]:
                pos = int(plan.start_pos[i] + plan.num_new[i])
                out.append(EOS if self.eos_at.get(sid) == pos else (int(tokens[ends[i]]) * 7 + pos) % (VOCAB - 1) + 1)
        sampled = plan.seq_ids[plan.sample == 1]
        self.last = (plan.step_id, dict(zip(sampled.tolist(), out)))
        n = len(out)
        return protocol.StepResult(
            step_id=plan.step_id, seq_ids=sampled + 1000 if plan.step_id in self.spoil else sampled,
            tokens=np.asarray(out, np.int32), logprobs=np.zeros(n, np.float32), top_ids=np.zeros((n, 0), np.int32),
            top_lps=np.zeros((n, 0), np.float32), forward_ms=1.0)


@pytest.fixture
def engine_with(monkeypatch, released_engines):
    def make(enabled: bool):
        monkeypatch.setattr(run_ahead, "ENABLED", enabled)
        driver = FollowingDriver()
        engine, failures = engine_for(driver, "t-ahead", released_engines)
        return engine, driver, failures
    return make


def request(i: int, prompt: list[int], max_tokens: int) -> Request:
    req = Request(id=f"r{i}", seq_id=i, model="t", tenant="local", params=SamplingParams(temperature=0.0))
    req.prompt_ids, req.max_tokens = list(prompt), max_tokens
    return req


def serve(engine, reqs: list[Request], submit: bool = True):
    async def scenario():
        for r in reqs if submit else []:
            engine.submit(r)
        await run_until(engine, lambda: all(r.output.finish_reason is not None for r in reqs) and not engine._held,
                        steps=2000)
    asyncio.run(scenario())
    return [(r.output.ids, r.output.finish_reason) for r in reqs]


def prompts():
    return [[5, 6, 7], [9, 3, 3, 8, 1, 2, 4], [11]]


@pytest.mark.parametrize("max_tokens", [[9, 5, 14], [1, 2, 3]])
def test_outputs_are_those_of_steps_run_one_after_another(engine_with, max_tokens):
    results = {}
    for enabled in (False, True):
        engine, driver, _ = engine_with(enabled)
        reqs = [request(i, p, m) for i, (p, m) in enumerate(zip(prompts(), max_tokens))]
        results[enabled] = serve(engine, reqs)
        if enabled and max(max_tokens) > 3:
            assert engine.stats.ahead > 0 and any(p.follows for p in driver.plans)
        engine.scheduler.check_integrity()
        assert engine.scheduler.pool.num_used == 0
    assert results[True] == results[False]
    assert [len(ids) for ids, _ in results[True]] == max_tokens


def test_a_stop_at_step_n_drops_the_token_computed_ahead(engine_with):
    results = {}
    for enabled in (False, True):
        engine, driver, _ = engine_with(enabled)
        driver.eos_at = {0: 6, 1: 9}   # end of sequence as the 4th and 3rd token
        reqs = [request(0, [5, 6, 7], 20), request(1, [9, 3, 3, 8, 1, 2], 20), request(2, [4], 8)]
        results[enabled] = serve(engine, reqs)
        engine.scheduler.check_integrity()
        assert engine.scheduler.pool.num_used == 0
    assert results[True] == results[False]
    assert [len(ids) for ids, _ in results[True]] == [4, 4, 8]
    assert [why for _, why in results[True]] == ["stop", "stop", "length"]


def test_no_step_is_sent_ahead_while_a_request_waits(engine_with):
    results = {}
    for enabled in (False, True):
        engine, driver, _ = engine_with(enabled)
        reqs = [request(0, [5, 6, 7], 12), request(1, [8, 8], 6)]
        early, late = reqs
        driver.on_step[4] = lambda: engine.submit(late)   # arrives while step 4 (and 5, ahead) run
        results[enabled] = serve(engine, [early])
        results[enabled] += serve(engine, [late], submit=False)
        # the late prompt was planned in a step the kernel made after the last result, not ahead
        first = next(p for p in driver.plans if 1 in p.seq_ids.tolist())
        assert first.follows == 0 and first.num_new[first.seq_ids.tolist().index(1)] == 2
    assert results[True] == results[False]


def test_a_step_sent_ahead_of_a_lost_step_is_not_applied(engine_with):
    results = {}
    for enabled in (False, True):
        engine, driver, failures = engine_with(enabled)
        driver.spoil = {3}   # step 3's answer names other sequences: it is lost, and replayed
        reqs = [request(0, [5, 6, 7], 8), request(1, [2, 9], 8)]
        results[enabled] = serve(engine, reqs)
        assert engine.bad_results_total == 1 and not failures
        if enabled:   # step 4 was sent ahead of step 3, answered, and not applied
            assert driver.plans[3].follows == 3
        engine.scheduler.check_integrity()
        assert engine.scheduler.pool.num_used == 0
    assert results[True] == results[False]


def test_a_failed_step_fails_its_requests_and_the_step_ahead_is_dropped(engine_with):
    engine, driver, failures = engine_with(True)
    real = driver.answer

    def fail_step_3(plan):
        if plan.step_id == 3:
            driver.last = None
            return protocol.StepFailed(step_id=3, error="RuntimeError: out of memory")
        return real(plan)
    driver.answer = fail_step_3
    reqs = [request(0, [5, 6, 7], 10)]
    serve(engine, reqs)
    assert failures["r0"].status == 500 and "out of memory" in failures["r0"].message
    assert driver.plans[3].follows == 3          # sent ahead, failed with it, not applied
    good = request(1, [5, 6, 7], 10)
    ((ids, why),) = serve(engine, [good])
    reference_engine, _, _ = engine_with(False)
    ((ref, _),) = serve(reference_engine, [request(1, [5, 6, 7], 10)])
    assert why == "length" and ids == ref
    engine.scheduler.check_integrity()
    assert engine.scheduler.pool.num_used == 0


def test_a_step_ahead_of_requests_all_aborted_is_taken_without_new_work(engine_with):
    engine, driver, _ = engine_with(True)
    reqs = [request(0, [5, 6, 7], 50), request(1, [2, 9], 50)]

    def abort_all():   # both clients go as step 6 is sent ahead of 5, as the front door drops them
        for r in reqs:
            engine.drop(r)
            r.to(State.DONE)
    driver.on_step[6] = abort_all

    async def scenario():
        for r in reqs:
            engine.submit(r)
        await run_until(engine, lambda: len(driver.plans) >= 6 and not engine._pending and engine._ahead is None)
    asyncio.run(scenario())
    assert driver.plans[5].follows == 5 and len(driver.plans) == 6 and engine.stats.steps == 6   # taken, no more
    engine.scheduler.check_integrity()
    assert engine.scheduler.pool.num_used == 0
