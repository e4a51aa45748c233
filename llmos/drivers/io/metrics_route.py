"""GET /metrics (Prometheus' text format, rendered by prometheus_client) and GET /version.

The figures are the kernel's (kernel/metrics.py), sent as a typed MetricsSnapshot. What this
module keeps is a cache of the kernel's last answers, one per asker (the credentials a scrape
came with, so that the kernel still decides who may read them), so that a scrape does not
wait on the kernel's loop. By the age of the answer held:

  - under FRESH_S: served as it is;
  - under RECENT_S (a router polling every 50 ms): served at once, and a newer one is asked
    for in the background, so each poll gets figures about one poll interval old;
  - under MAX_STALE_S (a Prometheus scraping every 15 s): a newer one is asked for and awaited
    up to WAIT_S, else the one held is served (the newer one replaces it when it comes);
  - none held, or older: the scrape waits for the kernel (FIRST_WAIT_S, then a 504).
One query in flight per asker. A refusal (401, 403) drops what was held for that asker.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib.metadata
import logging
import math
import platform
import time
from collections import OrderedDict

from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

import llmos
from llmos import protocol
from llmos.drivers.io.credentials import CURRENT
from llmos.drivers.io.kernel_link import AuthRefused, KernelLink, KernelUnavailable

log = logging.getLogger(__name__)
FRESH_S, RECENT_S, WAIT_S, MAX_STALE_S, FIRST_WAIT_S = 0.025, 1.0, 0.02, 10.0, 5.0
MAX_ASKERS = 64
CACHE = web.AppKey("metrics_cache", object)
KINDS = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}


def add_routes(app: web.Application, link: KernelLink) -> None:
    app[CACHE] = MetricsCache(link)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/version", version)


async def metrics(request: web.Request) -> web.Response:
    answer = await request.app[CACHE].get()
    body, content_type = answer.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


@functools.cache
def versions() -> dict:
    """What this install is: llmos, the bus protocol, Python, and (from their metadata, without
    importing them) the model driver's torch and transformers."""
    def dist(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"llmos": llmos.__version__, "protocol": protocol.PROTOCOL_VERSION, "python": platform.python_version(),
            "torch": dist("torch"), "transformers": dist("transformers")}


async def version(request: web.Request) -> web.Response:
    return web.json_response(versions())


class Answer:
    """One MetricsSnapshot and its renderings (by content type), made once each."""

    def __init__(self, snap: protocol.MetricsSnapshot):
        self.snap = snap
        self._text: dict[str, bytes] = {}

    def render(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)   # OpenMetrics when asked for, else the text format
        if content_type not in self._text:
            self._text[content_type] = encoder(self)
        return self._text[content_type], content_type

    def collect(self):
        """prometheus_client's Collector interface, over the snapshot's families."""
        for fam in self.snap.families:
            try:
                yield family(fam)
            except (ValueError, TypeError, KeyError) as exc:   # one bad family must not cost the scrape
                log.error("metrics: family %.80r left out: %s", fam.name, exc)


def family(f: protocol.MetricFamily):
    """The prometheus_client family of one of the kernel's MetricFamily records."""
    cls = KINDS[f.kind]
    names = [str(n) for n in f.label_names]
    m = cls(f.name, f.help, labels=names)
    for s in f.series:
        labels = [str(v) for v in s.labels]
        if len(labels) != len(names):
            raise ValueError(f"{len(labels)} label values for {len(names)} labels")
        if cls is HistogramMetricFamily:
            bounds = [*map(float, f.bounds or ()), math.inf]
            if s.buckets is None or len(s.buckets) != len(bounds):
                raise ValueError("buckets do not match the bounds")
            m.add_metric(labels, [(floatToGoString(b), n) for b, n in zip(bounds, s.buckets)], s.value)
        else:
            m.add_metric(labels, s.value)
    return m


class MetricsCache:
    """The kernel's last answers to "metrics", per asker. A cache: nothing here is figured out."""

    def __init__(self, link: KernelLink, clock=time.monotonic, fresh_s: float = FRESH_S, recent_s: float = RECENT_S,
                 wait_s: float = WAIT_S, max_stale_s: float = MAX_STALE_S, first_wait_s: float = FIRST_WAIT_S):
        self.link, self.clock = link, clock
        self.fresh_s, self.recent_s, self.wait_s = fresh_s, recent_s, wait_s
        self.max_stale_s, self.first_wait_s = max_stale_s, first_wait_s
        self._held: OrderedDict[tuple, tuple[float, Answer]] = OrderedDict()   # asker -> (when it came, answer)
        self._asking: dict[tuple, asyncio.Task] = {}

    async def get(self) -> Answer:
        creds = CURRENT.get()
        key = dataclasses.astuple(creds) if creds is not None else ()
        now = self.clock()
        held = self._held.get(key)
        age = now - held[0] if held is not None else math.inf
        if age < self.fresh_s:
            return held[1]
        task = self._asking.get(key)
        if task is None:   # (it runs in this request's context: the query carries its credentials)
            task = self._asking[key] = asyncio.ensure_future(self._ask(key))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())   # retrieved: a late failure is no warning
        if age < self.recent_s:
            return held[1]
        usable = age < self.max_stale_s
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.wait_s if usable else self.first_wait_s)
        except asyncio.TimeoutError:
            if not usable:
                raise KernelUnavailable(f"the kernel did not answer 'metrics' within {self.first_wait_s:g} s",
                                        504) from None
            return held[1]

    async def _ask(self, key: tuple) -> Answer:
        try:
            snap = await self.link.query("metrics", timeout=max(self.first_wait_s, self.max_stale_s))
        except AuthRefused:
            self._held.pop(key, None)
            raise
        finally:
            self._asking.pop(key, None)
        if not isinstance(snap, protocol.MetricsSnapshot):
            raise KernelUnavailable("the kernel answered 'metrics' without a snapshot", 502)
        answer = Answer(snap)
        self._held[key] = (self.clock(), answer)
        self._held.move_to_end(key)
        while len(self._held) > MAX_ASKERS:
            self._held.popitem(last=False)
        return answer
