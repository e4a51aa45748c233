"""Soak: mixed traffic against a real llmosd for a set time, then leaks, RSS and fds.

    python benchmarks/soak.py                            # tiny random model, 600 s
    python benchmarks/soak.py --duration 120 --json soak.json
    python benchmarks/soak.py --model smollm2 --duration 1800
    python benchmarks/soak.py --duration 300 --trace-kernel      # where the kernel's heap grows
    python benchmarks/soak.py --daemon-env MALLOC_ARENA_MAX=2    # e.g. to tell fragmentation from a leak

Starts its own daemon (home in a fresh temp dir, kept for its logs) and drives it over the
Unix socket only. --concurrency clients, randomized with --seed, send: streaming and
non-streaming completions and chat completions (some with n > 1, logprobs, stops,
priorities, tenants), cancels (POST /llmos/v1/requests/{id}/cancel by X-Request-Id),
client disconnects mid-stream, invalid requests (a 4xx is "rejected as expected") and
batch jobs (Client.submit_batch, then wait). The model driver is killed with SIGKILL every
--kill-every seconds (at least once) and the tokenizer driver once; requests in flight
must still finish.

Then, once the daemon is idle, it reports: requests ok / failed (every failure's status,
code and message, grouped), expected rejections, batch lines ok / failed, whether the KV
pool is back to full (blocks_used == 0, integrity ok), RSS and open fds of the kernel and
each driver after warm-up and at the end (a restarted driver is measured against its new
incarnation's first settled sample), the CPU model and the duration.

Exit status 1 if a request was lost (no answer and no error within --request-timeout),
blocks leaked, the daemon never got idle or died, or the kernel's RSS grew more than
--rss-limit percent; with --strict also for any failed request or batch line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LLMOS_MODEL_CACHE", str(REPO / ".cache" / "models"))  # as tests/conftest.py

from chaos import pid_of, wait_running  # noqa: E402
from daemon_harness import Daemon, bench_model_dir, cpu_model  # noqa: E402

FINISH = {"stop", "length", "cancelled"}
SYSTEM = ("You are a helpful, concise assistant running on llmos. Answer plainly, in short sentences, "
          "and never invent facts you are not sure about.")


class Fail(Exception):
    """A request that ended with an explicit error (or a malformed answer)."""

    def __init__(self, status, code, message):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, str(message)


def _fail_from(status: int, raw: bytes | str) -> Fail:
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        err = None
    if not isinstance(err, dict):
        return Fail(status, None, (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw)[:300])
    return Fail(status, err.get("code"), err.get("message"))


def _normalize(msg: str) -> str:
    """Group messages that differ only by ids and numbers."""
    msg = re.sub(r"soak-[\w.:-]+", "<id>", msg)
    msg = re.sub(r"\b(cmpl|chatcmpl|batch|file|req)[-_][0-9a-f]{6,}\w*", r"\1-<id>", msg)
    return re.sub(r"\d+(\.\d+)?", "N", msg)[:300]


class Stats:
    def __init__(self):
        self.ok = Counter()          # kind -> requests answered correctly
        self.failed = Counter()      # kind -> requests ended by an error
        self.failures: dict = {}     # (status, code, message) -> {"count", "kinds", "examples"}
        self.expected = Counter()    # invalid case -> rejected as expected (4xx)
        self.outcomes = Counter()    # cancelled, cancel_too_late, disconnected ...
        self.lost: list = []         # requests with neither answer nor error in time
        self.tokens = 0
        self.records: list = []      # every request: {"rid", "kind", "t0", "t1", "result"}
        self.in_flight: dict = {}    # rid -> record
        self.batch = {"jobs": 0, "jobs_by_status": Counter(), "lines_ok": 0, "lines_failed": 0,
                      "line_failures": Counter(), "jobs_cancelled_by_us": 0}

    def fail(self, kind: str, rid: str, exc: Fail) -> None:
        self.failed[kind] += 1
        key = (str(exc.status), str(exc.code), _normalize(exc.message))
        f = self.failures.setdefault(key, {"count": 0, "kinds": Counter(), "examples": []})
        f["count"] += 1
        f["kinds"][kind] += 1
        if len(f["examples"]) < 5:
            f["examples"].append({"request_id": rid, "message": exc.message})


# ------------------------------------------------------------------ one request

def _body(rng: random.Random, model: str, prompts: list[str], chat: bool, max_tokens: int) -> dict:
    prompt = rng.choice(prompts)
    if rng.random() < 0.1:  # long prompt: chunked prefill
        prompt = " ".join(rng.choice(prompts) for _ in range(rng.randint(4, 10)))
    body: dict = {"model": model, "max_tokens": rng.randint(1, max_tokens)}
    if chat:
        msgs = [{"role": "user", "content": prompt}]
        if rng.random() < 0.5:  # a shared system prompt: prefix-cache hits
            msgs.insert(0, {"role": "system", "content": SYSTEM})
        body["messages"] = msgs
    else:
        body["prompt"] = prompt if rng.random() < 0.9 else [rng.randint(10, 2000) for _ in range(rng.randint(1, 40))]
    r = rng.random()
    body["temperature"] = 0 if r < 0.4 else round(rng.uniform(0.3, 1.2), 2)
    if rng.random() < 0.3:
        body["top_p"] = round(rng.uniform(0.5, 1.0), 2)
    if rng.random() < 0.2:
        body["top_k"] = rng.randint(1, 50)
    if rng.random() < 0.3:
        body["seed"] = rng.randint(0, 10**6)
    if rng.random() < 0.15:
        body["stop"] = rng.choice([[" the"], ["."], ["\n", " a"]])
    if rng.random() < 0.3:
        body["ignore_eos"] = True
    if rng.random() < 0.2:
        body["n"] = rng.randint(2, 4)
    if rng.random() < 0.1:
        body.update({"logprobs": True, "top_logprobs": 2} if chat else {"logprobs": 2})
    if rng.random() < 0.2:
        body["priority"] = rng.choice(["realtime", "interactive", "batch", "interactive:2"])
    if rng.random() < 0.2:
        body["tenant"] = rng.choice(["alice", "bob", "carol"])
    return body


def _check_answer(data, n: int, chat: bool) -> tuple[int, list[str]]:
    """(completion tokens, finish reasons) of a complete non-streamed answer, or Fail."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or sorted(c.get("index") for c in choices) != list(range(n)):
        raise Fail(200, "bad_answer", f"expected {n} choices, got {str(data)[:200]}")
    reasons = [c.get("finish_reason") for c in choices]
    if not set(reasons) <= FINISH:
        raise Fail(200, "bad_answer", f"finish reasons {reasons}")
    if chat and not all(isinstance((c.get("message") or {}).get("content"), str) for c in choices):
        raise Fail(200, "bad_answer", "a choice has no message content")
    return int((data.get("usage") or {}).get("completion_tokens") or 0), reasons


