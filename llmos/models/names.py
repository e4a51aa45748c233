"""Model names from model specs, without importing torch (the kernel uses this).

A spec is a built-in name (`smollm2`), `name=/path/to/model` (an HF directory or a
.gguf file), or a bare path (named after its last component)."""
from __future__ import annotations

from pathlib import Path

BUILTIN_MODELS = ("smollm2",)


def model_name(spec: str) -> str:
    if "=" in spec:
        name = spec.split("=", 1)[0].strip()
    elif spec in BUILTIN_MODELS:
        name = spec
    else:
        path = Path(spec)
        name = path.stem if path.suffix == ".gguf" else path.name
    if not name:
        raise ValueError(f"cannot name model spec {spec!r}")
    return name
