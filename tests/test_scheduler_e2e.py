"""The priority scheduler in the real daemon: classes, preemption, quotas, deadlines, visibility,
chunked prefill."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from daemon_harness import serving, stream_text


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    with serving(tmp_path_factory.mktemp("prio"), [f"tiny={tiny_llama_dir}"], "--max-num-seqs", "2",
               "--max-model-len", "2048", "--tenant", "q:max_concurrent=1", "--tenant", "slow:default_priority=batch",
                 "--tenant", "heavy:weight=3") as d:
        yield d


def post(daemon, **body):
    with daemon.http() as c:
        return c.post("/v1/completions", json={"model": "tiny", "prompt": "hello", **body})


def background(daemon, n, tokens=400):
    started = [threading.Event() for _ in range(n)]
    threads = [threading.Thread(target=lambda e=e: _quiet(stream_text, daemon, "tiny", "batch work", tokens, e))
               for e in started]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(60)
    return threads


def _quiet(fn, *args):
    try:
        fn(*args)
    except Exception:  # cut by the test's end; not what is checked
        pass


def test_realtime_request_preempts_batch_work_and_ps_shows_classes(daemon):
    with daemon.http() as c:
        before = c.get("/llmos/v1/ps").json()["scheduler"]["tiny"]["preemptions"]["priority"]
    threads = background(daemon, 2)
    time.sleep(0.3)          # past min_run_s protection of the batch work
    ps = daemon.ps()
    assert {r["priority"] for r in ps["requests"]} == {"interactive:0"}
    r = post(daemon, max_tokens=8, priority="realtime", tenant="rt")
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    ps = daemon.ps()
    assert ps["scheduler"]["tiny"]["preemptions"]["priority"] > before
    states = {x["state"] for x in ps["requests"]}
    assert states <= {"running", "waiting", "preempted", "swapped"}
    for x in ps["requests"]:
        assert x["tenant"] == "local" and "waited_s" in x and x["output_tokens"] > 0
    for t in threads:
        t.join(120)


def test_tenant_default_class_and_bad_priorities(daemon):
    assert post(daemon, max_tokens=2, tenant="slow").status_code == 200
    for bad in ("urgent", "batch:-1", True, 1.5):
        r = post(daemon, max_tokens=2, priority=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "priority", bad


def test_over_quota_is_429_with_retry_after(daemon):
    with daemon.http() as c:
        body = {"model": "tiny", "prompt": "hold", "max_tokens": 1500, "ignore_eos": True, "stream": True,
                "tenant": "q"}
        with c.stream("POST", "/v1/completions", json=body) as held:
            assert held.status_code == 200
            lines = held.iter_lines()   # kept alive: dropping the iterator closes the stream
            next(lines)
            r = post(daemon, max_tokens=2, tenant="q")
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert "max_concurrent" in r.json()["error"]["message"]
            assert post(daemon, max_tokens=2, tenant="other").status_code == 200


def test_deadline_ends_the_request_with_a_clear_error_and_frees_memory(daemon):
    r = post(daemon, max_tokens=1900, ignore_eos=True, timeout=0.5)
    assert r.status_code == 408 and "total timeout" in r.json()["error"]["message"]
    deadline = time.monotonic() + 60   # (a cleanup takes milliseconds; a loaded CI machine, seconds)
    while daemon.ps()["requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.memory("tiny")["blocks_used"] == 0


def test_a_heavier_tenant_gets_its_share_by_fairness_preemption(daemon):
    """Both batch slots run long requests of the default tenant (weight 1); a request of
    `heavy` (weight 3) of the same priority takes one of them (2:0 -> 1:1) instead of
    waiting for them to finish, and the victim still finishes whole."""
    with daemon.http() as c:
        before = c.get("/llmos/v1/ps").json()["scheduler"]["tiny"]["preemptions"]
    texts, started = [None, None], [threading.Event(), threading.Event()]

    def light(i):
        texts[i] = stream_text(daemon, "tiny", f"long work {i}", 800, started[i])
    threads = [threading.Thread(target=light, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(60)
    time.sleep(0.6)          # past min_run_s protection
    r = post(daemon, max_tokens=8, tenant="heavy")
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    running = [t.is_alive() for t in threads]
    after = daemon.ps()["scheduler"]["tiny"]["preemptions"]
    assert all(running)      # it did not wait for a slot to free up
    assert after["fairness"] == before["fairness"] + 1 and after["priority"] == before["priority"]
    for t in threads:
        t.join(120)
    assert all(isinstance(t, str) and t for t in texts)   # both light requests finished


# Chunked prefill: a small per-step token budget, a slot for each stream and the long prompt,
# and no prefix cache, so that running the same prompt again computes it again.
BUDGET, STREAMS, LONG_PROMPT, LONG_OUT = 128, 3, 2000, 8


@pytest.fixture(scope="module")
def chunking(tmp_path_factory, tiny_llama_dir):
    with serving(tmp_path_factory.mktemp("chunked"), [f"tiny={tiny_llama_dir}"], "--max-num-seqs", str(STREAMS + 1),
                 "--max-batched-tokens", str(BUDGET), "--max-model-len", "2048", "--no-prefix-caching") as d:
        yield d


def async_http(daemon) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(daemon.socket)), base_url="http://llmos",
                             timeout=300)


async def stream_ids(client, prompt, max_tokens, arrivals: list, stop: asyncio.Event | None = None):
    """Greedy streamed completion; appends (perf_counter at arrival, token ids) per chunk.
    Returns the finish reason, or None when `stop` cut it first (closing the stream aborts it)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if stop is not None and stop.is_set():
                return None
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["token_ids"]:
                    arrivals.append((time.perf_counter(), choice["token_ids"]))
                if choice["finish_reason"]:
                    return choice["finish_reason"]
    return None