async def post_json(client: httpx.AsyncClient, path: str, body, rid: str | None = None, raw: bytes | None = None):
    headers = {"X-Request-Id": rid} if rid else {}
    if raw is not None:
        r = await client.post(path, content=raw, headers={**headers, "Content-Type": "application/json"})
    else:
        r = await client.post(path, json=body, headers=headers)
    if r.status_code != 200:
        raise _fail_from(r.status_code, r.content)
    return r.json()


async def stream(client: httpx.AsyncClient, path: str, body: dict, rid: str, chat: bool,
                 stop_after: int | None = None, on_chunk=None) -> dict:
    """Stream one request. Returns {"finish": {index: reason}, "chunks", "tokens", "done"};
    with stop_after, leaves (closing the connection) after that many content chunks."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    finish, chunks, tokens = {}, 0, 0
    async with client.stream("POST", path, json=body, headers={"X-Request-Id": rid}) as r:
        if r.status_code != 200:
            raise _fail_from(r.status_code, await r.aread())
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return {"finish": finish, "chunks": chunks, "tokens": tokens, "done": True}
            obj = json.loads(data)
            if "error" in obj:
                err = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
                raise Fail(f"sse:{err.get('type')}", err.get("code"), err.get("message"))
            if obj.get("usage"):
                tokens = int(obj["usage"].get("completion_tokens") or 0)
            for c in obj.get("choices") or []:
                if c.get("finish_reason"):
                    finish[c["index"]] = c["finish_reason"]
                piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                if piece:
                    chunks += 1
            if on_chunk is not None:
                await on_chunk(chunks)
            if stop_after is not None and chunks >= stop_after:
                return {"finish": finish, "chunks": chunks, "tokens": tokens, "done": False}
    raise Fail(200, "stream_truncated", f"the stream ended without [DONE] after {chunks} chunks")


def _check_stream(res: dict, n: int) -> list[str]:
    if sorted(res["finish"]) != list(range(n)) or not set(res["finish"].values()) <= FINISH:
        raise Fail(200, "bad_stream", f"finish reasons {res['finish']} for n={n}")
    return list(res["finish"].values())


# ------------------------------------------------------------------ the traffic

class Soak:
    def __init__(self, args, daemon: Daemon, model: str, prompts: list[str]):
        self.args, self.daemon, self.model, self.prompts = args, daemon, model, prompts
        self.stats = Stats()
        self.t_start = time.monotonic()
        self.deadline = self.t_start + args.duration
        self.kills: list = []
        self.trace_dir = daemon.home / "tracemalloc"

    def now(self) -> float:
        return time.monotonic() - self.t_start

    def client(self) -> httpx.AsyncClient:
        t = self.args.request_timeout + 30   # our own asyncio timeout fires first: "lost"
        return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.daemon.socket)),
                                 base_url="http://llmos", timeout=httpx.Timeout(t, connect=10))

    async def run_one(self, kind: str, rid: str, fn) -> None:
        """Run one request with the per-request timeout and file its result."""
        rec = {"rid": rid, "kind": kind, "t0": round(self.now(), 2), "t1": None, "result": None}
        self.stats.records.append(rec)
        self.stats.in_flight[rid] = rec
        try:
            rec["result"] = await asyncio.wait_for(fn(), self.args.request_timeout)
            if rec["result"] in ("ok", None):
                rec["result"] = "ok"
                self.stats.ok[kind] += 1
            elif rec["result"] == "expected":
                pass
            else:
                self.stats.outcomes[rec["result"]] += 1
                self.stats.ok[kind] += 1
        except asyncio.TimeoutError:
            rec["result"] = "lost"
            self.stats.lost.append({"kind": kind, "request_id": rid, "started_s": rec["t0"]})
        except Fail as exc:
            rec["result"] = f"failed: {exc}"
            self.stats.fail(kind, rid, exc)
        except httpx.HTTPError as exc:
            rec["result"] = f"failed: {exc!r}"
            self.stats.fail(kind, rid, Fail(0, type(exc).__name__, str(exc) or repr(exc)))
        except Exception as exc:  # a bug in this script or a garbled answer: still a failure
            rec["result"] = f"failed: {exc!r}"
            self.stats.fail(kind, rid, Fail(0, type(exc).__name__, repr(exc)))
        finally:
            rec["t1"] = round(self.now(), 2)
            self.stats.in_flight.pop(rid, None)

    async def worker(self, w: int) -> None:
        rng = random.Random(f"{self.args.seed}-{w}")
        kinds = {"completion": 4, "chat": 4, "stream_completion": 4, "stream_chat": 4, "cancel": 1.5,
                 "disconnect": 1.5, "invalid": 1.2}
        names, weights = list(kinds), list(kinds.values())
        async with self.client() as c:
            for i in range(self.args.max_requests):
                if time.monotonic() >= self.deadline:
                    break
                kind = rng.choices(names, weights)[0]
                rid = f"soak-{w}-{i}"
                await self.run_one(kind, rid, lambda: getattr(self, "do_" + kind)(c, rng, rid))

    async def do_completion(self, c, rng, rid, chat=False):
        body = _body(rng, self.model, self.prompts, chat, self.args.max_tokens)
        data = await post_json(c, "/v1/chat/completions" if chat else "/v1/completions", body, rid)
        tokens, _ = _check_answer(data, body.get("n", 1), chat)
        self.stats.tokens += tokens

    async def do_chat(self, c, rng, rid):
        await self.do_completion(c, rng, rid, chat=True)

    async def do_stream_completion(self, c, rng, rid, chat=False):
        body = _body(rng, self.model, self.prompts, chat, self.args.max_tokens)
        res = await stream(c, "/v1/chat/completions" if chat else "/v1/completions", body, rid, chat)
        _check_stream(res, body.get("n", 1))
        self.stats.tokens += res["tokens"]

    async def do_stream_chat(self, c, rng, rid):
        await self.do_stream_completion(c, rng, rid, chat=True)

    async def _cancel(self, c, rid) -> str:
        r = await c.post(f"/llmos/v1/requests/{rid}/cancel")
        if r.status_code == 200:
            return "accepted"
        if r.status_code == 404:
            return "not_found"
        raise _fail_from(r.status_code, r.content)

    async def do_cancel(self, c, rng, rid):
        chat = rng.random() < 0.5
        body = _body(rng, self.model, self.prompts, chat, self.args.max_tokens)
        body.update(ignore_eos=True, max_tokens=self.args.cancel_tokens)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        n = body.get("n", 1)
        answer = {}
        try:
            reasons = await self._cancelled_run(c, rng, rid, path, body, chat, n, answer)
        except Fail as exc:  # cancelled while still tokenizing: the documented answer is 409 "cancelled"
            if exc.status == 409 and exc.code == "cancelled" and answer.get("cancel") == "accepted":
                return "cancelled_before_start"
            raise
        if "cancelled" in reasons:
            if answer.get("cancel") != "accepted":
                raise Fail(200, "bad_answer", f"finish_reason cancelled, but the cancel call said {answer}")
            return "cancelled"
        return "cancel_too_late" if answer.get("cancel") in ("not_found", None) else "cancel_accepted_not_applied"

    async def _cancelled_run(self, c, rng, rid, path, body, chat, n, answer) -> list[str]:
        if rng.random() < 0.5:  # streaming: cancel after a few chunks
            after = rng.randint(1, 6)

            async def on_chunk(chunks):
                if chunks >= after and "cancel" not in answer:
                    answer["cancel"] = await self._cancel(c, rid)
            res = await stream(c, path, body, rid, chat, on_chunk=on_chunk)
            return _check_stream(res, n)
        else:  # non-streaming: cancel from the side after a random delay
            async def side():
                await asyncio.sleep(rng.uniform(0.05, 1.5))
                answer["cancel"] = await self._cancel(c, rid)
            task = asyncio.create_task(side())
            try:
                data = await post_json(c, path, body, rid)
            finally:
                try:
                    await asyncio.wait_for(task, 30)
                except asyncio.TimeoutError:
                    raise Fail(0, "cancel_call_hung", "POST .../cancel did not answer in 30 s") from None
            return _check_answer(data, n, chat)[1]

    async def do_disconnect(self, c, rng, rid):
        chat = rng.random() < 0.5
        body = _body(rng, self.model, self.prompts, chat, self.args.max_tokens)
        body.update(ignore_eos=True, max_tokens=self.args.cancel_tokens)
        res = await stream(c, "/v1/chat/completions" if chat else "/v1/completions", body, rid, chat,
                           stop_after=rng.randint(1, 5))
        if res["done"]:
            return "disconnect_too_late"
        # the kernel must drop it (and free its blocks) soon after the connection closed
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.args.abort_timeout:
            r = await c.get("/llmos/v1/ps")
            if r.status_code == 200 and not any(str(q.get("id", "")).startswith(rid)
                                                for q in r.json().get("requests", [])):
                return "disconnected"
            await asyncio.sleep(0.5)
        raise Fail(0, "not_aborted", f"still in ps {self.args.abort_timeout:g} s after its client disconnected")

    INVALID = ["unknown_model", "max_tokens", "n_zero", "n_huge", "unknown_param", "empty_messages", "not_json",
               "bad_request_id", "temperature_type", "empty_prompt", "no_route", "cancel_unknown", "stream_options",
               "bad_batch_file", "unknown_batch", "too_long", "duplicate_id", "bad_role"]

    async def do_invalid(self, c, rng, rid):
        case = rng.choice(self.INVALID)
        m, p = self.model, "/v1/completions"
        base = {"model": m, "prompt": "hello", "max_tokens": 4}
        try:
            if case == "unknown_model":
                await post_json(c, p, {**base, "model": "no-such-model"}, rid)
            elif case == "max_tokens":
                await post_json(c, p, {**base, "max_tokens": -1}, rid)
            elif case == "n_zero":
                await post_json(c, p, {**base, "n": 0}, rid)
            elif case == "n_huge":
                await post_json(c, p, {**base, "n": 100000}, rid)
            elif case == "unknown_param":
                await post_json(c, p, {**base, "frobnicate": True}, rid)
            elif case == "empty_messages":
                await post_json(c, "/v1/chat/completions", {"model": m, "messages": []}, rid)
            elif case == "bad_role":
                await post_json(c, "/v1/chat/completions",
                                {"model": m, "messages": [{"role": "x", "content": "a"}]}, rid)
            elif case == "not_json":
                await post_json(c, p, None, rid, raw=b"{not json")
            elif case == "bad_request_id":
                await post_json(c, p, base, "bad id!")
            elif case == "temperature_type":
                await post_json(c, p, {**base, "temperature": "hot"}, rid)
            elif case == "empty_prompt":
                await post_json(c, p, {**base, "prompt": ""}, rid)
            elif case == "stream_options":
                await post_json(c, p, {**base, "stream_options": {"include_usage": True}}, rid)
            elif case == "too_long":
                await post_json(c, p, {**base, "prompt": [100] * 50_000}, rid)
            elif case == "no_route":
                r = await c.get("/v1/no-such-route")
                if r.status_code != 200:
                    raise _fail_from(r.status_code, r.content)
            elif case == "cancel_unknown":
                r = await c.post(f"/llmos/v1/requests/{rid}-nobody/cancel")
                if r.status_code != 200:
                    raise _fail_from(r.status_code, r.content)
            elif case == "unknown_batch":
                r = await c.get("/v1/batches/batch_nosuchjob")
                if r.status_code != 200:
                    raise _fail_from(r.status_code, r.content)
            elif case == "bad_batch_file":
                data = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n{oops\n'
                r = await c.post("/v1/files", data={"purpose": "batch"},
                                 files={"file": ("bad.jsonl", data, "application/jsonl")})
                if r.status_code != 200:
                    raise _fail_from(r.status_code, r.content)
            elif case == "duplicate_id":
                return await self._duplicate(c, rng, rid)
        except Fail as exc:
            if isinstance(exc.status, int) and 400 <= exc.status < 500:
                self.stats.expected[case] += 1
                return "expected"
            raise Fail(exc.status, exc.code, f"[invalid case {case}] {exc.message}") from None
        raise Fail(200, "accepted_invalid", f"invalid case {case} was accepted")

    async def _duplicate(self, c, rng, rid):
        """A second request with the id of one in flight: 409; the first one still finishes."""
        body = {"model": self.model, "prompt": rng.choice(self.prompts), "max_tokens": self.args.cancel_tokens,
                "ignore_eos": True}
        seen = {}

        async def on_chunk(chunks):
            if chunks >= 1 and "dup" not in seen:
                try:
                    await post_json(c, "/v1/completions", {**body, "max_tokens": 2}, rid)
                    seen["dup"] = 200
                except Fail as exc:
                    seen["dup"] = exc
        res = await stream(c, "/v1/completions", body, rid, False, on_chunk=on_chunk)
        _check_stream(res, 1)
        self.stats.tokens += res["tokens"]
        dup = seen.get("dup")
        if isinstance(dup, Fail) and isinstance(dup.status, int) and 400 <= dup.status < 500:
            self.stats.expected["duplicate_id"] += 1
            return "expected"
        if dup is None:  # finished before its first chunk was seen: nothing to test
            return "ok"
        raise dup if isinstance(dup, Fail) else Fail(200, "accepted_invalid", "a duplicate request id was accepted")

    # -------------------------------------------------------------- batch jobs

    async def batches(self) -> None:
        from llmos.client import AsyncClient, LlmosError
        rng = random.Random(f"{self.args.seed}-batch")
        async with AsyncClient(home=self.daemon.home) as cl:
            for j in range(self.args.max_batches):
                if time.monotonic() >= self.deadline:
                    break
                chat = rng.random() < 0.5
                lines = []
                for k in range(rng.randint(2, self.args.batch_lines)):
                    body = _body(rng, self.model, self.prompts, chat, self.args.max_tokens)
                    body.pop("priority", None)
                    lines.append({"custom_id": f"j{j}-{k}", "method": "POST",
                                  "url": "/v1/chat/completions" if chat else "/v1/completions", "body": body})
                rid = f"soak-batch-{j}"
                cancel = rng.random() < 0.1

                async def one(lines=lines, cancel=cancel):
                    job = await cl.submit_batch(lines)
                    self.stats.batch["jobs"] += 1
                    if cancel:
                        await asyncio.sleep(rng.uniform(0.1, 2))
                        await cl.cancel(job["id"])
                        self.stats.batch["jobs_cancelled_by_us"] += 1
                    job = await cl.wait(job["id"], timeout=self.args.request_timeout, poll=1.0)
                    self.stats.batch["jobs_by_status"][job["status"]] += 1
                    for line in [x async for x in cl.results(job["id"])]:
                        out = json.loads(line)
                        resp = out.get("response") or {}
                        if resp.get("status_code") == 200 and not out.get("error"):
                            self.stats.batch["lines_ok"] += 1
                            self.stats.tokens += int(((resp.get("body") or {}).get("usage") or {})
                                                     .get("completion_tokens") or 0)
                    if (job.get("llmos") or {}).get("error_file_id"):
                        for line in [x async for x in cl.results(job["id"], errors=True)]:
                            out = json.loads(line)
                            err = out.get("error") or ((out.get("response") or {}).get("body") or {}).get("error") or {}
                            status = (out.get("response") or {}).get("status_code")
                            why = f"{status} {err.get('code')}: {_normalize(str(err.get('message')))}"
                            if cancel and "cancel" in why.lower():
                                self.stats.outcomes["batch_line_cancelled"] += 1
                                continue
                            self.stats.batch["lines_failed"] += 1
                            self.stats.batch["line_failures"][why] += 1
                    if job["status"] not in ("completed", "cancelled") or (job["status"] == "cancelled" and not cancel):
                        raise Fail(job["status"], "batch_job", f"job ended {job['status']}: {job.get('errors')}")

                async def guarded(one=one):
                    try:
                        await one()
                    except TimeoutError as exc:  # Client.wait's own limit: the job did not finish
                        raise Fail(0, "batch_not_final", str(exc)) from None
                    except LlmosError as exc:
                        raise Fail(exc.status, exc.code, exc.message) from None
                await self.run_one("batch_job", rid, guarded)
                await asyncio.sleep(min(rng.uniform(2, 10), max(0.0, self.deadline - time.monotonic())))

    # -------------------------------------------------------------- driver kills

    def kill_plan(self) -> list[tuple[float, str]]:
        d, rng = self.args.duration, random.Random(f"{self.args.seed}-kill")
        k = max(1, int(d // self.args.kill_every))
        plan = [(d * (i + 0.5) / k + rng.uniform(-0.05, 0.05) * d / k, f"model-{self.model}") for i in range(k)]
        # the tokenizer once, half way between two model kills (or at 3/4 of a one-kill run)
        plan.append((d / k if k > 1 else 0.75 * d, f"tokenizer-{self.model}"))
        return sorted(plan)

    async def killer(self) -> None:
        for at, driver in self.kill_plan():
            await asyncio.sleep(max(0.0, self.t_start + at - time.monotonic()))
            if time.monotonic() >= self.deadline:
                break
            waited = 0.0
            while not self.stats.in_flight and waited < 15:  # kill under load
                await asyncio.sleep(0.2)
                waited += 0.2
            try:
                old = await asyncio.to_thread(pid_of, self.daemon, driver)
                victims = list(self.stats.in_flight.values())
                os.kill(old, signal.SIGKILL)
            except Exception as exc:  # no such driver running, or the daemon does not answer
                self.kills.append({"driver": driver, "at_s": round(self.now(), 1), "old_pid": None, "in_flight": 0,
                                   "restart_error": f"could not kill: {exc!r}", "_victims": []})
                continue
            event = {"driver": driver, "at_s": round(self.now(), 1), "old_pid": old, "in_flight": len(victims)}
            try:
                event["restart_s"] = round(await asyncio.to_thread(wait_running, self.daemon, driver, old, 180), 2)
                event["new_pid"] = await asyncio.to_thread(pid_of, self.daemon, driver)
            except Exception as exc:
                event["restart_error"] = repr(exc)
            event["_victims"] = victims
            self.kills.append(event)
            print(f"[{event['at_s']:6.1f}s] killed {driver} (pid {old}) with {len(victims)} requests in flight; "
                  f"back in {event.get('restart_s', '?')} s as pid {event.get('new_pid', '?')}", flush=True)

    # -------------------------------------------------------------- sampling

    async def sampler(self, samples: dict, warm_s: float) -> None:
        dumped = False
        while time.monotonic() < self.deadline:
            await asyncio.to_thread(sample_all, self.daemon, samples, self.now())
            if self.args.trace_kernel and not dumped and self.now() >= warm_s:
                dumped = await asyncio.to_thread(signal_dump, self.daemon.proc.pid,
                                                 self.trace_dir / "kernel-1.tracemalloc")
            await asyncio.sleep(self.args.sample_every)

    async def progress(self) -> None:
        while time.monotonic() < self.deadline:
            await asyncio.sleep(min(30, max(0.1, self.deadline - time.monotonic())))
            s = self.stats
            print(f"[{self.now():6.1f}s] ok {sum(s.ok.values())}, failed {sum(s.failed.values())}, "
                  f"rejected as expected {sum(s.expected.values())}, lost {len(s.lost)}, "
                  f"in flight {len(s.in_flight)}, batch jobs {s.batch['jobs']}", flush=True)

    async def run(self, samples: dict, warm_s: float) -> None:
        tasks = [asyncio.create_task(self.worker(w)) for w in range(self.args.concurrency)]
        tasks += [asyncio.create_task(self.batches()), asyncio.create_task(self.killer()),
                  asyncio.create_task(self.sampler(samples, warm_s)), asyncio.create_task(self.progress())]
        # every loop stops by itself; the outer limit is only a guard against a bug here
        done, pending = await asyncio.wait(tasks, timeout=self.args.duration + 2 * self.args.request_timeout + 300)
        for t in pending:
            t.cancel()
        for t in done:
            if t.exception() is not None:
                raise t.exception()
        if pending:
            raise RuntimeError(f"{len(pending)} traffic loops did not stop by themselves")


# ------------------------------------------------------------------ processes

def sample_all(daemon: Daemon, samples: dict, t: float) -> None:
    """One RSS / fd sample of the kernel and every driver: samples[(name, pid)] = [{t, rss, ...}]."""
    try:
        procs = {p["name"]: p["pid"] for p in daemon.ps()["processes"] if p.get("pid")}
    except Exception:
        procs = {}
    procs["kernel"] = daemon.proc.pid
    for name, pid in procs.items():
        try:
            pr = psutil.Process(pid)
            with pr.oneshot():
                mi = pr.memory_info()
                s = {"t": round(t, 1), "rss": mi.rss, "anon": mi.rss - mi.shared, "fds": pr.num_fds(),
                     "threads": pr.num_threads()}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        samples.setdefault((name, pid), []).append(s)


def rss_report(samples: dict, final: dict, warm_s: float) -> list[dict]:
    """Per process incarnation: baseline (the first sample after warm-up; for a restarted
    driver, its new incarnation's first sample at least warm_s after it appeared), end (the
    sample after idle; for a killed incarnation its last sample), growth. The incarnation
    alive at the end comes first, marked alive."""
    rows = []
    by_name = defaultdict(list)
    for (name, pid), ss in samples.items():
        by_name[name].append((ss[0]["t"], pid, ss))
    for name in sorted(by_name, key=lambda n: (n != "kernel", n)):
        incs = sorted(by_name[name])
        for i in reversed(range(len(incs))):
            t_first, pid, ss = incs[i]
            alive = i == len(incs) - 1 and (name, pid) in final
            end = final.get((name, pid)) if alive else (ss[-1] if len(ss) > 1 else None)
            settle = warm_s if i == 0 else t_first + warm_s
            base = next((x for x in ss if x["t"] >= settle and x is not end), None)
            notes = []
            if len(incs) > 1:
                notes.append(f"incarnation {i + 1} of {len(incs)}" + (", vs its own first settled sample" if i else "")
                             + ("" if alive else ", killed: end = its last sample"))
            if base is None:
                base = ss[0]
                notes.append("no settled sample: vs its first sample")
            row = {"name": name, "pid": pid, "alive": alive, "incarnation": i + 1, "incarnations": len(incs),
                   "note": "; ".join(notes), "rss_base": base["rss"], "rss_end": end["rss"] if end else None,
                   "anon_base": base["anon"], "anon_end": end["anon"] if end else None,
                   "fds_base": base["fds"], "fds_end": end["fds"] if end else None,
                   "base_t": base["t"], "end_t": end["t"] if end else None}
            row["rss_growth_pct"] = round(100 * (end["rss"] - base["rss"]) / base["rss"], 2) if end else None
            # steady growth or a plateau? least-squares slope after the baseline, and the last half's growth
            pts = [(x["t"], x["rss"]) for x in ss if base["t"] <= x["t"] and x is not end]
            pts += [(end["t"], end["rss"])] if end else []
            row["rss_slope_mib_per_min"] = _slope_mib_min(pts)
            half = [x for x in pts if x[0] >= (pts[0][0] + pts[-1][0]) / 2] if len(pts) > 2 else []
            row["rss_growth_last_half_pct"] = round(100 * (half[-1][1] - half[0][1]) / half[0][1], 2) if half else None
            rows.append(row)
    return rows


def _slope_mib_min(pts: list[tuple[float, int]]) -> float | None:
    if len(pts) < 3 or pts[-1][0] - pts[0][0] < 1:
        return None
    mt = sum(t for t, _ in pts) / len(pts)
    mr = sum(r for _, r in pts) / len(pts)
    var = sum((t - mt) ** 2 for t, _ in pts)
    return round(sum((t - mt) * (r - mr) for t, r in pts) / var * 60 / 2**20, 3)


def tracemalloc_diff(first: Path, last: Path, top: int = 15) -> list[dict]:
    """Where the kernel's Python heap grew between two snapshots (benchmarks/soak_trace)."""
    import tracemalloc
    keep = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    a = tracemalloc.Snapshot.load(str(first)).filter_traces(keep)
    b = tracemalloc.Snapshot.load(str(last)).filter_traces(keep)
    diffs = b.compare_to(a, "traceback")
    out = [{"size_diff_kib": round(sum(st.size_diff for st in diffs) / 1024, 1),
            "count_diff": sum(st.count_diff for st in diffs), "size_kib": round(sum(st.size for st in diffs) / 1024, 1),
            "where": ["(total traced Python heap)"]}]
    for st in diffs[:top]:  # frames innermost first
        out.append({"size_diff_kib": round(st.size_diff / 1024, 1), "count_diff": st.count_diff,
                    "size_kib": round(st.size / 1024, 1),
                    "where": [f"{f.filename}:{f.lineno}" for f in reversed(st.traceback)]})
    return out


