"""GET /metrics (issue 15): the kernel's figures (kernel/metrics.py) counted at the front door's
real events, read from the real engine and scheduler, carried in the protocol's types and
rendered by the io driver's route with prometheus_client; its cache; then a real daemon
scraped before and after traffic with prometheus_client's own parser."""
from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmos import protocol
from llmos.config import DaemonConfig
from llmos.drivers.io.kernel_link import AuthRefused
from llmos.drivers.io.metrics_route import Answer, MetricsCache
from llmos.kernel import metrics as km
from llmos.kernel.engine import ModelEngine
from llmos.kernel.frontdoor import FrontDoor
from llmos.kernel.outputs import EngineOutputs, Failure
from llmos.kernel.supervisor import DState
from scheduler_kit import VOCAB, FakeClock, run_step

MODEL, IO = "mx", "io"
INFO = protocol.ModelInfo(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32", vocab_size=VOCAB,
                          max_model_len=64, weight_bytes=0, eos_token_ids=[0], model_type="llama", model_dir="/none")


class Supervisor:
    def __init__(self, rows=()):
        self.rows = list(rows)

    def processes(self):
        return [protocol.ProcessRow(name="kernel", role="kernel", state="running", pid=1, restarts=0, uptime_s=None,
                                    last_error=None), *self.rows]


class Kernel:
    """A FrontDoor and its engine, wired to Metrics as core.py wires them; a fake clock for the metrics."""

    def __init__(self, supervisor=None, jobs=None):
        self.sent, self.clock = [], FakeClock(t=0.0)
        config = DaemonConfig(models=[MODEL], device="cpu", swap_memory="0", max_batched_tokens=64)
        self.front = FrontDoor({}, self.send, lambda name: ("running", None))
        self.engine = ModelEngine(MODEL, MODEL, config, lambda info, device: {"kv_budget_bytes": 64 * 16 * 32},
                                  self.send, self.outputs)
        self.front.engines[MODEL] = self.engine
        self.engine.driver_up(INFO)
        self.engine.pool_mapped(None)
        self.front.tokenizer_restarted(self.engine)
        self.metrics = km.Metrics(self.front.engines, self.front, supervisor or Supervisor(), lambda: jobs,
                                  clock=self.clock, min_interval_s=0)
        self.front.on_done = self.metrics.request_done
        self.front.on_rejected = lambda m, principal, status, code: self.metrics.rejected(status, code)

    def send(self, peer, msg):
        self.sent.append((peer, msg))

    def outputs(self, engine, out):
        self.metrics.outputs(out)
        self.front.engine_outputs(engine, out)

    def admit(self, rid: str, prompt: list[int], tenant: str = "t", priority=None, **params):
        self.front.submit(IO, protocol.Submit(request_id=rid, model=MODEL, prompt=None, messages=None,
                                              prompt_token_ids=prompt, params={"temperature": 0.0, **params},
                                              tenant=tenant, priority=priority))
        return self.front.table.get(rid)

    def step(self, dt: float = 0.0):
        self.clock.advance(dt)
        self.outputs(self.engine, EngineOutputs(progressed=run_step(self.engine.scheduler).changed))

    def finish_text(self, rid: str):
        """The tokenizer's answer to everything sent for rid (one delta), ending it if it finished."""
        req = self.front.table[rid]
        self.front.text_deltas(protocol.TextDeltas(items=[protocol.TextDelta(
            rid=rid, text="x", n=req.detok.sent - req.detok.acked, lp=None, finish=req.output.finish_reason,
            stop_hit=False)]))

    def figures(self) -> dict:
        """name -> {labels: value} (histograms: {labels: (buckets, sum)}), through the wire format."""
        reply = protocol.decode(protocol.encode(protocol.QueryReply(query_id="q", metrics=self.metrics.snapshot())))
        return {f.name: {tuple(s.labels): (s.value if s.buckets is None else (s.buckets, s.value)) for s in f.series}
                for f in reply.metrics.families}

    def close(self):
        self.engine.pool.release()


@pytest.fixture
def kernel():
    k = Kernel()
    yield k
    k.close()


def test_a_histogram_puts_each_observation_in_its_bucket():
    f = km.Family("h", "histogram", "", ("a",), bounds=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):   # a value on a bound belongs to it (le)
        f.observe(("x",), v)
    s = f.record().series[0]
    assert (s.labels, s.buckets, s.value) == (["x"], [2, 4, 5], pytest.approx(8.65))


