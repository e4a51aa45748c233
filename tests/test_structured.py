"""Structured outputs through a real daemon serving the tiny random model: every output of
200 random (schema, seed) pairs, sampled at temperature 1, parses and validates against its
schema (jsonschema); regex, choice, a GBNF grammar and every choice of n > 1 hold too; bad
specs are a 400 naming the field, and the next request is served. (The openai SDK's parse()
and a model-driver restart mid-generation: test_structured_sdk.py.)"""
from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from schema_gen import random_schema

PAIRS = 200


@pytest.fixture(scope="module")
def daemon(tiny_daemon):   # the tiny models' own context: 2048 tokens
    return tiny_daemon


def chat(daemon, **body):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": 600, **body}
    with daemon.http(timeout=600) as c:
        return c.post("/v1/chat/completions", json=body)


def content(r) -> str:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice   # the grammar ended it, not max_tokens
    return choice["message"]["content"]


def test_random_schemas_always_give_valid_json(daemon):
    cases = [(random_schema(random.Random(i)), 1000 + i) for i in range(PAIRS)]

    def one(case):
        schema, seed = case
        fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
        return content(chat(daemon, response_format=fmt, temperature=1.0, seed=seed))

    with ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(one, cases))
    for (schema, seed), text in zip(cases, outputs):
        jsonschema.validate(json.loads(text), schema)   # raises, naming the schema and the instance
    assert len(set(outputs)) > PAIRS // 2   # the seeds made different outputs, not one canned answer


def test_completions_take_guided_json(daemon):
    # (json_object, whose strings are unbounded, is tried with smollm2: a random model can
    # write one string forever.)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    with daemon.http() as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 50, "guided_json": schema,
                                            "temperature": 1.0, "seed": 3})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), schema)


@pytest.mark.parametrize("body, check", [
    ({"guided_regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    ({"guided_choice": ["red", "green", "blue sky"]}, lambda t: t in ("red", "green", "blue sky")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"regex": r"(ab|cd){1,3}!"}}, lambda t: re.fullmatch(r"(ab|cd){1,3}!", t)),
    ({"guided_grammar": 'root ::= "(" [a-c] [a-c]? ")"'}, lambda t: re.fullmatch(r"\([a-c]{1,2}\)", t)),
])
def test_regex_choice_and_grammar_outputs_match(daemon, body, check):
    for seed in range(4):
        text = content(chat(daemon, **body, temperature=1.0, seed=seed, max_tokens=40))
        assert check(text), text


SMALL = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["n"], "additionalProperties": False}
def test_every_choice_of_n_follows_the_grammar(daemon):
    r = chat(daemon, n=4, temperature=1.0, seed=11, max_tokens=50, guided_json=SMALL_ARRAY)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 4 and all(c["finish_reason"] == "stop" for c in choices)
    for c in choices:
        jsonschema.validate(json.loads(c["message"]["content"]), SMALL_ARRAY)


SMALL_ARRAY = {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4}
BIG = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(400)}}
DEEP = {"type": "object"}
for _ in range(40):
    DEEP = {"type": "object", "properties": {"a": DEEP}}


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BIG}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": DEEP}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_json": [1, 2]}, "guided_json"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", 3]}, "guided_choice"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens"),
])
def test_bad_specs_are_a_400_naming_the_field_and_the_next_request_is_served(daemon, body, param):
    r = chat(daemon, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert json.loads(content(chat(daemon, guided_json=SMALL, temperature=0, max_tokens=100)))["n"] in range(10)
