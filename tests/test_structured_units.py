"""Structured outputs below the daemon: the driver's GrammarBook (masks follow the grammar,
EOS only where it accepts, a row is held while its grammar builds, a fresh book - a
restarted driver - rebuilds the same matcher from the tokens alone, a token outside the
grammar fails that row), the sampler's mask, the kernel's side of a hold (the row's last
position is planned again, nothing is appended) and the spec's bounds."""
from __future__ import annotations

import json
import threading
from concurrent.futures import wait

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from llmos import grammar_spec, protocol
from llmos.drivers.model import grammar
from llmos.drivers.model.grammar import GrammarBook
from llmos.drivers.model.sampling import sample
from llmos.kernel.step_check import BadStepResult, check_result
from llmos.kernel.step_plan import build_plan
from scheduler_kit import VOCAB, answer, make_request, priority_scheduler

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["n"], "additionalProperties": False}
EOS = 2


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def row(output_ids, spec=SCHEMA, r=0) -> protocol.GrammarRow:
    c = grammar_spec.json_schema(spec)
    return protocol.GrammarRow(row=r, key=grammar_spec.key(c), kind=c["kind"], spec=c["spec"],
                               output_ids=list(output_ids))


def ready(book: GrammarBook, g: protocol.GrammarRow) -> grammar.Masks:
    book.start([g])
    wait([book._templates[g.key][0]], timeout=60)   # wait for the build: the test's choice, never the runner's
    return book.masks([g], np.array([7]), np.array([0]))


def test_masks_follow_the_grammar_and_a_fresh_book_rebuilds_from_the_tokens(tiny_llama_dir, tok):
    ids = tok.encode('{"n": 42}', add_special_tokens=False)
    book = GrammarBook(tiny_llama_dir, 49152, [EOS])
    for k, t in enumerate(ids):
        m = ready(book, row(ids[:k]))
        assert m.allowed[0, t] and not m.allowed[0, EOS], k   # the next token of a valid output; no end yet
        assert m.allowed[0].sum() < 49152
    done = ready(book, row(ids))
    assert done.allowed[0, EOS] and done.allowed[0].sum() == 1   # complete: only EOS
    assert book.rebuilds == 1                                    # one matcher, advanced token by token
    fresh = GrammarBook(tiny_llama_dir, 49152, [EOS])            # a restarted driver: the tokens alone
    assert torch.equal(ready(fresh, row(ids[:3])).allowed, ready(book, row(ids[:3])).allowed)
    assert book.rebuilds == 2   # (book saw a shorter history than its matcher's: rebuilt, not trusted)


def test_a_row_is_held_while_its_grammar_builds_and_a_token_off_the_grammar_fails_it(tiny_llama_dir, monkeypatch):
    gate = threading.Event()
    book = GrammarBook(tiny_llama_dir, 49152, [EOS])
    build = book._build_tokenizer
    monkeypatch.setattr(book, "_build_tokenizer", lambda: (gate.wait(60), build())[1])
    g = row([])
    book.start([g])
    held = book.masks([g], np.array([7]), np.array([0]))
    assert held.held == [7] and held.allowed is None and not held.errors
    monkeypatch.setattr(grammar, "COMPILE_TIMEOUT_S", -1.0)   # a build past its time fails its row alone
    late = book.masks([g], np.array([7]), np.array([0]))
    assert late.held == [] and late.errors[0][0] == 7 and "longer than" in late.errors[0][1]
    monkeypatch.setattr(grammar, "COMPILE_TIMEOUT_S", 10.0)
    gate.set()
    assert ready(book, g).held == []
    bad = ready(book, row([EOS]))   # EOS before any JSON: the output left the grammar
    assert bad.errors and bad.errors[0][0] == 7 and "grammar" in bad.errors[0][1]


def test_a_bad_spec_fails_its_row_not_the_step(tiny_llama_dir):
    book = GrammarBook(tiny_llama_dir, 49152, [EOS])
    g = protocol.GrammarRow(row=0, key=grammar_spec.key({"kind": "regex", "spec": "(("}), kind="regex", spec="((",
                            output_ids=[])
    m = ready(book, g)
    assert m.errors and m.errors[0][0] == 7 and "regex" in m.errors[0][1]
    forged = protocol.GrammarRow(row=0, key="0" * 32, kind="regex", spec="a", output_ids=[])
    assert "key" in ready(book, forged).errors[0][1]


