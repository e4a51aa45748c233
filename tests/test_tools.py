"""Tool calls through a real daemon and the `openai` SDK: a two-turn conversation (a call,
then the tool's result sent back and answered), the call streamed as deltas, the tools in
the prompt, and bad tools refused with the field's path while the next request is served.

The tiny random model never writes a call by itself: turn 1 names the function
(tool_choice), which constrains decoding to a call, so the structure is certain."""
from __future__ import annotations

import json

import httpx
import openai
import pytest


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 12}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": [], "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def daemon(tiny_daemon):
    return tiny_daemon


@pytest.fixture()
def client(daemon):
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=120)
    yield openai.OpenAI(base_url="http://llmos/v1", api_key="local", http_client=http, max_retries=0)
    http.close()


def test_a_two_turn_tool_conversation_through_the_openai_sdk(client):
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice=NAMED,
                                           temperature=0, max_tokens=200)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str)
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 22})}]
    second = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER, TIME],
                                            temperature=0, max_tokens=8)
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.tool_calls is None
    assert isinstance(answer.message.content, str) and second.usage.completion_tokens > 0
    # The call and its result were rendered into turn 2's prompt, not dropped.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + len(call.function.arguments) // 8


def test_a_required_call_streams_as_openai_deltas(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME],
                                                 tool_choice="required", temperature=0, max_tokens=200, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    head, rest = deltas[0], deltas[1:]
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name in ("get_weather", "get_time") and head.function.arguments == ""
    assert rest and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert isinstance(json.loads("".join(d.function.arguments for d in rest)), dict)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_tools_reach_the_prompt_and_none_keeps_them_without_parsing(client):
    plain = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=1)
    none = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=4, temperature=0)
    assert none.usage.prompt_tokens > plain.usage.prompt_tokens + 40   # the tools block, as OpenAI bills it
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    rendered = client.post("/chat/completions/render", cast_to=httpx.Response,
                           body={"model": "tiny", "messages": ASK, "tools": [WEATHER]}).json()
    assert rendered["count"] == none.usage.prompt_tokens   # the render route counts the tools too


@pytest.mark.parametrize("kwargs,param", [
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER] * 129}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [*ASK, {"role": "tool", "content": "22 C"}]}, "messages[1].tool_call_id"),
])
def test_bad_tools_are_a_400_naming_the_field_and_the_next_request_is_served(client, kwargs, param):
    body = {"model": "tiny", "messages": ASK, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    assert info.value.status_code == 400 and info.value.body["param"] == param, info.value.body
    ok = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_smollm2_asked_for_a_call_calls_the_tool_with_the_city_and_answers_its_result(smollm2_daemon):
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(smollm2_daemon.socket)), timeout=300) as http:
        client = openai.OpenAI(base_url="http://llmos/v1", api_key="local", http_client=http, max_retries=0)
        first = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required",
                                               temperature=0, max_tokens=60)
        (call,) = first.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and "Paris" in json.loads(call.function.arguments)["city"]
        history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "22 degrees Celsius and sunny"}]
        second = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER], temperature=0,
                                                max_tokens=40)
        assert second.choices[0].message.content and second.choices[0].message.tool_calls is None
