"""Encryption at rest and deletion, through a real daemon (tiny model): a marker in the
prompts is never on disk in the clear (database, WAL, shm, logs), and after deletion even
its ciphertext is gone; tampered and swapped rows read as errors, a wrong key is refused
(and opens nothing); the key rotates while a job runs; the deletion routes, with their 404s and
409s; idempotency keys; expires_at."""
from __future__ import annotations

import base64
import json
import os
import sqlite3
import time
import uuid

import openai
import pytest
from click.testing import CliRunner

from daemon_harness import serving
from llmos.cli import main as cli_main
from llmos.cli.storage_keys import rotate_storage
from llmos.client import Client, RequestRejected, openai_client
from llmos.kernel.jobs import JobStore
from llmos.kernel.jobs.files import Files
from llmos.kernel.jobs.rotation import SEALED
from llmos.kernel.jobs.sealing import Keyring, load_keyring, record
from llmos.paths import Paths


def chat_line(i: int, text: str, max_tokens: int = 8, **extra) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"{text} number {i}?"}],
            "max_tokens": max_tokens, "temperature": 0, **extra}
    return {"custom_id": f"{text}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def found(home, needles: list[bytes]) -> list[str]:
    """Which needles occur in any regular file under home (binary-safe: the database, its
    -wal and -shm, the logs, the key file, the daemon's stdout)."""
    hits = []
    for path in sorted(home.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{n[:40]!r} in {path.relative_to(home)}" for n in needles if n in data]
    return hits


def sealed_values(home, where: str, args: tuple, table: str, col: str) -> list[bytes]:
    db = sqlite3.connect(f"file:{home / 'jobs.db'}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute(f"SELECT {col} FROM {table} WHERE {where}", args)]
    finally:
        db.close()


def wait_erased(c: Client, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (s := c.storage_status())["erasing"] or s["checkpoint_pending"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.1)
    return s


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    with serving(tmp_path_factory.mktemp("home"), [f"tiny={tiny_llama_dir}"], "--max-model-len", "256") as d:
        yield d


def llmos(daemon, *args):
    return CliRunner().invoke(cli_main.cli, ["--home", str(daemon.home), *args])


# ---------------------------------------------------------------- the marker


def test_a_marker_is_never_on_disk_in_the_clear_and_after_deletion_nothing_is_left(daemon):
    mark = f"mark-{uuid.uuid4().hex}"
    with Client(daemon.home) as c:
        job = c.submit_batch([chat_line(i, mark, max_tokens=24) for i in range(12)], metadata={"owner": mark})
        job = c.wait(job["id"], timeout=120, poll=0.1)
        assert job["status"] == "completed" and job["metadata"] == {"owner": mark}
        out = [json.loads(x) for x in c.results(job["id"])]
        assert sorted(o["custom_id"] for o in out) == sorted(f"{mark}-{i}" for i in range(12))
        answers = [o["response"]["body"]["choices"][0]["message"]["content"] for o in out]
        answers = [a.encode() for a in answers if len(a) >= 16 and len(set(a)) >= 6]   # distinctive ones
        assert answers, "no distinctive output to look for"
        assert not found(daemon.home, [mark.encode(), *answers]), "plaintext on disk"
        fid = job["input_file_id"]
        ciphertexts = (sealed_values(daemon.home, "file_id=?", (fid,), "file_lines", "text")
                       + sealed_values(daemon.home, "job_id=?", (job["id"],), "requests", "response"))
        assert len(ciphertexts) == 24 and len(found(daemon.home, [x[-24:] for x in ciphertexts[:4]])) == 4
        with daemon.http() as h:
            assert h.delete(f"/v1/batches/{job['id']}").json() == {"id": job["id"], "object": "batch",
                                                                  "deleted": True, "input_file_deleted": False}
            assert h.delete(f"/v1/files/{fid}").json() == {"id": fid, "object": "file", "deleted": True}
        wait_erased(c)
    assert (daemon.home / "jobs.db-wal").stat().st_size == 0
    assert not found(daemon.home, [mark.encode(), *answers, *[x[-24:] for x in ciphertexts]]), "deleted data remains"


def test_a_tampered_or_swapped_row_reads_as_an_error_and_another_key_is_refused(tmp_path, tiny_llama_dir):
    home, args = tmp_path / "home", ([f"tiny={tiny_llama_dir}"], "--max-model-len", "256")
    with serving(home, *args):
        with Client(home) as c:
            job = c.wait(c.submit_batch([chat_line(i, "tamper") for i in range(4)])["id"], timeout=120, poll=0.1)
    db = sqlite3.connect(home / "jobs.db")
    (a,), (b,) = db.execute("SELECT text FROM file_lines WHERE line_no IN (1, 2) ORDER BY line_no").fetchall()
    db.executemany("UPDATE file_lines SET text=? WHERE line_no=?", [(b, 1), (a, 2)])           # swapped
    resp = db.execute("SELECT response FROM requests WHERE line_no=3").fetchone()[0]
    db.execute("UPDATE requests SET response=? WHERE line_no=3", (resp[:40] + bytes([resp[40] ^ 4]) + resp[41:],))
    db.commit()
    db.close()
    with serving(home, *args) as d, Client(home) as c, d.http() as h:
        lines = [json.loads(x) for x in h.get(f"/v1/files/{job['input_file_id']}/content").text.splitlines()]
        assert [x.get("error", {}).get("code") for x in lines] == ["record_unreadable"] * 2 + [None] * 2
        assert lines[2]["custom_id"] == "tamper-2"
        out = {o["custom_id"] or o["id"]: o for o in map(json.loads, c.results(job["id"]))}
        bad = [o for o in out.values() if o["error"]]
        assert len(bad) == 1 and bad[0]["custom_id"] == "tamper-2" and bad[0]["error"]["code"] == "record_unreadable"
        assert bad[0]["response"] is None and out["tamper-3"]["response"]["status_code"] == 200
    other = base64.b64encode(os.urandom(32)).decode()        # another key opens nothing, and is refused
    r = CliRunner().invoke(rotate_storage, [], obj=Paths.from_env(home), env={"LLMOS_STORAGE_KEY": other})
    assert r.exit_code == 1 and "not among the keys given" in r.output, r.output
    store = JobStore(home / "jobs.db", keys=Keyring([base64.b64decode(other)], "env"))   # (forced open)
    try:
        files = Files(store, {"tiny"})
        page = files.page({"id": job["input_file_id"], "limit": 100})["lines"]
        assert len(page) == 4 and {json.loads(x)["error"]["code"] for x in page} == {"record_unreadable"}
        out = files.page({"id": f"file-out-{job['id']}", "limit": 100})["lines"]
        assert {json.loads(x)["error"]["code"] for x in out} == {"record_unreadable"}
        assert not any("tamper" in x for x in page + out)
    finally:
        store.close()


# ---------------------------------------------------------------- rotation


def test_rotate_storage_while_a_job_runs(daemon):
    old = load_keyring(daemon.home).current.hex()
    with Client(daemon.home) as c:
        job = c.submit_batch([chat_line(i, "rotate", max_tokens=32, ignore_eos=True) for i in range(60)])
        while c.job(job["id"])["request_counts"]["completed"] < 1:
            time.sleep(0.05)
        r = CliRunner().invoke(rotate_storage, [], obj=Paths.from_env(daemon.home))
        assert r.exit_code == 0, r.output
        assert f"old key(s) removed: {old}" in r.output and "every value is sealed with key" in r.output
        job = c.wait(job["id"], timeout=300, poll=0.2)
        assert job["status"] == "completed" and job["request_counts"]["completed"] == 60
        assert len([json.loads(x) for x in c.results(job["id"])]) == 60
        status = c.storage_status()
    keys = load_keyring(daemon.home)
    assert keys.ids == [status["key_id"]] and status["key_id"] != old and not status["rotating"]
    db = sqlite3.connect(f"file:{daemon.home / 'jobs.db'}?mode=ro", uri=True)
    n = 0
    for table, pk, cols in SEALED:
        for row in db.execute(f"SELECT {', '.join(pk + cols)} FROM {table}"):
            for col, value in zip(cols, row[len(pk):]):
                if value is not None:
                    keys.open(record(table, col, *row[:len(pk)]), value)   # every value opens with the new key
                    n += 1
    db.close()
    assert n >= 60 * 4


# ---------------------------------------------------------------- deletion and idempotency over HTTP


def test_deletion_routes_refuse_what_they_must_and_then_delete(daemon, tmp_path):
    with daemon.http() as h, Client(daemon.home) as c:
        for method, path, status, code in (("DELETE", "/v1/files/file-nope", 404, "file_not_found"),
                                           ("DELETE", "/v1/batches/batch_nope", 404, "batch_not_found"),
                                           ("DELETE", "/llmos/v1/jobs/batch_nope?input_file=maybe", 400, None),
                                           ("POST", "/llmos/v1/jobs/purge", 400, None),
                                           ("GET", "/v1/files?limit=0", 400, None)):
            r = h.request(method, path, json={} if method == "POST" else None)
            assert r.status_code == status and (code is None or r.json()["error"]["code"] == code), r.text
            assert h.get("/v1/files?limit=5").status_code == 200             # and the next request is served
        job = c.submit_batch([chat_line(i, "long", max_tokens=200, ignore_eos=True) for i in range(40)])
        fid = job["input_file_id"]
        r = h.delete(f"/v1/batches/{job['id']}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "batch_active" and "cancel" in r.text
        r = h.delete(f"/v1/files/{fid}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "file_in_use"
        assert c.job(job["id"])["status"] == "in_progress"
        assert h.delete(f"/v1/files/file-out-{job['id']}").status_code == 409
        c.cancel(job["id"])
        assert fid in [f["id"] for f in c.list_files()]
        assert c.delete_job(job["id"], input_file=True)["input_file_deleted"] is True
        assert h.get(f"/v1/batches/{job['id']}").status_code == 404 and h.get(f"/v1/files/{fid}").status_code == 404
        assert h.delete(f"/v1/batches/{job['id']}").status_code == 404
        assert fid not in [f["id"] for f in c.list_files()]
        done = c.wait(c.submit_batch([chat_line(i, "cli") for i in range(2)])["id"], timeout=60, poll=0.1)
        oai = openai_client(daemon.home, max_retries=0)
        assert done["input_file_id"] in [f.id for f in oai.files.list()]
        r = llmos(daemon, "jobs", "purge", "--older-than", "soon")
        assert r.exit_code == 2 and "duration" in r.output
        r = llmos(daemon, "jobs", "rm", done["id"])
        assert r.exit_code == 0 and f"{done['id']} deleted (and its input file)" in r.output
        r = llmos(daemon, "jobs", "rm", done["id"])
        assert r.exit_code == 1 and "404" in r.output
        c.wait(c.submit_batch([chat_line(0, "purge")])["id"], timeout=60, poll=0.1)
        r = llmos(daemon, "jobs", "purge", "--older-than", "7d")
        assert r.exit_code == 0 and r.output.startswith("0 job(s) deleted")
        r = llmos(daemon, "jobs", "purge", "--older-than", "0")
        assert r.exit_code == 0 and "0 job(s) deleted" not in r.output
        assert [j for j in c.jobs() if j["status"] != "in_progress"] == []
        wait_erased(c)


def test_idempotency_keys_and_expiry_fields(daemon):
    lines = jsonl([chat_line(i, "idem") for i in range(3)])

    def upload(h, content, key, **fields):
        return h.post("/v1/files", data={"purpose": "batch", **fields}, headers={"Idempotency-Key": key},
                      files={"file": ("idem.jsonl", content, "application/jsonl")})
    key = uuid.uuid4().hex
    with daemon.http() as h:
        first = upload(h, lines, key).json()
        assert upload(h, lines, key).json()["id"] == first["id"]                 # a retry: the same file
        r = upload(h, lines + b"\n", key)
        assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_conflict"
        r = upload(h, lines, "has space")
        assert r.status_code == 400 and r.json()["error"]["param"] == "Idempotency-Key"
        r = upload(h, lines, key + "x", **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "60"})
        assert r.status_code == 400 and "expires_after" in r.text
        f = upload(h, lines, key + "x", **{"expires_after[anchor]": "created_at",
                                           "expires_after[seconds]": "3600"}).json()
        assert f["id"] != first["id"] and f["expires_at"] == f["created_at"] + 3600
        body = {"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        b1 = h.post("/v1/batches", json=body, headers={"Idempotency-Key": key}).json()
        assert b1["expires_at"] == b1["created_at"] + 86400
        assert h.post("/v1/batches", json=body, headers={"Idempotency-Key": key}).json()["id"] == b1["id"]
        r = h.post("/v1/batches", json={**body, "metadata": {"a": "b"}}, headers={"Idempotency-Key": key})
        assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_conflict"
        r = h.post("/v1/batches", json={**body, "completion_window": "forever"})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("completion_window")
        assert h.post("/v1/batches", json=body).json()["id"] != b1["id"]         # no key: a new batch
    oai = openai_client(daemon.home, max_retries=0)
    g = oai.files.create(file=("e.jsonl", lines), purpose="batch", expires_after={"anchor": "created_at",
                                                                                  "seconds": 7200})
    assert g.expires_at == g.created_at + 7200
    assert oai.files.delete(g.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(g.id)
    with Client(daemon.home) as c:
        sk = uuid.uuid4().hex
        one = c.submit_batch([chat_line(i, "sdk") for i in range(2)], idempotency_key=sk)
        assert c.submit_batch([chat_line(i, "sdk") for i in range(2)], idempotency_key=sk)["id"] == one["id"]
        with pytest.raises(RequestRejected) as exc:
            c.submit_batch([chat_line(i, "sdk") for i in range(3)], idempotency_key=sk)
        assert exc.value.status == 409
        c.wait(one["id"], timeout=60, poll=0.1)
