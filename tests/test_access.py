"""Access control through a real daemon: every route with a wrong key, another tenant's key,
the right key and an admin key; another local user without a key; never another's data."""
from __future__ import annotations

import json
import os
import ssl
import threading
import time

import httpx
import pytest

from daemon_harness import Daemon
from llmos import protocol
from llmos.kernel.auth import AuthError, Authority, KeyStore
from llmos.models.catalog import Catalog
from llmos.paths import Paths

BODY = {"model": "tl", "prompt": "Hi", "max_tokens": 3, "temperature": 0}
ADMIN_ROUTES = [   # (method, path, json): each needs an admin key
    ("GET", "/llmos/v1/memory", None), ("POST", "/llmos/v1/drivers/io/restart", None),
    ("GET", "/llmos/v1/models", None), ("GET", "/llmos/v1/models/tl", None),
    ("POST", "/llmos/v1/models", {"name": "x", "path": "/nonexistent"}), ("DELETE", "/llmos/v1/models/qw", None),
    ("PATCH", "/llmos/v1/models/qw", {"replicas": 1}), ("POST", "/llmos/v1/models/qw/copy", {"to": "qw2"}),
    ("POST", "/llmos/v1/models/qw/load", None), ("POST", "/llmos/v1/models/tl/unload", None),
    ("POST", "/llmos/v1/models/tl/scale", {"replicas": 1}), ("POST", "/llmos/v1/models/qw/upgrade", {"version": 1}),
    ("POST", "/llmos/v1/models/qw/rollback", None), ("GET", "/llmos/v1/models/qw/upgrade", None),
]
OPEN_ROUTES = [("GET", "/v1/models", None), ("GET", "/llmos/v1/ps", None), ("POST", "/v1/completions", BODY),
               ("POST", "/v1/chat/completions", {**BODY, "prompt": None, "messages": [{"role": "user", "content": "Hi"}]})]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir, tiny_qwen2_dir):
    home = tmp_path_factory.mktemp("access")
    Catalog(Paths.from_env(home)).add("qw", tiny_qwen2_dir)
    store = KeyStore(home / "keys.db")
    keys = {"alice": store.create("alice", ["tl"], "interactive")[0], "bob": store.create("bob", ["tl"], "batch")[0],
            "admin": store.create("ops", None, "realtime", admin=True)[0], "wrong": "llmos-" + "x" * 43}
    d = Daemon(home, [f"tl={tiny_llama_dir}"], "--max-loaded-models", "2").wait_ready()
    d.keys = keys
    yield d
    d.stop()


