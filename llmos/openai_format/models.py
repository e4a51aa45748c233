"""The request bodies of the OpenAI-compatible routes as pydantic models: the one description
of what /v1/chat/completions, /v1/completions and the tokenizer routes accept, from which
validation (openai_format/validation.py) and GET /openapi.json (openai_format/openapi.py) are
both made. Batch files, uploads and POST /v1/batches: batch_models.py.

Contract: a body that validates is well typed and every field is within the bounds below
(lengths, ranges, counts; the constants are sampling_params', tools' and grammar_spec's, so
the kernel's own check of a Submit uses the same numbers). What needs more than one field or
a grammar engine (top_logprobs needs logprobs, n x max_tokens, a schema llguidance refuses,
tool_choice naming a declared tool) is requests.py's, after validation.

Strict types (no "8" for 8, no 8.0 or true for an integer, no NaN); every string is checked
to be valid Unicode (a lone surrogate cannot cross the bus). Unknown fields are refused in
the bodies and in every object of OpenAI's with a closed shape (tools, tool calls,
response_format, tool_choice); chat messages, their content parts and stream_options ignore
fields they do not name, as they always did (clients send `name`, `refusal`, ...). Every
list is bounded and stops at its first bad element (fail_fast), so a hostile body of a
million bad items makes one error, not a million.
"""
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from llmos import grammar_spec
from llmos.openai_format import tools as tool_rules
from llmos.sampling_params import (MAX_CHOICES, MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES, MAX_MESSAGES, MAX_PENALTY,
                                   MAX_PROMPT_CHARS, MAX_PROMPT_TOKEN_IDS, MAX_REPETITION_PENALTY, MAX_STOP_CHARS,
                                   MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, MAX_TENANT_CHARS, MAX_TIMEOUT_S,
                                   MAX_TOKEN_ID, MAX_TOKENS_LIMIT, MAX_TOP_K, MAX_TOP_LOGPROBS, SEED_MAX, SEED_MIN)

MAX_NAME_CHARS = 256          # model names and string priorities
MAX_TEXT = MAX_PROMPT_CHARS   # a string with no bound of its own (the body cap, 32 MiB, is the real one)


class Body(BaseModel):
    """A request body, or an object of OpenAI's with a closed shape: unknown fields are refused."""
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, hide_input_in_errors=True)


class Open(BaseModel):
    """An object whose fields we do not all name (messages, content parts): the others are ignored."""
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, hide_input_in_errors=True)


def text(max_length: int = MAX_TEXT, min_length: int = 0, **kw):
    return Annotated[str, Field(min_length=min_length, max_length=max_length, **kw)]


def integer(lo: int, hi: int, **kw):
    return Annotated[int, Field(ge=lo, le=hi, **kw)]


def number(lo: float, hi: float, *, above: bool = False, **kw):
    """A number in [lo, hi] (in (lo, hi] with `above`); integers are numbers too."""
    bound = {"gt": lo} if above else {"ge": lo}
    return Annotated[float, Field(**bound, le=hi, **kw)]


def bounded_list(item, max_length: int, min_length: int = 0, **kw):
    return Annotated[list[item], Field(min_length=min_length, max_length=max_length, fail_fast=True, **kw)]


def only(*values, description: str | None = None):
    """A field accepted only at its no-op value (or null): what the hand-written parser took,
    `value == allowed` and not a boolean where the allowed value is not one (best_of 1.0 is 1)."""
    def same(v):
        for a in values:
            if v is a or v == a and type(v) is not bool:
                return a
        raise PydanticCustomError("literal_error", "Input should be {expected}",
                                  {"expected": " or ".join(map(repr, values))})
    return Annotated[Literal[values], BeforeValidator(same),
                     Field(description=description or "accepted only at this value (it has no effect here)")]


Ignored = Annotated[Any, Field(description="OpenAI's; accepted and ignored (no effect on a local model's output)")]
Name = text(64, 1, pattern=r"^[a-zA-Z0-9_-]{1,64}$")   # a function's name (tools.NAME)
TokenId = integer(0, MAX_TOKEN_ID)
Seconds = number(0, MAX_TIMEOUT_S, above=True)
JsonSchema = Annotated[dict[str, Any], Field(description="a JSON schema")]


# ---------------------------------------------------------------- chat messages


class TextPart(Open):
    type: Literal["text"]
    text: text(MAX_PROMPT_CHARS)


Content = Union[text(MAX_PROMPT_CHARS), bounded_list(TextPart, MAX_MESSAGES)]