def test_a_finished_request_counts_once_with_its_tokens_and_latencies(kernel):
    kernel.admit("c1", [5, 6, 7], max_tokens=3)
    kernel.step()                       # prefill: the first token
    kernel.step(dt=0.03)                # two gaps of 30 ms
    kernel.step(dt=0.03)
    kernel.finish_text("c1")
    f = kernel.figures()
    who = (MODEL, "t", "interactive")
    assert f["llmos_requests_total"] == {(*who, "200", "length"): 1}
    assert f["llmos_prompt_tokens_total"] == {who: 3} and f["llmos_generation_tokens_total"] == {who: 3}
    buckets, total = f["llmos_inter_token_latency_seconds"][(MODEL, "interactive")]
    assert buckets == [0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2] and total == pytest.approx(0.06)
    for name in ("llmos_time_to_first_token_seconds", "llmos_request_queue_time_seconds",
                 "llmos_e2e_request_latency_seconds"):
        assert f[name][(MODEL, "interactive")][0][-1] == 1, name
    assert f["llmos_admission_rejections_total"] == {}


def test_each_ending_has_its_status_and_a_refusal_is_no_request(kernel):
    kernel.front.submit(IO, protocol.Submit(request_id="r0", model="nope", prompt="hi", messages=None,
                                            prompt_token_ids=None, params={}, tenant="t"))   # refused: 404
    kernel.admit("r1", [1] * 70)                  # in the table, then a 400: over the context
    kernel.admit("r2", [5, 6, 7], max_tokens=9)
    kernel.admit("r3", [8, 9], max_tokens=9)
    kernel.step()
    kernel.front.abort(protocol.Abort(request_id="r2", reason="client disconnected"))
    failed = [(kernel.front.table["r3"], Failure(500, "internal_error", "the step failed"))]
    kernel.outputs(kernel.engine, EngineOutputs(failed=failed))
    f = kernel.figures()
    who = (MODEL, "t", "interactive")
    assert f["llmos_admission_rejections_total"] == {("404", "model_not_found"): 1}
    assert f["llmos_requests_total"] == {(*who, "400", "error"): 1, (*who, "499", "abort"): 1,
                                         (*who, "500", "error"): 1}
    assert f["llmos_generation_tokens_total"] == {who: 2} and f["llmos_prompt_tokens_total"] == {who: 5}
    assert f["llmos_e2e_request_latency_seconds"] == {}   # only requests answered in full


def test_queues_and_memory_are_read_from_the_engine(kernel):
    kernel.engine.config.max_num_seqs = 2
    kernel.engine.scheduler.max_num_seqs = 2
    for i in range(3):
        kernel.admit(f"q{i}", [10 * i + 1] * 20, max_tokens=5)
    kernel.admit("b", [99] * 4, max_tokens=5, priority="batch")
    kernel.step()
    f = kernel.figures()
    assert f["llmos_requests_running"][(MODEL, "interactive")] == 2
    assert f["llmos_requests_waiting"] == {(MODEL, "realtime"): 0, (MODEL, "interactive"): 1, (MODEL, "batch"): 1}
    assert f["vllm:num_requests_running"] == {(): 2} and f["vllm:num_requests_waiting"] == {(): 2}
    pool = kernel.engine.scheduler.pool
    blocks = {k[2]: v for k, v in f["llmos_kv_blocks"].items()}
    assert blocks == {"free": pool.num_free, "cached": 0, "used": pool.num_used, "swapped": 0}
    assert sum(blocks.values()) == pool.num_blocks and pool.num_used == 4   # 2 x (20 + 1 tokens) in blocks of 16
    assert f["vllm:kv_cache_usage_perc"] == {(): pytest.approx(4 / pool.num_blocks)}
    assert f["vllm:cache_config_info"] == {("16", str(pool.num_blocks)): 1}
    kernel.engine.stats.record(wall_s=0.5, forward_s=0.4, tokens=42, now=0.0)   # (the engine's loop records steps)
    f = kernel.figures()
    me = (MODEL, MODEL)
    assert (f["llmos_steps_total"], f["llmos_step_tokens_total"]) == ({me: 1}, {me: 42})
    assert f["llmos_step_seconds_total"][me] == 0.5 and f["llmos_step_kernel_seconds_total"][me] == pytest.approx(0.1)
    assert f["llmos_step_kernel_share"][me] == pytest.approx(0.2)
    assert f["llmos_preemptions_total"] == {(MODEL, MODEL, c): 0 for c in ("priority", "fairness", "memory")}


def test_drivers_jobs_and_a_failing_section(kernel):
    class Jobs:
        class store:
            job_counts = staticmethod(lambda: {"in_progress": 1, "completed": 2})
        lines_done = {"completed": 7, "failed": 1}
    rows = [protocol.ProcessRow(name="model-mx", role="model", state="backoff", pid=None, restarts=2, uptime_s=0.0,
                                last_error="killed")]
    k = Kernel(Supervisor(rows), Jobs())
    try:
        f = k.figures()
        assert f["llmos_driver_restarts_total"] == {("model-mx", "model"): 2}
        assert f["llmos_driver_state"] == {("model-mx", "model", s.value): int(s is DState.BACKOFF) for s in DState}
        assert f["llmos_batch_jobs"] == {("completed",): 2, ("in_progress",): 1}
        assert f["llmos_batch_lines_done_total"] == {("completed",): 7, ("failed",): 1}
        k.metrics.supervisor = None        # its section fails: left out, the others still served
        f = k.figures()
        assert "llmos_driver_state" not in f and "llmos_batch_jobs" in f and "vllm:num_requests_waiting" in f
    finally:
        k.close()


