"""Memory pressure end to end: preemption by swap gives the same tokens, nothing leaks."""
from __future__ import annotations

import pytest

from daemon_harness import Daemon, stream_many

PROMPTS = [f"Memory test {i}: the quick brown fox" for i in range(12)]
TOKENS = 160


@pytest.fixture(scope="module")
def unconstrained(tiny_daemon):
    return stream_many(tiny_daemon, "tiny", PROMPTS, TOKENS)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_forced_preemption_produces_the_same_tokens(tmp_path, tiny_llama_dir, unconstrained, mode):
    # 48 blocks of 16 tokens: the 12 sequences need ~132 blocks at the end, so most get preempted.
    d = Daemon(tmp_path, [f"tiny={tiny_llama_dir}"], "--kv-memory", str(48 * 8192),
               "--preemption-mode", mode).wait_ready()
    try:
        assert stream_many(d, "tiny", PROMPTS, TOKENS) == unconstrained
        mem = d.memory("tiny")
        assert mem["preemptions"] > 0
        if mode == "swap":
            assert mem["swap"]["swap_outs"] > 0 and mem["swap"]["swap_ins"] == mem["swap"]["swap_outs"]
            assert mem["swap"]["host_blocks_used"] == 0
        assert mem["blocks_used"] == 0 and mem["integrity"] == "ok"
        with d.http() as c:   # a request that could never fit is refused at once, saying why
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1000})
        assert r.status_code == 400 and "KV blocks" in r.json()["error"]["message"]
    finally:
        d.stop()