class ToolCallFunction(Body):
    name: Name
    arguments: text(tool_rules.MAX_ARGUMENTS_CHARS, description="the call's arguments, a JSON object as text")


class ToolCall(Body):
    id: text(tool_rules.MAX_CALL_ID_CHARS, 1)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class SystemMessage(Open):
    role: Literal["system", "developer"]
    content: Content
    tool_calls: None = Field(None, description="only assistant messages carry tool calls")


class UserMessage(Open):
    role: Literal["user"]
    content: Content
    tool_calls: None = Field(None, description="only assistant messages carry tool calls")


class AssistantMessage(Open):
    role: Literal["assistant"]
    content: Content | None = Field(None, description="null (or absent) in a turn that only called tools")
    tool_calls: bounded_list(ToolCall, tool_rules.MAX_TOOL_CALLS) | None = None


class ToolMessage(Open):
    role: Literal["tool"]
    content: Content
    tool_call_id: text(tool_rules.MAX_CALL_ID_CHARS, 1, description="the id of the call this message answers")
    tool_calls: None = Field(None, description="only assistant messages carry tool calls")


Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]


# ---------------------------------------------------------------- tools


class FunctionDef(Body):
    name: Name
    description: text(tool_rules.MAX_DESCRIPTION_CHARS) | None = None
    parameters: JsonSchema | None = Field(None, description=f"a JSON schema of at most {tool_rules.MAX_SCHEMA_CHARS} "
                                          f"bytes and {tool_rules.MAX_SCHEMA_DEPTH} levels")
    strict: bool | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Body):
    name: Name


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


# ---------------------------------------------------------------- structured outputs


class TextFormat(Body):
    type: Literal["text"]


class JsonObjectFormat(Body):
    type: Literal["json_object"]


class JsonSchemaSpec(Body):
    name: text() | None = None
    schema_: JsonSchema | bool = Field(alias="schema")
    strict: bool | None = None
    description: text(tool_rules.MAX_DESCRIPTION_CHARS) | None = None


class JsonSchemaFormat(Body):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[Union[TextFormat, JsonObjectFormat, JsonSchemaFormat], Field(discriminator="type")]
Spec = text(grammar_spec.MAX_SPEC_BYTES, 1)
Choices = bounded_list(text(grammar_spec.MAX_CHOICE_CHARS, 1), grammar_spec.MAX_CHOICE_OPTIONS, 1)
GuidedJson = Union[JsonSchema, bool, Annotated[Spec, Field(description="a JSON schema as text")]]


class StructuredOutputs(Body):
    """vLLM's structured_outputs: give one of these (its other fields only as null or false)."""
    json_: GuidedJson | None = Field(None, alias="json")
    regex: Spec | None = None
    choice: Choices | None = None
    grammar: Spec | None = None
    json_object: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _given(cls, data):
        """null and false mean "not given", for any field, as vLLM's own parser takes them."""
        return {k: v for k, v in data.items() if v is not None and v is not False} if isinstance(data, dict) else data


class StreamOptions(Open):
    include_usage: bool = False


# ---------------------------------------------------------------- the bodies


