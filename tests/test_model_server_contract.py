"""The model-server contract an inference gateway (the Gateway API Inference Extension, llm-d)
relies on, checked over the TCP listener as a gateway reaches it: the OpenAI routes, streaming,
with usage.prompt_tokens_details.cached_tokens; /v1/models; /metrics with the protocol's gauges
for an ordinary key; /health 503 while a model loads and while draining; the render routes'
token ids; the gateway's headers. Each point has a deeper test elsewhere (test_tokenize.py,
test_gateway_headers.py, test_metrics.py, test_kv_events_e2e.py); this one is the contract."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon_harness import Daemon, wait_for
from llmos.kernel.auth import KeyStore

GAUGES = {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
          "vllm:cache_config_info"}
PREFIX = list(range(1000, 1000 + 64))   # four full blocks of 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_llama_dir):
    home = tmp_path_factory.mktemp("contract")
    key = KeyStore(home / "keys.db").create("gw", None, "realtime")[0]
    port = _free_port()
    d = Daemon(home, [f"tl={tiny_llama_dir}"], "--listen", f"127.0.0.1:{port}", "--drain-timeout", "120").wait_ready()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=120)
    yield d, client
    client.close()
    d.stop()


def test_completions_stream_and_report_cached_tokens(gateway):
    _, c = gateway
    first = c.post("/v1/completions", json={"model": "tl", "prompt": PREFIX + [7], "max_tokens": 2})
    assert first.status_code == 200 and first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    usage = None
    with c.stream("POST", "/v1/chat/completions", json={
            "model": "tl", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage["completion_tokens"] == 3
    again = c.post("/v1/completions", json={"model": "tl", "prompt": PREFIX + [8], "max_tokens": 2})
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == len(PREFIX)


def test_models_render_and_metrics_for_an_ordinary_key(gateway):
    _, c = gateway
    assert c.get("/v1/models").json()["data"][0]["id"] == "tl"
    body = {"model": "tl", "prompt": "Route me by my prefix"}
    rendered = c.post("/v1/completions/render", json=body)
    counted = c.post("/v1/completions", json={**body, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    assert rendered.status_code == 200 and len(rendered.json()[0]["token_ids"]) == counted
    chat = c.post("/v1/chat/completions/render", json={"model": "tl", "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 200 and chat.json()["token_ids"]
    families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    assert GAUGES <= set(families)
    (info,) = families["vllm:cache_config_info"].samples
    assert info.labels["block_size"] == "16" and int(info.labels["num_gpu_blocks"]) > 0
    assert 0 <= families["vllm:kv_cache_usage_perc"].samples[0].value <= 1


def test_the_gateways_headers_are_accepted_and_a_bad_one_is_a_400(gateway):
    _, c = gateway
    ok = c.post("/v1/completions", json={"model": "tl", "prompt": "x", "max_tokens": 1},
                headers={"x-gateway-inference-objective": "sheddable", "x-gateway-inference-fairness-id": "gw"})
    assert ok.status_code == 200, ok.text
    wider = c.post("/v1/completions", json={"model": "tl", "prompt": "x", "max_tokens": 1},
                   headers={"x-gateway-inference-fairness-id": "someone-else"})   # a key's tenant is fixed
    assert wider.status_code == 403 and wider.json()["error"]["param"] == "x-gateway-inference-fairness-id"
    bad = c.post("/v1/completions", json={"model": "tl", "prompt": "x", "max_tokens": 1},
                 headers={"x-gateway-inference-objective": "whenever"})
    assert bad.status_code == 400 and "x-gateway-inference-objective" in json.dumps(bad.json())


def test_health_is_503_while_a_model_loads(gateway):
    d, c = gateway
    assert c.get("/health").status_code == 200
    with d.http() as admin:   # (restart is the admin's: the daemon's own user on the socket)
        assert admin.post("/llmos/v1/drivers/model-tl/restart").status_code == 200
    # The new model driver imports torch and loads the weights: seconds, against 50 ms polls.
    wait_for(lambda: c.get("/health").status_code == 503, 120, "503 while the model driver reloads", 0.05)
    wait_for(lambda: c.get("/health").status_code == 200, 120, "200 once it serves again", 0.05)
    r = c.post("/v1/completions", json={"model": "tl", "prompt": "back", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_health_is_503_while_draining(gateway):
    """Last: it stops the daemon. A stream in flight, its model driver stopped while we look,
    holds the drain open, so /health is seen 503; then the drain lets it finish."""
    d, c = gateway
    started, done = threading.Event(), {}

    def long_stream():
        with c.stream("POST", "/v1/completions", json={"model": "tl", "prompt": "go", "max_tokens": 1500,
                                                      "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                started.set()
                if line == "data: [DONE]":
                    done["ok"] = True
    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(120)
    with d.http() as admin:
        pid = next(p["pid"] for p in admin.get("/llmos/v1/ps").json()["processes"] if p["name"] == "model-tl")
    os.kill(pid, signal.SIGSTOP)   # the stream cannot finish while we look: no step runs
    try:
        d.proc.send_signal(signal.SIGTERM)
        status = wait_for(lambda: c.get("/health").json().get("status") == "draining" and c.get("/health").status_code,
                          120, "draining", 0.05)
        assert status == 503
    finally:
        os.kill(pid, signal.SIGCONT)
    t.join(180)
    assert done.get("ok")   # the drain let it finish
