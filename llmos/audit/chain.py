"""The hash chain: canonical JSON, a record's hash and mac, and the check of one line.

Shared by the writer (log.py) and the verifier (verify.py), so both sides agree on every
byte. A stored line is the canonical JSON of the whole record (hash and mac included) plus
"\\n"; a line that parses but is not byte for byte canonical is refused, so an edit that
leaves the parsed value alone (an escape's case, a duplicate key) is caught too.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re

GENESIS = "0" * 64            # the prev of the first record of a log
RESERVED = ("seq", "ts", "kind", "prev", "hash", "mac")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


class AuditError(Exception):
    """The audit log cannot be opened or written (a corrupt tail, a wrong key, a full disk)."""


class BadLine(ValueError):
    """One stored line is not a well-formed record; the message says why."""


def canonical(obj) -> bytes:
    """Sorted keys, no spaces, ASCII only, no NaN: one byte string per value."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except TypeError as exc:   # one error type for "not a JSON value", whatever json says
        raise ValueError(f"not a JSON value: {exc}") from None
    return text.encode("ascii")


def record_hash(record: dict) -> str:
    """sha256(previous hash's 32 bytes + canonical record without its hash and mac)."""
    body = {k: v for k, v in record.items() if k not in ("hash", "mac")}
    return hashlib.sha256(bytes.fromhex(record["prev"]) + canonical(body)).hexdigest()


def record_mac(key: bytes, digest: str) -> str:
    """HMAC-SHA256 over the record's hash: whoever lacks the key cannot re-chain an edit."""
    return hmac.new(key, bytes.fromhex(digest), hashlib.sha256).hexdigest()


def seal(record: dict, key: bytes | None) -> bytes:
    """Fill in hash (and mac) and return the line to append."""
    record["hash"] = record_hash(record)
    if key is not None:
        record["mac"] = record_mac(key, record["hash"])
    return canonical(record) + b"\n"


def parse_line(line: bytes) -> dict:
    """A stored line (its newline stripped) -> the record, or BadLine saying what is wrong
    with its form. Whether it fits the chain is the caller's question."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadLine(f"unparsable: {exc}") from None
    if not isinstance(record, dict):
        raise BadLine("unparsable: not a JSON object")
    for name, kind in (("seq", int), ("ts", (int, float)), ("kind", str), ("prev", str), ("hash", str)):
        if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool):
            raise BadLine(f"field {name!r} missing or of the wrong type")
    for name in ("prev", "hash", "mac"):
        if name in record and not (isinstance(record[name], str) and _HEX64.match(record[name])):
            raise BadLine(f"field {name!r} is not 64 lowercase hex digits")
    try:
        same = canonical(record) == line
    except ValueError:
        same = False
    if not same:
        raise BadLine("not canonical JSON (bytes edited?)")
    return record
