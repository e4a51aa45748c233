"""GET /ready and /ready?model=X through a real daemon: a preloaded model, an on-demand one
before and after its first request, unknown and malformed names, and an anonymous probe
over TCP that learns no more than ready or not."""
from __future__ import annotations

import socket

import httpx
import pytest

from daemon_harness import Daemon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    port = _free_port()
    d = Daemon(tmp_path_factory.mktemp("ready"), [f"tl={tiny_llama_dir}"], "--max-loaded-models", "2",
               "--listen", f"127.0.0.1:{port}").wait_ready()
    d.port = port
    yield d
    d.stop()


def test_ready_when_every_preloaded_model_serves(daemon):
    with daemon.http() as c:
        r = c.get("/ready")
        assert r.status_code == 200 and r.json() == {"ready": True, "status": "ok"}
        r = c.get("/ready", params={"model": "tl"})
        assert r.status_code == 200 and r.json()["state"] == "loaded"


def test_an_on_demand_model_is_not_ready_until_it_loads(daemon, tiny_qwen2_dir):
    with daemon.http() as c:
        assert c.post("/llmos/v1/models", json={"name": "qw", "path": str(tiny_qwen2_dir)}).status_code == 201
        r = c.get("/ready", params={"model": "qw"})
        assert r.status_code == 503 and r.json() == {"ready": False, "model": "qw", "state": "unloaded"}
        assert c.get("/ready").status_code == 200   # the daemon is ready: qw is not preloaded
        done = c.post("/v1/completions", json={"model": "qw", "prompt": "Hi", "max_tokens": 2, "temperature": 0})
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 2
        r = c.get("/ready", params={"model": "qw"})
        assert r.status_code == 200 and r.json()["state"] == "loaded"


@pytest.mark.parametrize("name, status", [("nope", 404), ("a b", 400), ("x" * 200, 400), ("", 400),
                                          ("../etc", 400)])
def test_unknown_and_malformed_names(daemon, name, status):
    with daemon.http() as c:
        r = c.get("/ready", params={"model": name})
        assert r.status_code == status, r.text
        assert c.get("/ready", params={"model": "tl"}).status_code == 200   # and it answers on


def test_an_anonymous_probe_learns_only_ready_or_not(daemon):
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=60) as c:
        assert c.get("/v1/models").status_code == 401   # the listener needs keys...
        assert c.get("/ready").status_code == 200        # ...but not for probes
        assert c.get("/ready", params={"model": "tl"}).status_code == 200
        r = c.get("/ready", params={"model": "nope"})    # unknown and cold look the same
        assert r.status_code == 503 and r.json()["state"] == "unloaded"


def test_the_served_model_is_listed_first(daemon):
    """Routers such as SGLang's smg register a worker under the first model it lists."""
    with daemon.http() as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert ids[0] == "tl" and ids[1:] == sorted(ids[1:]) and "smollm2" in ids
