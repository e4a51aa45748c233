"""The batch API of the io driver: OpenAI's /v1/files and /v1/batches, and the native
/llmos/v1/jobs. The kernel owns every file and job (its JobManager, design.md rule 1);
this module only streams an upload to it in bounded chunks of lines and streams file
contents back page by page, so neither side holds a whole file in memory.

Deletion: DELETE /v1/files/{id} and DELETE /v1/batches/{id} (an ended batch; a running
one is a 409: cancel it first), POST /llmos/v1/jobs/purge; the kernel erases what they
held (kernel/jobs/erasure.py). Storage keys: GET /llmos/v1/storage, POST
/llmos/v1/storage/rotate. POST /v1/files and /v1/batches take OpenAI's Idempotency-Key
header: a retry with the same key and body answers the first object, another body a 409.

Errors: a malformed batch file is a 400 whose error names the bad lines (code
"invalid_batch_file", with "lines": their numbers); over MAX_FILE_BYTES is a 413; an
unknown file or batch is a 404; the kernel's coded refusals (REFUSALS, see
kernel/jobs/refusals.py) have their status; its other refusals are 400s.
"""
from __future__ import annotations

import contextlib
import logging
import re

from aiohttp import web

from llmos.drivers.io.bodies import parse_json, read_body
from llmos.drivers.io.kernel_link import KernelLink, KernelUnavailable, QueryFailed
from llmos.openai_format import ApiError
from llmos.openai_format.batch_models import BATCH_MESSAGES, UPLOAD_MESSAGES, BatchCreateRequest, FileUpload
from llmos.openai_format.validation import validate

MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_LINE_BYTES = 4 * 1024 * 1024     # one request; a whole context of text is far less
READ_SIZE = 256 * 1024
CHUNK_LINES, CHUNK_BYTES = 500, 512 * 1024   # one files.append: ~10-40 ms of the kernel loop
PAGE_LINES = 1000
KEPT_ERRORS = 50
MAX_FIELD_BYTES = 64                 # a multipart text field such as purpose ("batch")
MAX_LIST = 10_000                    # files per page of GET /v1/files (OpenAI's limit)
LINK = web.AppKey("batch_link", KernelLink)
log = logging.getLogger(__name__)
REFUSALS = {"file_not_found": (404, "id"), "batch_not_found": (404, "id"), "file_in_use": (409, "id"),
            "batch_active": (409, "id"), "idempotency_conflict": (409, "Idempotency-Key"),
            "rotation_running": (409, None), "storage_unavailable": (503, None)}
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")   # printable ASCII, no spaces
TRUE = {"1": True, "true": True, "0": False, "false": False}


def add_routes(app: web.Application, link: KernelLink) -> None:
    app[LINK] = link
    r = app.router
    r.add_post("/v1/files", create_file)
    r.add_get("/v1/files", list_files)
    r.add_get("/v1/files/{id}", get_file)
    r.add_delete("/v1/files/{id}", delete_file)
    r.add_get("/v1/files/{id}/content", file_content)
    r.add_post("/v1/batches", create_batch)
    r.add_get("/v1/batches", list_batches)
    r.add_get("/v1/batches/{id}", get_batch)
    r.add_delete("/v1/batches/{id}", delete_batch)
    r.add_post("/v1/batches/{id}/cancel", cancel_batch)
    r.add_get("/llmos/v1/jobs", list_batches)
    r.add_get("/llmos/v1/jobs/errors", job_errors)   # before {id}: "errors" is never a job id
    r.add_post("/llmos/v1/jobs/purge", purge_jobs)
    r.add_get("/llmos/v1/jobs/{id}", get_batch)
    r.add_delete("/llmos/v1/jobs/{id}", delete_batch)
    r.add_post("/llmos/v1/jobs/{id}/cancel", cancel_batch)
    r.add_get("/llmos/v1/storage", storage_status)
    r.add_post("/llmos/v1/storage/rotate", rotate_storage)


