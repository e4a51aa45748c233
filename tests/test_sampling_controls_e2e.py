"""Penalties, logit bias and min_p through a real daemon serving the tiny model: a bias
forces greedy's token, a frequency penalty stops a repeated one, bad values are a 400 naming
the parameter (the vocabulary bound is the kernel's), and seeded sampling with every control
on gives the same text twice and across a kill -9 of the model driver mid-generation."""
from __future__ import annotations

import json
import os
import signal
from collections import Counter

import httpx
import openai
import pytest

from daemon_harness import at_once, serving

VOCAB = 49152          # the tiny models' (SmolLM2's) vocabulary
CONTROLS = {"presence_penalty": 0.6, "frequency_penalty": 0.4, "repetition_penalty": 1.3, "min_p": 0.02,
            "logit_bias": {"29": 2.0, "30": -5}}
SEEDED = {"temperature": 1.0, "top_p": 0.95, "seed": 1234, "ignore_eos": True, **CONTROLS}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    with serving(tmp_path_factory.mktemp("controls"), [f"tiny={tiny_llama_dir}"], "--max-model-len", "512") as d:
        yield d


def complete(daemon, prompt="The cat sat on", max_tokens=24, **params) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "return_token_ids": True, **params}
    with daemon.http() as c:
        return c.post("/v1/completions", json=body)


def ids_of(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_a_bias_of_100_forces_greedys_token(daemon):
    plain = ids_of(complete(daemon, temperature=0, ignore_eos=True))
    forced = next(t for t in range(1000, VOCAB) if t not in plain)
    got = ids_of(complete(daemon, temperature=0, ignore_eos=True, logit_bias={str(forced): 100}))
    assert got == [forced] * 24
    banned = Counter(plain).most_common(1)[0][0]
    assert banned not in ids_of(complete(daemon, temperature=0, ignore_eos=True, logit_bias={str(banned): -100}))


def test_a_strong_frequency_penalty_stops_a_repeated_token(daemon):
    # A bias of +10 makes greedy repeat one token; a frequency penalty of 2 takes 2 off it per
    # time it was generated, so it lasts about 10 / 2 times (the model's own logits are small).
    looping = {"temperature": 0, "ignore_eos": True, "max_tokens": 48, "logit_bias": {"1234": 10}}
    assert ids_of(complete(daemon, **looping)) == [1234] * 48
    penalized = ids_of(complete(daemon, **looping, frequency_penalty=2.0))
    assert penalized[0] == 1234 and 2 <= Counter(penalized)[1234] <= 7, penalized
    assert max(Counter(penalized).values()) <= 7
    presence = ids_of(complete(daemon, **looping, presence_penalty=2.0))   # only once: -2 whatever the count
    assert presence == [1234] * 48


def test_the_openai_sdk_sends_them_and_seeded_output_repeats(daemon):
    client = openai.OpenAI(base_url="http://llmos/v1", api_key="x", max_retries=0,
                           http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket))))
    with client:
        def chat():
            return client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=32,
                temperature=1.0, seed=7, presence_penalty=0.6, frequency_penalty=0.4, logit_bias={29: 2.0},
                logprobs=True, top_logprobs=2,
                extra_body={"repetition_penalty": 1.3, "min_p": 0.02, "ignore_eos": True})
        a, b = chat(), chat()
    assert a.choices[0].message.content == b.choices[0].message.content and a.usage.completion_tokens == 32
    assert len(a.choices[0].logprobs.content) == 32


@pytest.mark.parametrize("body, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"5": 200}}, "logit_bias"),
    ({"logit_bias": {str(VOCAB): 1}}, "logit_bias"),   # in range for the parser, past the vocabulary
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
])
def test_bad_values_are_a_400_naming_the_parameter_and_the_next_request_is_served(daemon, body, param):
    r = complete(daemon, **body)
    assert (r.status_code, r.json()["error"]["param"]) == (400, param), r.text
    assert len(ids_of(complete(daemon, temperature=0, max_tokens=4, ignore_eos=True))) == 4


PROMPTS = [f"Story number {i}: once upon a time" for i in range(8)]


def generate_all(daemon, during=None) -> list[list[int]]:
    """Every prompt at once, seeded with every control on; `during()` once all are under way."""
    def work(i, started):
        body = {"model": "tiny", "prompt": PROMPTS[i], "max_tokens": 300, "stream": True, "return_token_ids": True,
                **SEEDED, "seed": 1234 + i}
        ids = []
        with daemon.http(timeout=300) as c, c.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:]).get("choices") or []:
                        ids += choice.get("token_ids") or []
                    started.set()
        return ids
    return at_once(len(PROMPTS), work, during)


def test_seeded_output_with_controls_is_the_same_across_a_model_driver_kill(daemon):
    reference = generate_all(daemon)
    assert all(len(ids) == 300 for ids in reference) and len({tuple(r) for r in reference}) == len(PROMPTS)
    assert generate_all(daemon) == reference
    before = len(daemon.memory("tiny")["recoveries"])
    pid = next(p["pid"] for p in daemon.ps()["processes"] if p["name"] == "model-tiny")
    assert generate_all(daemon, during=lambda: os.kill(pid, signal.SIGKILL)) == reference
    assert len(daemon.memory("tiny")["recoveries"]) > before   # steps ran after the restart: it was mid-generation