def signal_dump(pid: int, path: Path, timeout: float = 60) -> bool:
    """Ask the traced kernel for a tracemalloc snapshot; True once it is written."""
    try:
        os.kill(pid, signal.SIGUSR2)
    except ProcessLookupError:
        return False
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists():
            return True
        time.sleep(0.2)
    return False


def wait_idle(daemon: Daemon, model: str, timeout: float) -> tuple[bool, float, dict]:
    """Wait for no request in flight, no job running; returns (idle, seconds, last memory)."""
    t0 = time.monotonic()
    mem = {}
    while time.monotonic() - t0 < timeout:
        try:
            with daemon.http(timeout=10) as c:
                ps = c.get("/llmos/v1/ps").json()
                mem = c.get("/llmos/v1/memory").json()[model]
                jobs = c.get("/llmos/v1/jobs").json().get("data", [])
            running = [j for j in jobs if j.get("status") not in ("completed", "failed", "cancelled", "expired")]
            if not ps["requests"] and not mem.get("requests") and not running and mem.get("blocks_used") == 0:
                return True, time.monotonic() - t0, mem
        except Exception:
            pass
        time.sleep(0.5)
    return False, time.monotonic() - t0, mem


def log_problems(home: Path, limit: int = 12) -> dict:
    """ERROR / CRITICAL / Traceback lines of the daemon's logs, grouped per file."""
    out = {}
    for f in sorted((home / "logs").glob("*.log")) + [home / "llmosd.out"]:
        if not f.exists():
            continue
        hits = [ln for ln in f.read_text(errors="replace").splitlines()
                if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", ln)]
        if hits:
            out[f.name] = {"count": len(hits), "first": hits[:limit]}
    return out


# ------------------------------------------------------------------ report

def mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:8.1f}"


