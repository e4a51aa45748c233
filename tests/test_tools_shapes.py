"""tools / tool_choice / tool messages as parsed (400s naming the field path), and tool
calls as ResponseShaper answers them: whole, and as OpenAI's streaming deltas (checked
by the `openai` SDK's own stream accumulator)."""
from __future__ import annotations

import json

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llmos.openai_format import ApiError, ResponseShaper, parse_chat
from llmos.protocol import OutputItem

USER = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _deep(n: int) -> dict:
    d: dict = {}
    for _ in range(n):
        d = {"type": "object", "properties": {"x": d}}
    return d


def chat(**body):
    return parse_chat({"model": "smollm2", "messages": USER, **body})


def error(**body) -> ApiError:
    with pytest.raises(ApiError) as info:
        chat(**body)
    assert info.value.status == 400
    return info.value


def test_tools_and_tool_choice_are_parsed_with_openai_defaults():
    assert (chat().tools, chat().tool_choice) == (None, "none")
    req = chat(tools=[WEATHER, TIME])
    assert req.tool_choice == "auto" and [t["function"]["name"] for t in req.tools] == ["get_weather", "get_time"]
    assert chat(tools=[]).tools is None
    assert (chat(tools=[WEATHER], tool_choice="required").tool_choice, chat(tools=[WEATHER], tool_choice="none")
            .tool_choice) == ("required", "none")
    named = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert (named.tool_choice, named.tool_name) == ("function", "get_time")


@pytest.mark.parametrize("body,param", [
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": [WEATHER] * 129}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [TIME, {"type": "function", "function": {"name": "bad name"}}]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f" * 65}}]}, "tools[0].function.name"),
    ({"tools": [TIME, TIME]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"d": "x" * 70_000}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": _deep(40)}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "tools[0].function.description"),
    ({"tools": [{"type": "function", "function": {"name": "f", "extra": 1}}]}, "tools[0].function.extra"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tools": [WEATHER], "tool_choice": {"type": "x", "function": {"name": "get_weather"}}}, "tool_choice.type"),
])
def test_bad_tools_and_tool_choice_are_400_naming_the_field_path(body, param):
    assert error(**body).param == param


def test_tool_messages_and_assistant_calls_in_the_history_are_kept():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    req = chat(messages=[*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "content": "22 C", "tool_call_id": "call_1"}], tools=[WEATHER])
    assert req.messages[1:] == [{"role": "assistant", "content": "", "tool_calls": [call]},
                                {"role": "tool", "content": "22 C", "tool_call_id": "call_1"}]


@pytest.mark.parametrize("message,param", [
    ({"role": "tool", "content": "22 C"}, "messages[1].tool_call_id"),
    ({"role": "user", "content": "x", "tool_calls": []}, "messages[1].tool_calls"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
     "messages[1].tool_calls[0].id"),
    ({"role": "assistant", "tool_calls": "f()"}, "messages[1].tool_calls"),
])
def test_bad_tool_messages_are_400_naming_the_field_path(message, param):
    assert error(messages=[*USER, message]).param == param


def outputs(pieces: list[str], finish: str = "stop") -> list[OutputItem]:
    out = [OutputItem(rid="r", index=0, text=p, n=1, ids=[i], lp=None, finish=None, usage=None)
           for i, p in enumerate(pieces)]
    out[-1].finish, out[-1].usage = finish, {"prompt_tokens": 5, "completion_tokens": len(pieces)}
    return out


def shaped(req, pieces, finish="stop") -> tuple[dict, list[dict]]:
    """The whole answer of one shaper and the chunks of another, for the same items."""
    whole, stream = ResponseShaper(req, "r", 5), ResponseShaper(req, "r", 5)
    chunks = stream.role_chunks()
    for item in outputs(pieces, finish):
        whole.add(item)
        stream.add(item)
        chunks += stream.chunks(item)
    return whole.response(), chunks


