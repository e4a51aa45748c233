"""What jobs.create accepts: the checks of its arguments, and idempotency.

A request with an idempotency key is summed up by a digest of what it asks (input file,
endpoint, window, metadata); a retry with that key and the same digest is the job created
first, another digest is refused (409). The key is kept with the job (and is free again
once the job is deleted).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from llmos.kernel.jobs.batchfile import PARSERS
from llmos.kernel.jobs.files import MAX_IDEMPOTENCY_KEY
from llmos.kernel.jobs.refusals import Refused

WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 365 * 86400


@dataclass
class NewJob:
    file: dict
    endpoint: str
    window: str
    window_s: int
    metadata: dict | None
    idem: tuple[str, bytes] | None     # (idempotency key, digest of the request)


def check_create(store, args: dict) -> str | NewJob:
    """The id of the job a retry names, or what to create; raises ValueError (400) or Refused."""
    file_id, endpoint = args.get("input_file_id"), args.get("endpoint")
    window, metadata, key = args.get("completion_window") or "24h", args.get("metadata"), args.get("idempotency_key")
    if key is not None and not (isinstance(key, str) and 0 < len(key) <= MAX_IDEMPOTENCY_KEY):
        raise ValueError(f"the idempotency key must be a string of 1 to {MAX_IDEMPOTENCY_KEY} characters")
    window_s = window_seconds(window)
    digest = hashlib.sha256(json.dumps([file_id, endpoint, window, metadata], sort_keys=True).encode()).digest()
    first = store.job_by_key(key) if key else None
    if first:
        if first[1] != digest:
            raise Refused("idempotency_conflict", f"the idempotency key {key!r} was used for another batch "
                                                  f"({first[0]})")
        return first[0]
    f = store.get_file(file_id) if isinstance(file_id, str) else None
    if f is None:
        raise ValueError(f"input_file_id: no file {file_id!r}")
    if f["purpose"] != "batch":
        raise ValueError(f"input_file_id: file {file_id} has purpose {f['purpose']!r}, not 'batch'")
    if endpoint not in PARSERS:
        raise ValueError(f"endpoint must be one of {', '.join(PARSERS)}, got {endpoint!r}")
    if endpoint != f["endpoint"]:
        raise ValueError(f"endpoint {endpoint} does not match the file's requests ({f['endpoint']})")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in metadata.items())):
        raise ValueError("metadata must be an object of at most 16 string keys (64) and values (512)")
    return NewJob(f, endpoint, window, window_s, metadata, (key, digest) if key else None)


def window_seconds(window) -> int:
    """Seconds of a completion window: "24h" (OpenAI's only value), or N s|m|h|d."""
    unit, number = (window[-1:], window[:-1]) if isinstance(window, str) else ("", "")
    if unit not in WINDOW_UNITS or not (number.isascii() and number.isdigit()) or len(window) > 16:
        raise ValueError(f"completion_window must be like '24h' (a number and s, m, h or d), got {str(window)[:20]!r}")
    seconds = int(number) * WINDOW_UNITS[unit]
    if not 0 < seconds <= MAX_WINDOW_S:
        raise ValueError(f"completion_window must be between 1s and {MAX_WINDOW_S // 86400}d")
    return seconds