def print_report(rep: dict) -> None:
    r = rep
    print()
    print(f"soak: {r['model']} for {r['duration_s']:.0f} s (traffic {r['traffic_s']:.0f} s, "
          f"seed {r['seed']}, {r['concurrency']} clients) on {r['cpu_model']} x{r['cpus']}, "
          f"load avg {r['loadavg_start']} -> {r['loadavg_end']}")
    print(f"daemon home {r['home']}")
    q = r["requests"]
    print(f"\nrequests: ok {q['ok']}, failed {q['failed']}, lost {q['lost']}, rejected as expected "
          f"{q['rejected_as_expected']}; {q['completion_tokens']} completion tokens")
    print(f"  {'kind':20s} {'ok':>6s} {'failed':>7s}")
    for k in sorted(set(q["ok_by_kind"]) | set(q["failed_by_kind"])):
        print(f"  {k:20s} {q['ok_by_kind'].get(k, 0):6d} {q['failed_by_kind'].get(k, 0):7d}")
    if q["outcomes"]:
        print("  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(q["outcomes"].items())))
    if q["expected_by_case"]:
        print("  rejected as expected: " + ", ".join(f"{k} {v}" for k, v in sorted(q["expected_by_case"].items())))
    if q["failures"]:
        print("  failures (status, code, message):")
        for f in q["failures"]:
            print(f"    {f['count']:5d} x {f['status']} {f['code']}: {f['message']}  "
                  f"[{', '.join(f'{k} {v}' for k, v in f['kinds'].items())}; e.g. {f['examples'][0]['request_id']}]")
    for lost in q["lost_requests"][:10]:
        print(f"  LOST: {lost}")
    b = r["batch"]
    print(f"\nbatch: {b['jobs']} jobs ({', '.join(f'{k} {v}' for k, v in b['jobs_by_status'].items()) or '-'}; "
          f"{b['jobs_cancelled_by_us']} cancelled by us), lines ok {b['lines_ok']}, failed {b['lines_failed']}")
    for why, n in b["line_failures"].items():
        print(f"    {n:5d} x {why}")
    print("\ndriver kills:")
    for k in r["kills"]:
        print(f"  {k['at_s']:6.1f}s {k['driver']:18s} pid {k['old_pid']} -> {k.get('new_pid', '?')} in "
              f"{k.get('restart_s', '?')} s; in flight {k['in_flight']}: "
              + ", ".join(f"{o} {n}" for o, n in k["victims"].items()) + (f"  {k['restart_error']}" if
                                                                           "restart_error" in k else ""))
    m = r["memory"]
    print(f"\nKV pool after idle ({'idle' if m['idle'] else 'NOT IDLE'} after {m['idle_wait_s']:.1f} s): "
          f"blocks used {m.get('blocks_used')} of {m.get('blocks_total')}, cached-free {m.get('blocks_cached_free')}, "
          f"swap host blocks used {m.get('swap_host_blocks_used')}, integrity {m.get('integrity')}, "
          f"preemptions {m.get('preemptions')}, prefix hit rate {m.get('prefix_hit_rate')}"
          f" -> {'LEAK' if m['leaked'] else 'ok'}")
    print(f"\nprocesses (RSS MiB and fds after warm-up at {r['warmup_s']:.0f} s, and at the end after idle):")
    print(f"  {'process':18s} {'pid':>7s} {'RSS base':>9s} {'RSS end':>9s} {'growth':>8s} {'2nd half':>8s} "
          f"{'MiB/min':>8s} "
          f"{'anon base':>9s} {'anon end':>9s} {'fds':>9s}")
    for p in r["processes"]:
        g = "-" if p["rss_growth_pct"] is None else f"{p['rss_growth_pct']:+.1f}%"
        flag = "  FLAG >%g%%" % r["rss_limit_pct"] if p["rss_growth_pct"] is not None and \
            p["rss_growth_pct"] > r["rss_limit_pct"] else ""
        sl = "-" if p["rss_slope_mib_per_min"] is None else f"{p['rss_slope_mib_per_min']:+.2f}"
        label = p["name"] if p["alive"] else f"  (killed #{p['incarnation']})"
        h = "-" if p["rss_growth_last_half_pct"] is None else f"{p['rss_growth_last_half_pct']:+.1f}%"
        print(f"  {label:18s} {p['pid']:7d} {mib(p['rss_base'])} {mib(p['rss_end'])}  {g:>7s} {h:>8s} {sl:>8s} "
              f"{mib(p['anon_base'])} {mib(p['anon_end'])} "
              f"{p['fds_base']:4d}->{'-' if p['fds_end'] is None else p['fds_end']:<4}"
              f"{flag}{('  (' + p['note'] + ')') if p['note'] else ''}")
    if r.get("kernel_tracemalloc"):
        print("\nkernel Python heap growth, warm-up -> end (tracemalloc, top sites):")
        for d in r["kernel_tracemalloc"][:11]:
            print(f"  {d['size_diff_kib']:+9.1f} KiB {d['count_diff']:+7d} blocks  {' <- '.join(d['where'][:3])}")
    if r["log_problems"]:
        print("\ndaemon log lines with ERROR/CRITICAL/Traceback:")
        for f, v in r["log_problems"].items():
            print(f"  {f}: {v['count']}")
            for ln in v["first"][:5]:
                print(f"    {ln[:220]}")
    print(f"\ndaemon exit code after SIGTERM: {r['daemon_exit']}")
    print(f"verdict: {'PASS' if not r['problems'] else 'FAIL: ' + '; '.join(r['problems'])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (random tiny llama) or a registry spec like smollm2")
    ap.add_argument("--duration", type=float, default=600, help="seconds of traffic")
    ap.add_argument("--concurrency", type=int, default=8, help="clients sending at once (plus one batch client)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=None, help="upper bound of a request's max_tokens "
                    "(default 48 tiny, 32 smollm2)")
    ap.add_argument("--cancel-tokens", type=int, default=None, help="max_tokens of cancelled / disconnected "
                    "requests (default 400 tiny, 96 smollm2)")
    ap.add_argument("--max-requests", type=int, default=100_000, help="most requests per client")
    ap.add_argument("--max-batches", type=int, default=1000)
    ap.add_argument("--batch-lines", type=int, default=8, help="most lines per batch job")
    ap.add_argument("--kill-every", type=float, default=180, help="seconds between model driver kills (>= 1 kill)")
    ap.add_argument("--request-timeout", type=float, default=None,
                    help="a request with no answer and no error after this is lost (default 300 s tiny, 900 smollm2)")
    ap.add_argument("--abort-timeout", type=float, default=30, help="seconds a disconnected request may stay in ps")
    ap.add_argument("--idle-timeout", type=float, default=180, help="seconds to wait for the daemon to get idle")
    ap.add_argument("--sample-every", type=float, default=5)
    ap.add_argument("--rss-limit", type=float, default=5.0, help="percent RSS growth flagged (fatal for the kernel)")
    ap.add_argument("--kv-memory", default=None, help="llmosd --kv-memory (default 64MiB tiny, 512MiB otherwise)")
    ap.add_argument("--daemon-arg", action="append", default=[], help="extra llmosd option (repeatable)")
    ap.add_argument("--daemon-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of llmosd and its drivers, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds before the RSS / fd baseline (default: 10%% of --duration, at most 60)")
    ap.add_argument("--trace-kernel", action="store_true", help="run the kernel under tracemalloc and report "
                    "where its Python heap grew (slower; a diagnostic for RSS growth)")
    ap.add_argument("--trace-frames", type=int, default=4, help="stack depth of --trace-kernel")
    ap.add_argument("--home", default=None, help="daemon home (default: a new temp dir, kept)")
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--strict", action="store_true", help="also exit 1 for any failed request or batch line")
    args = ap.parse_args()
    tiny = args.model == "tiny"
    args.max_tokens = args.max_tokens or (48 if tiny else 32)
    args.cancel_tokens = args.cancel_tokens or (400 if tiny else 96)
    args.request_timeout = args.request_timeout or (300 if tiny else 900)
    kv = args.kv_memory or ("64MiB" if tiny else "512MiB")

    prompts = json.loads((HERE / "prompts.json").read_text())
    model_dir = bench_model_dir(args.model)
    name = args.model
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="llmos-soak-"))
    print(f"starting llmosd ({name} = {model_dir}) in {home}", flush=True)
    env = dict(item.split("=", 1) for item in args.daemon_env) or None
    trace_dir = home / "tracemalloc"
    if args.trace_kernel:
        trace_dir.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join(filter(None, [str(HERE / "soak_trace"), os.environ.get("PYTHONPATH")]))
        env = {**(env or {}), "PYTHONPATH": path,
               "LLMOS_SOAK_TRACEMALLOC_DIR": str(trace_dir), "LLMOS_SOAK_TRACEMALLOC_FRAMES": str(args.trace_frames)}
    daemon = Daemon(home, [f"{name}={model_dir}"], "--kv-memory", kv, *args.daemon_arg, env=env)
    samples: dict = {}
    problems: list[str] = []
    load0 = [round(x, 2) for x in os.getloadavg()]
    try:
        daemon.wait_ready(900)
        soak = Soak(args, daemon, name, prompts)
        warm_s = args.warmup if args.warmup is not None else min(0.1 * args.duration, 60.0)
        print(f"ready; traffic for {args.duration:g} s, warm-up {warm_s:g} s, kills planned at "
              + ", ".join(f"{t:.0f}s {d}" for t, d in soak.kill_plan()), flush=True)
        asyncio.run(soak.run(samples, warm_s))
        traffic_s = soak.now()
        print(f"[{traffic_s:6.1f}s] traffic stopped; waiting for the daemon to get idle", flush=True)
        if daemon.proc.poll() is not None:
            problems.append(f"llmosd died (exit {daemon.proc.returncode})")
        idle, idle_s, mem = wait_idle(daemon, name, args.idle_timeout)
        time.sleep(2)  # let allocators settle before the last sample
        final: dict = {}
        sample_all(daemon, final, soak.now())
        final = {k: v[-1] for k, v in final.items()}
        traced = None
        if args.trace_kernel and (trace_dir / "kernel-1.tracemalloc").exists() and \
                signal_dump(daemon.proc.pid, trace_dir / "kernel-2.tracemalloc"):
            traced = tracemalloc_diff(trace_dir / "kernel-1.tracemalloc", trace_dir / "kernel-2.tracemalloc")
        ps = daemon.ps()
        try:
            mem = daemon.memory(name)
        except Exception:
            pass
    finally:
        code = daemon.stop()
    s = soak.stats
    procs = rss_report(samples, final, warm_s)
    swap = mem.get("swap") or {}
    leaked = not idle or mem.get("blocks_used") != 0 or mem.get("integrity") != "ok" \
        or mem.get("blocks_free") != mem.get("blocks_total") or (swap.get("host_blocks_used") or 0) != 0
    kills = []
    for k in soak.kills:
        victims = Counter((v["result"] or "unfinished") if not str(v["result"]).startswith("failed") else "failed"
                          for v in k.pop("_victims"))
        kills.append({**k, "victims": dict(victims)})
    failures = sorted(({"status": st, "code": co, "message": me, "count": f["count"], "kinds": dict(f["kinds"]),
                        "examples": f["examples"]} for (st, co, me), f in s.failures.items()),
                      key=lambda f: -f["count"])
    if s.lost:
        problems.append(f"{len(s.lost)} requests lost (no answer, no error in {args.request_timeout:g} s)")
    if leaked:
        problems.append("KV blocks leaked or pool not idle/ok")
    kern = next((p for p in procs if p["name"] == "kernel" and p["alive"]), None)
    if kern is None or kern["rss_growth_pct"] is None:
        problems.append("no kernel RSS figures")
    elif kern["rss_growth_pct"] > args.rss_limit and args.trace_kernel:
        kern["note"] = "traced: tracemalloc's own traces inflate this; not judged"
    elif kern["rss_growth_pct"] > args.rss_limit:
        problems.append(f"kernel RSS grew {kern['rss_growth_pct']:.1f}% (> {args.rss_limit:g}%)")
    if not all(p["state"] == "running" for p in ps["processes"]):
        problems.append("not every process is running at the end: "
                        + ", ".join(f"{p['name']} {p['state']}" for p in ps["processes"]))
    if not soak.kills:
        problems.append("no driver was killed (run too short?)")
    if args.strict and (s.failed or s.batch["lines_failed"]):
        problems.append(f"{sum(s.failed.values())} failed requests, {s.batch['lines_failed']} failed batch lines")
    report = {
        "model": name, "model_dir": str(model_dir), "seed": args.seed, "concurrency": args.concurrency,
        "duration_s": args.duration, "daemon_args": args.daemon_arg, "daemon_env": args.daemon_env,
        "traffic_s": round(traffic_s, 1), "warmup_s": warm_s,
        "cpu_model": cpu_model(), "cpus": os.cpu_count(), "loadavg_start": load0,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()], "home": str(home), "rss_limit_pct": args.rss_limit,
        "requests": {"ok": sum(s.ok.values()), "failed": sum(s.failed.values()), "lost": len(s.lost),
                     "rejected_as_expected": sum(s.expected.values()), "completion_tokens": s.tokens,
                     "ok_by_kind": dict(s.ok), "failed_by_kind": dict(s.failed), "outcomes": dict(s.outcomes),
                     "expected_by_case": dict(s.expected), "failures": failures, "lost_requests": s.lost},
        "batch": {**s.batch, "jobs_by_status": dict(s.batch["jobs_by_status"]),
                  "line_failures": dict(s.batch["line_failures"])},
        "kills": kills,
        "memory": {"idle": idle, "idle_wait_s": round(idle_s, 1), "leaked": leaked,
                   **{k: mem.get(k) for k in ("blocks_total", "blocks_used", "blocks_free", "blocks_cached_free",
                                              "blocks_shared", "integrity", "preemptions")},
                   "swap_host_blocks_used": swap.get("host_blocks_used"),
                   "prefix_hit_rate": (mem.get("prefix_cache") or {}).get("hit_rate"),
                   "recoveries": mem.get("recoveries")},
        "processes": procs, "process_table_end": ps["processes"],
        "samples": {f"{n}:{p}": v for (n, p), v in samples.items()},
        "kernel_tracemalloc": traced,
        "log_problems": log_problems(home), "daemon_exit": code, "problems": problems,
    }
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"report written to {args.json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
