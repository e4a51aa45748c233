"""Routing across two real daemons without a cluster (issue 17, item 4): two llmosd, each
with its own home and TCP listener, behind SGLang's model gateway (`smg`, from PyPI).

- cache_aware routing keeps each group of prompts sharing a long prefix on one daemon, so
  the daemons' prefix caches hit more often than under random routing (same daemons, one
  run; only that ordering is asserted, never a timing);
- each client's own llmos key goes through smg to the daemon, which enforces it;
- when one daemon is SIGKILLed, smg notices and the other answers every request.
"""
from __future__ import annotations

import importlib.util

import httpx
import pytest

from gateway_kit import MODEL, WORKER_HEADER, Pair, Router, prefix_groups, run_phase

pytestmark = pytest.mark.skipif(importlib.util.find_spec("smg") is None,
                                reason="the router is missing: pip install -e '.[cluster]' (smg, SGLang's model gateway)")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_llama_dir):
    p = Pair(tmp_path_factory.mktemp("two-daemons"), tiny_llama_dir)
    try:
        yield p.wait_ready()
    finally:
        p.stop()


@pytest.fixture
def router_for(pair, tmp_path):
    started = []

    def start(policy: str) -> Router:
        r = Router(pair, policy, tmp_path / f"smg-{policy}-{len(started)}.log")
        started.append(r)
        r.wait_healthy({n for n in pair.daemons if n not in pair.dead})
        return r
    yield start
    for r in started:
        r.stop()


def test_cache_aware_routing_keeps_a_prefix_on_the_daemon_that_has_it(pair, router_for):
    cache_aware = router_for("cache_aware")
    aware = run_phase(cache_aware, prefix_groups(8, 4, seed=1))
    cache_aware.stop()
    blind = run_phase(router_for("random"), prefix_groups(8, 4, seed=2))   # fresh prefixes: no head start
    assert aware["affinity"] >= 0.9, aware["served"]   # nearly every group stayed on one daemon
    assert aware["hit_rate"] > blind["hit_rate"], (aware, blind)


def test_each_clients_own_key_reaches_the_daemon(pair, router_for):
    r = router_for("round_robin")
    ok = r.complete("Hello")
    assert ok.status_code == 200 and pair.name_of(ok.headers.get(WORKER_HEADER)) in pair.urls, ok.text
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "tenant": "alice"}
    # the gateway's own key is tenant "gateway": a daemon that saw it (not a key smg swapped in) says 403
    as_gateway = httpx.post(f"{r.url}/v1/completions", json=body, timeout=60,
                            headers={"Authorization": f"Bearer {pair.gateway_key}"})
    assert as_gateway.status_code == 403 and as_gateway.json()["error"]["param"] == "tenant", as_gateway.text
    as_alice = httpx.post(f"{r.url}/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {pair.client_key}"})
    assert as_alice.status_code == 200, as_alice.text
    assert httpx.post(f"{r.url}/v1/completions", json=body, timeout=60).status_code == 401


def test_when_one_daemon_dies_the_other_answers_everything(pair, router_for):
    r = router_for("cache_aware")
    prompts = prefix_groups(4, 2, words=100, seed=3)
    before = run_phase(r, prompts)
    victim = max(before["per_daemon"], key=before["per_daemon"].get)   # the one holding most groups
    survivor = next(n for n in pair.urls if n != victim)
    pair.kill(victim)
    r.wait_healthy({survivor}, timeout=180)   # smg's health checks mark it down (1 s apart, 2 failures)
    answered = []
    for _, prompt in prompts * 2:
        resp = r.complete(prompt)
        answered.append((resp.status_code, pair.name_of(resp.headers.get(WORKER_HEADER))))
    assert answered == [(200, survivor)] * len(answered)