class InvalidBatchFile(ApiError):
    def __init__(self, errors: list, total: int):
        parts = [f"line {n}: {msg}" for n, msg in errors[:20]]
        more = f"; ... and {total - len(parts)} more" if total > len(parts) else ""
        super().__init__(400, f"the batch file has {total} invalid line{'s' * (total != 1)}: "
                         + "; ".join(parts) + more, "file", "invalid_batch_file")
        self.lines = [n for n, _ in errors]

    def body(self) -> dict:
        body = super().body()
        body["error"]["lines"] = self.lines
        return body


async def _ask(request: web.Request, kind: str, what: str, args: dict, timeout: float | None = None):
    """The kernel's answer; its refusals (ok=False) become 400s naming the reason."""
    link = request.app[LINK]
    call = link.command if kind == "command" else link.query
    try:
        return await (call(what, args) if timeout is None else call(what, args, timeout))
    except QueryFailed as exc:
        msg = str(exc)
        if msg.startswith(("unknown command", "unknown query")):
            raise ApiError(501, "this daemon's kernel has no batch jobs", code="not_implemented") from None
        msg = msg.removeprefix(f"{what}: ")
        code, _, rest = msg.partition(": ")
        if code in REFUSALS:
            status, param = REFUSALS[code]
            raise ApiError(status, rest, param, code) from None
        raise ApiError(400, msg, code="invalid_request") from None


