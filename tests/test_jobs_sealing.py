"""The job store at rest, without processes: sealed values (AES-GCM, the record's name as
authenticated data), the storage keys and where they come from, tampered and swapped rows,
rotation while a job runs, deletion that erases (database and WAL), expiry, retention,
idempotency keys and the sealing of a schema 1 store."""
from __future__ import annotations

import base64
import json
import os
import sqlite3
import time

import pytest

from llmos.kernel.jobs import JobManager, JobStore
from llmos.kernel.jobs.refusals import Refused
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
    monkeypatch.setenv("LLMOS_STORAGE_KEY", base64.b64encode(env_key).decode() + "," + base64.b64encode(cred_key).decode())
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
    m = manager(JobStore(tmp_path / "jobs.db"))
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
    m = manager(JobStore(tmp_path / "jobs.db"))
    job_id = submit(m, 10)
    run_to_end(m, job_id)
    m.commands["storage.rotate"]({})
    m.keeper.resealer.step(rows=3)
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


# ---------------------------------------------------------------- deletion that deletes


def test_deleted_files_and_jobs_are_erased_from_the_database_and_its_wal(tmp_path):
    m = manager(JobStore(tmp_path / "jobs.db"))
    job_id = submit(m, 30)
    fid = m.store.get_job(job_id)["input_file_id"]
    with pytest.raises(Refused, match="batch_active: .* cancel it first"):
        m.commands["jobs.delete"]({"id": job_id})
    with pytest.raises(Refused, match="file_in_use"):
        m.commands["files.delete"]({"id": fid})
    run_to_end(m, job_id)
    keep = submit(m, 2)                      # another job's data stays
    run_to_end(m, keep)
    db = sqlite3.connect(tmp_path / "jobs.db")
    sealed = [r[0] for r in db.execute("SELECT text FROM file_lines WHERE file_id=?", (fid,))] + [
        r[0] for r in db.execute("SELECT response FROM requests WHERE job_id=?", (job_id,))]
    db.close()
    assert len(sealed) == 60 and all(s[-24:] in home_bytes(tmp_path) for s in sealed[:3])
    with pytest.raises(Refused, match="file_in_use: file-out-"):
        m.commands["files.delete"]({"id": f"file-out-{job_id}"})
    assert m.commands["jobs.delete"]({"id": job_id}) == {"id": job_id, "object": "batch", "deleted": True,
                                                        "input_file_deleted": False}
    assert m.commands["files.delete"]({"id": fid}) == {"id": fid, "object": "file", "deleted": True}
    for what, ident, code in (("jobs.delete", job_id, "batch_not_found"), ("files.delete", fid, "file_not_found")):
        with pytest.raises(Refused, match=code):
            m.commands[what]({"id": ident})
    assert m.get_job({"id": job_id}) is None and m.files.page({"id": fid}) is None
    assert m.keeper.status()["erasing"] == 2
    settle(m)
    assert m.keeper.status()["erasing"] == 0 and not m.keeper.status()["checkpoint_pending"]
    assert (tmp_path / "jobs.db-wal").stat().st_size == 0
    everything = home_bytes(tmp_path)
    assert not [s for s in sealed if s[-24:] in everything], "a deleted value is still on disk"
    assert len(lines_of(m, f"file-out-{keep}")) == 2
    m.close()


def test_another_process_reading_the_store_delays_the_checkpoint_and_nothing_spins(tmp_path):
    m = manager(JobStore(tmp_path / "jobs.db"))
    job_id = submit(m, 3)
    run_to_end(m, job_id)
    reader = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM requests").fetchone()          # a read transaction holds the WAL
    m.commands["jobs.delete"]({"id": job_id, "input_file": True})
    m.keeper.next_sweep = float("inf")
    assert m.keeper.tick() is True                                       # erasing
    assert m.keeper.tick() is False and m.keeper.status()["checkpoint_pending"]   # waits a round, no spinning
    reader.execute("COMMIT")
    reader.close()
    settle(m)
    assert not m.keeper.status()["checkpoint_pending"] and (tmp_path / "jobs.db-wal").stat().st_size == 0
    m.close()


