"""FrontDoor with fake send callbacks (issue 11.7): the real ModelEngine and Scheduler behind it,
stepped by scheduler_kit's fake model; every message the front door sends is recorded and
asserted by its real protocol type. No processes, no event loop."""
from __future__ import annotations

import pytest

from llmos import protocol
from llmos.config import DaemonConfig
from llmos.kernel.engine import ModelEngine
from llmos.kernel.frontdoor import FrontDoor
from llmos.kernel.outputs import EngineOutputs, Failure
from llmos.kernel.requests import State
from scheduler_kit import VOCAB, run_step, token_at

MODEL = "fd-test"
TOKENIZER, IO = f"tokenizer-{MODEL}", "io"
INFO = protocol.ModelInfo(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32", vocab_size=VOCAB,
                          max_model_len=64, weight_bytes=0, eos_token_ids=[0], model_type="llama", model_dir="/none")


class Door:
    """A FrontDoor, its engine, and the messages sent: (peer, message) in order."""

    def __init__(self):
        self.sent: list[tuple[str, protocol.Message]] = []
        config = DaemonConfig(models=[MODEL], device="cpu", swap_memory="0", max_batched_tokens=64)
        self.front = FrontDoor({}, self._record, lambda name: ("running", None))
        self.engine = ModelEngine(MODEL, MODEL, config, lambda info, device: {"kv_budget_bytes": 64 * 16 * 32},
                                  self._record, self.front.engine_outputs)
        self.front.engines[MODEL] = self.engine
        self.engine.driver_up(INFO)
        self.engine.pool_mapped(None)
        self.front.tokenizer_restarted(self.engine)   # the kernel does this when the tokenizer is ready
        self.taken = len(self.sent)

    def _record(self, peer: str, msg) -> None:
        protocol.encode(msg)   # what the front door sends must be writable, as on the bus
        self.sent.append((peer, msg))

    def new(self) -> list[tuple[str, protocol.Message]]:
        """The messages sent since the last call."""
        out, self.taken = self.sent[self.taken:], len(self.sent)
        return out

    def submit(self, rid: str, model: str = MODEL, **params):
        self.front.submit(IO, protocol.Submit(request_id=rid, model=model, prompt="hi", messages=None,
                                              prompt_token_ids=None, params={"temperature": 0.0, **params},
                                              tenant="t"))

    def admit(self, rid: str, prompt: list[int], **params):
        self.submit(rid, **params)
        assert self.new() == [(TOKENIZER, protocol.Encode(request_id=rid, prompt="hi", messages=None))]
        self.front.encoded(protocol.Encoded(request_id=rid, token_ids=protocol.i32(prompt), error=None))
        assert self.new() == [(IO, protocol.Accepted(request_id=rid, prompt_tokens=len(prompt)))]
        return self.front.table[rid]

    def step(self) -> list[protocol.DetokItem]:
        """One scheduler step, its outputs emitted as the engine's loop does; the Detokenize items sent."""
        self.front.engine_outputs(self.engine, EngineOutputs(progressed=run_step(self.engine.scheduler).changed))
        return [item for peer, m in self.new() if peer == TOKENIZER for item in m.items]

    def text(self, rid: str, text: str, n: int = 1, finish=None, stop_hit=False) -> list[protocol.OutputItem]:
        self.front.text_deltas(protocol.TextDeltas(items=[protocol.TextDelta(
            rid=rid, text=text, n=n, lp=None, finish=finish, stop_hit=stop_hit)]))
        return [item for peer, m in self.new() if peer == IO for item in m.items]


@pytest.fixture
def door():
    d = Door()
    yield d
    d.engine.pool.release()


