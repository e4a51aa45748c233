"""Shared fixtures: a model cache (the smollm2 GGUF is converted once per machine) and
tiny random models for fast end-to-end runs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LLMOS_MODEL_CACHE", str(REPO / ".cache" / "models"))


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
    from llmos.models.tiny import make_tiny_model
    out = model_cache / "tiny-llama"
    return out if (out / "config.json").exists() else make_tiny_model("llama", out, smollm2_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(model_cache, smollm2_dir) -> Path:
    from llmos.models.tiny import make_tiny_model
    out = model_cache / "tiny-qwen2"
    return out if (out / "config.json").exists() else make_tiny_model("qwen2", out, smollm2_dir, seed=0)
