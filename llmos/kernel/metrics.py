"""The kernel's figures for Prometheus (GET /metrics; every name and what it means: docs/metrics.md).

The kernel owns them. What happens once (a request ends, a token comes, a Submit is refused)
is counted here, at the kernel's calls below; everything else is read at snapshot time from
the structures that already keep it: the request table, the block pools and prefix caches,
the policy's preemption counts, the step stats, the process table, the job store. `snapshot()`
answers the "metrics" query with a typed MetricsSnapshot; the io driver renders it.

The kernel calls (core.py wires them):
  outputs(out)                each step's EngineOutputs, before the front door: first tokens, token gaps
  request_done(req, status)   FrontDoor.on_done: a request left the table (status None: its client left)
  rejected(status, code)      FrontDoor.on_rejected, and the kernel's own 401s: a Submit refused
Labels stay few: models and drivers are the kernel's own, tenants are capped (MAX_TENANTS), reasons
are the kernel's error codes. A snapshot costs one pass over the table; what costs a pass over a
block pool or a SQL query is refreshed at most every SLOW_S.
"""
from __future__ import annotations

import bisect
import logging
import platform
import time

import llmos
from llmos import names, protocol
from llmos.kernel.requests import State
from llmos.kernel.supervisor import DState

log = logging.getLogger(__name__)

MAX_TENANTS = 100          # tenant label values; requests of any later tenant are counted as "other"
MIN_INTERVAL_S = 0.025     # snapshots asked for sooner than this get the last one: many scrapers, one cost
SLOW_S = 1.0
TTFT_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
LONG_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
WAITING = (State.TOKENIZING, State.FORKING, State.WAITING)   # admitted, not running (preempted included)
REQ = ("model", "priority_class")


class Family:
    """One metric's series as plain numbers: label values -> [value], or for a histogram
    [sum, count per bucket..., count above the last bound]."""

    def __init__(self, name: str, kind: str, help: str, label_names=(), bounds=None):
        self.name, self.kind, self.help, self.label_names = name, kind, help, tuple(label_names)
        self.bounds = list(bounds) if bounds is not None else None
        self.series: dict[tuple, list] = {}

    def inc(self, labels: tuple, by: float = 1.0) -> None:
        self.series.setdefault(labels, [0.0])[0] += by

    def set(self, labels: tuple, value: float) -> None:
        self.series[labels] = [float(value)]

    def observe(self, labels: tuple, value: float) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [0.0] + [0] * (len(self.bounds) + 1)
        s[0] += value
        s[1 + bisect.bisect_left(self.bounds, value)] += 1   # le semantics: value <= bound

    def record(self) -> protocol.MetricFamily:
        series = []
        for labels, s in self.series.items():
            buckets = None
            if self.bounds is not None:
                buckets, total = [], 0
                for n in s[1:]:
                    total += n
                    buckets.append(total)
            series.append(protocol.MetricSeries(labels=list(labels), value=s[0], buckets=buckets))
        return protocol.MetricFamily(name=self.name, kind=self.kind, help=self.help,
                                     label_names=list(self.label_names), bounds=self.bounds, series=series)


def live(name: str, help: str, label_names=(), values: dict | None = None, kind: str = "gauge") -> Family:
    """A family read from live structures at snapshot time (a counter when kind says so)."""
    f = Family(name, kind, help, label_names)
    for labels, v in (values or {}).items():
        f.set(labels, v)
    return f


