"""Model names from model specs, and the registry's errors, without torch (the kernel uses this).

A spec is a built-in name (`smollm2`), a registered name (`llmos models add`), `name=/path`
(an HF directory or a .gguf file), or a path (named after its last component). A registered
name is one NAME_RE accepts and never ends in `.gguf`, so it names itself here exactly as
`parse_model_spec` resolves it, with no lookup."""
from __future__ import annotations

import re
from pathlib import Path

BUILTIN_MODELS = ("smollm2",)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ModelError(ValueError):
    """A model request that cannot be done; the message says why, in one line."""


class UnknownModel(ModelError):
    """No model by that name (or no such version of it), and no such path."""


class ModelExists(ModelError):
    pass


class BadModel(ModelError):
    """A bad name, a path that is not a model, or a GGUF that does not convert."""


def bad_name(name: str) -> str | None:
    """Why `name` cannot be registered, or None when it can."""
    if not NAME_RE.match(name):
        return f"model name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    if name.endswith(".gguf"):
        return f"model name {name!r}: a name may not end in .gguf (it would read as a file)"
    return None


def model_name(spec: str) -> str:
    """The name `parse_model_spec(spec)` serves the model under."""
    spec = spec.strip()
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