def test_tenants_beyond_the_cap_are_other(kernel, monkeypatch):
    monkeypatch.setattr(km, "MAX_TENANTS", 2)
    for i, tenant in enumerate(("a", "b", "c")):
        kernel.admit(f"t{i}", [3 + i], tenant=tenant, max_tokens=1)
    kernel.step()
    for i in range(3):
        kernel.finish_text(f"t{i}")
    assert {k[1] for k in kernel.figures()["llmos_requests_total"]} == {"a", "b", "other"}


def test_n_choices_count_one_request_and_every_choice_s_tokens(kernel):
    kernel.front.submit(IO, protocol.Submit(request_id="g", model=MODEL, prompt=None, messages=None,
                                            prompt_token_ids=[4, 5, 6], params={"temperature": 0.0, "max_tokens": 2},
                                            tenant="t", n=3))
    for _ in range(4):
        kernel.step()
    for rid in [r.id for r in kernel.front.table.values()]:
        kernel.finish_text(rid)
    assert kernel.front.table == {}
    f = kernel.figures()
    who = (MODEL, "t", "interactive")
    assert f["llmos_requests_total"] == {(*who, "200", "length"): 1}
    assert f["llmos_generation_tokens_total"] == {who: 6} and f["llmos_prompt_tokens_total"] == {who: 3}


def test_the_rendered_text_parses_back_to_the_same_figures(kernel):
    kernel.admit("c1", [5, 6, 7], max_tokens=2)
    kernel.step()
    kernel.step(dt=0.01)
    kernel.finish_text("c1")
    body, content_type = Answer(kernel.metrics.snapshot()).render("")
    assert content_type.startswith("text/plain")
    parsed = {m.name: m for m in text_string_to_metric_families(body.decode())}
    assert parsed["llmos_requests"].type == "counter"
    [ok] = [s for s in parsed["llmos_requests"].samples if s.name == "llmos_requests_total"]
    assert ok.labels == {"model": MODEL, "tenant": "t", "priority_class": "interactive", "status": "200",
                         "finish_reason": "length"} and ok.value == 1
    itl = {s.labels.get("le"): s.value for s in parsed["llmos_inter_token_latency_seconds"].samples
           if s.name.endswith("_bucket")}
    assert itl["0.01"] == 1 and itl["+Inf"] == 1
    assert [s.value for s in parsed["vllm:num_requests_waiting"].samples] == [0]
    assert parsed["vllm:cache_config_info"].samples[0].labels["block_size"] == "16"
    om, om_type = Answer(kernel.metrics.snapshot()).render("application/openmetrics-text; version=1.0.0")
    assert om_type.startswith("application/openmetrics-text") and om.endswith(b"# EOF\n")


# ---------------------------------------------------------------- the io driver's cache

class Link:
    """KernelLink's query, answered when the test says so."""

    def __init__(self):
        self.asked: list[asyncio.Future] = []

    async def until_asked(self, n: int) -> asyncio.Future:
        """The n-th query, once the scrapes waiting on the loop have sent it."""
        for _ in range(10_000):
            if len(self.asked) >= n:
                return self.asked[n - 1]
            await asyncio.sleep(0)
        raise AssertionError(f"{len(self.asked)} queries, expected {n}")

    async def query(self, what, args=None, timeout=5.0):
        assert what == "metrics"
        fut = asyncio.get_running_loop().create_future()
        self.asked.append(fut)
        return await fut


def snap(t: float) -> protocol.MetricsSnapshot:
    return protocol.MetricsSnapshot(taken_at=t, families=[])


