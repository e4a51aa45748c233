"""verify(): walk the whole chain and name the first record that does not fit.

Per line, in order: it parses and is canonical; its own hash; its mac (with the key); its
seq follows the last one; its prev is the last hash; a file's first line is that file's
audit.file header. Across the log: it starts at seq 1 from GENESIS, or where an
audit.pruned record says old files were deleted; it reaches the anchor's seq with the
anchor's hash. What a chain cannot prove on its own is said in the notes (docs/security.md).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from llmos.audit import files as F
from llmos.audit.chain import GENESIS, BadLine, parse_line, record_hash, record_mac


@dataclass
class Problem:
    file: str
    line: int            # 1-based; past the last line for a missing tail; 0 for the anchor itself
    seq: int | None
    why: str

    def __str__(self) -> str:
        at = f"{self.file} line {self.line}" if self.line else self.file
        return f"{at}{f' (seq {self.seq})' if self.seq is not None else ''}: {self.why}"


@dataclass
class VerifyResult:
    ok: bool = True
    records: int = 0
    files: list[str] = field(default_factory=list)
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None
    bad: Problem | None = None
    notes: list[str] = field(default_factory=list)
    macs_checked: bool = False
    anchored: bool = False     # an anchor was found and the chain reaches it


class _Bad(Exception):
    def __init__(self, problem: Problem):
        self.problem = problem


def verify(directory: str | Path, hmac_key: bytes | None = None,
           anchor_path: str | Path | None = None) -> VerifyResult:
    """Check the log in `directory`. anchor_path: an anchor file (default: the directory's
    own anchor.json if there is one; a path given must exist)."""
    directory = Path(directory)
    res = VerifyResult(macs_checked=hmac_key is not None)
    paths = F.log_files(directory)
    res.files = [p.name for p in paths]
    walk = _Walk(directory, hmac_key, None, res)
    try:
        walk.anchor = _read_anchor(directory, anchor_path, hmac_key)
        for i, path in enumerate(paths):
            walk.file(path, newest=i == len(paths) - 1, missing=_missing_before(paths, i))
        walk.finish(paths[-1].name if paths else "(no files)")
    except _Bad as exc:
        res.ok, res.bad = False, exc.problem
    if hmac_key is None and res.records:
        res.notes.append("not checked: macs (no key given)" if walk.signed else
                         "records are not signed: whoever can write the log can rewrite it consistently")
    return res


def _missing_before(paths: list[Path], i: int) -> list[str]:
    if i == 0:
        return []
    a, b = F.file_index(paths[i - 1].name), F.file_index(paths[i].name)
    return [F.file_name(k) for k in range(a + 1, b)]


class _Walk:
    def __init__(self, directory: Path, key: bytes | None, anchor: dict | None, res: VerifyResult):
        self.dir, self.key, self.anchor, self.res = directory, key, anchor, res
        self.prev: str | None = None
        self.start: tuple[str, int, str] | None = None
        self.kept: set[tuple[str, int, str]] = set()
        self.signed = False
        self.lines_in_last = 0

    def file(self, path: Path, newest: bool, missing: list[str]) -> None:
        line_no = 0
        with open(path, "rb") as f:
            for raw in f:
                line_no += 1
                if not raw.endswith(b"\n"):
                    if not newest:
                        raise _Bad(Problem(path.name, line_no, None, "unterminated line in a file that is not the newest"))
                    self.res.notes.append(
                        f"{path.name} line {line_no}: {len(raw)} bytes of an unfinished write at the end "
                        "(a crash while writing); the log's next open moves them aside (audit.recovered)")
                    break
                self.record(path.name, line_no, raw[:-1], missing)
        if line_no == 0:
            if not newest:
                raise _Bad(Problem(path.name, 1, None, "empty file"))
            self.res.notes.append(f"{path.name} is empty (a crash right after rotating); the next open writes its header")
        self.lines_in_last = line_no

    def record(self, name: str, line_no: int, line: bytes, missing: list[str]) -> None:
        def bad(why: str, seq=None) -> _Bad:
            return _Bad(Problem(name, line_no, seq, why))
        try:
            rec = parse_line(line)
        except BadLine as exc:
            raise bad(str(exc)) from None
        seq = rec["seq"]
        if record_hash(rec) != rec["hash"]:
            raise bad("bad hash: the record was edited", seq)
        if self.key is not None:
            if "mac" not in rec:
                raise bad("missing mac", seq)
            if record_mac(self.key, rec["hash"]) != rec["mac"]:
                raise bad("bad mac: edited and re-hashed without the key (or another key)", seq)
        self.signed |= "mac" in rec
        if self.prev is None:
            self.start = (name, seq, rec["prev"])
            self.res.first_seq = seq
        else:
            expected = self.res.last_seq + 1
            gone = f" (missing file: {', '.join(missing)})" if missing and line_no == 1 else ""
            if seq > expected:
                raise bad(f"seq gap: expected {expected}, got {seq}: records removed{gone}", seq)
            if seq < expected:
                raise bad(f"out of order: seq {seq} after {expected - 1} (reordered or inserted)", seq)
            if rec["prev"] != self.prev:
                raise bad(f"prev mismatch: does not chain to seq {expected - 1} (inserted or replaced){gone}", seq)
        if line_no == 1 and (rec["kind"] != "audit.file" or rec.get("file") != name):
            raise bad("a file's first record must be its audit.file header naming it (file renamed?)", seq)
        self.kinds(name, line_no, rec)
        if self.anchor is not None and seq == self.anchor["seq"]:
            if rec["hash"] != self.anchor["hash"]:
                raise bad(f"the anchor says seq {seq} has hash {self.anchor['hash'][:16]}..: history rewritten", seq)
            self.res.anchored = True
        self.prev, self.res.last_seq, self.res.last_hash = rec["hash"], seq, rec["hash"]
        self.res.records += 1

    def kinds(self, name: str, line_no: int, rec: dict) -> None:
        if rec["kind"] == "audit.pruned":
            self.kept.add((rec.get("kept_from"), rec.get("kept_seq"), rec.get("kept_prev")))
        elif rec["kind"] == "audit.recovered":
            torn = self.dir / str(rec.get("torn_file"))
            there = torn.is_file() and hashlib.sha256(torn.read_bytes()).hexdigest() == rec.get("sha256")
            self.res.notes.append(
                f"{name} line {line_no} (seq {rec['seq']}): recovered after a crash: {rec.get('bytes')} torn bytes "
                f"at offset {rec.get('offset')} of {rec.get('file')} moved to {rec.get('torn_file')}"
                + ("" if there else " (that file is gone or differs)"))

    def finish(self, last_file: str) -> None:
        res = self.res
        if self.start is not None and self.start[1:] != (1, GENESIS):
            if self.start not in self.kept:
                raise _Bad(Problem(self.start[0], 1, self.start[1],
                                   f"the log starts at seq {self.start[1]}: earlier records are missing and "
                                   "no audit.pruned record names this file as where the log was kept from"))
            res.notes.append(f"records before seq {self.start[1]} were pruned (recorded in the log)")
        if self.anchor is None:
            if res.records:
                res.notes.append("no anchor: records removed from the end would go unnoticed")
            return
        aseq = self.anchor["seq"]
        if res.last_seq is None or aseq > res.last_seq:
            raise _Bad(Problem(last_file, self.lines_in_last + 1, aseq,
                               f"truncated: the anchor says seq {aseq} was written; the log ends at "
                               f"{'seq ' + str(res.last_seq) if res.last_seq is not None else 'no record'}"))
        if aseq < res.first_seq:
            res.notes.append(f"the anchor names seq {aseq}, older than the oldest kept record")


def _read_anchor(directory: Path, given, key: bytes | None) -> dict | None:
    path = Path(given) if given is not None else directory / F.ANCHOR
    if not path.exists():
        if given is not None:
            raise _Bad(Problem(str(path), 0, None, "anchor file not found"))
        return None
    try:
        anchor = json.loads(path.read_bytes())
        seq, digest = anchor["seq"], anchor["hash"]
        if not isinstance(seq, int) or not isinstance(digest, str) or len(digest) != 64:
            raise ValueError("seq or hash of the wrong type")
        bytes.fromhex(digest)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _Bad(Problem(path.name, 0, None, f"anchor unreadable: {exc}")) from None
    if key is not None and anchor.get("mac") != F.anchor_mac(key, seq, digest):
        raise _Bad(Problem(path.name, 0, seq, "bad anchor mac: the anchor was forged or signed with another key"))
    return anchor
