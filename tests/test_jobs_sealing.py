"""The job store at rest, without processes: sealed values (AES-GCM, the record's name as
authenticated data), the storage keys and where they come from, nothing in the clear on
disk, tampered and swapped rows and a wrong key, rotation while a job runs, cut short, and
offline. (Deletion, expiry, retention and idempotency: test_jobs_erasure.py.)"""
from __future__ import annotations

import base64
import json
import os
import sqlite3
import time

import pytest

from llmos.kernel.jobs import JobManager, JobStore
from llmos.kernel.jobs.refusals import Refused
from llmos.kernel.jobs import rotation
from llmos.kernel.jobs.rotation import SEALED, rotate_offline
from llmos.kernel.jobs.sealing import (Keyring, StorageKeyError, Unreadable, key_id, load_keyring, record)
from test_jobs_store import MODELS, FakeFront, line, upload

MARK = "zebra-quokka-7719"


def home_bytes(home) -> bytes:
    """Every regular file under home, concatenated (the database, its WAL and shm, keys)."""
    return b"".join(p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file())


class Clock:
    def __init__(self):
        self.shift = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift


def manager(store, front=None, limit=4, **kw) -> JobManager:
    front = front or FakeFront()
    m = JobManager(store, front, MODELS, lambda name: True, max_in_flight=limit, **kw)
    front.deliver = m.deliver
    m.resume()
    return m


def submit(m: JobManager, n: int, **create) -> str:
    fid, errors = upload(m.files, [line(f"{MARK}-{i}") for i in range(n)], chunk=50)
    assert not errors
    m.files.commit({"id": fid})
    return m.create({"input_file_id": fid, "endpoint": "/v1/chat/completions", **create})["id"]


def run_to_end(m: JobManager, job_id: str) -> dict:
    while m.get_job({"id": job_id})["status"] == "in_progress":
        m.feed()
        m.front.answer(2)
    return m.get_job({"id": job_id})


def settle(m: JobManager) -> None:
    """Run the upkeep until nothing waits (erasure, checkpoint, re-sealing)."""
    m.keeper.next_sweep = float("inf")
    while m.keeper.tick():
        pass


def lines_of(m: JobManager, file_id: str) -> list[str]:
    return m.files.page({"id": file_id, "limit": 5000})["lines"]


# ---------------------------------------------------------------- sealed values and keys


def test_a_sealed_value_opens_only_under_its_own_name_and_key():
    keys = Keyring([os.urandom(32)], "env")
    blob = keys.seal(record("file_lines", "text", "file-a", 1), b"secret prompt")
    assert blob[0] == 1 and blob[1:5] == keys.current and len(blob) == 1 + 4 + 12 + 13 + 16
    assert keys.open(record("file_lines", "text", "file-a", 1), blob) == b"secret prompt"
    assert keys.seal(record("file_lines", "text", "file-a", 1), b"secret prompt") != blob   # a nonce per value
    for name in (record("file_lines", "text", "file-a", 2), record("file_lines", "custom_id", "file-a", 1)):
        with pytest.raises(Unreadable, match="altered or moved"):
            keys.open(name, blob)
    bent = bytearray(blob)
    bent[-3] ^= 1
    with pytest.raises(Unreadable, match="altered"):
        keys.open(record("file_lines", "text", "file-a", 1), bytes(bent))
    with pytest.raises(Unreadable, match="does not have"):
        Keyring([os.urandom(32)], "env").open(record("file_lines", "text", "file-a", 1), blob)
    with pytest.raises(Unreadable, match="not a sealed value"):
        keys.open("x", "plain text")