def pieces_of(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_a_call_is_the_message_tool_calls_with_finish_reason_tool_calls():
    body, _ = shaped(chat(tools=[WEATHER]), pieces_of(CALL))
    choice = ChatCompletion.model_validate(body).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_deltas_have_openai_shape_and_add_up_to_the_whole_answer():
    text = "Checking.\n" + CALL + '\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    body, chunks = shaped(chat(tools=[WEATHER, TIME], stream=True), pieces_of(text, 2))
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    assert [sorted(c) for c in calls] == [["function", "id", "index", "type"], ["function", "index"]] * 2
    assert [(c["index"], c["function"].get("name")) for c in calls] == [(0, "get_weather"), (0, None),
                                                                        (1, "get_time"), (1, None)]
    assert calls[0]["function"]["arguments"] == ""
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Paris"}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    state = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    final = state.current_completion_snapshot.choices[0]
    whole = ChatCompletion.model_validate(body).choices[0]
    assert final.finish_reason == whole.finish_reason == "tool_calls"
    assert final.message.content == whole.message.content == "Checking."
    assert [(t.function.name, t.function.arguments) for t in final.message.tool_calls] == [
        (t.function.name, t.function.arguments) for t in whole.message.tool_calls]
    assert [t.id for t in final.message.tool_calls] == [c["id"] for c in calls[::2]]


def test_without_parsing_the_tags_are_content():
    for req in (chat(tools=[WEATHER], tool_choice="none"), chat()):
        body, chunks = shaped(req, pieces_of(CALL))
        assert body["choices"][0]["message"] == {"role": "assistant", "content": CALL}
        assert body["choices"][0]["finish_reason"] == "stop"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == CALL


def test_a_malformed_call_stays_content_and_a_cut_one_keeps_finish_length():
    bad = '<tool_call>{"name": "get_weather", "arguments": {"city": }</tool_call>'
    body, chunks = shaped(chat(tools=[WEATHER], stream=True), pieces_of(bad))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": bad}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == bad
    body, chunks = shaped(chat(tools=[WEATHER], stream=True), pieces_of(CALL), finish="length")
    assert body["choices"][0]["finish_reason"] == chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_named_choice_parses_only_calls_of_that_function():
    named = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    body, _ = shaped(named, [CALL])
    assert body["choices"][0]["message"]["content"] == CALL and "tool_calls" not in body["choices"][0]["message"]


def test_the_ids_of_a_whole_answer_do_not_change_when_it_is_asked_twice():
    shaper = ResponseShaper(chat(tools=[WEATHER]), "r", 5)
    for item in outputs([CALL]):
        shaper.add(item)
    assert shaper.response()["choices"] == shaper.response()["choices"]


def test_required_and_named_choices_constrain_decoding_to_one_call_of_the_right_tools():
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark
    assert chat(tools=[WEATHER]).params.structured is None
    named = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    required = chat(tools=[WEATHER, TIME], tool_choice="required")

    def accepts(req, text: str) -> bool:
        grammar = LLMatcher.grammar_from_lark(any_to_lark(req.params.structured["spec"]))
        return LLMatcher.validate_grammar_with_warnings(grammar)[0] is False and _matches(grammar, text)
    weather = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    time_call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert accepts(required, weather) and accepts(required, time_call) and accepts(named, time_call)
    assert not accepts(named, weather)
    assert not accepts(required, '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>')  # city


def _matches(grammar: str, text: str) -> bool:
    """Whether llguidance's matcher accepts exactly `text` (over a byte tokenizer)."""
    import llguidance
    from llguidance import LLMatcher
    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))
    m = LLMatcher(tok, grammar)
    return m.consume_tokens(list(text.encode())) and m.is_accepting()


class _Bytes:
    """The smallest tokenizer: one token per byte, and an end-of-sequence token."""
    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([b]) for b in range(256)] + [b"</s>"]
    special_token_ids = [256]

    def __call__(self, s):
        return list(s if isinstance(s, bytes) else s.encode())


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_object"}}, "tool_choice"),
    ({"ignore_eos": True}, "ignore_eos"),
])
def test_a_required_call_cannot_be_combined_with_what_overrides_its_grammar(extra, param):
    assert error(tools=[WEATHER], tool_choice="required", **extra).param == param


def test_a_batch_line_with_tools_is_submitted_with_them_and_its_result_has_the_calls():
    from llmos.kernel.jobs.batchfile import check_line, submit_of
    body = {"model": "smollm2", "messages": USER, "tools": [WEATHER]}
    line = check_line(1, json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                                     "body": body}))
    assert submit_of(line, "r").tools == line.parsed.tools == [WEATHER]
    shaper = ResponseShaper(line.parsed, "r", 5)   # as the job manager shapes the line's result
    for item in outputs([CALL]):
        shaper.add(item)
    assert shaper.response()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
