"""Penalties, logit bias and min_p on their way in: the OpenAI parser (HTTP and batch lines
alike), the kernel's own check with the vocabulary, and the step plan, which carries the
controls and the token history they need for the sequences that ask, and nothing for the others."""
from __future__ import annotations

import json

import pytest
from scheduler_kit import make_request, priority_scheduler, run_step

from llmos import protocol
from llmos.kernel.admission import check_submit
from llmos.kernel.jobs.batchfile import LineError, check_line
from llmos.openai_format import ApiError, parse_chat, parse_completion
from llmos.sampling_params import InvalidParam, SamplingParams

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}
GOOD = {"presence_penalty": -2, "frequency_penalty": 2.0, "repetition_penalty": 1.15, "min_p": 0.05,
        "logit_bias": {"0": -100, "42": 100, "0007": 1.5}}

BAD = [
    ("presence_penalty", 2.01), ("presence_penalty", -3), ("presence_penalty", "0.5"), ("presence_penalty", True),
    ("presence_penalty", float("nan")), ("frequency_penalty", 2.5), ("frequency_penalty", float("inf")),
    ("frequency_penalty", [0]), ("repetition_penalty", 0), ("repetition_penalty", -1), ("repetition_penalty", 2.5),
    ("repetition_penalty", False), ("min_p", -0.1), ("min_p", 1.01), ("min_p", "0"), ("min_p", float("nan")),
    ("logit_bias", {"-1": 1}), ("logit_bias", {"x": 1}), ("logit_bias", {"1.5": 1}), ("logit_bias", {" 1": 1}),
    ("logit_bias", {"+1": 1}), ("logit_bias", {"": 1}), ("logit_bias", {"²": 1}), ("logit_bias", {"2147483648": 1}),
    ("logit_bias", {"99999999999": 1}), ("logit_bias", {"1": 100.5}), ("logit_bias", {"1": -101}),
    ("logit_bias", {"1": "5"}), ("logit_bias", {"1": True}), ("logit_bias", {"1": None}), ("logit_bias", [[1, 5]]),
    ("logit_bias", "x"), ("logit_bias", {"7": 1, "07": 2}), ("logit_bias", {str(i): 1 for i in range(301)}),
]


@pytest.mark.parametrize("parse, base", [(parse_chat, CHAT), (parse_completion, COMPLETION)])
def test_good_values_are_kept_and_survive_the_bus(parse, base):
    p = parse({**base, **GOOD}).params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (-2.0, 2.0, 1.15, 0.05)
    assert p.logit_bias == {"0": -100.0, "42": 100.0, "7": 1.5} and p.bias_pairs == ([0, 42, 7], [-100.0, 100.0, 1.5])
    assert p.logits_controls
    wire = protocol.decode(protocol.encode(submit(p.to_dict())))   # msgpack map keys must be strings
    assert SamplingParams.from_dict(wire.params) == p
    assert parse({**base, **{k: None for k in GOOD}}).params == parse(base).params   # null: the default
    assert not parse({**base, "presence_penalty": 0, "repetition_penalty": 1, "logit_bias": {}}).params.logits_controls
    ok = parse({**base, "logit_bias": {str(i): 1 for i in range(300)}}).params   # OpenAI's 300 entries
    assert len(ok.logit_bias) == 300


@pytest.mark.parametrize("name, value", BAD)
@pytest.mark.parametrize("parse, base", [(parse_chat, CHAT), (parse_completion, COMPLETION)])
def test_bad_values_are_a_400_naming_the_parameter(parse, base, name, value):
    with pytest.raises(ApiError) as err:
        parse({**base, name: value})
    assert (err.value.status, err.value.param) == (400, name), err.value.message
    assert parse(base).params == SamplingParams.from_dict({})   # the next request is parsed as before


@pytest.mark.parametrize("name, value", [(n, v) for n, v in BAD[::3] if v == v and v not in (float("inf"),)])
def test_a_batch_line_is_checked_by_the_same_parser(name, value):
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {**CHAT, name: value}}
    with pytest.raises(LineError, match=f"body.{name}: "):
        check_line(1, json.dumps(line))
    line["body"] = {**CHAT, **GOOD}
    assert check_line(1, json.dumps(line)).parsed.params.logit_bias["42"] == 100.0


def submit(params: dict) -> protocol.Submit:
    return protocol.Submit(request_id="r", model="m", prompt="hi", messages=None, prompt_token_ids=None,
                           params=params, tenant="t")


def test_the_kernel_checks_again_and_bounds_bias_ids_by_the_vocabulary():
    assert check_submit(submit({"logit_bias": {"99": 1.0}}), 512, 100).bias_pairs == ([99], [1.0])
    with pytest.raises(InvalidParam) as err:
        check_submit(submit({"logit_bias": {"3": 1.0, "100": 1.0}}), 512, 100)
    assert err.value.param == "logit_bias" and "vocabulary size 100" in str(err.value)
    for name, value in BAD[::3]:   # what the io driver refuses, the kernel refuses too
        with pytest.raises(InvalidParam) as err:
            check_submit(submit({name: value}), 512, 100)
        assert err.value.param == name


def test_the_plan_carries_controls_and_history_only_for_the_sequences_that_ask():
    sched, _ = priority_scheduler(blocks=64, seqs=8)
    plain = make_request(6, temperature=0.8, seed=1)
    minp = make_request(6, min_p=0.1, temperature=1.0)
    freq = make_request(6, frequency_penalty=0.5)
    rep = make_request(6, repetition_penalty=1.2)
    bias = make_request(6, logit_bias={"5": 2.0, "9": -1.0})
    reqs = [plain, minp, freq, rep, bias]
    for r in reqs:
        sched.add(r)
    first = run_step(sched)   # the prompts' prefill: every row samples its first token
    assert [protocol.plain(c) for c in first.plan.controls] == [
        control(1, minp), control(2, freq, output=[]), control(3, rep, output=[], prompt=rep.prompt_ids),
        control(4, bias, bias_ids=[5, 9], bias_values=[2.0, -1.0])]
    for _ in range(3):
        step = run_step(sched)
    rows = {int(c.row): c for c in step.plan.controls}
    seq_row = {int(s): i for i, s in enumerate(step.plan.seq_ids)}
    assert seq_row[plain.seq_id] not in rows   # no penalty, no bias, no min_p: nothing travels
    assert rows[seq_row[freq.seq_id]].output_ids == freq.output.ids[:-1] and len(freq.output.ids) == 4
    assert rows[seq_row[rep.seq_id]].prompt_ids == rep.prompt_ids
    assert rows[seq_row[minp.seq_id]].output_ids == [] and rows[seq_row[bias.seq_id]].output_ids == []
    assert not run_step_plain_only().plan.controls


def control(row, req, output=(), prompt=(), bias_ids=(), bias_values=()) -> dict:
    x = req.params
    return dict(row=row, min_p=x.min_p, presence_penalty=x.presence_penalty, frequency_penalty=x.frequency_penalty,
                repetition_penalty=x.repetition_penalty, output_ids=list(output), prompt_ids=list(prompt),
                bias_ids=list(bias_ids), bias_values=list(bias_values))


def run_step_plain_only():
    sched, _ = priority_scheduler()
    sched.add(make_request(5, temperature=1.0, top_k=5, seed=3))
    return run_step(sched)
