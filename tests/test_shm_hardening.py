"""The KV pool files in /dev/shm, which every local user shares: unguessable names, created
exclusively and never through a link, and a sweep at start that touches only our own files."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from llmos.kernel.mem import pool as pool_mod
from llmos.kernel.mem.geometry import KVGeometry

GEO = KVGeometry(num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", block_size=4)


@pytest.fixture()
def shm(tmp_path, monkeypatch):
    monkeypatch.setattr(pool_mod, "SHM_DIR", tmp_path)
    return tmp_path


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_pool_files_are_private_unguessable_and_exclusive(shm):
    a, b = pool_mod.SharedKVPool("m", GEO, 4), pool_mod.SharedKVPool("m", GEO, 4)
    assert a.path != b.path and a.path.name.startswith(f"llmos-{os.getuid()}-{os.getpid()}-")
    st = a.path.lstat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_ISREG(st.st_mode) and st.st_size == a.nbytes
    a.release(), b.release()


def test_the_sweep_removes_only_our_dead_kernels_plain_files(shm, tmp_path_factory):
    uid, gone = os.getuid(), dead_pid()
    stale = shm / f"llmos-{uid}-{gone}-{'a' * 16}-m.kv"
    stale.write_bytes(b"x")
    alive = shm / f"llmos-{uid}-{os.getpid()}-{'b' * 16}-m.kv"       # a kernel that runs
    alive.write_bytes(b"x")
    target = tmp_path_factory.mktemp("victim") / "precious"
    target.write_bytes(b"keep me")
    link = shm / f"llmos-{uid}-{gone}-{'c' * 16}-m.kv"                 # a planted link
    link.symlink_to(target)
    folder = shm / f"llmos-{uid}-{gone}-{'d' * 16}-m.kv"               # a planted directory
    folder.mkdir()
    other = shm / f"llmos-{uid + 1}-{gone}-{'e' * 16}-m.kv"             # another user's
    other.write_bytes(b"x")
    old_style = shm / f"llmos-{gone}-m.kv"                             # not our pattern at all
    old_style.write_bytes(b"x")
    assert pool_mod.remove_stale_pools() == [stale]
    assert alive.exists() and link.is_symlink() and folder.is_dir() and other.exists() and old_style.exists()
    assert target.read_bytes() == b"keep me"


def test_a_second_daemon_on_one_home_is_refused_by_the_pid_lock(tmp_path):
    import fcntl
    from llmos.cli.daemon import claim_pid_file
    from llmos.paths import Paths
    paths = Paths.from_env(tmp_path)
    paths.ensure()
    holder = os.open(paths.pid_file, os.O_RDWR | os.O_CREAT, 0o600)   # another daemon holds the lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    os.write(holder, b"4242")
    r = subprocess.run([sys.executable, "-m", "llmos.cli.daemon", "--home", str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "already running (pid 4242" in r.stderr, r.stderr
    os.close(holder)   # its holder died: the next start takes the file over
    claim_pid_file(paths)
    assert paths.pid_file.read_text() == str(os.getpid())
