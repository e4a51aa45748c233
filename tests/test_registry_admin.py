"""The registry's admin API (/llmos/v1/models) and its SDK methods, through a real daemon.

`tl` (tiny llama) is served from a path spec; `qw` (tiny qwen2) is added over the API and
then served on demand. Every bad request is followed by a good one, answered as before.
"""
from __future__ import annotations

import shutil
import sqlite3

import pytest

from daemon_harness import Daemon
from llmos.client import Client, NotFound, RequestRejected

HELLO = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    d = Daemon(tmp_path_factory.mktemp("admin"), [f"tl={tiny_llama_dir}"], "--max-loaded-models", "2").wait_ready()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_qwen2_dir):
    """Paths that are not models: a GGUF (by name, and by magic only), a directory without
    config.json, and a copy of tiny qwen2 for a second name."""
    root = tmp_path_factory.mktemp("files")
    (root / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (root / "renamed.bin").write_bytes(b"GGUF\x03\x00\x00\x00")
    (root / "empty").mkdir()
    shutil.copytree(tiny_qwen2_dir, root / "qwen-copy")
    return root


def names(d: Daemon) -> list[str]:
    with d.http() as c:
        r = c.get("/llmos/v1/models")
    assert r.status_code == 200, r.text
    return [m["name"] for m in r.json()["data"]]


def send(d: Daemon, method: str, path: str, body=None, raw: bytes | None = None):
    with d.http() as c:
        if raw is not None:
            return c.request(method, path, content=raw, headers={"Content-Type": "application/json"})
        return c.request(method, path, json=body)


def refused(r, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_list_shows_the_builtin_with_facts(daemon):
    with daemon.http() as c:
        data = c.get("/llmos/v1/models").json()["data"]
    smol = next(m for m in data if m["name"] == "smollm2")
    assert smol["builtin"] and smol["kind"] == "gguf" and smol["state"] == "unloaded"
    assert smol["facts"]["architecture"] == "LlamaForCausalLM" and smol["facts"]["parameters"] > 100e6
    assert "tl" not in [m["name"] for m in data]   # served from a path, not registered


def test_added_over_the_api_then_served_on_demand(daemon, tiny_qwen2_dir):
    r = send(daemon, "POST", "/llmos/v1/models", {"name": "qw", "path": str(tiny_qwen2_dir), "note": "tiny"})
    assert r.status_code == 201, r.text
    m = r.json()
    assert (m["name"], m["version"], m["kind"], m["state"]) == ("qw", 1, "hf", "unloaded")
    assert m["facts"]["architecture"] == "Qwen2ForCausalLM" and m["prepared"] == str(tiny_qwen2_dir)
    assert [(h["event"], h["reason"]) for h in m["history"]] == [("added", "tiny")]
    with daemon.http() as c:
        listed = {x["id"]: x["state"] for x in c.get("/v1/models").json()["data"]}
        assert listed["qw"] == "unloaded"
        answer = c.post("/v1/completions", json={"model": "qw", **HELLO})   # loads it, then answers
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 4
        assert c.get("/llmos/v1/models/qw").json()["state"] == "loaded"


ADD_BAD = [   # (body or raw bytes, status, param, code)
    (b"{not json", 400, None, None),
    (b"[1, 2]", 400, None, None),
    ({"path": "/x"}, 400, "name", None),
    ({"name": 5, "path": "/x"}, 400, "name", None),
    ({"name": "ok"}, 400, "path", None),
    ({"name": "ok", "path": "/x", "colour": "red"}, 400, "colour", None),
    ({"name": "a b", "path": "/x"}, 400, "name", None),
    ({"name": "x" * 65, "path": "/x"}, 400, "name", None),
    ({"name": "ok.gguf", "path": "/x"}, 400, "name", None),
    ({"name": "ok", "path": "relative/dir"}, 400, "path", None),
    ({"name": "ok", "path": "/no/such/dir"}, 400, "path", None),
    ({"name": "ok", "path": "/x\u0000y"}, 400, "path", None),
    ({"name": "ok", "path": "/" + "x" * 5000}, 400, "path", None),
    ({"name": "ok", "path": "/x", "note": 3}, 400, "note", None),
    ({"name": "ok", "path": "/x", "note": "n" * 1001}, 400, "note", None),
    ({"name": "smollm2", "path": "/x"}, 409, None, "model_exists"),
    ({"name": "tl", "path": "/x"}, 409, None, "model_exists"),   # the daemon serves a tl already
]


@pytest.mark.parametrize("case", range(len(ADD_BAD)))
def test_add_refuses_bad_input_and_goes_on(daemon, case):
    body, status, param, code = ADD_BAD[case]
    before = names(daemon)
    raw = body if isinstance(body, bytes) else None
    refused(send(daemon, "POST", "/llmos/v1/models", None if raw else body, raw), status, param, code)
    assert names(daemon) == before   # nothing half-added, and the next request is answered


def test_add_refuses_what_is_not_an_hf_directory(daemon, files, tiny_qwen2_dir):
    err = refused(send(daemon, "POST", "/llmos/v1/models", {"name": "g", "path": str(files / "m.gguf")}), 400, "path")
    assert "llmos models add g" in err["message"]
    err = refused(send(daemon, "POST", "/llmos/v1/models", {"name": "g", "path": str(files / "renamed.bin")}),
                  400, "path")
    assert "GGUF" in err["message"]
    err = refused(send(daemon, "POST", "/llmos/v1/models", {"name": "g", "path": str(files / "empty")}), 400, "path")
    assert "config.json" in err["message"]
    send(daemon, "POST", "/llmos/v1/models", {"name": "dup", "path": str(tiny_qwen2_dir)})
    refused(send(daemon, "POST", "/llmos/v1/models", {"name": "dup", "path": str(tiny_qwen2_dir)}), 409,
            code="model_exists")
    assert send(daemon, "DELETE", "/llmos/v1/models/dup").status_code == 200
    assert "g" not in names(daemon) and "dup" not in names(daemon)


def test_show_unknown_and_impossible_names(daemon):
    refused(send(daemon, "GET", "/llmos/v1/models/nope"), 404, "name", "model_not_found")
    refused(send(daemon, "GET", "/llmos/v1/models/a%20b"), 404, "name", "model_not_found")
    refused(send(daemon, "GET", "/llmos/v1/models/" + "x" * 300), 404, "name", "model_not_found")
    assert send(daemon, "GET", "/llmos/v1/models/smollm2").json()["versions"][0]["kind"] == "gguf"


def test_copy(daemon, tiny_qwen2_dir):
    send(daemon, "POST", "/llmos/v1/models", {"name": "cq", "path": str(tiny_qwen2_dir)})
    for body, status, param in [({}, 400, "to"), ({"to": 1}, 400, "to"), ({"to": "bad name"}, 400, "to"),
                                ({"to": "x", "also": 1}, 400, "also"), ({"to": "smollm2"}, 409, None),
                                ({"to": "cq"}, 409, None)]:
        refused(send(daemon, "POST", "/llmos/v1/models/cq/copy", body), status, param)
        assert send(daemon, "GET", "/llmos/v1/models/cq").status_code == 200
    refused(send(daemon, "POST", "/llmos/v1/models/nope/copy", {"to": "x"}), 404, "name")
    r = send(daemon, "POST", "/llmos/v1/models/cq/copy", {"to": "cq2"})
    assert r.status_code == 201, r.text
    assert r.json()["prepared"] == str(tiny_qwen2_dir) and r.json()["history"][0]["reason"] == "copy of cq v1"
    assert {"cq", "cq2"} <= set(names(daemon))


def test_defaults(daemon, tiny_qwen2_dir):
    send(daemon, "POST", "/llmos/v1/models", {"name": "dq", "path": str(tiny_qwen2_dir)})
    for body, param in [({}, "keep_alive_s"), ({"replicas": 0}, "replicas"), ({"replicas": "2"}, "replicas"),
                        ({"replicas": True}, "replicas"), ({"replicas": 1.5}, "replicas"),
                        ({"replicas": 65}, "replicas"), ({"keep_alive_s": -1}, "keep_alive_s"),
                        ({"keep_alive_s": "5m"}, "keep_alive_s"), ({"keep_alive_s": 1e300}, "keep_alive_s"),
                        ({"ttl": 3}, "ttl")]:
        refused(send(daemon, "PATCH", "/llmos/v1/models/dq", body), 400, param)
        assert send(daemon, "GET", "/llmos/v1/models/dq").json()["keep_alive_s"] is None
    refused(send(daemon, "PATCH", "/llmos/v1/models/nope", {"replicas": 2}), 404, "name")
    m = send(daemon, "PATCH", "/llmos/v1/models/dq", {"keep_alive_s": 30, "replicas": 2}).json()
    assert (m["keep_alive_s"], m["replicas"]) == (30, 2) and m["history"][-1]["event"] == "defaults"
    m = send(daemon, "PATCH", "/llmos/v1/models/dq", {"keep_alive_s": None}).json()
    assert (m["keep_alive_s"], m["replicas"]) == (None, 2)


def test_remove(daemon, tiny_qwen2_dir):
    send(daemon, "POST", "/llmos/v1/models", {"name": "rq", "path": str(tiny_qwen2_dir)})
    refused(send(daemon, "DELETE", "/llmos/v1/models/rq?force=maybe"), 400, "force")
    refused(send(daemon, "DELETE", "/llmos/v1/models/nope"), 404, "name", "model_not_found")
    refused(send(daemon, "DELETE", "/llmos/v1/models/smollm2"), 409, code="model_builtin")
    r = send(daemon, "DELETE", "/llmos/v1/models/rq")
    assert r.status_code == 200 and r.json() == {"removed": "rq", "freed": [], "still_loaded": False}
    refused(send(daemon, "GET", "/llmos/v1/models/rq"), 404)
    with daemon.http() as c:   # no longer a model a request may name
        refused(c.post("/v1/completions", json={"model": "rq", **HELLO}), 404, "model")
    assert tiny_qwen2_dir.joinpath("config.json").is_file()   # the user's directory stays


def test_remove_a_loaded_model_needs_force(daemon, files):
    assert send(daemon, "POST", "/llmos/v1/models", {"name": "lq", "path": str(files / "qwen-copy")}).status_code == 201
    with daemon.http() as c:
        assert c.post("/v1/completions", json={"model": "lq", **HELLO}).status_code == 200
    err = refused(send(daemon, "DELETE", "/llmos/v1/models/lq"), 409, code="model_loaded")
    assert "unload" in err["message"] and "force" in err["message"]
    assert "lq" in names(daemon)
    r = send(daemon, "DELETE", "/llmos/v1/models/lq?force=true")
    assert r.status_code == 200 and r.json()["still_loaded"] is True
    assert "lq" not in names(daemon)
    with daemon.http() as c:   # the daemon serves on what it has loaded
        assert c.post("/v1/completions", json={"model": "tl", **HELLO}).status_code == 200


def test_the_sdk(daemon, files, monkeypatch):
    monkeypatch.chdir(files)
    with Client(daemon.home) as c:
        m = c.add_model("sdk", "qwen-copy", note="relative")   # resolved on the client's side
        assert m["source"] == str(files / "qwen-copy") and m["state"] == "unloaded"
        assert "sdk" in [x["name"] for x in c.list_registered()]
        assert c.show_model("sdk")["history"][0]["reason"] == "relative"
        assert c.copy_model("sdk", "sdk2")["name"] == "sdk2"
        assert c.set_model_defaults("sdk2", replicas=3)["replicas"] == 3
        assert c.set_model_defaults("sdk2", keep_alive_s=5)["replicas"] == 3   # the other stays
        with pytest.raises(RequestRejected) as exc:
            c.add_model("sdk", "qwen-copy")
        assert (exc.value.status, exc.value.code) == (409, "model_exists")
        with pytest.raises(RequestRejected) as exc:
            c.add_model("gg", "m.gguf")
        assert exc.value.status == 400 and exc.value.param == "path"
        with pytest.raises(NotFound) as exc:
            c.show_model("../../v1/models")   # quoted: one path segment, an unknown name
        assert exc.value.code == "model_not_found"
        assert c.remove_model("sdk2")["removed"] == "sdk2"
        assert c.remove_model("sdk", force=True)["removed"] == "sdk"
        with pytest.raises(NotFound):
            c.remove_model("sdk")


def test_a_locked_registry_is_a_503_and_the_daemon_serves_on(daemon, tiny_qwen2_dir):
    """Another process holding the registry's write lock (a long `llmos models add`) costs the
    kernel's loop a short busy wait, then a 503; it does not stall every stream for 30 s."""
    from llmos.models.catalog import db_path
    from llmos.paths import Paths
    locker = sqlite3.connect(str(db_path(Paths.from_env(daemon.home))), isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        refused(send(daemon, "POST", "/llmos/v1/models", {"name": "locked", "path": str(tiny_qwen2_dir)}), 503,
                code="registry_unavailable")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    with daemon.http() as c:
        r = c.post("/v1/completions", json={"model": "tl", "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert send(daemon, "POST", "/llmos/v1/models", {"name": "locked", "path": str(tiny_qwen2_dir)}).status_code == 201
