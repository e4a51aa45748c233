"""Tools in the chat template (the tokenizer driver's chat.py): a template that renders tools
(Qwen2.5's) gets them from transformers; one that does not (SmolLM2-135M's, so our tiny
test models') gets the same Hermes block written for it, and tool calls and results of the
history are rendered by both, never dropped."""
from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from llmos import protocol
from llmos.drivers.tokenizer.__main__ import TokenizerDriver
from llmos.drivers.tokenizer.chat import knows_tools, render

# Qwen2.5-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct), tools part.
QWEN25 = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}'''

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
HISTORY = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "content": "22 C, sunny", "tool_call_id": "call_1"},
    {"role": "tool", "content": "25 C, clear", "tool_call_id": "call_2"},
]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def qwen(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.chat_template = QWEN25
    return tok


def test_which_templates_render_tools(smol, qwen):
    assert not knows_tools(smol) and knows_tools(qwen)


def test_qwen25s_template_gets_the_tools_and_renders_calls_and_results(qwen):
    text = render(qwen, HISTORY, [WEATHER], True, False)
    assert text == qwen.apply_chat_template(_as_dicts(HISTORY), tools=[WEATHER], tokenize=False,
                                            add_generation_prompt=True)
    assert json.dumps(WEATHER) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n22 C, sunny\n</tool_response>\n<tool_response>\n25 C" in text


def test_a_template_without_tools_gets_the_same_hermes_block_and_turns(smol, qwen):
    ours, theirs = render(smol, HISTORY, [WEATHER], True, False), render(qwen, HISTORY, [WEATHER], True, False)
    # Qwen2.5's opens with its own identity line; from the tools block on they are the same text.
    assert ours.split("# Tools", 1)[1] == theirs.split("# Tools", 1)[1]
    assert ours.startswith("<|im_start|>system\n# Tools")


def test_tools_join_an_existing_system_message_and_a_plain_chat_is_unchanged(smol):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = render(smol, chat, [WEATHER], True, False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and text.count("<|im_start|>system") == 1
    assert render(smol, chat, None, True, False) == smol.apply_chat_template(chat, tokenize=False,
                                                                             add_generation_prompt=True)


def test_the_driver_encodes_a_chat_with_tools_from_its_encode_message(smol):
    drv = TokenizerDriver(smol)
    with_tools = drv.encode(protocol.Encode(request_id="a", prompt=None, messages=HISTORY, tools=[WEATHER]))
    without = drv.encode(protocol.Encode(request_id="b", prompt=None, messages=HISTORY[:1]))
    assert with_tools.error is None and without.error is None
    text = smol.decode(with_tools.token_ids.tolist())
    assert "get_weather" in text and "<tool_response>\n25 C, clear" in text
    assert len(with_tools.token_ids) > len(without.token_ids)
    bad = drv.encode(protocol.Encode(request_id="c", prompt=None, tools=None,
                                     messages=[{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}]))
    assert bad.error and np.asarray(bad.token_ids).size == 0


def _as_dicts(messages):
    """The history as transformers' docs pass it: a call's arguments as a mapping."""
    out = []
    for m in messages:
        m = dict(m)
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out