def test_a_request_goes_round_tokenizer_model_and_back_to_its_client(door):
    req = door.admit("c1", [5, 6, 7], max_tokens=2)
    assert req.state is State.WAITING and req.max_tokens == 2
    t1, t2 = token_at(req.seq_id, 3), token_at(req.seq_id, 4)
    first = door.step()
    assert [(i.rid, i.ids, i.prior, i.finish) for i in first] == [("c1", [t1], [], None)]
    assert door.text("c1", "A") == [protocol.OutputItem(rid="c1", index=0, text="A", n=1, ids=[t1], lp=None,
                                                        finish=None, usage=None)]
    assert [(i.ids, i.prior, i.finish) for i in door.step()] == [([t2], None, "length")]
    assert door.text("c1", "B", finish="length") == [protocol.OutputItem(
        rid="c1", index=0, text="B", n=1, ids=[t2], lp=None, finish="length",
        usage={"prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 0})]
    assert door.front.table == {} and req.state is State.DONE
    assert door.engine.scheduler.pool.num_used == 0 and not door.engine.scheduler.has_work()


def test_a_stop_string_ends_generation_through_the_engine(door):
    req = door.admit("c1", [5, 6, 7], max_tokens=20)
    door.step()
    out = door.text("c1", "the end", stop_hit=True)
    assert [(i.text, i.finish, i.usage) for i in out] == [("the end", "stop",
                                                           {"prompt_tokens": 3, "completion_tokens": 1, "cached_tokens": 0})]
    assert door.front.table == {} and req.state is State.DONE and req.output.finish_reason == "stop"
    assert door.engine.scheduler.pool.num_used == 0 and not door.engine.scheduler.has_work()


def test_refusals_reach_the_client_and_leave_nothing_behind(door):
    door.submit("c1", model="nope")
    assert [(p, m.status, m.code, m.param) for p, m in door.new()] == [(IO, 404, "model_not_found", "model")]
    door.submit("c2")
    door.new()
    door.front.encoded(protocol.Encoded(request_id="c2", token_ids=protocol.i32([]), error="bad template"))
    assert [(p, m.status, m.code, m.message) for p, m in door.new()] == [(IO, 400, "invalid_prompt", "bad template")]
    door.submit("c3")
    door.new()
    door.front.encoded(protocol.Encoded(request_id="c3", token_ids=protocol.i32([1] * 64), error=None))
    assert [(p, m.status, m.code) for p, m in door.new()] == [(IO, 400, "context_length_exceeded")]
    assert door.front.table == {} and not door.engine.scheduler.has_work()


def test_an_abort_frees_the_request_and_the_tokenizers_state(door):
    req = door.admit("c1", [5, 6, 7], max_tokens=20)
    door.step()
    assert door.engine.scheduler.pool.num_used == 1
    door.front.abort(protocol.Abort(request_id="c1", reason="client disconnected"))
    assert door.new() == [(TOKENIZER, protocol.Detokenize(items=[protocol.DetokItem(
        rid="c1", ids=[], prior=None, lp=None, stop=None, finish="abort")]))]
    assert door.front.table == {} and req.state is State.DONE and door.engine.scheduler.pool.num_used == 0


def test_a_cancel_finishes_with_what_it_has(door):
    req = door.admit("c1", [5, 6, 7], max_tokens=20)
    door.step()
    door.text("c1", "A")
    assert door.front.cancel("c1") == {"id": "c1", "cancelled": 1}
    assert [(i.ids, i.finish) for _, m in door.new() for i in m.items] == [([], "cancelled")]
    assert [(i.text, i.finish) for i in door.text("c1", "", n=0, finish="cancelled")] == [("", "cancelled")]
    assert door.front.table == {} and req.state is State.DONE
    with pytest.raises(KeyError):
        door.front.cancel("c1")


def test_an_engine_failure_is_one_rejection_for_its_client(door):
    req = door.admit("c1", [5, 6, 7], max_tokens=20)
    door.step()
    ended = door.engine.scheduler.finish_requests([req], "error")   # as the engine does before emitting
    door.front.engine_outputs(door.engine, EngineOutputs(failed=[(r, Failure(500, "internal_error", "boom"))
                                                                 for r in ended]))
    sent = door.new()
    assert sent[-1] == (IO, protocol.Rejected(request_id="c1", status=500, code="internal_error", message="boom",
                                              param=None))
    assert door.front.table == {} and door.engine.scheduler.pool.num_used == 0


def test_a_restarted_tokenizer_gets_the_acked_prefix_and_the_rest(door):
    req = door.admit("c1", [5, 6, 7], max_tokens=20)
    door.step()
    door.text("c1", "A")                  # the first token's text came back
    door.step()                           # the second was sent; then the tokenizer dies
    door.front.tokenizer_restarted(door.engine)
    t1, t2 = token_at(req.seq_id, 3), token_at(req.seq_id, 4)
    assert [(i.prior, i.ids) for _, m in door.new() for i in m.items] == [([t1], [t2])]
    assert (req.detok.epoch, req.detok.sent, req.detok.acked) == (1, 2, 1)
