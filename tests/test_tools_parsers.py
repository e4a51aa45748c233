"""The Hermes tool-call parser (SmolLM2, Qwen2.5): whole texts, any split of them into
stream pieces, malformed calls, several calls, and text around them."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from llmos.openai_format.tool_parsers import HermesToolParser, ToolCall, parser_for

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'


def parse(text: str, pieces: list[int] | None = None, names=None) -> list:
    """Events for `text` fed whole, or cut at the given offsets; adjacent content merged."""
    p, events, cuts = HermesToolParser(names), [], [0, *(pieces or []), len(text)]
    for a, b in zip(cuts, cuts[1:]):
        events += p.feed(text[a:b])
    events += p.finish()
    merged = []
    for e in events:
        if merged and isinstance(e, str) and isinstance(merged[-1], str):
            merged[-1] += e
        else:
            merged.append(e)
    return [e if isinstance(e, str) else (e.name, json.loads(e.arguments)) for e in merged]


def test_one_call_is_parsed_and_layout_whitespace_is_not_content():
    assert parse(WEATHER) == [("get_weather", {"city": "Paris", "unit": "C"})]
    assert parse("\n" + WEATHER + "\n\n") == [("get_weather", {"city": "Paris", "unit": "C"})]


def test_text_outside_the_tags_stays_content_in_order():
    text = f"Let me look.\n{WEATHER}\nDone: it is warm."
    assert parse(text) == ["Let me look.", ("get_weather", {"city": "Paris", "unit": "C"}), "\nDone: it is warm."]


def test_several_calls_in_tags_and_in_a_list_as_smollm2_writes_them():
    two = WEATHER + '\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert parse(two) == [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {})]
    listed = '<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</tool_call>'
    assert parse(listed) == [("a", {"x": 1}), ("b", {})]


@pytest.mark.parametrize("inner", [
    '{"name": "f", "arguments": {"x": 1}',          # truncated JSON
    '{bad json}',
    '{"arguments": {}}',                             # no name
    '{"name": "has space", "arguments": {}}',        # not a function name
    '{"name": "f", "arguments": [1, 2]}',            # arguments not an object
    '"just a string"',
    '[]',
])
def test_malformed_json_inside_the_tags_is_left_as_content(inner):
    text = f"before <tool_call>{inner}</tool_call> after"
    assert parse(text) == [text]


def test_a_call_to_an_undeclared_tool_is_content():
    assert parse(WEATHER, names=frozenset({"other"})) == [WEATHER]
    assert parse(WEATHER, names=frozenset({"get_weather"})) == [("get_weather", {"city": "Paris", "unit": "C"})]


def test_arguments_written_as_a_json_string_are_read_and_sent_as_compact_json_text():
    p = HermesToolParser()
    (call,) = p.feed('<tool_call>{"name": "f", "arguments": "{\\"q\\": \\"é\\"}"}</tool_call>') + p.finish()
    assert isinstance(call, ToolCall) and call.arguments == '{"q": "é"}'
    assert call.id.startswith("call_") and len(call.id) == 29
    assert call.as_openai() == {"id": call.id, "type": "function",
                                "function": {"name": "f", "arguments": call.arguments}}


def test_an_unclosed_tag_at_the_end_is_a_call_when_its_json_parses_else_content():
    assert parse('<tool_call>\n{"name": "f", "arguments": {}}\n') == [("f", {})]
    assert parse('So <tool_call>{"name": "f", "argu') == ['So <tool_call>{"name": "f", "argu']


def test_a_partial_tag_is_held_back_until_known_and_released_when_it_is_not_a_tag():
    p = HermesToolParser()
    assert p.feed("a <tool") == ["a"]            # " <tool" might open a tag
    assert p.feed("box> b") == [" <toolbox> b"]  # it did not
    assert p.finish() == []
    p = HermesToolParser()
    assert p.feed("x <") == ["x"] and p.finish() == [" <"]


def test_plain_text_without_calls_comes_out_unchanged_with_its_whitespace():
    assert parse("  Hello,\n world.  \n") == ["  Hello,\n world.  \n"]
    assert parse("") == []


def test_the_parser_of_every_family_is_hermes():
    assert all(isinstance(parser_for(m), HermesToolParser) for m in ("smollm2", "qwen2.5-7b", "tiny"))


pieces = st.lists(st.integers(0, 400), max_size=12).map(sorted)
texts = st.lists(st.sampled_from([WEATHER, "Hi.", " ", "\n", "<tool_call>{bad}</tool_call>", "<", "<tool_",
                                  '<tool_call>{"name": "t", "arguments": {"k": [1, "</"]}}</tool_call>',
                                  "</tool_call>", "é!"]), max_size=8).map("".join)


@settings(max_examples=300, deadline=None)
@given(texts, pieces)
def test_any_split_of_a_text_into_stream_pieces_gives_the_events_of_the_whole(text, cuts):
    cuts = [c for c in cuts if c <= len(text)]
    assert parse(text, cuts) == parse(text)