def test_the_key_file_is_made_private_and_the_environment_or_a_credential_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMOS_STORAGE_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    keys = load_keyring(tmp_path)
    path = tmp_path / "storage.key"
    assert keys.source == "file" and path.stat().st_mode & 0o777 == 0o600
    assert load_keyring(tmp_path).current == keys.current                   # the same key next time
    env_key, cred_key = os.urandom(32), os.urandom(32)
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "llmos-storage-key").write_text(base64.b64encode(cred_key).decode() + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert load_keyring(tmp_path).current == key_id(cred_key)
    monkeypatch.setenv("LLMOS_STORAGE_KEY", ",".join(base64.b64encode(k).decode() for k in (env_key, cred_key)))
    env = load_keyring(tmp_path)
    assert (env.source, env.current, env.ids[1]) == ("env", key_id(env_key), key_id(cred_key).hex())
    with pytest.raises(StorageKeyError, match="LLMOS_STORAGE_KEY"):
        env.add_new_key()
    monkeypatch.setenv("LLMOS_STORAGE_KEY", "not-base64!")
    with pytest.raises(StorageKeyError, match="not base64"):
        load_keyring(tmp_path)
    monkeypatch.setenv("LLMOS_STORAGE_KEY", base64.b64encode(b"short").decode())
    with pytest.raises(StorageKeyError, match="has 5 bytes"):
        load_keyring(tmp_path)
    monkeypatch.delenv("LLMOS_STORAGE_KEY")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    path.chmod(0o644)
    with pytest.raises(StorageKeyError, match="chmod 600"):
        load_keyring(tmp_path)
    path.chmod(0o600)
    JobStore(tmp_path / "jobs.db").close()
    path.unlink()                           # a sealed store without its key does not get a new one
    with pytest.raises(StorageKeyError, match="is missing"):
        JobStore(tmp_path / "jobs.db")
    assert not path.exists()


def test_nothing_of_a_job_is_written_in_the_clear(tmp_path):
    m = manager(JobStore(tmp_path / "jobs.db"))
    job_id = submit(m, 6, metadata={"owner": MARK})
    job = run_to_end(m, job_id)
    assert job["status"] == "completed" and job["metadata"] == {"owner": MARK}
    out = lines_of(m, f"file-out-{job_id}")
    assert len(out) == 6 and f"HI {MARK.upper()}-0" in out[0]          # readable through the API
    assert MARK.encode() not in home_bytes(tmp_path) and MARK.upper().encode() not in home_bytes(tmp_path)
    m.close()


def test_a_tampered_or_swapped_row_reads_as_an_error_and_a_wrong_key_reads_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMOS_STORAGE_KEY", raising=False)
    m = manager(JobStore(tmp_path / "jobs.db"))
    job_id = submit(m, 4)
    fid = m.store.get_job(job_id)["input_file_id"]
    run_to_end(m, job_id)
    m.close()
    db = sqlite3.connect(tmp_path / "jobs.db")
    (a,), (b,) = db.execute("SELECT text FROM file_lines WHERE line_no IN (1, 2) ORDER BY line_no").fetchall()
    db.execute("UPDATE file_lines SET text=? WHERE line_no=1", (b,))               # swapped
    db.execute("UPDATE file_lines SET text=? WHERE line_no=2", (a,))
    resp = db.execute("SELECT response FROM requests WHERE line_no=3").fetchone()[0]
    db.execute("UPDATE requests SET response=? WHERE line_no=3", (resp[:-1] + bytes([resp[-1] ^ 1]),))   # one bit
    db.commit()
    db.close()
    m = manager(JobStore(tmp_path / "jobs.db"))
    lines = [json.loads(x) for x in lines_of(m, fid)]
    assert [x.get("error", {}).get("code") for x in lines] == ["record_unreadable", "record_unreadable", None, None]
    assert "altered or moved" in lines[0]["error"]["message"] and lines[2]["custom_id"] == f"{MARK}-2"
    out = {json.loads(x)["id"][-1]: json.loads(x) for x in lines_of(m, f"file-out-{job_id}")}
    assert out["3"]["response"] is None and out["3"]["error"]["code"] == "record_unreadable"
    assert out["4"]["response"]["status_code"] == 200
    m.close()
    monkeypatch.setenv("LLMOS_STORAGE_KEY", base64.b64encode(os.urandom(32)).decode())   # another key
    with pytest.raises(StorageKeyError, match="not among the keys given"):
        JobStore(tmp_path / "jobs.db")                         # is refused: it would open nothing
    m = manager(JobStore(tmp_path / "jobs.db", keys=load_keyring(tmp_path)))   # (forced)
    assert {json.loads(x)["error"]["code"] for x in lines_of(m, fid)} == {"record_unreadable"}
    assert {json.loads(x)["error"]["code"] for x in lines_of(m, f"file-out-{job_id}")} == {"record_unreadable"}
    assert m.files.get({"id": fid})["filename"] == "(unreadable)"
    m.close()


def test_an_unreadable_input_line_fails_that_line_alone(tmp_path):
    m = manager(JobStore(tmp_path / "jobs.db"))
    fid, _ = upload(m.files, [line(f"r{i}") for i in range(3)])
    m.files.commit({"id": fid})
    m.store.db.execute("UPDATE file_lines SET text=x'00' WHERE line_no=2")
    job_id = m.create({"input_file_id": fid, "endpoint": "/v1/chat/completions"})["id"]
    job = run_to_end(m, job_id)
    assert job["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    err = json.loads(lines_of(m, f"file-err-{job_id}")[0])
    assert err["custom_id"] == "r1" and err["response"]["status_code"] == 500
    assert err["response"]["body"]["error"]["code"] == "record_unreadable"
    m.close()


# ---------------------------------------------------------------- rotation


def every_value_opens_with(home, keys: Keyring) -> int:
    db = sqlite3.connect(home / "jobs.db")
    n = 0
    for table, pk, cols in SEALED:
        for row in db.execute(f"SELECT {', '.join(pk + cols)} FROM {table}"):
            for col, value in zip(cols, row[len(pk):]):
                if value is not None:
                    assert value[1:5] == keys.current, f"{table}.{col} is not sealed with the current key"
                    keys.open(record(table, col, *row[:len(pk)]), value)
                    n += 1
    db.close()
    return n


def test_rotation_while_a_job_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMOS_STORAGE_KEY", raising=False)
    m = manager(JobStore(tmp_path / "jobs.db"), limit=3)
    old = m.store.keys.current
    job_id = submit(m, 40, metadata={"k": "v"})
    m.feed()
    m.front.answer(2)
    status = m.commands["storage.rotate"]({})
    assert status["rotating"] and status["key_ids"] == [status["key_id"], old.hex()]
    assert len((tmp_path / "storage.key").read_text().split()) > 2            # both keys, during the pass
    with pytest.raises(Refused, match="rotation_running"):
        m.commands["storage.rotate"]({})
    while m.get_job({"id": job_id})["status"] == "in_progress" or m.keeper.resealer.active:
        m.feed()
        m.front.answer(1)
        m.keeper.tick()
    final = m.keeper.status()
    assert final["dropped_key_ids"] == [old.hex()] and final["key_ids"] == [final["key_id"]]
    assert final["resealed"] > 40 and final["unreadable"] == 0
    assert m.get_job({"id": job_id})["request_counts"]["completed"] == 40
    m.close()
    keys = load_keyring(tmp_path)
    assert keys.ids == [final["key_id"]] and keys.current != old
    assert every_value_opens_with(tmp_path, keys) > 2 * 40


def test_a_rotation_cut_short_resumes_at_the_next_start(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMOS_STORAGE_KEY", raising=False)
    monkeypatch.setattr(rotation, "RESEAL_BYTES", 1)          # one row per step
    m = manager(JobStore(tmp_path / "jobs.db"))
    job_id = submit(m, 10)
    run_to_end(m, job_id)
    m.commands["storage.rotate"]({})
    for _ in range(6):
        m.keeper.resealer.step()
    r = m.keeper.resealer
    assert r.active and r.table == 2 and 0 < r.resealed < 12          # a few rows of file_lines, one per step
    m.close()                                                  # the kernel dies in the middle
    m = manager(JobStore(tmp_path / "jobs.db"))
    assert m.keeper.resealer.active                            # both keys in the file: the pass goes on
    settle(m)
    assert len(m.store.keys.keys) == 1 and len(lines_of(m, f"file-out-{job_id}")) == 10
    m.close()
    assert every_value_opens_with(tmp_path, load_keyring(tmp_path)) == 1 + 2 * 10 + 2 * 10


def test_offline_rotation(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMOS_STORAGE_KEY", raising=False)
    m = manager(JobStore(tmp_path / "jobs.db"))
    run_to_end(m, submit(m, 3))
    old = m.store.keys.current
    m.close()
    store = JobStore(tmp_path / "jobs.db")
    status = rotate_offline(store)
    store.close()
    assert status["dropped_key_ids"] == [old.hex()] and not status["rotating"]
    assert every_value_opens_with(tmp_path, load_keyring(tmp_path)) == 1 + 6 + 6