def test_long_prompt_is_prefilled_in_budget_chunks_while_streams_keep_decoding(chunking):
    """While a 2,000-token prompt is prefilled under a 128-token budget, every running stream
    gets its decode token in each of the ceil(2000 / (128 - 3)) = 16 steps: no stream stalls
    until the prompt is in. The prompt's output equals its output alone, where it is cut into
    other chunks (ceil(2000 / 128) = 16, counted by the kernel's step statistics)."""
    prompt = [100 + (i * 7919) % 40000 for i in range(LONG_PROMPT)]   # exact length, no tokenizer
    chunks = -(-LONG_PROMPT // (BUDGET - STREAMS))

    async def contended():
        # One event loop reads every stream: an arrival time is when the chunk was read,
        # with no thread of this test waiting for the GIL in between.
        async with async_http(chunking) as c:
            streams, stop = [[] for _ in range(STREAMS)], asyncio.Event()
            tasks = [asyncio.create_task(stream_ids(c, f"stream {i}", 1500, streams[i], stop))
                     for i in range(STREAMS)]
            deadline = time.monotonic() + 60
            while not all(streams) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert all(streams) and not any(t.done() for t in tasks)
            long, t0 = [], time.perf_counter()
            assert await stream_ids(c, prompt, LONG_OUT, long) == "length"
            stop.set()
            return t0, long, streams, await asyncio.gather(*tasks)

    t0, long, streams, ends = asyncio.run(contended())
    assert ends == [None] * STREAMS            # all still running when the long request ended
    t1 = long[0][0]                            # its first token: the prompt is in
    received = [sum(len(ids) for t, ids in s if t0 <= t < t1) for s in streams]
    # one token per prefill step; the last step's may be read just after the long one's
    assert min(received) >= chunks - 1, (received, chunks)

    deadline = time.monotonic() + 30           # the streams' aborts take effect, and the steps
    while (chunking.ps()["requests"] or chunking.memory("tiny")["steps"]["in_flight"]) \
            and time.monotonic() < deadline:   # sent ahead for them are done (kernel/run_ahead.py)
        time.sleep(0.05)
    assert chunking.memory("tiny")["blocks_used"] == 0

    async def alone(arrivals):
        async with async_http(chunking) as c:
            return await stream_ids(c, prompt, LONG_OUT, arrivals)
    before, arrivals = chunking.memory("tiny")["steps"], []
    assert asyncio.run(alone(arrivals)) == "length"
    after = chunking.memory("tiny")["steps"]
    assert [i for _, ids in arrivals for i in ids] == [i for _, ids in long for i in ids]
    assert after["steps"] - before["steps"] == -(-LONG_PROMPT // BUDGET) + LONG_OUT - 1
    assert after["tokens_computed"] - before["tokens_computed"] == LONG_PROMPT + LONG_OUT - 1
