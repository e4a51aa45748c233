"""OpenAI's Batch file format, in and out. Pure functions; the kernel imports this (no I/O).

Input: one JSON object per line,
    {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}
where body is what that endpoint takes. The line is validated by openai_format's models
(batch_models.BatchRequestLine) and its body by the very parser, and so the very model, that
endpoint is served with: a line accepts exactly what an interactive request does, except
`stream`, and refuses a bad body with the same error (its message, after "body.<param>: "). Line numbers are
physical and 1-based; blank lines are skipped but counted, so errors name the line an
editor shows.

Output: one line per request, {"id", "custom_id", "response": {"status_code", "request_id",
"body"}, "error"}; a request that never ran (its job was cancelled) has response null and
error {"code", "message"}.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from llmos import protocol
from llmos.openai_format import ApiError, ParsedRequest, parse_chat, parse_completion
from llmos.openai_format.batch_models import LINE_MESSAGES, BatchRequestLine
from llmos.openai_format.validation import validate

PARSERS = {"/v1/chat/completions": parse_chat, "/v1/completions": parse_completion}
TENANT = "batch"   # tenant of job lines that name none (its quotas and fair share)


class LineError(ValueError):
    """Line `line_no` of a batch file is not a valid request; str() says why. `error`: the
    ApiError its body got, which an HTTP request with that body gets too (None: not the body's)."""

    def __init__(self, line_no: int, message: str, error: ApiError | None = None):
        super().__init__(message)
        self.line_no, self.error = line_no, error


@dataclass
class BatchLine:
    line_no: int
    custom_id: str
    url: str
    text: str                  # the line as stored (stripped)
    parsed: ParsedRequest


def check_line(line_no: int, raw: bytes | str, models=None) -> BatchLine | None:
    """Parse and validate one line; None for a blank line. `models`: the served model names
    (a container), or None to skip that check. Raises LineError."""
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LineError(line_no, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    text = raw.strip()
    if not text:
        return None
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise LineError(line_no, "nested too deeply") from None
    except ValueError as exc:
        raise LineError(line_no, f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise LineError(line_no, "must be a JSON object with custom_id, method, url and body")
    try:
        envelope = validate(BatchRequestLine, obj, LINE_MESSAGES)
    except ApiError as exc:
        raise LineError(line_no, exc.message) from None
    custom_id, url, body = envelope.custom_id, envelope.url, obj["body"]
    if body.get("stream"):
        raise LineError(line_no, "body.stream: batch requests cannot stream")
    try:
        parsed = PARSERS[url](body)
    except ApiError as exc:
        where = f"body.{exc.param}: " if exc.param else "body: "
        raise LineError(line_no, where + exc.message, exc) from None
    if models is not None and parsed.model not in models:
        served = ", ".join(sorted(models)) or "none"
        raise LineError(line_no, f"body.model: model {parsed.model!r} is not served (served: {served})")
    return BatchLine(line_no, custom_id, url, text, parsed)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def submit_of(line: BatchLine, request_id: str) -> protocol.Submit:
    """The kernel request of a line: always in the batch class (a level the line gives,
    "batch:3" or 3, is kept); the line's tenant if it names one, else "batch"."""
    p = line.parsed
    level = p.priority if isinstance(p.priority, int) else (
        p.priority.partition(":")[2] if isinstance(p.priority, str) and p.priority.startswith("batch:") else "")
    return protocol.Submit(request_id=request_id, model=p.model, prompt=p.prompt, messages=p.messages,
                           prompt_token_ids=p.prompt_token_ids, params=p.params.to_dict(),
                           tenant=TENANT if p.tenant == "local" else p.tenant,
                           priority=f"batch:{level}" if level != "" else "batch",
                           timeout_s=p.timeout_s, queue_timeout_s=p.queue_timeout_s, n=p.n,
                           keep_alive_s=p.keep_alive_s, tools=p.tools)


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict:
    return ApiError(status, message, param, code).body()


def output_line(req_id: str, custom_id: str, request_id: str | None, status: int | None,
                body: dict | None, error: dict | None = None) -> str:
    """One line of an output or error file (without the newline)."""
    response = None if status is None else {"status_code": status, "request_id": request_id, "body": body}
    return json.dumps({"id": req_id, "custom_id": custom_id, "response": response, "error": error},
                      ensure_ascii=False)