def test_the_sampler_never_picks_a_masked_token():
    logits = torch.randn(3, 50)
    allowed = torch.zeros(2, 50, dtype=torch.bool)
    allowed[0, [5, 9]] = True
    allowed[1, 17] = True
    common = (np.zeros(3, np.float32), np.ones(3, np.float32), np.full(3, -1), np.full(3, -1), np.zeros(3, np.int32),
              np.full(3, -1))
    greedy = sample(logits, *common, allowed=(np.array([0, 2]), allowed))
    assert greedy.tokens[0] == (5 if logits[0, 5] > logits[0, 9] else 9) and greedy.tokens[2] == 17
    assert greedy.tokens[1] == int(logits[1].argmax())   # unconstrained row: untouched
    for seed in range(20):
        s = sample(logits, np.ones(3, np.float32), *common[1:3], np.full(3, seed), np.zeros(3, np.int32),
                   np.full(3, -1), allowed=(np.array([0, 2]), allowed))
        assert s.tokens[0] in (5, 9) and s.tokens[2] == 17
    every = torch.zeros(3, 50, dtype=torch.bool)
    every[0, 3], every[1, 4], every[2, 5] = True, True, True
    for order in ([0, 1, 2], [2, 0, 1]):   # in plan order, or not: the same rows get the same masks
        s = sample(logits, *common, allowed=(np.array(order), every[order]))
        assert s.tokens.tolist() == [3, 4, 5]


def test_a_held_row_gets_no_token_and_its_last_position_is_planned_again():
    sched, _ = priority_scheduler()
    req = make_request(6, structured=grammar_spec.json_schema(SCHEMA))
    sched.add(req)
    batch = sched.schedule()
    plan = protocol.decode(protocol.encode(build_plan(1, batch, sched.step_ops())))
    assert [g.row for g in plan.grammars] == [0] and plan.grammars[0].output_ids == []
    result = answer(plan)
    result.held = [req.seq_id]
    check_result(plan, result, VOCAB)
    assert sched.update_from_output(batch, result) == [] and req.output.ids == []
    again = sched.schedule()
    assert [(s.num_new, s.sample) for s in again] == [(1, True)] and req.kv.num_computed == 5
    sched.update_from_output(again, answer(build_plan(2, again, sched.step_ops())))
    assert len(req.output.ids) == 1
    sched.check_integrity()


def test_a_result_holding_an_unconstrained_row_is_refused():
    sched, _ = priority_scheduler()
    sched.add(make_request(4))
    plan = build_plan(1, sched.schedule(), sched.step_ops())
    for field, value in (("held", [int(plan.seq_ids[0])]), ("grammar_errors", [[int(plan.seq_ids[0]), "x"]])):
        result = answer(plan)
        setattr(result, field, value)
        with pytest.raises(BadStepResult):
            check_result(plan, result, VOCAB)


@pytest.mark.parametrize("raw, why", [
    ({"kind": "json", "spec": "[1]"}, "object or a boolean"),
    ({"kind": "json", "spec": "x" * (grammar_spec.MAX_SPEC_BYTES + 1)}, "bytes"),
    ({"kind": "json", "spec": '{"a":' * 40 + "{}" + "}" * 40}, "deeper"),
    ({"kind": "json", "spec": '{"a":' * 20 + "{}" + "}" * 20}, None),
    ({"kind": "lua", "spec": "x"}, "unknown"),
    ({"kind": "choice", "spec": json.dumps(["a"] * 300)}, "choice"),
    ({"kind": "regex", "spec": ""}, "non-empty"),
])
def test_spec_bounds(raw, why):
    if why is None:
        assert grammar_spec.normalize(raw)["kind"] == "json"
        return
    with pytest.raises(grammar_spec.BadSpec, match=why):
        grammar_spec.normalize(raw)
