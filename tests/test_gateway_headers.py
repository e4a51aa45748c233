"""The inference gateway's headers through a real daemon: x-gateway-inference-objective sets the
priority class and x-gateway-inference-fairness-id the tenant (seen in the kernel's metrics by
tenant and class); a bad header is a 400 naming it; a key's tenant and class are not widened."""
from __future__ import annotations

import time

import pytest

from daemon_harness import Daemon
from llmos.kernel.auth import KeyStore

OBJECTIVE, FAIRNESS = "x-gateway-inference-objective", "x-gateway-inference-fairness-id"
BODY = {"model": "tl", "prompt": "Hello", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    home = tmp_path_factory.mktemp("gateway")
    store = KeyStore(home / "keys.db")
    d = Daemon(home, [f"tl={tiny_llama_dir}"]).wait_ready()
    d.keys = {"alice": store.create("alice", ["tl"], "interactive")[0]}
    yield d
    d.stop()


def complete(d: Daemon, headers: dict, key: str | None = None, body=None):
    if key:
        headers = {**headers, "Authorization": f"Bearer {d.keys[key]}"}
    with d.http() as c:
        return c.post("/v1/completions", json=body or BODY, headers=headers)


def served(d: Daemon, tenant: str, klass: str, want: float = 1, timeout: float = 60.0) -> str:
    """Wait until GET /metrics counts `want` requests of this tenant and class that ended with
    200 (the io driver serves the kernel's figures from a cache, a moment old); the last text."""
    deadline, count = time.monotonic() + timeout, None
    while True:
        with d.http() as c:
            text = c.get("/metrics").text
        count = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("llmos_requests_total{") and f'tenant="{tenant}"' in line
                    and f'priority_class="{klass}"' in line and 'status="200"' in line)
        if count == want:
            return text
        assert count < want and time.monotonic() < deadline, f"{tenant}/{klass}: {count} requests, not {want}"
        time.sleep(0.1)


@pytest.mark.parametrize("objective, klass", [("sheddable", "batch"), ("Critical", "realtime"),
                                              ("standard", "interactive"), ("batch", "batch")])
def test_the_headers_set_priority_class_and_tenant(daemon, objective, klass):
    tenant = f"team-{objective.lower()}"
    r = complete(daemon, {OBJECTIVE: objective, FAIRNESS: tenant})
    assert r.status_code == 200, r.text
    served(daemon, tenant, klass)


def test_the_headers_win_over_the_body(daemon):
    r = complete(daemon, {OBJECTIVE: "sheddable", FAIRNESS: "gateway-team"},
                 body={**BODY, "tenant": "body-team", "priority": "realtime"})
    assert r.status_code == 200, r.text
    assert 'tenant="body-team"' not in served(daemon, "gateway-team", "batch")


@pytest.mark.parametrize("header, value", [(OBJECTIVE, "urgent"), (OBJECTIVE, ""), (FAIRNESS, ""),
                                           (FAIRNESS, "x" * 65)])
def test_a_bad_header_is_400_naming_it_and_the_next_request_is_served(daemon, header, value):
    r = complete(daemon, {header: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == header, r.text
    assert complete(daemon, {}).status_code == 200


def test_a_keys_tenant_and_class_are_not_widened_by_the_headers(daemon):
    r = complete(daemon, {FAIRNESS: "bob"}, key="alice")
    assert r.status_code == 403 and r.json()["error"]["param"] == FAIRNESS, r.text
    r = complete(daemon, {OBJECTIVE: "critical"}, key="alice")   # alice: interactive at most
    assert r.status_code == 403 and r.json()["error"]["param"] == OBJECTIVE, r.text
    r = complete(daemon, {FAIRNESS: "alice", OBJECTIVE: "sheddable"}, key="alice")   # narrowing is fine
    assert r.status_code == 200, r.text
    served(daemon, "alice", "batch")
