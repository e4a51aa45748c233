"""Shared fixtures, seen by every test module (none needs to import them): the model
cache (the smollm2 GGUF is converted once per machine) and the tiny random models of
llmos/models/tiny.py, each built once per machine for the tiny.py that made it."""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import pytest

from daemon_harness import SMOLLM2, TINY, Shared, SharedDaemons

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LLMOS_MODEL_CACHE", str(REPO / ".cache" / "models"))
# Tests share 2 cores with whatever else runs: OpenMP threads that spin while they wait
# (the default) turn a busy machine into a stalled one. Passive waits cost little when
# quiet; the daemons the tests start inherit this. (Before torch is imported anywhere.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# The shared daemons (daemon_harness.SharedDaemons): each fixture leases the daemon of its spec
# for one test module. A test uses one by asking for the fixture, directly or through another.
SHARED = {"tiny_daemon": TINY, "smollm2_daemon": SMOLLM2}
NEEDED = pytest.StashKey[Counter]()   # spec -> tests still to run that use it
POOL = pytest.StashKey[SharedDaemons]()


def shared_specs(item) -> list[Shared]:
    return [spec for name, spec in SHARED.items() if name in item.fixturenames]


def pytest_collection_finish(session):
    session.config.stash[NEEDED] = Counter(spec for item in session.items for spec in shared_specs(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Once a test's teardown is done, a shared daemon no test still to run uses is stopped."""
    try:
        return (yield)
    finally:
        item.config.stash.get(NEEDED, Counter()).subtract(shared_specs(item))
        if POOL in item.config.stash:
            item.config.stash[POOL].stop_unneeded()


@pytest.fixture(scope="session")
def shared_daemons(request, tmp_path_factory):
    pool = SharedDaemons(tmp_path_factory.mktemp("shared"), request.config.stash.get(NEEDED, Counter()))
    request.config.stash[POOL] = pool
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def tiny_daemon(request, shared_daemons):
    """tiny llama as `tiny`, default flags: shared by every module that asks, so use it only
    where tests leave it as they found it (daemon_harness.SharedDaemons says what that means)."""
    with shared_daemons.lease(request, TINY) as d:
        yield d


@pytest.fixture(scope="module")
def smollm2_daemon(request, shared_daemons):
    """smollm2, default flags, shared as tiny_daemon is."""
    with shared_daemons.lease(request, SMOLLM2) as d:
        yield d


def tiny_model_dir(kind: str, cache: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """The one way tests get a tiny model: make_tiny_model(kind, seed) with this tokenizer,
    kept in `cache` under a name that carries a digest of tiny.py, so an edit to it builds
    a fresh model instead of reusing a stale one. Built aside and renamed into place:
    concurrent sessions never see half a model."""
    from llmos.models import tiny
    from llmos.models.convert import build_once
    digest = hashlib.sha256(Path(tiny.__file__).read_bytes()).hexdigest()[:12]
    out = Path(cache) / f"tiny-{kind}-seed{seed}-{digest}"
    return build_once(out, lambda tmp: tiny.make_tiny_model(kind, tmp, tokenizer_dir, seed=seed))


@pytest.fixture(scope="session")
def model_cache() -> Path:
    path = Path(os.environ["LLMOS_MODEL_CACHE"])
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(model_cache) -> Path:
    from llmos.models.registry import prepare_model_dir
    return prepare_model_dir("smollm2", model_cache)


@pytest.fixture(scope="session")
def tiny_llama_dir(model_cache, smollm2_dir) -> Path:
    return tiny_model_dir("llama", model_cache, smollm2_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(model_cache, smollm2_dir) -> Path:
    return tiny_model_dir("qwen2", model_cache, smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_llama_dir, tiny_qwen2_dir) -> dict[str, Path]:
    return {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}
