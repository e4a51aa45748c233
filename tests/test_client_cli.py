"""The client SDK and the `llmos` CLI against the real io driver and a fake kernel
(FakeKernel from fake_kernel.py). `start`/`stop` run a fake llmosd: this file run as a script.
Client and AsyncClient are compared request by request on a mock transport, and
AsyncClient.restart_driver runs against a real daemon."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import httpx
import pytest
from click.testing import CliRunner

from daemon_harness import serving
from llmos import protocol
from llmos.cli import main as cli_main
from llmos.client import AsyncClient, Client, DaemonNotRunning, NotFound, RequestRejected, ServerError, openai_client
from llmos.paths import Paths
from fake_kernel import MODEL, REPLY, io_stack

ANSWER = "".join(REPLY)
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with io_stack(home) as (kernel, _, _):
        yield home, kernel


def llmos(home, *args, input=None):
    return CliRunner().invoke(cli_main.cli, ["--home", str(home), *args], input=input)


def test_client_sync(home):
    with Client(home[0]) as c:
        assert c.health()["status"] == "ok"
        assert [m["id"] for m in c.models()] == [MODEL]
        assert c.ps()["processes"][0]["name"] == "io" and c.memory()[MODEL]["blocks_free"] == 60
        assert c.chat(MODEL, HI, max_tokens=50)["choices"][0]["message"]["content"] == ANSWER
        assert c.completion(MODEL, "x", max_tokens=2)["choices"][0]["text"] == "Hello world"
        assert "".join(c.stream_chat(MODEL, HI)) == ANSWER
        assert "".join(c.stream_completion(MODEL, [5, 6])) == ANSWER
        with pytest.raises(RequestRejected) as exc:
            c.chat("nope", HI)
        assert (exc.value.status, exc.value.code, exc.value.param) == (404, "model_not_found", "model")
        with pytest.raises(RequestRejected) as exc:
            c.chat(MODEL, HI, temperature=9)
        assert (exc.value.status, exc.value.param) == (400, "temperature")
        with pytest.raises(ServerError, match="model driver crashed"):
            c.completion(MODEL, "fail")
        with pytest.raises(ServerError, match="model driver crashed"):
            list(c.stream_completion(MODEL, "fail"))


def test_client_async_and_openai(home):
    async def go():
        async with AsyncClient(home[0]) as c:
            assert (await c.health())["status"] == "ok"
            assert (await c.chat(MODEL, HI))["choices"][0]["message"]["content"] == ANSWER
            assert "".join([d async for d in c.stream_chat(MODEL, HI)]) == ANSWER
            with pytest.raises(RequestRejected):
                await c.completion("nope", "x")
    asyncio.run(go())
    oai = openai_client(home[0])
    assert oai.models.list().data[0].id == MODEL
    assert oai.chat.completions.create(model=MODEL, messages=HI).choices[0].message.content == ANSWER


def test_not_running(tmp_path):
    with pytest.raises(DaemonNotRunning):
        Client(tmp_path).health()
    with pytest.raises(DaemonNotRunning):
        list(Client(tmp_path).stream_chat(MODEL, HI))
    r = llmos(tmp_path, "status")
    assert r.exit_code == 1 and "not running" in r.output
    for args in (["run", MODEL, "hi"], ["ps"], ["load", MODEL], ["unload", MODEL]):
        r = llmos(tmp_path, *args)
        assert r.exit_code == 1 and "llmosd is not running" in r.output and "Traceback" not in r.output
    r = llmos(tmp_path, "models")   # the registry needs no daemon: everything is unloaded
    assert r.exit_code == 0 and "smollm2" in r.output and "unloaded" in r.output
    r = llmos(tmp_path, "stop")
    assert r.exit_code == 0 and "not running" in r.output


def public_methods(cls) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}


def test_both_clients_have_the_same_methods():
    assert public_methods(Client) - {"close"} == public_methods(AsyncClient) - {"aclose"}
    assert "restart_driver" in public_methods(AsyncClient)


JOB = {"id": "batch_1", "status": "completed", "request_counts": {"total": 1, "completed": 1, "failed": 0},
       "llmos": {"output_file_id": "file-out", "error_file_id": "file-err"}}
SSE = b'data: {"choices": [{"delta": {"content": "Hel"}, "text": "Hel"}]}\n\n' \
      b'data: {"choices": [{"delta": {}, "text": "lo"}]}\n\ndata: [DONE]\n\n'


class Recorder:
    """A mock daemon: canned answers by path, and every request it was sent."""

    def __init__(self):
        self.sent: list[tuple] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        kind = request.headers.get("content-type", "").split(";")[0]
        body = json.loads(request.content) if kind == "application/json" else kind
        self.sent.append((request.method, request.url.path, str(request.url.query, "ascii"), body))
        path = request.url.path
        if isinstance(body, dict) and body.get("stream"):
            return httpx.Response(200, content=SSE, headers={"content-type": "text/event-stream"})
        if path.endswith("/content"):
            return httpx.Response(200, text=f"{path}\n\nline 2\n")
        if path in ("/v1/models", "/llmos/v1/jobs", "/llmos/v1/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": path}]})
        if path == "/v1/files" and request.method == "GET":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "file-in"}]})
        if path == "/v1/files":
            return httpx.Response(200, json={"id": "file-in", "llmos": {"endpoint": "/v1/completions"}})
        if path.startswith("/llmos/v1/jobs/batch_1"):
            return httpx.Response(200, json=JOB)
        if path == "/health":
            return httpx.Response(503, json={"status": "starting"})
        return httpx.Response(200, json={"path": path})


CALLS = {   # every public method of the API, with arguments
    "health": (), "models": (), "ps": (), "memory": (), "alerts": (), "restart_driver": ("io",), "cancel_request": ("cmpl-1",),
    "completion": (MODEL, "x"), "chat": (MODEL, HI), "stream_completion": (MODEL, [1, 2]),
    "stream_chat": (MODEL, HI), "upload_file": ([{"custom_id": "a", "body": {}}],),
    "submit_batch": ([{"custom_id": "a", "body": {}}], MODEL), "jobs": (), "job": ("batch_1",),
    "cancel": ("batch_1",), "job_errors": (), "wait": ("batch_1",), "results": ("batch_1",), "status": (),
    "list_registered": (), "show_model": (MODEL,), "add_model": ("m", "/weights/m", "why"), "remove_model": ("m",),
    "copy_model": ("m", "m2"), "set_model_defaults": ("m", None, 2),
    "load_model": (MODEL,), "unload_model": (MODEL,),
    "scale_model": (MODEL, 2), "upgrade_model": (MODEL, 2), "rollback_model": (MODEL,), "upgrade_status": (MODEL,),
    "list_files": (), "delete_file": ("file-1",), "delete_job": ("batch_1",), "purge_jobs": (86400.0,),
    "storage_status": (), "rotate_storage": (), "key_changed": ("create", "k1", "alice"),
}
STREAMS = {"stream_completion", "stream_chat", "results"}


def run_sync(name: str, args: tuple):
    rec = Recorder()
    c = Client("/nonexistent")
    c.close()
    c._http = httpx.Client(transport=httpx.MockTransport(rec), base_url="http://llmos")
    try:
        out = getattr(c, name)(*args)
        out = list(out) if name in STREAMS else out
    except ServerError as exc:
        out = ("raised", type(exc).__name__, exc.status, exc.body)
    return out, rec.sent


def run_async(name: str, args: tuple):
    async def go():
        rec = Recorder()
        c = AsyncClient("/nonexistent")
        await c.aclose()
        c._http = httpx.AsyncClient(transport=httpx.MockTransport(rec), base_url="http://llmos")
        try:
            call = getattr(c, name)(*args)
            out = [x async for x in call] if name in STREAMS else await call
        except ServerError as exc:
            out = ("raised", type(exc).__name__, exc.status, exc.body)
        return out, rec.sent
    return asyncio.run(go())


def test_every_method_is_compared():
    assert set(CALLS) == public_methods(Client) - {"close"}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_both_clients_send_the_same_requests_and_read_the_same_answers(name):
    sync, async_ = run_sync(name, CALLS[name]), run_async(name, CALLS[name])
    assert sync == async_
    assert sync[1], "no request was sent"


def test_what_the_mock_calls_read():
    assert run_sync("health", ())[0] == ("raised", "ServerError", 503, {"status": "starting"})
    assert run_sync("status", ())[0]["health"] == {"status": "starting"}   # 503 with a body is a status
    assert run_sync("models", ())[0] == [{"id": "/v1/models"}]
    assert run_sync("stream_chat", (MODEL, HI))[0] == ["Hel"]
    assert run_sync("stream_completion", (MODEL, "x"))[0] == ["Hel", "lo"]
    assert run_sync("results", ("batch_1",))[0] == ["/v1/files/file-out/content", "line 2"]
    out, sent = run_sync("submit_batch", ([{"custom_id": "a", "body": {}}], MODEL))
    assert [s[:2] for s in sent] == [("POST", "/v1/files"), ("POST", "/v1/batches")]
    assert sent[1][3] == {"input_file_id": "file-in", "endpoint": "/v1/completions", "completion_window": "24h",
                          "metadata": None}
    assert run_sync("jobs", ())[1][0][2] == "limit=100"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    with serving(tmp_path_factory.mktemp("real"), [f"tiny={tiny_llama_dir}"]) as d:
        yield d


def test_async_restart_driver_on_the_real_daemon(daemon):
    def tokenizer(ps: dict) -> dict:
        return next(p for p in ps["processes"] if p["name"] == "tokenizer-tiny")

    async def go():
        async with AsyncClient(daemon.home) as c:
            old = tokenizer(await c.ps())["pid"]
            assert await c.restart_driver("tokenizer-tiny") == {"restarting": "tokenizer-tiny"}
            deadline = time.monotonic() + 120
            while not ((p := tokenizer(await c.ps()))["pid"] not in (None, old) and p["state"] == "running"):
                assert time.monotonic() < deadline, f"tokenizer-tiny not back: {p}"
                await asyncio.sleep(0.05)
            with pytest.raises(NotFound) as exc:
                await c.restart_driver("nope")
            assert exc.value.code == "driver_not_found" and "nope" in exc.value.message
            answer = await c.completion("tiny", "Hello", max_tokens=3, temperature=0)
            assert answer["usage"]["completion_tokens"] == 3
    asyncio.run(go())


def test_cli_status_models_ps(home):
    r = llmos(home[0], "status")
    assert r.exit_code == 0 and "llmosd is running" in r.output and MODEL in r.output
    r = llmos(home[0], "models")
    assert r.exit_code == 0 and MODEL in r.output and "2048" in r.output
    r = llmos(home[0], "ps")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "PID", "STATE", "UPTIME", "RESTARTS"]
    assert lines[1].split() == ["io", "io", "123", "running", "12.5s", "0"]
    assert "cmpl-abc" in r.output and "local" in r.output


def test_cli_run_and_chat(home):
    kernel = home[1]
    r = llmos(home[0], "run", MODEL, "hello there", "--max-tokens", "5", "--temperature", "0", "--system", "be nice")
    assert r.exit_code == 0, r.output
    assert r.output == "Hello world, from llmos\n"
    sub = kernel.wait_for(lambda m: isinstance(m, protocol.Submit) and m.messages
                          and m.messages[-1]["content"] == "hello there")
    assert sub.params["max_tokens"] == 5 and sub.params["temperature"] == 0
    assert sub.messages[0] == {"role": "system", "content": "be nice"}
    r = llmos(home[0], "chat", MODEL, input="first\nsecond\n\n")
    assert r.exit_code == 0 and r.output.count(ANSWER) == 2
    sub = kernel.wait_for(lambda m: isinstance(m, protocol.Submit) and m.messages
                          and m.messages[-1]["content"] == "second")
    assert [m["role"] for m in sub.messages] == ["user", "assistant", "user"]
    assert sub.messages[1]["content"] == ANSWER
    r = llmos(home[0], "run", "nope", "hi")
    assert r.exit_code == 1 and "model 'nope' does not exist" in r.output


def test_cli_start_stop(tmp_path, monkeypatch):
    monkeypatch.setattr(cli_main, "daemon_command", lambda args: [sys.executable, __file__, *args])
    r = llmos(tmp_path, "start", "--model", "smollm2", "--dtype", "float32", "--fail-early")
    assert r.exit_code == 1 and "exited with code 3" in r.output and "boom" in r.output

    r = llmos(tmp_path, "start", "--model", "smollm2", "--dtype", "float32", "--max-batch", "8")
    assert r.exit_code == 0, r.output
    assert "llmosd started (pid" in r.output
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv == ["--model", "smollm2", "--dtype", "float32", "--max-batch", "8"]
    pid = int(Paths.from_env(tmp_path).pid_file.read_text())
    assert "already running" in llmos(tmp_path, "start").output
    assert llmos(tmp_path, "status").exit_code == 0
    r = llmos(tmp_path, "stop")
    assert r.exit_code == 0 and f"stopped (pid {pid})" in r.output
    assert not Paths.from_env(tmp_path).pid_file.exists()
    assert llmos(tmp_path, "status").exit_code == 1

    Paths.from_env(tmp_path).pid_file.write_text("999999999\n")  # stale
    r = llmos(tmp_path, "stop")
    assert "stale" in r.output and not Paths.from_env(tmp_path).pid_file.exists()


def _fake_daemon(argv: list[str]) -> None:
    """A stand-in llmosd: records its argv, writes the pid file, serves the real io driver
    against a FakeKernel until SIGTERM."""
    home = Paths.from_env()
    if "--fail-early" in argv:
        print("boom: cannot load model", flush=True)
        sys.exit(3)
    (home.home / "argv.json").write_text(json.dumps(argv))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with io_stack(home.home):
        home.pid_file.write_text(f"{os.getpid()}\n")
        try:
            while True:
                time.sleep(1)
        finally:
            home.pid_file.unlink(missing_ok=True)


if __name__ == "__main__":
    _fake_daemon(sys.argv[1:])