def _idempotency_key(request: web.Request) -> dict:
    """{"idempotency_key": KEY} for a request that sent OpenAI's Idempotency-Key header."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return {}
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(400, "Idempotency-Key must be 1 to 255 printable ASCII characters", "Idempotency-Key")
    return {"idempotency_key": key}


def _found(data, kind: str, ident: str):
    if data is None:
        raise ApiError(404, f"No such {kind}: {ident}", "id", f"{kind}_not_found")
    return data


# ---------------------------------------------------------------- files


async def create_file(request: web.Request) -> web.Response:
    """multipart/form-data with `purpose` ("batch") and `file` (JSONL); optionally
    `expires_after[anchor]` ("created_at") and `expires_after[seconds]`, as OpenAI's SDK sends them.
    The text fields are batch_models.FileUpload's (a bad purpose is refused before the file is
    read); other fields are ignored."""
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "upload the file as multipart/form-data with the fields 'purpose' and 'file'", "file")
    idem = _idempotency_key(request)
    reader = await request.multipart()
    purpose, file_id, nbytes, expiry = None, None, 0, {}
    try:
        while (part := await reader.next()) is not None:
            if part.name == "purpose":
                purpose = await _small_field(part, "purpose")
                validate(FileUpload, {"purpose": purpose}, UPLOAD_MESSAGES)
            elif part.name in ("expires_after[anchor]", "expires_after[seconds]"):
                expiry[part.name[14:-1]] = await _small_field(part, part.name)
            elif part.name == "file":
                if file_id is not None:
                    raise ApiError(400, "only one file per upload", "file")
                file_id = (await _ask(request, "command", "files.begin",
                                      {"filename": part.filename or "batch.jsonl"}))["id"]
                nbytes = await _send_lines(request, file_id, part)
            else:
                await part.release()
        if file_id is None:
            raise ApiError(400, "the upload has no 'file' field", "file")
        fields = {"purpose": purpose, "expires_after": expiry or None}
        form = validate(FileUpload, {k: v for k, v in fields.items() if v is not None}, UPLOAD_MESSAGES)
        expires = {"expires_after_s": int(form.expires_after.seconds)} if form.expires_after else {}
        obj = await _ask(request, "command", "files.commit", {"id": file_id, "bytes": nbytes, "purpose": purpose,
                                                              **expires, **idem})
        file_id = None  # committed: nothing to discard
        return web.json_response(obj)
    finally:
        if file_id is not None and request.app[LINK].up:
            with contextlib.suppress(Exception):
                await request.app[LINK].command("files.discard", {"id": file_id}, timeout=5)


async def _small_field(part, name: str) -> str:
    """A short text field of a multipart upload, read with a cap (never the whole part)."""
    raw = bytearray()
    while chunk := await part.read_chunk(MAX_FIELD_BYTES + 1):
        raw += chunk
        if len(raw) > MAX_FIELD_BYTES:
            raise ApiError(400, f"{name} must be at most {MAX_FIELD_BYTES} bytes", name)
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ApiError(400, f"{name} is not valid UTF-8", name) from None


class _Uploader:
    """Feeds one upload to the kernel: lines numbered from 1, sent in chunks; keeps the
    first KEPT_ERRORS bad lines (the kernel's verdicts and our own) and counts them all."""

    def __init__(self, request: web.Request, file_id: str):
        self.request, self.file_id = request, file_id
        self.first, self.batch, self.batch_bytes = 1, [], 0
        self.errors, self.n_errors = [], 0

    def bad(self, line_no: int, message: str) -> None:
        self.n_errors += 1
        if len(self.errors) < KEPT_ERRORS:
            self.errors.append((line_no, message))

    async def add(self, line: bytes | None) -> None:
        """One complete line; None stands for a line longer than MAX_LINE_BYTES."""
        if line is None:  # keep the numbering: the kernel skips the blank stand-in
            self.bad(self.first + len(self.batch), f"longer than {MAX_LINE_BYTES // 2**20} MiB")
            line = b""
        self.batch.append(line)
        self.batch_bytes += len(line)
        if len(self.batch) >= CHUNK_LINES or self.batch_bytes >= CHUNK_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self.batch:
            reply = await _ask(self.request, "command", "files.append",
                               {"id": self.file_id, "first_line": self.first, "lines": self.batch})
            for line_no, message in reply.get("errors") or []:
                self.bad(line_no, message)
            self.first, self.batch, self.batch_bytes = self.first + len(self.batch), [], 0


async def _send_lines(request: web.Request, file_id: str, part) -> int:
    """Stream the part to the kernel as chunks of lines; returns its size in bytes.
    Raises InvalidBatchFile naming the bad lines, after reading the whole file."""
    up = _Uploader(request, file_id)
    buf, nbytes, too_long = bytearray(), 0, False
    while chunk := await part.read_chunk(READ_SIZE):
        nbytes += len(chunk)
        if nbytes > MAX_FILE_BYTES:
            raise ApiError(413, f"the file is larger than {MAX_FILE_BYTES // 2**20} MiB", "file")
        *ends, tail = chunk.split(b"\n")   # only the new bytes are scanned: linear in the file
        for piece in ends:
            too_long = too_long or len(buf) + len(piece) > MAX_LINE_BYTES
            await up.add(None if too_long else bytes(buf + piece))
            buf.clear()
            too_long = False
        too_long = too_long or len(buf) + len(tail) > MAX_LINE_BYTES
        if too_long:
            buf.clear()
        else:
            buf += tail
    if buf or too_long:
        await up.add(None if too_long else bytes(buf))
    await up.flush()
    if up.n_errors:
        raise InvalidBatchFile(sorted(up.errors), up.n_errors)
    return nbytes


async def list_files(request: web.Request) -> web.Response:
    q = request.query
    try:
        limit = int(q.get("limit", MAX_LIST))
    except ValueError:
        raise ApiError(400, "limit must be an integer", "limit") from None
    if not 0 < limit <= MAX_LIST:
        raise ApiError(400, f"limit must be in 1..{MAX_LIST}", "limit")
    if q.get("order", "desc") not in ("asc", "desc"):
        raise ApiError(400, "order must be 'asc' or 'desc'", "order")
    args = {"limit": limit, "order": q.get("order", "desc"), **{k: q[k] for k in ("after", "purpose") if k in q}}
    page = await _ask(request, "query", "files.list", args)
    data = page["data"]
    return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None, "has_more": page["has_more"]})


async def delete_file(request: web.Request) -> web.Response:
    return web.json_response(await _ask(request, "command", "files.delete", {"id": request.match_info["id"]}))


