"""The bus protocol: round trips, and rejection of anything malformed."""
import dataclasses

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos import protocol as p


def sample_plan():
    return p.StepPlan(step_id=3, seq_ids=p.i32([4, 9]), num_new=p.i32([2, 1]), start_pos=p.i32([0, 7]),
                      tokens=p.i32([5, 6, 7]), block_tables=p.i32([[2, -1], [0, 1]]), sample=p.i32([1, 1]),
                      temperature=np.float32([0, 0.7]), top_p=np.float32([1, 0.9]), top_k=p.i32([-1, 5]),
                      seed=np.int64([-1, 42]), gen_index=p.i32([0, 3]), top_logprobs=p.i32([-1, 2]))


def test_arrays_travel_as_extra_frames_and_round_trip():
    plan = sample_plan()
    frames = p.encode(plan)
    assert frames[0] == bytes([p.StepPlan.OPCODE])
    assert len(frames) == 2 + len(p.StepPlan.ARRAYS)
    back = p.decode(frames)
    for f in dataclasses.fields(plan):
        assert np.array_equal(getattr(back, f.name), getattr(plan, f.name))
    assert back.block_tables.shape == (2, 2)


def test_every_message_type_has_a_unique_opcode():
    ops = [m.OPCODE for m in p.ALL_MESSAGES]
    assert len(ops) == len(set(ops)) and len(ops) >= 20


def head(fields, version=p.PROTOCOL_VERSION, arrays=()):
    return msgpack.packb({"v": version, "f": fields, "a": list(arrays)})


@pytest.mark.parametrize("frames, why", [
    ([b"\x30"], "at least 2 frames"),
    ([b"\xee", head({})], "unknown opcode"),
    ([b"\x30\x30", head({})], "unknown opcode"),
    ([b"\x30", b"\xc1garbage"], "not msgpack"),
    ([b"\x30", msgpack.packb([1, 2])], "malformed header"),
    ([b"\x34", head({"request_id": "a", "reason": "x"}, version=99)], "protocol version"),
    ([b"\x34", head({"request_id": "a"})], "missing"),
    ([b"\x34", head({"request_id": "a", "reason": "x", "evil": 1})], "unknown"),
    ([b"\x34", head({"request_id": 5, "reason": "x"})], "request_id"),
    ([b"\x03", head({"name": True})], "name"),
    ([b"\x21", head({"request_id": "a", "error": None}, arrays=[["token_ids", "int32", [4]]]), b"\0" * 3],
     "bytes for shape"),
    ([b"\x21", head({"request_id": "a", "error": None}, arrays=[["token_ids", "object", [1]]]), b"\0" * 8],
     "bad array spec"),
])
def test_malformed_messages_are_rejected_with_a_reason(frames, why):
    with pytest.raises(p.BadMessage, match=why):
        p.decode(frames)


def test_bool_is_not_an_int():
    with pytest.raises(p.BadMessage):
        p.decode([b"\x31", head({"request_id": "a", "prompt_tokens": True})])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_random_frames_never_raise_anything_but_bad_message(frames):
    try:
        p.decode(frames)
    except p.BadMessage:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(p.ALL_MESSAGES), st.dictionaries(st.text(max_size=12), st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=8), max_size=6))
def test_random_msgpack_fields_never_raise_anything_but_bad_message(cls, fields):
    try:
        p.decode([bytes([cls.OPCODE]), msgpack.packb({"v": 1, "f": fields, "a": []})])
    except p.BadMessage:
        pass


def test_array_dimensions_whose_int64_product_wraps_are_rejected():
    """2**32 x 2**32 x 2**32 x 2**32 wraps to 0 in int64: with an empty frame it used to pass."""
    frames = p.encode(p.Encoded(request_id="r", token_ids=p.i32([]), error=None))
    head = msgpack.unpackb(frames[1])
    head["a"][0][2] = [2**32, 2**32, 2**32, 2**32]
    with pytest.raises(p.BadMessage, match="bytes for shape"):
        p.decode([frames[0], msgpack.packb(head), b""])
    head["a"][0][2] = [1] * 40   # more dimensions than any message has
    with pytest.raises(p.BadMessage, match="bad array spec"):
        p.decode([frames[0], msgpack.packb(head), b"\0\0\0\0"])


@pytest.mark.parametrize("msg, why", [
    (p.Encode(request_id="r", prompt="\ud800", messages=None), "UnicodeEncodeError"),
    (p.Submit(request_id="r", model="m", prompt="x", messages=None, prompt_token_ids=[2**64], params={},
              tenant="t"), "OverflowError"),
    (p.Query(query_id="q", what="x", args={"a": object()}), "TypeError"),
])
def test_what_cannot_be_written_raises_unencodable(msg, why):
    with pytest.raises(p.Unencodable, match=why):
        p.encode(msg)



@pytest.mark.parametrize("bad, why", [
    ({"rid": "r", "text": "x", "n": 1, "lp": None, "finish": None}, r"missing \['stop_hit'\]"),
    ({"rid": "r", "text": 3, "n": 1, "lp": None, "finish": None, "stop_hit": False}, r"items\[0\]\.text"),
    ({"rid": "r", "text": "x", "n": True, "lp": None, "finish": None, "stop_hit": False}, r"items\[0\]\.n"),
    ("not a map", "expected a map"),
])
def test_message_items_are_typed_and_checked_like_messages(bad, why):
    good = p.TextDeltas(items=[p.TextDelta(rid="r", text="x", n=1, lp=None, finish=None, stop_hit=False)])
    assert p.decode(p.encode(good)) == good
    frames = p.encode(good)
    head = msgpack.unpackb(frames[1])
    head["f"]["items"] = [bad]
    with pytest.raises(p.BadMessage, match=why):
        p.decode([frames[0], msgpack.packb(head)])


