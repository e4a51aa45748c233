"""The request models (issue 16, item 1): errors that name the field path, the bounds a
hostile body cannot make pydantic spend past, GET /openapi.json (valid OpenAPI 3.1, served to
every principal and no one else) and a batch line refused exactly as the HTTP request with
the same body."""
from __future__ import annotations

import json

import pytest
from openapi_spec_validator import validate as validate_openapi

import fuzz_bodies as fb
import fuzz_schema as fs
from daemon_harness import Daemon
from llmos.kernel.auth import KeyStore
from llmos.kernel.jobs.batchfile import LineError, check_line
from llmos.openai_format import ApiError, openapi, parse_chat, parse_completion
from llmos.sampling_params import MAX_PROMPT_TOKEN_IDS

USER = [{"role": "user", "content": "hi"}]
CHAT = {"model": "tl", "messages": USER}
COMPLETION = {"model": "tl", "prompt": "hi"}


def chat_error(**fields) -> ApiError:
    with pytest.raises(ApiError) as err:
        parse_chat({**CHAT, **fields})
    assert err.value.status == 400
    return err.value


@pytest.mark.parametrize("fields, param, starts", [
    ({"messages": [*USER, *USER, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", "messages[2].content[0].type must be 'text'"),
    ({"messages": [*USER, {"role": "user", "content": [{"type": "text", "text": 7}]}]},
     "messages", "messages[1].content[0].text must be a string"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "messages[0].role must be one of"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
     "response_format", "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "response_format.json_schema.schema is required"),
    ({"response_format": {"type": "text", "strict": True}}, "response_format",
     "unknown parameter 'response_format.strict'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}, "x": 1}}]},
     "tools[0].function.x", "unknown parameter 'tools[0].function.x'"),
    ({"logit_bias": {"x": 1}}, "logit_bias", 'logit_bias.x: the key'),
    ({"logit_bias": {"1": 101}}, "logit_bias", 'logit_bias["1"] must be <= 100'),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "stop must be a string or a list of at most 4 strings"),
    ({"stop": ["a", "b" * 257]}, "stop", "stop[1]: String should have at most 256 characters"),
    ({"temperature": 9}, "temperature", "temperature must be between 0.0 and 2.0, got 9"),
    ({"top_k": True}, "top_k", "top_k must be an integer, got bool"),
    ({"bogus": 1, "temperature": 9}, "bogus", "unknown parameter 'bogus'"),
])
def test_an_error_names_the_field_path(fields, param, starts):
    err = chat_error(**fields)
    assert err.param == param and err.message.startswith(starts), (err.param, err.message)


def test_param_stays_what_clients_read_before():
    """`param` is the top-level field as the hand-written parser named it (its tests and
    clients read it); the path is in the message."""
    assert chat_error(messages=[{"role": "user", "content": 3}]).param == "messages"
    assert chat_error(messages=[*USER, {"role": "tool", "content": "x"}]).param == "messages[1].tool_call_id"
    assert chat_error(n=0).message == "n must be an integer from 1 to 128"
    with pytest.raises(ApiError) as err:
        parse_completion({**COMPLETION, "prompt": [1, "a"]})
    assert (err.value.param, err.value.message) == ("prompt", "prompt[1] must be an integer, got str")


def test_every_accepted_shape_keeps_its_meaning():
    req = parse_chat({**CHAT, "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                             {"type": "text", "text": "b"}]},
                                           {"role": "assistant", "content": None, "name": "bot"}, *USER],
                      "best_of": None, "not_ours": None, "function_call": "auto", "modalities": ["text"],
                      "user": {"any": "thing"},
                      "top_p": 1e-300, "top_k": 0, "stop": "x", "max_completion_tokens": 5, "max_tokens": 9})
    assert req.messages[:2] == [{"role": "system", "content": "a\nb"}, {"role": "assistant", "content": ""}]
    p = req.params
    assert (p.top_k, p.stop, p.max_tokens) == (-1, ["x"], 5) and 0 < p.top_p < 1e-20
    done = parse_completion({**COMPLETION, "prompt": ["one string"], "echo": 0, "best_of": 1.0, "timeout": 30})
    assert (done.prompt, done.timeout_s) == ("one string", 30.0)
    assert parse_completion({**COMPLETION, "prompt": [5, 6]}).prompt_token_ids == [5, 6]


def test_a_hostile_body_costs_one_error_not_a_million():
    """A million bad token ids stop at the first (fail_fast): pydantic collects a handful of
    errors, not one per element (counted, not timed), and the 400 names the field."""
    from pydantic import ValidationError
    from llmos.openai_format.models import ChatCompletionRequest, CompletionRequest
    body = {**COMPLETION, "prompt": ["x"] + [None] * (MAX_PROMPT_TOKEN_IDS - 1)}
    with pytest.raises(ValidationError) as raw:
        CompletionRequest.model_validate(body)
    assert raw.value.error_count() <= 8
    with pytest.raises(ApiError) as err:
        parse_completion(body)
    assert err.value.param == "prompt"
    chat = {**CHAT, "messages": [{"role": "user", "content": 1}] * 2048, "stop_token_ids": ["x"] * 10**6}
    with pytest.raises(ValidationError) as raw:
        ChatCompletionRequest.model_validate(chat)
    assert raw.value.error_count() <= 8
    with pytest.raises(ApiError) as err:
        parse_chat(chat)
    assert err.value.param == "messages"


def test_the_document_is_valid_openapi_3_1_with_every_body():
    doc = openapi.document()
    validate_openapi(doc)
    assert doc["openapi"] == "3.1.0"
    assert {"/v1/chat/completions", "/v1/completions", "/v1/files", "/v1/batches", "/tokenize"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False and chat["required"] == ["model", "messages"]
    assert chat["properties"]["temperature"]["anyOf"][0] == {"maximum": 2.0, "minimum": 0.0, "type": "number"}
    assert schemas["BatchRequestLine"]["properties"]["url"]["enum"] == ["/v1/chat/completions", "/v1/completions"]
    assert "file" in schemas["FileUploadForm"]["required"]


@pytest.mark.parametrize("path, parse", [(fs.COMPLETIONS, parse_completion), (fs.CHAT, parse_chat)])
def test_every_body_the_schema_refuses_is_a_400_naming_its_field(path, parse):
    """The fuzzer's mutations (one field of a valid body, from the document's schemas), judged
    by the schema with jsonschema, against the parser: the validators are the schema."""
    doc = json.loads(json.dumps(openapi.document()))
    judged = {True: 0, False: 0}
    for field, cases in fs.mutations(doc, path).items():
        for body, valid in cases:
            try:
                parse(body)
                out = fb.Outcome(200)
            except ApiError as err:
                out = fb.Outcome(err.status, named=err.param, message=err.message)
            assert fb.expectation_problem((field, valid), out) is None, (field, fb.describe(body[field])[:300],
                                                                          out.named, out.message)
            judged[valid] += 1
    assert min(judged.values()) > 200, judged


# ---------------------------------------------------------------- through the daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    home = tmp_path_factory.mktemp("schema")
    key = KeyStore(home / "keys.db").create("alice", ["tl"], "interactive")[0]
    d = Daemon(home, [f"tl={tiny_llama_dir}"], "--max-model-len", "256").wait_ready()
    d.key = key
    yield d
    d.stop()


def test_openapi_json_is_served_to_every_principal_and_no_one_else(daemon):
    with daemon.http() as c:
        r = c.get("/openapi.json")   # the socket's peer: this uid, the admin
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        assert r.json() == json.loads(json.dumps(openapi.document()))
        assert c.get("/openapi.json", headers={"Authorization": f"Bearer {daemon.key}"}).json() == r.json()
        wrong = c.get("/openapi.json", headers={"Authorization": "Bearer llmos-" + "x" * 43})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    validate_openapi(r.json())


BAD_BODIES = [
    {**CHAT, "messages": [*USER, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
    {**CHAT, "temperature": 9},
    {**CHAT, "tools": [{"type": "function", "function": {"name": "bad name"}}]},
    {**CHAT, "top_logprobs": 2},
    {**CHAT, "guided_regex": "(unclosed"},
    {**CHAT, "bogus": True},
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_a_batch_line_is_refused_as_the_same_http_request_is(daemon, body):
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    with daemon.http() as c:
        http = c.post("/v1/chat/completions", json=body)
        assert http.status_code == 400, http.text
        error = http.json()["error"]
        good = {**line, "custom_id": "b", "body": {**CHAT, "max_tokens": 2}}
        upload = c.post("/v1/files", data={"purpose": "batch"},
                        files={"file": ("x.jsonl", "\n".join(map(json.dumps, [good, line])).encode())})
    assert upload.status_code == 400 and upload.json()["error"]["lines"] == [2], upload.text
    assert f"line 2: body.{error['param']}: {error['message']}" in upload.json()["error"]["message"]
    with pytest.raises(LineError) as refused:   # the kernel's parser, below the upload
        check_line(1, json.dumps(line))
    same = refused.value.error
    assert (same.status, same.code, same.param, same.message) == (400, error["code"], error["param"],
                                                                  error["message"])


def test_batches_and_uploads_are_validated_by_their_models(daemon):
    with daemon.http() as c:
        r = c.post("/v1/batches", json={"input_file_id": "file-x", "endpoint": "/v1/embeddings"})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "endpoint"), r.text
        r = c.post("/v1/batches", json={"input_file_id": "file-x", "endpoint": "/v1/completions", "extra": 1})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "extra"), r.text
        r = c.post("/v1/batches", json={"input_file_id": "file-x", "endpoint": "/v1/completions",
                                        "metadata": {"k": 1}})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "metadata"), r.text
        r = c.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("x.jsonl", b"")})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "purpose"), r.text
        r = c.post("/v1/files", data={"purpose": "batch", "expires_after[seconds]": "600"},
                   files={"file": ("x.jsonl", json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                                          "body": {**COMPLETION, "max_tokens": 2}}).encode())})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "expires_after.anchor"), r.text
        r = c.post("/tokenize", json={"model": "tl", "messages": USER,
                                      "tools": [{"type": "function", "function": {"name": "f"}}]})
        assert r.status_code == 200 and r.json()["count"] > c.post("/tokenize", json={"model": "tl", "messages":
                                                                                   USER}).json()["count"]


def test_parallel_tool_calls_false_parses_at_most_one_call():
    from llmos.openai_format import ResponseShaper
    from llmos.protocol import OutputItem
    tools = [{"type": "function", "function": {"name": n}} for n in ("a", "b")]
    two = '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]</tool_call>' \
          '<tool_call>{"name": "b", "arguments": {}}</tool_call>'

    def calls(**extra):
        req = parse_chat({**CHAT, "model": "smollm2", "tools": tools, **extra})
        shaper = ResponseShaper(req, "r", 5)
        shaper.add(OutputItem(rid="r", index=0, text=two, n=3, ids=[1, 2, 3], lp=None, finish="stop",
                              usage={"prompt_tokens": 5, "completion_tokens": 3}))
        message = shaper.response()["choices"][0]["message"]
        return [c["function"]["name"] for c in message.get("tool_calls") or ()], message["content"]
    assert calls() == (["a", "b", "b"], None)
    assert calls(parallel_tool_calls=True) == calls(parallel_tool_calls="yes") == calls()   # (never refused)
    names, content = calls(parallel_tool_calls=False)
    assert names == ["a"] and content == '<tool_call>{"name": "b", "arguments": {}}</tool_call>'