async def get_file(request: web.Request) -> web.Response:
    fid = request.match_info["id"]
    return web.json_response(_found(await _ask(request, "query", "files.get", {"id": fid}), "file", fid))


async def file_content(request: web.Request) -> web.StreamResponse:
    """The file as JSONL. Output and error files of a running job hold the results so far."""
    fid = request.match_info["id"]
    page = _found(await _ask(request, "query", "files.page", {"id": fid, "after": 0, "limit": PAGE_LINES}),
                  "file", fid)
    resp = web.StreamResponse(headers={"Content-Type": "application/jsonl; charset=utf-8"})
    await resp.prepare(request)
    try:
        while page is not None:
            if page["lines"]:
                await resp.write(("\n".join(page["lines"]) + "\n").encode())
            if page["next"] is None:
                break
            page = await _ask(request, "query", "files.page", {"id": fid, "after": page["next"],
                                                               "limit": PAGE_LINES})
    except (ApiError, KernelUnavailable) as exc:
        # Headers are gone: cut the connection so the client sees a truncated body, not a short file.
        log.warning("file %s: content stream failed: %s", fid, exc)
        if request.transport is not None:
            request.transport.close()
        raise ConnectionResetError(str(exc)) from None
    await resp.write_eof()
    return resp


# ---------------------------------------------------------------- batches (jobs)


async def create_batch(request: web.Request) -> web.Response:
    """The body is batch_models.BatchCreateRequest; the kernel checks the file and the window's range."""
    body = validate(BatchCreateRequest, parse_json(await read_body(request)), BATCH_MESSAGES)
    args = {k: getattr(body, k) for k in ("input_file_id", "endpoint", "completion_window", "metadata")}
    return web.json_response(await _ask(request, "command", "jobs.create", {**args, **_idempotency_key(request)}))


async def list_batches(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", 20))
    except ValueError:
        raise ApiError(400, "limit must be an integer", "limit") from None
    args = {"limit": limit, **({"after": request.query["after"]} if "after" in request.query else {})}
    data = await _ask(request, "query", "jobs.list", args)
    return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None, "has_more": len(data) == limit})


async def get_batch(request: web.Request) -> web.Response:
    bid = request.match_info["id"]
    return web.json_response(_found(await _ask(request, "query", "jobs.get", {"id": bid}), "batch", bid))


async def cancel_batch(request: web.Request) -> web.Response:
    bid = request.match_info["id"]
    return web.json_response(_found(await _ask(request, "command", "jobs.cancel", {"id": bid}), "batch", bid))


async def job_errors(request: web.Request) -> web.Response:
    return web.json_response(await _ask(request, "query", "jobs.errors", {}))


async def delete_batch(request: web.Request) -> web.Response:
    """An ended batch and its results; ?input_file=true: its input file too, if no other batch reads it."""
    flag = request.query.get("input_file", "false").lower()
    if flag not in TRUE:
        raise ApiError(400, "input_file must be true or false", "input_file")
    return web.json_response(await _ask(request, "command", "jobs.delete",
                                        {"id": request.match_info["id"], "input_file": TRUE[flag]}))


async def purge_jobs(request: web.Request) -> web.Response:
    """Body {"older_than_s": N, "input_files": true}: batches that ended at least N s ago."""
    body = parse_json(await read_body(request))
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    age, files = body.get("older_than_s"), body.get("input_files", True)
    if isinstance(age, bool) or not isinstance(age, (int, float)):
        raise ApiError(400, "older_than_s is required (a number of seconds)", "older_than_s")
    if not isinstance(files, bool):
        raise ApiError(400, "input_files must be true or false", "input_files")
    return web.json_response(await _ask(request, "command", "jobs.purge", {"older_than_s": age, "input_files": files}))


async def storage_status(request: web.Request) -> web.Response:
    return web.json_response(await _ask(request, "query", "storage.status", {}))


async def rotate_storage(request: web.Request) -> web.Response:
    return web.json_response(await _ask(request, "command", "storage.rotate", {}))