class _Generation(Body):
    """What /v1/completions and /v1/chat/completions share: OpenAI's fields and our extensions.
    A field given as null is not given, one this API does not know included."""
    model: text(MAX_NAME_CHARS, 1)
    max_tokens: integer(1, MAX_TOKENS_LIMIT) | None = None
    temperature: number(0.0, 2.0) | None = None
    top_p: number(0.0, 1.0, above=True) | None = None
    top_k: integer(-1, MAX_TOP_K, description="-1 or 0: off (vLLM's)") | None = None
    seed: integer(SEED_MIN, SEED_MAX) | None = None
    stop: Union[text(MAX_STOP_CHARS, 1), bounded_list(text(MAX_STOP_CHARS, 1), MAX_STOP_STRINGS)] | None = None
    stop_token_ids: bounded_list(TokenId, MAX_STOP_TOKEN_IDS) | None = None
    ignore_eos: bool | None = None
    min_tokens: integer(0, MAX_TOKENS_LIMIT) | None = None
    presence_penalty: number(-MAX_PENALTY, MAX_PENALTY) | None = None
    frequency_penalty: number(-MAX_PENALTY, MAX_PENALTY) | None = None
    repetition_penalty: number(0.0, MAX_REPETITION_PENALTY, above=True) | None = None
    logit_bias: Annotated[dict[text(10, 1, pattern=r"^[0-9]{1,10}$"), number(-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)],
                          Field(max_length=MAX_LOGIT_BIAS_ENTRIES,
                                description="token id (decimal) -> bias added to its logit")] | None = None
    min_p: number(0.0, 1.0) | None = None
    n: integer(1, MAX_CHOICES) | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    tenant: text(MAX_TENANT_CHARS, 1, description="the tenant whose quota and fair share this uses") | None = None
    priority: Union[integer(-2**31, 2**31 - 1), text(MAX_NAME_CHARS)] | None = Field(
        None, description="a class ('batch', 'interactive', 'realtime'), 'class:level', or a level (vLLM's)")
    return_token_ids: bool | None = None
    timeout: Seconds | None = Field(None, description="seconds from arrival to the end of the answer")
    queue_timeout: Seconds | None = Field(None, description="seconds it may wait to start")
    keep_alive: Union[float, text()] | None = Field(
        None, description="Ollama's: how long the model stays loaded after this request (seconds or '5m')")
    response_format: ResponseFormat | None = None
    guided_json: GuidedJson | None = None
    guided_regex: Spec | None = None
    guided_choice: Choices | None = None
    guided_grammar: Spec | None = Field(None, description="GBNF or Lark")
    structured_outputs: StructuredOutputs | None = None
    use_beam_search: only(False) | None = None
    user: Ignored = None
    store: Ignored = None
    metadata: Ignored = None
    service_tier: Ignored = None
    parallel_tool_calls: Annotated[Any, Field(description="false: at most one tool call is parsed from each "
                                                          "choice (any other value: no limit)")] = None
    prompt_cache_key: Ignored = None
    safety_identifier: Ignored = None
    reasoning_effort: Ignored = None
    verbosity: Ignored = None

    @model_validator(mode="before")
    @classmethod
    def _given(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


Prompt = Union[text(MAX_PROMPT_CHARS, 1), bounded_list(TokenId, MAX_PROMPT_TOKEN_IDS, 1),
               bounded_list(text(MAX_PROMPT_CHARS, 1), 1, 1)]


class CompletionRequest(_Generation):
    """POST /v1/completions."""
    prompt: Prompt = Field(description="a string, a list of token ids, or a list of exactly one string")
    logprobs: integer(0, MAX_TOP_LOGPROBS, description="top logprobs per token") | None = None
    best_of: only(1) | None = None
    echo: only(False) | None = None
    suffix: only("") | None = None


class ChatCompletionRequest(_Generation):
    """POST /v1/chat/completions."""
    messages: bounded_list(Message, MAX_MESSAGES, 1)
    max_completion_tokens: integer(1, MAX_TOKENS_LIMIT) | None = Field(
        None, description="wins over max_tokens, which is then not read")
    logprobs: bool | None = None
    top_logprobs: integer(0, MAX_TOP_LOGPROBS, description="needs logprobs: true") | None = None
    tools: bounded_list(Tool, tool_rules.MAX_TOOLS) | None = None
    tool_choice: ToolChoice | None = None
    functions: Annotated[list[Any], Field(max_length=0, description="only [] (use tools)")] | None = None
    function_call: only("none", "auto") | None = None
    modalities: Annotated[list[Literal["text"]], Field(min_length=1, max_length=1,
                                                        description="only ['text']")] | None = None
    audio: None = None
    prediction: None = None
    web_search_options: None = None

    @model_validator(mode="before")
    @classmethod
    def _newer_name_wins(cls, data):
        if isinstance(data, dict) and data.get("max_completion_tokens") is not None and "max_tokens" in data:
            data = {k: v for k, v in data.items() if k != "max_tokens"}
        return data


# ---------------------------------------------------------------- the tokenizer routes


class TokenizeRequest(Body):
    """POST /tokenize: a prompt or a chat (vLLM's options)."""
    model: text(MAX_NAME_CHARS, 1)
    prompt: text(MAX_PROMPT_CHARS) | None = None
    messages: bounded_list(Message, MAX_MESSAGES, 1) | None = None
    tools: bounded_list(Tool, tool_rules.MAX_TOOLS) | None = Field(None, description="with messages: in the prompt")
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = Field(None, description="messages only")
    continue_final_message: bool | None = Field(None, description="messages only")
    return_token_strs: bool | None = None


class DetokenizeRequest(Body):
    """POST /detokenize."""
    model: text(MAX_NAME_CHARS, 1)
    tokens: bounded_list(TokenId, MAX_PROMPT_TOKEN_IDS)