def model_info(**over) -> p.ModelInfo:
    fields = dict(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32", vocab_size=256, max_model_len=128,
                  weight_bytes=1000, eos_token_ids=[2], model_type="llama", model_dir="/m")
    return p.ModelInfo(**{**fields, **over})


def test_ready_carries_the_one_typed_info_of_its_role():
    ready = p.Ready(name="model-x", model=model_info())
    back = p.decode(p.encode(ready))
    assert back == ready and back.info == model_info() and back.tokenizer is None and back.io is None
    tok = p.decode(p.encode(p.Ready(name="t", tokenizer=p.TokenizerInfo(vocab_size=9, eos_token_id=None))))
    assert tok.info == p.TokenizerInfo(vocab_size=9, eos_token_id=None)
    with pytest.raises(ValueError, match="exactly one"):
        p.Ready(name="x")
    with pytest.raises(ValueError, match="exactly one"):
        p.Ready(name="x", model=model_info(), io=p.IoInfo(socket="s", pid=1))


def _with_field(msg, name, value) -> list:
    frames = p.encode(msg)
    head = msgpack.unpackb(frames[1])
    head["f"][name] = value
    return [frames[0], msgpack.packb(head)]


@pytest.mark.parametrize("bad, why", [
    ({"vocab_size": 9}, r"Ready\.tokenizer: missing \['eos_token_id'\]"),
    ({"vocab_size": "9", "eos_token_id": 1}, r"Ready\.tokenizer\.vocab_size"),
    ({"vocab_size": True, "eos_token_id": 1}, r"Ready\.tokenizer\.vocab_size"),
    ([9, 1], r"Ready\.tokenizer: unexpected list"),
])
def test_a_single_item_is_checked_like_a_message(bad, why):
    frames = _with_field(p.Ready(name="t", tokenizer=p.TokenizerInfo(vocab_size=9, eos_token_id=1)), "tokenizer", bad)
    with pytest.raises(p.BadMessage, match=why):
        p.decode(frames)


def test_a_ready_with_two_infos_or_none_is_a_bad_message():
    ready = p.Ready(name="t", tokenizer=p.TokenizerInfo(vocab_size=9, eos_token_id=1))
    with pytest.raises(p.BadMessage, match="exactly one"):
        p.decode(_with_field(ready, "tokenizer", None))
    with pytest.raises(p.BadMessage, match="exactly one"):
        p.decode(_with_field(ready, "io", {"socket": "s", "pid": 3}))


def test_the_wrong_item_type_cannot_be_sent():
    with pytest.raises(p.Unencodable, match="expected TokenizerInfo"):
        p.encode(p.Ready(name="t", tokenizer=p.IoInfo(socket="s", pid=1)))


def test_a_union_of_two_item_types_cannot_be_declared():
    with pytest.raises(TypeError, match="one item type"):
        @p.item
        class Either:
            x: p.TokenizerInfo | p.IoInfo


def test_query_replies_are_typed_records_that_round_trip():
    row = p.ProcessRow(name="io", role="io", state="running", pid=3, restarts=0, uptime_s=1.5, last_error=None)
    ps = p.QueryReply(query_id="q", ps=p.ProcessReport(processes=[row], requests=[], scheduler={"m": {}}))
    back = p.decode(p.encode(ps))
    assert back == ps and back.ok and back.answer.processes[0] == row
    models = p.QueryReply(query_id="q", models=[])
    assert p.decode(p.encode(models)).answer == []
    refused = p.decode(p.encode(p.QueryReply(query_id="q", error="unknown query 'x'")))
    assert not refused.ok and refused.error == "unknown query 'x'"
    assert p.decode(p.encode(p.QueryReply(query_id="q", data=None))).answer is None
    with pytest.raises(ValueError, match="at most one answer"):
        p.QueryReply(query_id="q", error="no", data={"x": 1})
    assert p.plain(back.ps) == {"processes": [dataclasses.asdict(row)], "requests": [], "scheduler": {"m": {}}}


@pytest.mark.parametrize("memory, why", [
    ({"m": {"device": "cpu"}}, r"QueryReply\.memory\['m'\]: missing"),
    ({"m": 3}, r"QueryReply\.memory\['m'\]: expected a map"),
    ({b"m": None}, r"QueryReply\.memory: unexpected key type"),   # (msgpack itself refuses int keys)
    (["m"], r"QueryReply\.memory: unexpected list"),
])
def test_a_map_of_items_is_checked_entry_by_entry(memory, why):
    frames = _with_field(p.QueryReply(query_id="q", memory={"m": None}), "memory", memory)
    with pytest.raises(p.BadMessage, match=why):
        p.decode(frames)


def test_a_row_of_a_list_of_items_is_checked():
    ps = p.QueryReply(query_id="q", ps=p.ProcessReport(processes=[], requests=[], scheduler={}))
    frames = _with_field(ps, "ps", {"processes": [{"name": "io"}], "requests": [], "scheduler": {}})
    with pytest.raises(p.BadMessage, match=r"QueryReply\.ps\.processes\[0\]: missing"):
        p.decode(frames)
