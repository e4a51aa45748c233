"""A batch job split across replicas: the split, the cluster batch id and the merge. No Ray.

A cluster batch is a set of ordinary llmos batches, one per replica daemon, each durable in
that daemon's job store. The cluster keeps no store of its own: the id names the parts
(node, home, job id, first input line, line count), so any ingress can gather them."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass

PREFIX = "cbatch_"
FINAL = ("completed", "failed", "cancelled", "expired")


class BatchRefused(ValueError):
    """The input cannot be split into parts: `lines` are its 1-based bad line numbers."""

    def __init__(self, message: str, lines: list[int]):
        super().__init__(message)
        self.lines = lines


@dataclass(frozen=True)
class Part:
    node: str       # Ray node id where the daemon runs
    home: str       # the daemon's home on that node
    job: str        # the daemon's batch id
    first: int      # 0-based index of this part's first input line
    count: int


def split_lines(lines: list[str], parts: int) -> list[tuple[int, list[str]]]:
    """Contiguous parts of nearly equal size, as (first line index, lines); blank lines
    dropped. Refuses a custom_id that appears twice, since the merged results name each once."""
    lines = [x for x in lines if x.strip()]
    seen: dict[str, int] = {}
    dupes = []
    for n, line in enumerate(lines, 1):
        try:
            cid = json.loads(line).get("custom_id")
        except (ValueError, AttributeError):
            continue   # the daemon names a malformed line precisely
        if isinstance(cid, str):
            if cid in seen:
                dupes.append(n)
            seen.setdefault(cid, n)
    if dupes:
        raise BatchRefused(f"custom_id repeated on lines {dupes}", dupes)
    if not lines:
        raise BatchRefused("the batch has no lines", [])
    parts = max(1, min(parts, len(lines)))
    size, extra = divmod(len(lines), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append((start, lines[start:end]))
        start = end
    return out


def encode_id(parts: list[Part]) -> str:
    raw = json.dumps([[p.node, p.home, p.job, p.first, p.count] for p in parts], separators=(",", ":"))
    return PREFIX + base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_id(batch_id: str) -> list[Part]:
    """The parts a cluster batch id names; ValueError for anything else."""
    if not batch_id.startswith(PREFIX):
        raise ValueError(f"not a cluster batch id: {batch_id!r}")
    b64 = batch_id[len(PREFIX):]
    try:
        rows = json.loads(base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)))
        if not isinstance(rows, list) or not rows:
            raise ValueError("no parts")
        return [Part(str(n), str(h), str(j), int(f), int(c)) for n, h, j, f, c in rows]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a cluster batch id: {batch_id!r}") from exc


def merge_status(batch_id: str, parts: list[Part], jobs: list[dict | None]) -> dict:
    """One status from the parts' jobs; None is a part whose daemon does not answer now
    (its replica is being replaced: the part resumes from its job store), so not final."""
    counts = {"total": 0, "completed": 0, "failed": 0}
    rows = []
    for part, job in zip(parts, jobs):
        c = (job or {}).get("request_counts") or {}
        for k in counts:
            counts[k] += int(c.get(k) or 0) if job else (part.count if k == "total" else 0)
        rows.append({"node": part.node, "home": part.home, "job": part.job, "first_line": part.first + 1,
                     "lines": part.count, "status": job["status"] if job else "unavailable"})
    statuses = [r["status"] for r in rows]
    if all(s in FINAL for s in statuses):
        status = ("completed" if all(s == "completed" for s in statuses)
                  else "failed" if "failed" in statuses else next(s for s in statuses if s != "completed"))
    else:
        status = "in_progress"
    return {"id": batch_id, "object": "llmos.cluster_batch", "status": status, "request_counts": counts,
            "parts": rows}


def merge_results(per_part: list[list[str]]) -> list[str]:
    """The parts' result lines in input order (each part's are in its own order)."""
    return [line for lines in per_part for line in lines if line.strip()]