def call(d: Daemon, who: str | None, method: str, path: str, body=None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {d.keys[who]}"} if who else {}
    body = {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body
    with d.http() as c:
        return c.request(method, path, json=body, headers={**headers, **kw.pop("headers", {})}, **kw)


@pytest.mark.parametrize("method, path, body", ADMIN_ROUTES + OPEN_ROUTES)
def test_a_wrong_key_is_401_everywhere(daemon, method, path, body):
    r = call(daemon, "wrong", method, path, body)
    assert r.status_code == 401 and r.headers.get("WWW-Authenticate") == "Bearer", r.text
    assert call(daemon, "wrong", "GET", "/health").status_code == 200   # a probe needs no key
    assert call(daemon, "alice", "POST", "/v1/completions", BODY).status_code == 200   # and the daemon serves on


@pytest.mark.parametrize("method, path, body", ADMIN_ROUTES)
def test_admin_routes_are_403_for_a_tenant_key(daemon, method, path, body):
    r = call(daemon, "alice", method, path, body)
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("method, path, body", OPEN_ROUTES)
def test_open_routes_serve_a_tenant_key(daemon, method, path, body):
    assert call(daemon, "alice", method, path, body).status_code == 200


def test_a_key_only_narrows_tenant_models_and_priority(daemon):
    assert call(daemon, "alice", "POST", "/v1/completions", {**BODY, "tenant": "alice"}).status_code == 200
    for change, field in (({"tenant": "bob"}, "tenant"), ({"model": "qw"}, "model"),
                          ({"priority": "realtime"}, "priority")):
        r = call(daemon, "alice", "POST", "/v1/completions", {**BODY, **change})
        assert r.status_code == 403 and r.json()["error"]["param"] == field, r.text
    r = call(daemon, "bob", "POST", "/v1/completions", {**BODY, "priority": "interactive"})   # bob: batch at most
    assert r.status_code == 403
    assert call(daemon, "bob", "POST", "/v1/completions", {**BODY, "priority": "batch"}).status_code == 200
    assert call(daemon, "admin", "POST", "/v1/completions", {**BODY, "priority": "realtime"}).status_code == 200


def test_another_principals_request_is_invisible_and_uncancellable(daemon):
    started = threading.Event()
    done = {}

    def bobs_stream():
        body = {**BODY, "max_tokens": 1500, "ignore_eos": True, "stream": True, "priority": "batch"}
        headers = {"Authorization": f"Bearer {daemon.keys['bob']}", "X-Request-Id": "bob-1"}
        with daemon.http() as c, c.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            for line in r.iter_lines():
                started.set()
                if line.startswith("data: ") and line != "data: [DONE]":
                    done["last"] = json.loads(line[6:])
    t = threading.Thread(target=bobs_stream)
    t.start()
    assert started.wait(120)
    alice_ps = call(daemon, "alice", "GET", "/llmos/v1/ps").json()
    assert alice_ps["requests"] == [] and alice_ps["processes"] == []
    assert call(daemon, "alice", "POST", "/llmos/v1/requests/bob-1/cancel").status_code == 404
    # Ids are per principal: alice may use bob's id for her own request (and learns nothing
    # from it); bob may not use it twice at once.
    mine = call(daemon, "alice", "POST", "/v1/completions", BODY, headers={"X-Request-Id": "bob-1"})
    assert mine.status_code == 200 and mine.headers["X-Request-Id"] == "bob-1", mine.text
    assert mine.json()["choices"][0]["text"] == call(daemon, "alice", "POST", "/v1/completions", BODY).json()[
        "choices"][0]["text"]
    again = call(daemon, "bob", "POST", "/v1/completions", {**BODY, "priority": "batch"},
                 headers={"X-Request-Id": "bob-1"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "duplicate_request_id"
    assert [r["id"] for r in call(daemon, "bob", "GET", "/llmos/v1/ps").json()["requests"]] == ["bob-1"]
    assert "bob-1" in [r["id"] for r in call(daemon, "admin", "GET", "/llmos/v1/ps").json()["requests"]]
    assert call(daemon, "bob", "POST", "/llmos/v1/requests/bob-1/cancel").status_code == 200
    t.join(120)
    assert done["last"]["choices"][0]["finish_reason"] == "cancelled"


def test_admin_key_and_the_daemons_own_user_may_do_everything(daemon):
    assert call(daemon, "admin", "GET", "/llmos/v1/memory").status_code == 200
    assert call(daemon, None, "GET", "/llmos/v1/memory").status_code == 200   # the daemon's uid, no key
    assert call(daemon, None, "GET", "/llmos/v1/ps").json()["processes"]      # sees the process table


def test_a_revoked_or_expired_key_is_refused(daemon):
    store = KeyStore(daemon.home / "keys.db")
    secret, row = store.create("carol", None, "batch")
    store.revoke(row.id)
    auth = Authority(store, admin_uid=os.getuid())
    import hashlib
    sha = hashlib.sha256(secret.encode()).hexdigest()
    with pytest.raises(AuthError, match="revoked") as exc:
        auth.principal(protocol.Credentials(transport="unix", uid=0, key_sha256=sha))
    assert exc.value.status == 401
    secret, _ = store.create("dave", None, "batch", expires_s=1e-9)
    with pytest.raises(AuthError, match="expired"):   # (a fresh Authority: keys are re-read once a second)
        Authority(store, admin_uid=os.getuid()).principal(
            protocol.Credentials(transport="unix", key_sha256=hashlib.sha256(secret.encode()).hexdigest()))
    # Through the daemon: a revoked key is refused within a second.
    secret, row = store.create("erin", None, "batch")
    daemon.keys["erin"] = secret
    deadline = time.monotonic() + 30   # a new key is seen within a second, too
    while (r := call(daemon, "erin", "POST", "/v1/completions", {**BODY, "priority": "batch"})).status_code != 200:
        assert time.monotonic() < deadline and r.status_code == 401, r.text
        time.sleep(0.1)
    store.revoke(row.id)
    deadline = time.monotonic() + 30
    while (r := call(daemon, "erin", "GET", "/v1/models")).status_code != 401:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    assert "revoked" in r.json()["error"]["message"]


def test_other_local_users_need_a_key_unless_allowed(tmp_path):
    store = KeyStore(tmp_path / "keys.db")
    strict, lenient = Authority(store, admin_uid=1000), Authority(store, admin_uid=1000, allow_local_users=True)
    other = protocol.Credentials(transport="unix", uid=1001, gid=1001)
    with pytest.raises(AuthError) as exc:
        strict.principal(other)
    assert exc.value.status == 401 and "needs an API key" in str(exc.value)
    p = lenient.principal(other)
    assert (p.name, p.tenant, p.admin) == ("uid:1001", "default", False)
    with pytest.raises(AuthError):
        strict.principal(protocol.Credentials(transport="tcp"))   # over TCP a key is always needed
    assert strict.principal(protocol.Credentials(transport="unix", uid=1000)).admin
    assert not store.rows() or all("sha256" not in repr(r) for r in store.rows())   # rows never carry the hash


def test_keys_cli_prints_the_secret_once_and_lists_no_secret(tmp_path):
    from click.testing import CliRunner
    from llmos.cli.main import cli
    run = lambda *a: CliRunner().invoke(cli, ["--home", str(tmp_path), "keys", *a])   # noqa: E731
    made = run("create", "--tenant", "alice", "--models", "tl,qw", "--max-priority", "batch", "--expires", "30d")
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip().splitlines()[0]
    assert secret.startswith("llmos-") and len(secret) > 40
    listed = run("list")
    assert listed.exit_code == 0 and "alice" in listed.output and "tl,qw" in listed.output
    assert secret not in listed.output and secret not in (tmp_path / "keys.db").read_bytes().decode("latin-1")
    kid = KeyStore(tmp_path / "keys.db").rows()[0].id
    assert run("revoke", kid).exit_code == 0 and run("revoke", kid).exit_code == 1
    from llmos.audit import audit_dir, read_records, verify
    changes = [(r["action"], r["id"]) for r in read_records(audit_dir(tmp_path)) if r["kind"] == "key.change"]
    assert changes == [("create", kid), ("revoke", kid)] and verify(audit_dir(tmp_path)).ok   # no daemon: recorded here
    for bad in (["--tenant", ""], ["--tenant", "a", "--max-priority", "urgent"], ["--tenant", "a", "--expires", "soon"],
                ["--tenant", "a", "--expires", "-5"]):
        r = run("create", *bad)
        assert r.exit_code != 0 and "Traceback" not in r.output, (bad, r.output)
    assert (tmp_path / "keys.db").stat().st_mode & 0o077 == 0


def _self_signed(tmp_path):
    crypto = pytest.importorskip("cryptography")   # noqa: F841  (a test dependency through llmos)
    import datetime as dt
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_tcp_listener_serves_tls_and_always_needs_a_key(tmp_path, tiny_llama_dir):
    cert, key = _self_signed(tmp_path)
    port = _free_port()
    (tmp_path / "home").mkdir()
    secret = KeyStore(tmp_path / "home" / "keys.db").create("alice", None, "interactive")[0]
    d = Daemon(tmp_path / "home", [f"tl={tiny_llama_dir}"], "--listen", f"127.0.0.1:{port}",
               "--tls-cert", str(cert), "--tls-key", str(key)).wait_ready()
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=f"https://localhost:{port}", verify=trust, timeout=60) as c:
            assert c.get("/health").status_code == 200
            assert c.get("/v1/models").status_code == 401
            assert c.get("/v1/models", headers={"Authorization": "Bearer local"}).status_code == 401
            auth = {"Authorization": f"Bearer {secret}"}
            assert c.get("/v1/models", headers=auth).status_code == 200
            r = c.post("/v1/completions", json=BODY, headers=auth)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
            assert c.get("/llmos/v1/memory", headers=auth).status_code == 403
        with pytest.raises(httpx.HTTPError), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as plain:
            plain.get("/health").raise_for_status()   # no plaintext on a TLS port
    finally:
        d.stop()


def test_files_and_batches_are_their_owners_alone(daemon):
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "tl", "prompt": "Hi", "max_tokens": 2}})
    with daemon.http() as c:
        up = c.post("/v1/files", files={"file": ("in.jsonl", line + "\n")}, data={"purpose": "batch"},
                    headers={"Authorization": f"Bearer {daemon.keys['alice']}"})
    assert up.status_code == 200, up.text
    fid = up.json()["id"]
    batch = call(daemon, "alice", "POST", "/v1/batches", {"input_file_id": fid, "endpoint": "/v1/completions",
                                                          "completion_window": "24h"})
    assert batch.status_code == 200, batch.text
    bid = batch.json()["id"]
    for who in ("alice", "admin"):
        assert call(daemon, who, "GET", f"/v1/files/{fid}").status_code == 200
        assert call(daemon, who, "GET", f"/v1/batches/{bid}").status_code == 200
    assert call(daemon, "bob", "GET", f"/v1/files/{fid}").status_code == 404
    assert call(daemon, "bob", "GET", f"/v1/files/{fid}/content").status_code == 404
    assert call(daemon, "bob", "GET", f"/v1/batches/{bid}").status_code == 404
    assert call(daemon, "bob", "POST", f"/v1/batches/{bid}/cancel").status_code == 404
    assert call(daemon, "bob", "DELETE", f"/v1/files/{fid}").status_code == 404
    assert call(daemon, "bob", "POST", "/v1/batches", {"input_file_id": fid, "endpoint": "/v1/completions",
                                                       "completion_window": "24h"}).status_code == 400
    assert fid not in json.dumps(call(daemon, "bob", "GET", "/v1/files").json())
    assert bid not in json.dumps(call(daemon, "bob", "GET", "/v1/batches").json())
    assert bid in json.dumps(call(daemon, "alice", "GET", "/v1/batches").json())
    assert call(daemon, "alice", "POST", "/llmos/v1/jobs/purge", {"older_than_s": 1}).status_code == 403


def test_metrics_a_tenant_key_reads_only_the_gateways_gauges(daemon):
    from prometheus_client.parser import text_string_to_metric_families
    assert call(daemon, "alice", "POST", "/v1/completions", BODY).status_code == 200
    r = call(daemon, "alice", "GET", "/metrics")
    assert r.status_code == 200, r.text
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"} <= names
    assert all(n.startswith("vllm:") for n in names) and "alice" not in r.text and "ops" not in r.text
    full = call(daemon, "admin", "GET", "/metrics")
    assert full.status_code == 200 and "llmos_requests_total" in full.text and 'tenant="alice"' in full.text
    assert call(daemon, "wrong", "GET", "/metrics").status_code == 401
