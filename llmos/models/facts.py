"""What a Hugging Face model directory holds, read without torch (the kernel may import this).

The facts come from config.json and the safetensors headers: a safetensors file starts with
an 8-byte little-endian header length, then a JSON header mapping each tensor to its dtype
and shape, so counting parameters reads a few kilobytes, never the weights.
"""
from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER = 100 * 2**20   # a real header is kilobytes; a larger length means a broken file
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


@dataclass(frozen=True)
class Facts:
    """None where the directory does not say (no safetensors, an unusual config)."""
    architecture: str | None     # e.g. LlamaForCausalLM
    model_type: str | None       # e.g. llama
    parameters: int | None       # elements of every tensor in the safetensors files
    dtype: str | None            # the dtype holding most parameters on disk
    context_length: int | None   # the model's own limit (the daemon may cap it)
    size_bytes: int              # every file in the directory


def read_config(directory: Path) -> dict:
    """config.json as a dict. Raises ValueError when it is missing or not a JSON object."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def safetensors_header(path: Path) -> dict:
    """The tensor table of one safetensors file (its __metadata__ left out)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise ValueError(f"{path}: header length {length} is not plausible")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    return header


def read_facts(directory: Path) -> Facts:
    directory = Path(directory)
    config = read_config(directory)
    archs = config.get("architectures")
    parameters, by_dtype = None, Counter()
    try:
        files = sorted(directory.glob("*.safetensors"))
        for file in files:
            for tensor in safetensors_header(file).values():
                n = math.prod(tensor["shape"])
                by_dtype[tensor["dtype"]] += n
        parameters = sum(by_dtype.values()) if files else None
    except (OSError, ValueError, KeyError, TypeError):
        parameters, by_dtype = None, Counter()   # a broken file: say nothing rather than a wrong count
    disk = by_dtype.most_common(1)[0][0] if by_dtype else None
    dtype = DTYPES.get(disk, disk) if disk else config.get("dtype") or config.get("torch_dtype")
    return Facts(architecture=archs[0] if isinstance(archs, list) and archs else None,
                 model_type=config.get("model_type"), parameters=parameters, dtype=dtype,
                 context_length=context_length(config), size_bytes=dir_size(directory))


def context_length(config: dict) -> int | None:
    """The context limit a config states (multimodal configs keep it in text_config)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return next((v for c in (config, text) for k in CONTEXT_KEYS
                 if isinstance(v := c.get(k), int) and not isinstance(v, bool)), None)


def dir_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
