"""Files of the batch API: uploads (validated line by line as they arrive) and the pages of
input, output and error files. Part of the kernel's job subsystem; writes go to the JobStore.

An upload is a session of Commands from the io driver: files.begin -> files.append (a chunk
of lines, numbered from first_line) ... -> files.commit, or files.discard. Each append is
bounded (MAX_APPEND_LINES) so that validating a million-line file never stalls the kernel's
loop for long. A file is usable only once committed; unfinished uploads vanish at restart.

Output and error files are not stored: they are pages over the job's request rows, so they
can be read while the job runs. Their ids are OUTPUT_PREFIX / ERROR_PREFIX + the job id.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from llmos.kernel.jobs.batchfile import LineError, check_line, output_line
from llmos.kernel.jobs.store import JobStore

MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_APPEND_LINES = 5000
MAX_PAGE = 5000
PAGE_BYTES = 8 * 1024 * 1024   # a page of a file stops after the line that reaches this size
PAGE_FETCH = 64                # rows read from the store at a time while a page is built
OUTPUT_PREFIX, ERROR_PREFIX = "file-out-", "file-err-"
UPLOAD_IDLE_S = 600.0   # an upload silent this long was abandoned (its io driver died)


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


class Files:
    def __init__(self, store: JobStore, models):
        self.store = store
        self.models = models                 # container of served model names
        self.uploads: dict[str, Upload] = {}

    # ------------------------------------------------------------ upload session (Commands)
    def begin(self, args: dict) -> dict:
        filename = args.get("filename") or "batch.jsonl"
        if not isinstance(filename, str) or len(filename) > 255:
            raise ValueError("filename must be a string of at most 255 characters")
        self.drop_idle()
        up = Upload(f"file-{uuid.uuid4().hex[:24]}", filename)
        self.store.begin_file(up.file_id, filename, "batch", int(time.time()))
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
        duplicates = self.store.add_lines(up.file_id, rows)
        errors += duplicates
        up.next_line, up.touched = first + len(lines), time.monotonic()
        up.lines += len(rows) - len(duplicates)
        up.errors += len(errors)
        return {"errors": sorted([list(e) for e in errors])}

    def commit(self, args: dict) -> dict:
        up = self._upload(args)
        purpose = args.get("purpose") or "batch"
        problem = (f"purpose {purpose!r} is not supported (only 'batch')" if purpose != "batch" else
                   f"the file has {up.errors} invalid line(s)" if up.errors else
                   "the file has no requests" if up.lines == 0 else None)
        del self.uploads[up.file_id]
        if problem:
            self.store.discard_file(up.file_id)
            raise ValueError(problem)
        self.store.commit_file(up.file_id, int(args.get("bytes") or up.bytes), up.lines, up.url)
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
        return {"id": f["id"], "object": "file", "bytes": f["bytes"], "created_at": f["created_at"],
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed", "status_details": None,
                "expires_at": None, "llmos": {"requests": f["lines"], "endpoint": f["endpoint"]}}

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
                return [(r["line_no"], r["text"]) for r in self.store.file_page(file_id, cursor, n)]
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


def _result_line(job: dict, row) -> str:
    req_id = f"batch_req_{job['id'].removeprefix('batch_')}_{row['line_no']}"
    state = row["state"] if "state" in row.keys() else "completed"
    if state in ("completed", "failed"):
        return output_line(req_id, row["custom_id"], row["request_id"], row["status_code"], json.loads(row["response"]))
    why = "cancelled" if job["status"] == "cancelled" else "failed"
    return output_line(req_id, row["custom_id"], None, None, None,
                       {"code": f"batch_{why}", "message": f"the batch was {why} before this request finished"})
