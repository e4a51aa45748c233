"""Files of the batch API: uploads (validated line by line as they arrive) and the pages of
input, output and error files. Part of the kernel's job subsystem; writes go to the JobStore.

An upload is a session of Commands from the io driver: files.begin -> files.append (a chunk
of lines, numbered from first_line) ... -> files.commit, or files.discard. Each append is
bounded (MAX_APPEND_LINES) so that validating a million-line file never stalls the kernel's
loop for long. A file is usable only once committed; unfinished uploads vanish at restart.

Output and error files are not stored: they are pages over the job's request rows, so they
can be read while the job runs. Their ids are OUTPUT_PREFIX / ERROR_PREFIX + the job id.

A file may expire (expires_after, OpenAI's {"anchor": "created_at", "seconds": N}; the
retention setting caps every file's life too): the housekeeper deletes it then, unless an
unfinished job still reads it. An upload sent with an idempotency key is compared, by a
digest of its name, purpose, expiry and bytes, with the file first uploaded with that key:
the same upload answers that file, another one is refused (409).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field

from llmos.kernel.jobs.batchfile import LineError, check_line, output_line
from llmos.kernel.jobs.refusals import Refused
from llmos.kernel.jobs.sealing import Unreadable
from llmos.kernel.jobs.store import JobStore

MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_APPEND_LINES = 5000
MAX_PAGE = 5000
PAGE_BYTES = 8 * 1024 * 1024   # a page of a file stops after the line that reaches this size
PAGE_FETCH = 64                # rows read from the store at a time while a page is built
OUTPUT_PREFIX, ERROR_PREFIX = "file-out-", "file-err-"
UPLOAD_IDLE_S = 600.0   # an upload silent this long was abandoned (its io driver died)
MIN_EXPIRY_S, MAX_EXPIRY_S = 3600, 30 * 86400   # OpenAI's bounds for expires_after.seconds
MAX_LIST = 10_000
MAX_IDEMPOTENCY_KEY = 255


@dataclass
class Upload:
    file_id: str
    filename: str
    next_line: int = 1
    lines: int = 0
    bytes: int = 0
    errors: int = 0
    url: str | None = None
    url_line: int = 0
    touched: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
    key: bytes = field(default_factory=lambda: os.urandom(32))   # for its custom_id digests (filetable.py)
    content: object = field(default_factory=hashlib.sha256)   # a digest of its lines, for idempotency


class Files:
    def __init__(self, store: JobStore, models):
        self.store = store
        self.models = models                 # container of served model names
        self.uploads: dict[str, Upload] = {}
        self.retention_s: float | None = None   # set by the JobManager: no file lives longer

    # ------------------------------------------------------------ upload session (Commands)
    def begin(self, args: dict) -> dict:
        filename = args.get("filename") or "batch.jsonl"
        if not isinstance(filename, str) or len(filename) > 255:
            raise ValueError("filename must be a string of at most 255 characters")
        self.drop_idle()
        up = Upload(f"file-{uuid.uuid4().hex[:24]}", filename)
        self.store.begin_file(up.file_id, filename, "batch", up.created)
        self.uploads[up.file_id] = up
        return {"id": up.file_id}

    def append(self, args: dict) -> dict:
        """Validate and store one chunk; answers {"errors": [[line_no, message], ...]}."""
        up = self._upload(args)
        first, lines = args.get("first_line"), args.get("lines")
        if first != up.next_line:
            raise ValueError(f"expected lines from {up.next_line}, got first_line={first!r}")
        if not isinstance(lines, list) or len(lines) > MAX_APPEND_LINES:
            raise ValueError(f"lines must be a list of at most {MAX_APPEND_LINES} lines")
        up.bytes += sum(len(x) for x in lines if isinstance(x, (bytes, str))) + len(lines)
        if up.bytes > MAX_FILE_BYTES:
            raise ValueError(f"the file is larger than {MAX_FILE_BYTES} bytes")
        rows, errors = [], []
        for raw in lines:
            if isinstance(raw, (bytes, str)):
                up.content.update((raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw) + b"\n")
        for n, raw in enumerate(lines, start=first):
            try:
                if not isinstance(raw, (bytes, str)):
                    raise LineError(n, "not a line of text")
                line = check_line(n, raw, self.models)
                if line is None:
                    continue
                if up.url is None:
                    up.url, up.url_line = line.url, n
                elif line.url != up.url:
                    raise LineError(n, f"url {line.url} differs from line {up.url_line}'s {up.url}; "
                                       "all requests of a batch use one endpoint")
                rows.append((n, line.custom_id, line.text))
            except LineError as exc:
                errors.append((exc.line_no, str(exc)))
        duplicates = self.store.add_lines(up.file_id, rows, up.key)
        errors += duplicates
        up.next_line, up.touched = first + len(lines), time.monotonic()
        up.lines += len(rows) - len(duplicates)
        up.errors += len(errors)
        return {"errors": sorted([list(e) for e in errors])}

    def commit(self, args: dict) -> dict:
        """files.commit {id, purpose, bytes, expires_after_s, idempotency_key}."""
        up = self._upload(args)
        purpose, expiry, key = args.get("purpose") or "batch", args.get("expires_after_s"), args.get("idempotency_key")
        problem = (f"purpose {purpose!r} is not supported (only 'batch')" if purpose != "batch" else
                   f"expires_after.seconds must be an integer in {MIN_EXPIRY_S}..{MAX_EXPIRY_S}"
                   if expiry is not None and not (type(expiry) is int and MIN_EXPIRY_S <= expiry <= MAX_EXPIRY_S) else
                   f"the idempotency key must be a string of 1 to {MAX_IDEMPOTENCY_KEY} characters"
                   if key is not None and not (isinstance(key, str) and 0 < len(key) <= MAX_IDEMPOTENCY_KEY) else
                   f"the file has {up.errors} invalid line(s)" if up.errors else
                   "the file has no requests" if up.lines == 0 else None)
        del self.uploads[up.file_id]
        digest = hashlib.sha256(json.dumps([up.filename, purpose, expiry]).encode() + up.content.digest()).digest()
        first = self.store.file_by_key(key) if key and not problem else None
        if problem or first:
            self.store.discard_file(up.file_id)
        if problem:
            raise ValueError(problem)
        if first:   # a retry: the same upload answers the first file, another one is refused
            if first[1] != digest:
                raise Refused("idempotency_conflict", f"the idempotency key {key!r} was used for another upload "
                                                      f"({first[0]})")
            return self.get({"id": first[0]})
        self.store.commit_file(up.file_id, int(args.get("bytes") or up.bytes), up.lines, up.url,
                               None if expiry is None else up.created + expiry, (key, digest) if key else None)
        return self.get({"id": up.file_id})

    def discard(self, args: dict) -> dict:
        file_id = args.get("id")
        if self.uploads.pop(file_id, None) is not None:
            self.store.discard_file(file_id)
        return {}

    def drop_idle(self) -> None:
        now = time.monotonic()
        for up in [u for u in self.uploads.values() if now - u.touched > UPLOAD_IDLE_S]:
            self.discard({"id": up.file_id})

    def _upload(self, args: dict) -> Upload:
        up = self.uploads.get(args.get("id"))
        if up is None:
            raise ValueError(f"no upload in progress with id {args.get('id')!r} (did the daemon restart?)")
        return up

    # ------------------------------------------------------------ reading (Queries)
    def get(self, args: dict) -> dict | None:
        """The OpenAI file object, or None if there is no such (finished) file."""
        file_id = args.get("id")
        if not isinstance(file_id, str):
            return None
        job, kind = self._job_of(file_id)
        if job is not None:
            return {"id": file_id, "object": "file", "bytes": 0, "created_at": job["created_at"],
                    "filename": f"{job['id']}_{kind}.jsonl", "purpose": "batch_output", "status": "processed",
                    "status_details": None, "expires_at": None}
        f = self.store.get_file(file_id)
        if f is None:
            return None
        return self._view(f)

    def _view(self, f: dict) -> dict:
        ends = [t for t in (f["expires_at"], self.retention_s and int(f["created_at"] + self.retention_s)) if t]
        return {"id": f["id"], "object": "file", "bytes": f["bytes"], "created_at": f["created_at"],
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed", "status_details": None,
                "expires_at": min(ends) if ends else None,
                "llmos": {"requests": f["lines"], "endpoint": f["endpoint"]}}

    def list(self, args: dict) -> dict:
        """files.list {limit, after, order: desc|asc, purpose}: {"data": [file], "has_more"}."""
        limit, order, after, purpose = (args.get("limit", MAX_LIST), args.get("order", "desc"), args.get("after"),
                                        args.get("purpose"))
        if type(limit) is not int or not 0 < limit <= MAX_LIST:
            raise ValueError(f"limit must be an integer in 1..{MAX_LIST}")
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
        if not isinstance(after, (str, type(None))) or not isinstance(purpose, (str, type(None))):
            raise ValueError("after and purpose must be strings")
        rows = self.store.list_files(limit + 1, after, order == "desc", purpose)
        return {"data": [self._view(f) for f in rows[:limit]], "has_more": len(rows) > limit}

    def delete(self, args: dict) -> dict:
        """files.delete {id}: the file is gone from the API now, its lines erased soon after
        (erasure.py). Refused while an unfinished job reads it."""
        file_id = args.get("id")
        job, _ = self._job_of(file_id) if isinstance(file_id, str) else (None, None)
        if job is not None:
            raise Refused("file_in_use", f"{file_id} holds results of {job['id']}: delete the batch instead")
        if not isinstance(file_id, str) or self.store.get_file(file_id) is None:
            raise Refused("file_not_found", f"No such file: {str(file_id)[:100]}")
        users = self.store.file_users(file_id, active_only=True)
        if users:
            raise Refused("file_in_use", f"{users[0]} is still reading {file_id}: cancel it first")
        self.store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    def page(self, args: dict) -> dict | None:
        """Lines of a file after line number `after`: {"lines": [str], "next": cursor | None}.
        A page holds at most `limit` lines and about PAGE_BYTES (always at least one line),
        so a file of huge results cannot make one reply outgrow the bus or stall the kernel."""
        file_id, after, limit = args.get("id"), args.get("after", 0), args.get("limit", 1000)
        if not (type(after) is int and type(limit) is int and 0 < limit <= MAX_PAGE):
            raise ValueError(f"after must be an integer and limit one in 1..{MAX_PAGE}")
        job, kind = self._job_of(file_id) if isinstance(file_id, str) else (None, None)
        if job is not None:
            def fetch(cursor, n):
                rows = (self.store.output_page(job["id"], cursor, n) if kind == "output"
                        else self.store.error_page(job, cursor, n))
                return [(r["line_no"], _result_line(job, r)) for r in rows]
        elif isinstance(file_id, str) and self.store.get_file(file_id) is not None:
            def fetch(cursor, n):
                return [(n, _unreadable_line(t) if isinstance(t, Unreadable) else t)
                        for n, t in self.store.file_page(file_id, cursor, n)]
        else:
            return None
        lines, size, cursor, more = [], 0, after, True
        while more and len(lines) < limit and size < PAGE_BYTES:
            want = min(PAGE_FETCH, limit - len(lines))
            rows = fetch(cursor, want)
            more = len(rows) == want
            for line_no, line in rows:
                lines.append(line)
                size, cursor = size + len(line.encode()) + 1, line_no
                if size >= PAGE_BYTES:
                    more = True   # (maybe: the next page may be empty)
                    break
        return {"lines": lines, "next": cursor if more and lines else None}

    def _job_of(self, file_id: str) -> tuple[dict | None, str | None]:
        for prefix, kind in ((OUTPUT_PREFIX, "output"), (ERROR_PREFIX, "error")):
            if file_id.startswith(prefix):
                return self.store.get_job(file_id[len(prefix):]), kind
        return None, None


def _result_line(job: dict, row: dict) -> str:
    """The output line of a request row (store.output_page / error_page)."""
    req_id = f"batch_req_{job['id'].removeprefix('batch_')}_{row['line_no']}"
    custom_id, response = row["custom_id"], row["response"]
    if isinstance(custom_id, Unreadable) or isinstance(response, Unreadable):
        why = custom_id if isinstance(custom_id, Unreadable) else response
        return output_line(req_id, None if isinstance(custom_id, Unreadable) else custom_id, row["request_id"],
                           None, None, {"code": "record_unreadable", "message": str(why)})
    if row["state"] in ("completed", "failed"):
        return output_line(req_id, custom_id, row["request_id"], row["status_code"], json.loads(response))
    why = {"cancelled": "was cancelled", "expired": "expired"}.get(job["status"], "failed")
    return output_line(req_id, custom_id, None, None, None,
                       {"code": f"batch_{why.split()[-1]}", "message": f"the batch {why} before this request finished"})


def _unreadable_line(exc: Unreadable) -> str:
    """What an input line that does not open reads as: an error, never the bytes."""
    return json.dumps({"custom_id": None, "error": {"code": "record_unreadable", "message": str(exc)}})
