"""llmos on Ray Serve (llmos.serve): a local Ray head, two replicas, each supervising a real
llmosd with the tiny model, behind Serve's HTTP proxy. Requests (streaming too) are answered;
a batch is split across both replicas' daemons and merged with every custom_id once; after a
SIGKILL of one replica's daemon every request is still answered (the ingress re-routes what
that daemon failed before answering), Ray's health check replaces the replica, and the batch
completes. Those tests skip without Ray (`pip install -e '.[ray]'`); the unit tests of the
parts that need no Ray (the batch split and merge, the request a replica forwards) always run."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from gateway_kit import free_port
from llmos.serve import ServeConfig, build_app
from llmos.serve.batches import BatchRefused, Part, decode_id, encode_id, merge_results, merge_status, split_lines
from llmos.serve.proxy import ProxyRequest, prompt_text

try:
    import ray
    from ray import serve
except ImportError:   # CI installs no Ray: the Ray tests skip, naming the extra
    ray = serve = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (optional extra: pip install -e '.[ray]', "
                                                   "which installs ray[serve])")

MODEL = "llama-tiny"


def _pid(home: Path) -> int | None:
    try:
        return int((home / "run" / "llmosd.pid").read_text())
    except (OSError, ValueError):
        return None


def _healthy(home: Path) -> bool:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(home / "run" / "llmos.sock")),
                          base_url="http://llmos", timeout=5) as c:
            return c.get("/health").json().get("status") == "ok"
    except (httpx.HTTPError, ValueError):
        return False


def _poll(what, timeout: float = 300.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := what()):
            return value
        time.sleep(every)
    raise TimeoutError(f"not true after {timeout:g} s: {what.__doc__ or what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("ray")   # short: the daemons' socket paths live under it
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                                     "LLMOS_MODEL_CACHE") if k in os.environ}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(models=[f"{MODEL}={tiny_llama_dir}"], daemon_args=["--kv-memory", "64MiB"],
                          home_root=str(root / "homes"), min_replicas=2, max_replicas=2, replica_num_cpus=0.5,
                          target_ongoing_requests=4, health_check_period_s=1, retry_deadline_s=240)
        serve.run(build_app(cfg), name="llmos", route_prefix="/")   # returns once both replicas are ready
        yield f"http://127.0.0.1:{port}", root / "homes"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for home in (root / "homes").glob("slot-*"):   # nothing outlives the test
                if (pid := _pid(home)) is not None:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass


def test_split_contiguous_and_custom_ids_once():
    lines = [json.dumps({"custom_id": f"c{i}"}) for i in range(7)] + ["", "  "]
    parts = split_lines(lines, 3)
    assert [(first, len(p)) for first, p in parts] == [(0, 3), (3, 2), (5, 2)]
    assert [x for _, p in parts for x in p] == lines[:7]
    assert split_lines(lines[:2], 5) == [(0, [lines[0]]), (1, [lines[1]])]   # never an empty part
    with pytest.raises(BatchRefused) as err:
        split_lines(lines[:3] + [lines[1], "not json"], 2)
    assert err.value.lines == [4]
    with pytest.raises(BatchRefused):
        split_lines(["", "\n"], 2)


def test_batch_id_names_its_parts_and_merges():
    parts = [Part("node-a", "/h/slot-0", "batch_1", 0, 3), Part("node-b", "/h/slot-1", "batch_2", 3, 2)]
    bid = encode_id(parts)
    assert decode_id(bid) == parts
    for bad in ("batch_1", "cbatch_!!", "cbatch_" + "e30"):
        with pytest.raises(ValueError):
            decode_id(bad)
    job = lambda status, done: {"status": status, "request_counts": {"total": done, "completed": done, "failed": 0}}
    m = merge_status(bid, parts, [job("completed", 3), None])   # part b's daemon is being replaced
    assert m["status"] == "in_progress" and m["request_counts"] == {"total": 5, "completed": 3, "failed": 0}
    assert [p["status"] for p in m["parts"]] == ["completed", "unavailable"]
    assert merge_status(bid, parts, [job("completed", 3), job("completed", 2)])["status"] == "completed"
    assert merge_status(bid, parts, [job("completed", 3), job("failed", 0)])["status"] == "failed"
    assert merge_results([["a", ""], ["b", "c"]]) == ["a", "b", "c"]


def test_proxy_request_forwards_only_what_the_daemon_should_see():
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                                  {"role": "assistant", "content": " there"}], "stream": True})
    req = ProxyRequest.build("/v1/chat/completions", body.encode(),
                             {"Authorization": "Bearer k", "X-Gateway-Inference-Fairness-Id": "t1", "Host": "x"})
    assert req.stream and req.prompt == "hi there" and req.body == body.encode()
    assert req.headers == {"x-gateway-inference-fairness-id": "t1", "content-type": "application/json"}
    # Ray's prefix router divides by the text's length: never empty, even for odd bodies
    assert ProxyRequest.build("/v1/completions", b"not json", {}).prompt == "/v1/completions"
    assert ProxyRequest.build("/v1/completions", b'{"prompt": ""}', {}).prompt == "/v1/completions"
    assert prompt_text({"prompt": [1, 2, 3]}) == "[1, 2, 3]"
    assert prompt_text({"prompt": ["ab", "c"]}) == "abc"
    with pytest.raises(ValueError):
        ProxyRequest.build("/llmos/v1/ps", b"{}", {})


def _complete(url: str, prompt: str, max_tokens: int = 8) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=300,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def _stream(url: str, prompt: str) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
            "temperature": 0, "stream": True}
    text, done = "", False
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["delta"].get("content") or ""
    assert done
    return text


def _batch_lines(tag: str, n: int) -> str:
    return "".join(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/completions",
                               "body": {"model": MODEL, "prompt": f"line {i} of {tag}", "max_tokens": 8,
                                        "temperature": 0}}) + "\n" for i in range(n))


def _finished(url: str, batch_id: str) -> dict | None:
    job = httpx.get(f"{url}/cluster/v1/batches/{batch_id}", timeout=120).json()
    return job if job["status"] in ("completed", "failed", "cancelled", "expired") else None


def _custom_ids(url: str, batch_id: str) -> list[str]:
    r = httpx.get(f"{url}/cluster/v1/batches/{batch_id}/results", timeout=120)
    assert r.status_code == 200, r.text
    return [json.loads(x)["custom_id"] for x in r.text.splitlines() if x.strip()]


@needs_ray
def test_requests_through_the_serve_proxy(cluster):
    url, _ = cluster
    models = httpx.get(f"{url}/v1/models", timeout=60).json()
    assert MODEL in [m["id"] for m in models["data"]]
    r = _complete(url, "The sky is")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    assert _stream(url, "Say something")
    bad = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60)
    assert bad.status_code == 404, bad.text   # the daemon's own error reaches the client


@needs_ray
def test_batch_split_across_replicas(cluster):
    url, homes = cluster
    r = httpx.post(f"{url}/cluster/v1/batches", content=_batch_lines("split", 10), timeout=300)
    assert r.status_code == 200, r.text
    job = r.json()
    assert len({p["home"] for p in job["parts"]}) == 2, job   # one part in each replica's job store
    assert sum(p["lines"] for p in job["parts"]) == 10
    done = _poll(lambda: _finished(url, job["id"]))
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 10, done
    ids = _custom_ids(url, job["id"])
    assert sorted(ids) == sorted(f"split-{i}" for i in range(10))


@needs_ray
def test_daemon_killed_no_request_lost(cluster):
    url, homes = cluster
    batch = httpx.post(f"{url}/cluster/v1/batches", content=_batch_lines("kill", 16), timeout=300).json()
    victim = homes / "slot-0"
    old = _pid(victim)
    results: list = [None] * 6

    def ask(i):
        try:
            results[i] = _complete(url, f"request {i} while a daemon dies", max_tokens=16).status_code
        except Exception as exc:   # asserted below
            results[i] = exc
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    os.killpg(old, signal.SIGKILL)   # the kernel and its drivers, as when the daemon crashes
    for t in threads:
        t.join(400)
    assert results == [200] * len(results), results
    # Ray's health check failed that replica; its replacement took the free slot, whose
    # daemon (a new process) resumes the part of the batch in that home's job store.
    _poll(lambda: _pid(victim) not in (None, old) and _healthy(victim))
    _poll(lambda: serve.status().applications["llmos"].deployments["llmos"].replica_states.get("RUNNING") == 2)
    assert _stream(url, "after the replacement")
    done = _poll(lambda: _finished(url, batch["id"]))
    assert done["status"] == "completed", done
    ids = _custom_ids(url, batch["id"])
    assert sorted(ids) == sorted(f"kill-{i}" for i in range(16))