def test_the_cache_serves_what_it_holds_and_asks_once_at_a_time():
    async def settle():   # the query's task stores its answer
        for _ in range(3):
            await asyncio.sleep(0)

    async def scenario():
        link, clock = Link(), FakeClock(t=0.0)
        cache = MetricsCache(link, clock=clock, fresh_s=0.025, recent_s=1, wait_s=0.01, max_stale_s=10,
                             first_wait_s=5)
        first = asyncio.ensure_future(cache.get())   # nothing held: waits for the kernel
        (await link.until_asked(1)).set_result(snap(1))
        assert (await first).snap.taken_at == 1
        clock.advance(0.01)
        assert (await cache.get()).snap.taken_at == 1 and len(link.asked) == 1   # fresh: no query
        clock.advance(0.1)   # a poller: served at once, one query in the background however many ask
        served = [(await cache.get()).snap.taken_at for _ in range(3)]
        await link.until_asked(2)
        await settle()
        assert served == [1, 1, 1] and len(link.asked) == 2
        link.asked[1].set_result(snap(2))
        await settle()
        assert (await cache.get()).snap.taken_at == 2 and len(link.asked) == 2
        clock.advance(5)     # a sparse scraper: waits a little for a newer one, else gets the one held
        assert (await cache.get()).snap.taken_at == 2 and len(link.asked) == 3
        link.asked[2].set_result(snap(3))
        await settle()
        clock.advance(0.01)
        assert (await cache.get()).snap.taken_at == 3 and len(link.asked) == 3
        clock.advance(60)    # too old to serve: the scrape waits for the kernel, which refuses
        refused = asyncio.ensure_future(cache.get())
        (await link.until_asked(4)).set_exception(AuthRefused("revoked", 401))
        with pytest.raises(AuthRefused):
            await refused
        assert cache._held == {}
    asyncio.run(scenario())


# ---------------------------------------------------------------- a real daemon

def scrape(c: httpx.Client) -> dict:
    """sample name and labels -> value, parsed by prometheus_client."""
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for m in text_string_to_metric_families(r.text) for s in m.samples}


def total(figures: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in figures.items() if n == name and set(labels.items()) <= set(ls))


def scrape_until(c: httpx.Client, done, timeout: float = 60.0) -> dict:
    """Scrape until done(figures): a scrape may be served figures a moment old (the io driver's cache)."""
    deadline = time.monotonic() + timeout
    while not done(figures := scrape(c)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return figures


def test_a_scrape_moves_by_exactly_the_traffic_sent(tiny_daemon):
    with tiny_daemon.http() as c:
        before = scrape(c)
        sizes, usage = (3, 5, 8), []
        for k in sizes:
            body = {"model": "tiny", "prompt": f"count {k}", "max_tokens": k, "ignore_eos": True, "temperature": 0}
            usage.append(c.post("/v1/completions", json=body).json()["usage"])
        assert c.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
        def moved(name, figures=None, **labels):   # since `before`, in `figures` (default: `after`)
            return total(figures or after, name, **labels) - total(before, name, **labels)
        after = scrape_until(c, lambda f: moved("llmos_requests_total", f) >= 3)
        assert moved("llmos_requests_total") == 3 and moved("llmos_requests_total", status="200") == 3
        assert moved("llmos_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
        assert moved("llmos_generation_tokens_total") == sum(sizes) == sum(u["completion_tokens"] for u in usage)
        assert moved("llmos_admission_rejections_total", status="404", reason="model_not_found") == 1
        for name in ("llmos_time_to_first_token_seconds", "llmos_e2e_request_latency_seconds",
                     "llmos_request_queue_time_seconds"):
            assert moved(f"{name}_count") == 3, name
        assert moved("llmos_inter_token_latency_seconds_count") == sum(k - 1 for k in sizes)
        assert total(after, "vllm:num_requests_waiting") == 0 == total(after, "vllm:num_requests_running")
        assert 0 <= total(after, "vllm:kv_cache_usage_perc") <= 1
        [info] = [ls for (n, ls), v in after.items() if n == "vllm:cache_config_info" and v == 1]
        assert dict(info)["block_size"] == "16" and int(dict(info)["num_gpu_blocks"]) > 0
        assert total(after, "llmos_driver_state", driver="io", state="running") == 1

        before = after   # a batch job of two lines
        lines = "".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions",
                                    "body": {"model": "tiny", "prompt": "hi", "max_tokens": 2}}) + "\n"
                        for i in range(2))
        f = c.post("/v1/files", files={"file": ("b.jsonl", lines.encode())}, data={"purpose": "batch"}).json()
        c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/completions",
                                    "completion_window": "24h"}).raise_for_status()
        after = scrape_until(c, lambda f: moved("llmos_batch_jobs", f, state="completed") >= 1)
        assert moved("llmos_batch_lines_done_total", result="completed") == 2
        assert moved("llmos_batch_lines_done_total", result="failed") == 0
        assert moved("llmos_requests_total", priority_class="batch", status="200") == 2
        version = c.get("/version").json()
        assert version["llmos"] and version["protocol"] == protocol.PROTOCOL_VERSION


def test_llmos_version():
    from click.testing import CliRunner

    import llmos
    from llmos.cli.main import cli
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output == f"llmos {llmos.__version__}\n"


def test_bounds_are_sorted_and_finite():
    for bounds in (km.TTFT_S, km.ITL_S, km.LONG_S):
        assert list(bounds) == sorted(bounds) and all(math.isfinite(b) for b in bounds)