def test_purge_deletes_ended_jobs_and_their_input_files(tmp_path):
    clock = Clock()
    m = manager(JobStore(tmp_path / "jobs.db"), clock=clock)
    old = [submit(m, 2) for _ in range(3)]
    for j in old:
        run_to_end(m, j)
    running = submit(m, 2)
    with pytest.raises(ValueError, match="older_than_s"):
        m.commands["jobs.purge"]({"older_than_s": -1})
    assert m.commands["jobs.purge"]({"older_than_s": 3600})["deleted"] == 0      # none ended an hour ago
    clock.shift = 7200
    out = m.commands["jobs.purge"]({"older_than_s": 3600})
    assert (out["deleted"], out["input_files_deleted"], sorted(out["ids"])) == (3, 3, sorted(old))
    assert [j["id"] for j in m.list_jobs({})] == [running]
    assert m.store.list_files(10) and len(m.store.list_files(10)) == 1
    m.close()


# ---------------------------------------------------------------- expiry and retention


def test_a_batch_past_its_completion_window_expires(tmp_path):
    clock = Clock()
    m = manager(JobStore(tmp_path / "jobs.db"), limit=2, clock=clock)
    for bad in ("24 hours", "0h", "1y", 24, "9999d"):
        with pytest.raises(ValueError, match="completion_window"):
            m.create({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": bad})
    job_id = submit(m, 5, completion_window="2h")
    view = m.get_job({"id": job_id})
    assert view["expires_at"] == view["created_at"] + 7200 and view["expired_at"] is None
    m.feed()
    m.front.answer(1)
    m.feed()
    settle(m)
    assert m.get_job({"id": job_id})["status"] == "in_progress"
    clock.shift = 7201
    m.keeper.next_sweep = 0.0
    m.keeper.tick()
    view = m.get_job({"id": job_id})
    assert view["status"] == "expired" and view["expired_at"] >= view["expires_at"]
    assert not m.front.live and len(m.front.aborted) == 2               # what ran was aborted
    assert view["llmos"]["counts"]["expired"] == 4 and view["request_counts"]["completed"] == 1
    errs = [json.loads(x) for x in lines_of(m, view["error_file_id"])]
    assert len(errs) == 4 and {e["error"]["code"] for e in errs} == {"batch_expired"}
    assert len(lines_of(m, view["output_file_id"])) == 1
    m.close()


def test_files_expire_and_retention_purges_old_jobs_and_files(tmp_path):
    clock = Clock()
    m = manager(JobStore(tmp_path / "jobs.db"), clock=clock, retention_days=2)
    fid, _ = upload(m.files, [line("a")])
    with pytest.raises(ValueError, match="expires_after"):
        m.files.commit({"id": fid, "expires_after_s": 60})
    fid, _ = upload(m.files, [line("a")])
    f = m.files.commit({"id": fid, "expires_after_s": 3600})
    assert f["expires_at"] == f["created_at"] + 3600
    done = submit(m, 2)
    run_to_end(m, done)
    reading = m.create({"input_file_id": fid, "endpoint": "/v1/chat/completions"})["id"]
    assert m.files.get({"id": m.store.get_job(done)["input_file_id"]})["expires_at"] == f["created_at"] + 2 * 86400
    clock.shift = 2 * 3600
    m.keeper.sweep()
    assert m.files.get({"id": fid}) is not None          # expired, but a running job still reads it
    run_to_end(m, reading)
    m.keeper.sweep()
    assert m.files.get({"id": fid}) is None and m.get_job({"id": done}) is not None
    clock.shift = 3 * 86400
    m.keeper.sweep()
    assert m.list_jobs({}) == [] and m.store.list_files(10) == []
    settle(m)
    assert m.store.db.execute("SELECT COUNT(*) FROM file_lines").fetchone()[0] == 0
    m.close()


# ---------------------------------------------------------------- idempotency keys


def test_a_retry_with_an_idempotency_key_returns_the_first_object(tmp_path):
    m = manager(JobStore(tmp_path / "jobs.db"))
    lines = [line("a"), line("b")]

    def up(rows, key="up-1"):
        fid, _ = upload(m.files, rows)
        return m.files.commit({"id": fid, "idempotency_key": key})["id"]
    first = up(lines)
    assert up(lines) == first and len(m.store.list_files(10)) == 1
    with pytest.raises(Refused, match="idempotency_conflict"):
        up([line("a")])
    assert up([line("a")], key="up-2") != first
    args = {"input_file_id": first, "endpoint": "/v1/chat/completions", "idempotency_key": "job-1"}
    job = m.create(args)
    assert m.create(args)["id"] == job["id"] and len(m.list_jobs({})) == 1
    with pytest.raises(Refused, match="idempotency_conflict"):
        m.create({**args, "metadata": {"other": "body"}})
    with pytest.raises(ValueError, match="idempotency key"):
        m.create({**args, "idempotency_key": ""})
    run_to_end(m, job["id"])
    m.commands["jobs.delete"]({"id": job["id"]})
    assert m.create(args)["id"] != job["id"]             # a deleted job frees its key
    m.close()


# ---------------------------------------------------------------- a store of schema 1


SCHEMA_1 = """
CREATE TABLE files (id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, created_at INTEGER NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0, lines INTEGER NOT NULL DEFAULT 0, endpoint TEXT, complete INTEGER NOT NULL DEFAULT 0);
CREATE TABLE file_lines (file_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL, text TEXT NOT NULL,
    PRIMARY KEY (file_id, line_no)) WITHOUT ROWID;
CREATE UNIQUE INDEX file_custom_ids ON file_lines (file_id, custom_id);
CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, metadata TEXT, total INTEGER NOT NULL, next_line INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL, in_progress_at INTEGER,
    finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    errors TEXT);
CREATE TABLE requests (job_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, request_id TEXT, status_code INTEGER, response TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0, finished_at REAL,
    PRIMARY KEY (job_id, line_no)) WITHOUT ROWID;
PRAGMA user_version=1;
"""


def test_a_schema_1_store_is_sealed_at_start_and_its_plaintext_is_gone(tmp_path):
    db = sqlite3.connect(tmp_path / "jobs.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA secure_delete=OFF")   # (some builds of SQLite have it on by default)
    db.executescript(SCHEMA_1)
    db.execute("INSERT INTO files VALUES ('file-1', 'mine.jsonl', 'batch', 1, 10, 3, '/v1/chat/completions', 1)")
    db.executemany("INSERT INTO file_lines VALUES ('file-1', ?, ?, ?)", [(i, f"q{i}", line(f"{MARK}-{i}"))
                                                                        for i in (1, 2, 3)])
    db.execute("INSERT INTO jobs (id, status, endpoint, input_file_id, completion_window, metadata, total, "
               "completed, next_line, created_at, in_progress_at) VALUES ('batch_1', 'in_progress', '/v1/chat/completions', "
               f"'file-1', '24h', '{json.dumps({'m': MARK})}', 3, 1, 2, 1, 1)")
    db.execute("INSERT INTO requests (job_id, line_no, custom_id, state, status_code, response) VALUES "
               f"('batch_1', 1, 'q1', 'completed', 200, '{json.dumps({'answer': MARK})}')")
    db.execute("INSERT INTO file_lines VALUES ('file-gone', 1, 'x', ?)", (MARK * 50,))
    db.execute("DELETE FROM file_lines WHERE file_id='file-gone'")   # schema 1 had no secure_delete
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    assert MARK.encode() * 50 in home_bytes(tmp_path)     # deleted, and still on disk
    m = manager(JobStore(tmp_path / "jobs.db"))
    assert not m.store.legacy and not m.keeper.resealer.active
    assert MARK.encode() not in home_bytes(tmp_path)
    job = run_to_end(m, "batch_1")
    assert job["status"] == "completed" and job["metadata"] == {"m": MARK}
    out = [json.loads(x) for x in lines_of(m, "file-out-batch_1")]
    assert out[0]["response"]["body"] == {"answer": MARK} and [o["custom_id"] for o in out] == ["q1", "q2", "q3"]
    assert m.files.get({"id": "file-1"})["filename"] == "mine.jsonl"
    m.close()
    assert every_value_opens_with(tmp_path, load_keyring(tmp_path)) == 1 + 1 + 6 + 6
