"""Structured outputs with the openai SDK over the socket, and across model-driver restarts:
`client.chat.completions.parse(response_format=PydanticModel)` returns a parsed model;
seeded constrained generations give the same valid JSON when the model driver is restarted
(POST .../drivers/model-tiny/restart) or killed mid-generation, because a new driver rebuilds
every matcher from the tokens the kernel re-sends. A batch job's lines are constrained too,
and a bad spec refuses the file naming the line and field. A few smollm2 requests show a
real model writes sensible JSON under json_object and json_schema."""
from __future__ import annotations

import json
import os
import signal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from daemon_harness import at_once, serving

LONG = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                                   "minItems": 30, "maxItems": 30}},
        "required": ["words"], "additionalProperties": False}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    with serving(tmp_path_factory.mktemp("structured-sdk"), [f"tiny={tiny_llama_dir}"], "--max-model-len", "2048") as d:
        yield d


def sdk(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://llmos/v1", api_key="local", max_retries=0, http_client=httpx.Client(
        transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=300))


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    legs: int = pydantic.Field(ge=0, le=8)
    kind: str = pydantic.Field(json_schema_extra={"enum": ["cat", "dog"]})
    friendly: bool


def test_the_sdks_parse_returns_the_pydantic_model(daemon):
    with sdk(daemon) as client:
        for seed in range(3):
            r = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "A pet, please."}],
                                              response_format=Pet, temperature=1.0, seed=seed, max_tokens=200)
            pet = r.choices[0].message.parsed
            assert isinstance(pet, Pet) and r.choices[0].finish_reason == "stop"
            assert pet.kind in ("cat", "dog") and 0 <= pet.legs <= 8 and len(pet.name) <= 8


def generate_all(daemon, during=None, n: int = 6) -> list[str]:
    """n seeded constrained streams at once; `during()` once every one has its first chunk."""
    def work(i, started):
        body = {"model": "tiny", "messages": [{"role": "user", "content": f"List {i}"}], "max_tokens": 600,
                "stream": True, "temperature": 1.0, "seed": 77 + i,
                "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": LONG}}}
        text, finish = "", None
        with daemon.http(timeout=300) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:]).get("choices") or []:
                        text += choice["delta"].get("content") or ""
                        finish = choice.get("finish_reason") or finish
                    started.set()
        return text, finish
    results = at_once(n, work, during)
    for text, finish in results:
        assert finish == "stop", (text, finish)
        jsonschema.validate(json.loads(text), LONG)
    return [text for text, _ in results]


def restart(daemon):
    with daemon.http() as c:
        assert c.post("/llmos/v1/drivers/model-tiny/restart").status_code == 200


def kill(daemon):
    os.kill(next(p["pid"] for p in daemon.ps()["processes"] if p["name"] == "model-tiny"), signal.SIGKILL)


@pytest.mark.parametrize("fault", [restart, kill])
def test_a_model_driver_restart_mid_generation_still_gives_the_same_valid_json(daemon, fault):
    reference = generate_all(daemon)
    before = len(daemon.memory("tiny")["recoveries"])
    assert generate_all(daemon, during=lambda: fault(daemon)) == reference
    assert len(daemon.memory("tiny")["recoveries"]) > before   # steps ran after it: it was mid-generation


@pytest.mark.slow
def test_smollm2_writes_json_under_json_object_and_a_schema(smollm2_daemon):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "population"], "additionalProperties": False}
    with smollm2_daemon.http(timeout=300) as c:
        for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}):
            r = c.post("/v1/chat/completions", json={
                "model": "smollm2", "messages": [{"role": "user", "content": "Give the largest city of France as "
                                                  "JSON with its name (city) and population."}],
                "response_format": fmt, "temperature": 0, "max_tokens": 120})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "stop", choice
            value = json.loads(choice["message"]["content"])
            if fmt["type"] == "json_schema":
                jsonschema.validate(value, schema)
                assert "paris" in value["city"].lower()
            else:
                assert isinstance(value, dict)


def test_a_batch_job_constrains_its_lines_and_a_bad_spec_is_refused_naming_its_line(daemon):
    import time
    from llmos.client import openai_client
    small = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["n"], "additionalProperties": False}
    bodies = {"json": {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": small}}},
              "choice": {"guided_choice": ["up", "down"]}, "bad": {"guided_regex": "(("}}
    lines = [{"custom_id": k, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny", "messages": [{"role": "user", "content": k}], "max_tokens": 60,
                       "temperature": 1.0, "seed": 5, **extra}} for k, extra in bodies.items()]
    oai = openai_client(daemon.home, max_retries=0)

    def batch_of(lines):
        f = oai.files.create(file=("s.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()), purpose="batch")
        return oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")

    with pytest.raises(openai.BadRequestError, match="line 3: body.guided_regex"):   # the same check as HTTP's
        batch_of(lines)
    batch = batch_of(lines[:2])
    deadline = time.monotonic() + 120
    while (batch := oai.batches.retrieve(batch.id)).status != "completed" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (batch.status, batch.request_counts.completed) == ("completed", 2)
    out = {json.loads(x)["custom_id"]: json.loads(x) for x in oai.files.content(batch.output_file_id).text.splitlines()}
    text = {k: v["response"]["body"]["choices"][0]["message"]["content"] for k, v in out.items()}
    jsonschema.validate(json.loads(text["json"]), small)
    assert text["choice"] in ("up", "down")


def test_our_client_takes_a_pydantic_model_and_llmos_run_takes_format_and_schema(daemon, tmp_path):
    from click.testing import CliRunner

    from llmos.cli.main import cli
    from llmos.client import Client
    with Client(daemon.home) as c:
        r = c.chat("tiny", [{"role": "user", "content": "A pet."}], response_format=Pet, temperature=1.0, seed=5,
                   max_tokens=200)
    assert isinstance(Pet.model_validate_json(r["choices"][0]["message"]["content"]), Pet)

    def run(*args):
        return CliRunner().invoke(cli, ["--home", str(daemon.home), "run", "tiny", "Answer.", "--temperature", "1",
                                        "--seed", "3", "--max-tokens", "200", *args])
    shown = run("--format", "json", "--max-tokens", "8")   # any object: a random model need not close it
    assert shown.exit_code == 0 and shown.output.startswith("{"), shown.output
    closed = {**Pet.model_json_schema(), "additionalProperties": False}   # bounded: it always closes
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(closed))
    shown = run("--json-schema", str(schema))
    assert shown.exit_code == 0, shown.output
    jsonschema.validate(json.loads(shown.output), closed)
    schema.write_text("{not json")
    bad = run("--json-schema", str(schema))
    assert bad.exit_code == 2 and "--json-schema" in bad.output
