"""n > 1 end to end: the choices share the prompt's KV copy-on-write and each produces
exactly what a request of its own would have; nothing leaks. And the client's abort call
(cancel), which stops every choice of a request within a step."""
from __future__ import annotations

import json
import threading
import time

import pytest
from click.testing import CliRunner

from llmos.cli.main import cli
from llmos.client import Client


@pytest.fixture(scope="module")
def daemon(tiny_daemon):
    return tiny_daemon


def complete(daemon, **body) -> dict:
    with daemon.http() as c:
        r = c.post("/v1/completions", json={"model": "tiny", "return_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def ids(answer) -> list[list[int]]:
    return [c["token_ids"] for c in sorted(answer["choices"], key=lambda c: c["index"])]


def assert_pool_clean(daemon):
    mem = daemon.memory("tiny")
    assert mem["blocks_used"] == 0 and mem["integrity"] == "ok", mem


# 32 tokens end exactly on a block boundary (16-token blocks): the choices copy a full block;
# 37 tokens leave the last block partly filled.
@pytest.mark.parametrize("prompt_len", [32, 37])
def test_greedy_choices_equal_a_single_request(daemon, prompt_len):
    prompt = [(7 * i + 3) % 500 + 10 for i in range(prompt_len)]
    before = daemon.memory("tiny")["prefix_cache"]
    one = complete(daemon, prompt=prompt, max_tokens=24, temperature=0, ignore_eos=True)
    three = complete(daemon, prompt=prompt, max_tokens=24, temperature=0, ignore_eos=True, n=3)
    assert ids(three) == ids(one) * 3
    assert [c["text"] for c in three["choices"]] == [one["choices"][0]["text"]] * 3
    assert three["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 72, "total_tokens": prompt_len + 72,
                              # `one` left the prompt's full blocks (the last token is always computed) cached
                              "prompt_tokens_details": {"cached_tokens": (prompt_len - 1) // 16 * 16}}
    after = daemon.memory("tiny")["prefix_cache"]
    assert after["forks"] - before["forks"] == 2
    assert after["cow_copies"] - before["cow_copies"] == 2    # n - 1: the last owner writes in place
    assert_pool_clean(daemon)
    shown = CliRunner().invoke(cli, ["--home", str(daemon.home), "mem"])
    assert shown.exit_code == 0 and f"{after['forks']} forks (n > 1), {after['cow_copies']} copy-on-write" in shown.output


def test_seeded_choice_i_is_the_request_with_seed_plus_i(daemon):
    body = {"prompt": "Copy on write: the choices", "max_tokens": 16, "temperature": 1.0, "ignore_eos": True}
    group = ids(complete(daemon, n=3, seed=1234, **body))
    alone = [ids(complete(daemon, seed=1234 + i, **body))[0] for i in range(3)]
    assert group == alone
    assert len({tuple(x) for x in group}) > 1    # different seeds, different samples
    assert_pool_clean(daemon)


def test_chat_stream_of_n_choices_and_a_disconnect_free_everything(daemon):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, "n": 2, "stream": True}
    seen: dict[int, str] = {0: "", 1: ""}
    with daemon.http() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                seen[choice["index"]] += choice["delta"].get("content") or ""
    assert seen[0] == seen[1] and seen[0]
    with daemon.http() as c, c.stream("POST", "/v1/chat/completions",
                                      json={**body, "n": 4, "max_tokens": 400}) as r:
        lines = r.iter_lines()
        for _ in range(12):
            next(lines)          # leave mid-stream: the kernel must drop all four choices
    deadline = time.monotonic() + 60   # (a cleanup takes milliseconds; a loaded CI machine, seconds)
    while daemon.ps()["requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.ps()["requests"] == []
    assert_pool_clean(daemon)


def test_n_out_of_range_is_a_precise_400(daemon):
    with daemon.http() as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 500})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_cancel_stops_every_choice_and_the_stream_ends_with_what_it_has(daemon):
    body = {"model": "tiny", "prompt": "Cancel me", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "n": 2, "stream": True}
    finish, tokens, asked = {}, {0: 0, 1: 0}, False
    with daemon.http() as c, c.stream("POST", "/v1/completions", json=body,
                                      headers={"X-Request-Id": "mine-1"}) as r:
        assert r.headers["X-Request-Id"] == "mine-1"
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            tokens[choice["index"]] += 1
            if choice["finish_reason"]:
                finish[choice["index"]] = choice["finish_reason"]
            if sum(tokens.values()) >= 10 and not asked:
                asked = True
                with daemon.http() as other:
                    dup = other.post("/v1/completions", json={"model": "tiny", "prompt": "x"},
                                     headers={"X-Request-Id": "mine-1"})
                    assert dup.status_code == 409 and dup.json()["error"]["code"] == "duplicate_request_id"
                with Client(daemon.home) as sdk:
                    assert sdk.cancel_request("mine-1") == {"id": "mine-1", "cancelled": 2}
    assert finish == {0: "cancelled", 1: "cancelled"} and max(tokens.values()) < 100
    assert_pool_clean(daemon)


def test_cancel_from_the_cli_ends_a_waiting_client_with_partial_output(daemon):
    result = {}

    def ask():
        with daemon.http() as c:
            result["r"] = c.post("/v1/completions", headers={"X-Request-Id": "cli-cancel"}, json={
                "model": "tiny", "prompt": "Long answer", "max_tokens": 2000, "temperature": 0, "ignore_eos": True})

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.monotonic() + 30
    while not any(r["id"] == "cli-cancel" and r["output_tokens"] for r in daemon.ps()["requests"]):
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    shown = CliRunner().invoke(cli, ["--home", str(daemon.home), "cancel", "cli-cancel"])
    assert shown.exit_code == 0 and "cancelled cli-cancel" in shown.output, shown.output
    t.join(30)
    answer = result["r"].json()
    assert answer["choices"][0]["finish_reason"] == "cancelled"
    assert 0 < answer["usage"]["completion_tokens"] < 2000
    assert CliRunner().invoke(cli, ["--home", str(daemon.home), "cancel", "cli-cancel"]).exit_code != 0
    with daemon.http() as c:
        gone = c.post("/llmos/v1/requests/nope/cancel")
        bad = c.post("/v1/completions", json={"model": "tiny", "prompt": "x"}, headers={"X-Request-Id": "a b"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "request_not_found"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"
    assert_pool_clean(daemon)