class Metrics:
    def __init__(self, engines: dict, front, supervisor, jobs=lambda: None, clock=time.monotonic, wall=time.time,
                 min_interval_s: float = MIN_INTERVAL_S):
        """`engines`: engine id -> ModelEngine (the kernel's dict, read live); `jobs`: -> the
        JobManager or None (it exists once the kernel runs)."""
        self.engines, self.front, self.supervisor, self._jobs = engines, front, supervisor, jobs
        self.clock, self.wall, self.min_interval_s = clock, wall, min_interval_s
        per_tenant = ("model", "tenant", "priority_class")
        self.requests = Family("llmos_requests_total", "counter", "Requests that left the kernel's table, by the HTTP "
                               "status their client got (499: it went away) and finish reason",
                               (*per_tenant, "status", "finish_reason"))
        self.prompt_tokens = Family("llmos_prompt_tokens_total", "counter", "Prompt tokens of requests that left "
                                    "the table", per_tenant)
        self.generation_tokens = Family("llmos_generation_tokens_total", "counter", "Tokens generated for requests "
                                        "that left the table (every choice)", per_tenant)
        self.ttft = Family("llmos_time_to_first_token_seconds", "histogram", "From the kernel's receipt of the "
                           "Submit to the first generated token", REQ, TTFT_S)
        self.itl = Family("llmos_inter_token_latency_seconds", "histogram", "Between consecutive generated tokens "
                          "of one choice", REQ, ITL_S)
        self.e2e = Family("llmos_e2e_request_latency_seconds", "histogram", "From the Submit to the last output of "
                          "a request answered in full", REQ, LONG_S)
        self.queue = Family("llmos_request_queue_time_seconds", "histogram", "From the Submit to the request's "
                            "first admission to the running batch", REQ, LONG_S)
        self.rejections = Family("llmos_admission_rejections_total", "counter", "Submits refused before they "
                                 "entered the table, by HTTP status and reason (the error code)", ("status", "reason"))
        self.events = [self.requests, self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e,
                       self.queue, self.rejections]
        self._tokens_at: dict[str, tuple[float, int]] = {}   # table request id -> (time of its last token, tokens)
        self._tenants: set[str] = set()
        self._slow: dict[str, tuple[float, object]] = {}
        self._job_states: set[str] = set()    # every job state seen: one at 0 stays visible
        self._last: tuple[float, protocol.MetricsSnapshot] | None = None
        self._broken: set[str] = set()

    # ------------------------------------------------------------ events
    def outputs(self, out) -> None:
        """A step's outputs: time to first token and queue time at a choice's first token, then
        one gap per further token."""
        now = self.clock()
        for req in out.progressed:
            if req.state is State.DONE:
                continue
            n, seen = len(req.output.ids), self._tokens_at.get(req.id)
            self._tokens_at[req.id] = (now, n)
            labels = (req.model, req.priority.class_name)
            if seen is None:
                if req.index == 0:
                    self.ttft.observe(labels, (req.output.first_token_at or now) - req.sched.arrival)
                    self.queue.observe(labels, (req.sched.started_at or now) - req.sched.arrival)
            elif n > seen[1]:
                gap = (now - seen[0]) / (n - seen[1])
                for _ in range(n - seen[1]):
                    self.itl.observe(labels, gap)

    def request_done(self, req, status: int | None) -> None:
        """`status`: what its client was answered (200, an error's), None: the client left (499)."""
        now = self.clock()
        self._tokens_at.pop(req.id, None)
        status = 499 if status is None else status
        labels = (req.model, self._tenant(req.tenant), req.priority.class_name)
        self.generation_tokens.inc(labels, len(req.output.ids))
        if req.index != 0:   # a request with n choices counts once, as its choice 0
            return
        finish = (req.output.finish_reason or "none") if status == 200 else ("abort" if status == 499 else "error")
        self.requests.inc((*labels, str(status), finish))
        self.prompt_tokens.inc(labels, len(req.prompt_ids))
        if status == 200:
            self.e2e.observe((req.model, req.priority.class_name), now - req.sched.arrival)

    def rejected(self, status: int, code: str) -> None:
        self.rejections.inc((str(status), code[:64]))

    def _tenant(self, tenant: str) -> str:
        tenant = tenant[:64]
        if tenant not in self._tenants and len(self._tenants) >= MAX_TENANTS:
            return "other"
        self._tenants.add(tenant)
        return tenant

    # ------------------------------------------------------------ the snapshot
    def snapshot(self) -> protocol.MetricsSnapshot:
        """Every figure now. A section that fails is left out (and logged once); the rest is served."""
        now = self.clock()
        if self._last is not None and now - self._last[0] < self.min_interval_s:
            return self._last[1]
        families = [f.record() for f in self.events]
        for section in (self._requests_now, self._memory, self._engines, self._drivers, self._batch, self._info):
            try:
                families += [f.record() for f in section(now)]
            except Exception:
                if section.__name__ not in self._broken:
                    self._broken.add(section.__name__)
                    log.exception("metrics: %s failed; its figures are left out", section.__name__)
        snap = protocol.MetricsSnapshot(taken_at=self.wall(), families=families)
        self._last = (now, snap)
        return snap

    def _slowly(self, key: str, now: float, read):
        """read(), at most once per SLOW_S for this key."""
        held = self._slow.get(key)
        if held is None or now - held[0] >= SLOW_S:
            held = self._slow[key] = (now, read())
        return held[1]

    def _loaded(self) -> list:
        return [(eid, e) for eid, e in self.engines.items() if e.loaded]

    def _requests_now(self, now: float) -> list[Family]:
        zero = {(e.model, c): 0 for _, e in self._loaded() for c in names.PRIORITY_CLASSES}
        running, waiting = dict(zero), dict(zero)
        for req in self.front.table.values():
            key = (req.model, req.priority.class_name)
            if req.state is State.RUNNING:
                running[key] = running.get(key, 0) + 1
            elif req.state in WAITING:
                waiting[key] = waiting.get(key, 0) + 1
        parked = {(m,): len(q) for m, q in self.front.parking.by_model.items()}
        return [live("llmos_requests_running", "Requests in a running batch", REQ, running),
                live("llmos_requests_waiting", "Requests admitted and not running (tokenizing, queued, preempted, "
                      "swapped)", REQ, waiting),
                live("llmos_requests_parked", "Submits waiting for their model to load", ("model",), parked),
                live("vllm:num_requests_waiting", "Gateway API Inference Extension: requests waiting, all models",
                      (), {(): sum(waiting.values())}),
                live("vllm:num_requests_running", "Gateway API Inference Extension: requests running, all models",
                      (), {(): sum(running.values())})]

    def _memory(self, now: float) -> list[Family]:
        blocks, usage, used, total, block_size = {}, {}, 0, 0, None
        for eid, e in self._loaded():
            pool, swap = e.scheduler.pool, e.scheduler.swap
            cached = min(self._slowly(f"cached:{eid}", now, lambda: pool.num_cached_free), pool.num_free)
            for state, n in (("free", pool.num_free - cached), ("cached", cached), ("used", pool.num_used),
                             ("swapped", swap.host.num_used if swap is not None else 0)):
                blocks[(e.model, eid, state)] = n
            usage[(e.model, eid)] = pool.num_used / pool.num_blocks
            used, total, block_size = used + pool.num_used, total + pool.num_blocks, block_size or pool.block_size
        share = used / total if total else 0.0
        out = [live("llmos_kv_blocks", "KV blocks by state: free, cached (free, holding a prefix), used, swapped "
                     "(on the host)", ("model", "engine", "state"), blocks),
               live("llmos_kv_cache_usage_ratio", "Used device KV blocks over all of them", ("model", "engine"), usage),
               live("vllm:kv_cache_usage_perc", "Gateway API Inference Extension: KV-cache use, 0 to 1, all models",
                     (), {(): share}),
               live("vllm:gpu_cache_usage_perc", "The same, under vLLM's older name", (), {(): share})]
        if block_size is not None:
            out.append(live("vllm:cache_config_info", "Gateway API Inference Extension: the KV cache's block size "
                             "(tokens) and its blocks, all models", ("block_size", "num_gpu_blocks"),
                             {(str(block_size), str(total)): 1}))
        return out

    def _engines(self, now: float) -> list[Family]:
        f = {k: {} for k in ("queries", "hits", "lookups", "preempt", "steps", "wall", "kernel", "tokens", "share")}
        for eid, e in self._loaded():
            key, s, kv = (e.model, eid), e.scheduler, e.scheduler.kv
            f["queries"][key], f["hits"][key], f["lookups"][key] = kv.queried_tokens, kv.hit_tokens, kv.lookups
            stats = getattr(s.policy, "stats", None)   # FCFS keeps no causes: it preempts only for memory
            causes = stats.preemptions if stats is not None else {"memory": s.preemptions}
            for cause, n in causes.items():
                f["preempt"][(*key, cause)] = n
            st = e.stats
            f["steps"][key], f["wall"][key], f["tokens"][key] = st.steps, st.wall_s, st.tokens
            f["kernel"][key], f["share"][key] = st.wall_s - st.forward_s, st.kernel_share
        me = ("model", "engine")
        return [live("llmos_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache", me,
                      f["queries"], "counter"),
                live("llmos_prefix_cache_hits_total", "Prompt tokens found in the prefix cache", me, f["hits"],
                      "counter"),
                live("llmos_prefix_cache_lookups_total", "Prefix-cache lookups (one per admission)", me,
                      f["lookups"], "counter"),
                live("llmos_preemptions_total", "Preemptions by cause (priority, fairness, memory)",
                      (*me, "cause"), f["preempt"], "counter"),
                live("llmos_steps_total", "Steps run", me, f["steps"], "counter"),
                live("llmos_step_seconds_total", "Wall time of steps", me, f["wall"], "counter"),
                live("llmos_step_kernel_seconds_total", "Time of steps outside the model driver's forward pass "
                      "(scheduling, IPC, bookkeeping)", me, f["kernel"], "counter"),
                live("llmos_step_tokens_total", "Tokens computed by steps (prompt and generated)", me, f["tokens"],
                      "counter"),
                live("llmos_step_kernel_share", "The kernel's share of step time since the engine started", me,
                      f["share"])]

    def _drivers(self, now: float) -> list[Family]:
        restarts, states = {}, {}
        for row in self.supervisor.processes():
            if row.role == "kernel":
                continue
            restarts[(row.name, row.role)] = row.restarts
            for s in DState:
                states[(row.name, row.role, s.value)] = 1 if row.state == s.value else 0
        return [live("llmos_driver_restarts_total", "Restarts of each driver", ("driver", "role"), restarts,
                      "counter"),
                live("llmos_driver_state", "1 for each driver's state, 0 for the others", ("driver", "role", "state"),
                      states)]

    def _batch(self, now: float) -> list[Family]:
        jobs = self._jobs()
        if jobs is None:
            return []
        counts = self._slowly("jobs", now, jobs.store.job_counts)
        self._job_states |= set(counts)
        return [live("llmos_batch_jobs", "Batch jobs in the store by state", ("state",),
                      {(s,): counts.get(s, 0) for s in sorted(self._job_states)}),
                live("llmos_batch_lines_done_total", "Batch lines with a result, by result (completed, failed)",
                      ("result",), {(k,): v for k, v in jobs.lines_done.items()}, "counter")]

    def _info(self, now: float) -> list[Family]:
        return [live("llmos_build_info", "The kernel's llmos version", ("version", "python"),
                      {(llmos.__version__, platform.python_version()): 1}),
                live("llmos_metrics_snapshot_timestamp_seconds", "When the kernel took these figures (Unix time)",
                      (), {(): self.wall()})]


GATEWAY_PREFIX = "vllm:"


def gateway_view(snap: protocol.MetricsSnapshot) -> protocol.MetricsSnapshot:
    """What a principal who is not the admin may read: the Gateway API Inference Extension's
    aggregate gauges (queue depth, running, KV use, the cache's shape). A router or endpoint
    picker polls these with an ordinary key; the llmos_* families name tenants and stay the
    admin's."""
    return protocol.MetricsSnapshot(taken_at=snap.taken_at,
                                    families=[f for f in snap.families if f.name.startswith(GATEWAY_PREFIX)])
