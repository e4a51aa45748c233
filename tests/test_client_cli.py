"""The client SDK and the `llmos` CLI against the real io driver and a fake kernel
(FakeKernel from test_io_driver). `start`/`stop` run a fake llmosd: this file run as a script."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import pytest
from click.testing import CliRunner

from llmos import protocol
from llmos.cli import main as cli_main
from llmos.client import AsyncClient, Client, DaemonNotRunning, RequestRejected, ServerError, openai_client
from llmos.paths import Paths
from test_io_driver import MODEL, REPLY, io_stack

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
        assert c.ps()["processes"][0]["name"] == "io" and "blocks_free" in c.memory()
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
    for args in (["run", MODEL, "hi"], ["ps"], ["models"]):
        r = llmos(tmp_path, *args)
        assert r.exit_code == 1 and "llmosd is not running" in r.output and "Traceback" not in r.output
    r = llmos(tmp_path, "stop")
    assert r.exit_code == 0 and "not running" in r.output


def test_cli_status_models_ps(home):
    r = llmos(home[0], "status")
    assert r.exit_code == 0 and "llmosd is running" in r.output and MODEL in r.output
    r = llmos(home[0], "models")
    assert r.exit_code == 0 and MODEL in r.output and "2048" in r.output
    r = llmos(home[0], "ps")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "PID", "STATE", "UPTIME", "RESTARTS"]
    assert lines[1].split() == ["io", "io", "123", "RUNNING", "12.5s", "0"]
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
