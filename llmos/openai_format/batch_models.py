"""The batch API's request shapes as pydantic models (models.py has the generation bodies):
a line of a batch input file, the text fields of a file upload and the body of POST
/v1/batches. A line's `body` is validated by the very model its `url` is served with
(requests.py), so a line and an HTTP request are refused alike. The kernel checks again what
only it can: the file exists and is yours, the window's range, the expiry's range.
"""
from typing import Annotated, Any, Literal

from pydantic import Field

from llmos.openai_format.models import Body, text

MAX_CUSTOM_ID = 512
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
Endpoint = Literal[ENDPOINTS]


class BatchRequestLine(Body):
    """One line of a batch input file (JSONL): a request to `url`, answered under custom_id."""
    custom_id: text(MAX_CUSTOM_ID, 1, description="unique within the file")
    method: Literal["POST"]
    url: Endpoint
    body: Annotated[dict[str, Any], Field(description="the body `url` takes (ChatCompletionRequest or "
                                                      "CompletionRequest), without stream")]


class ExpiresAfter(Body):
    anchor: Literal["created_at"]
    seconds: text(12, 1, pattern=r"^[0-9]{1,12}$", description="3600 to 2592000 (a form field: its digits)")


class FileUpload(Body):
    """POST /v1/files (multipart/form-data): the text fields beside the `file` part, which is
    streamed to the kernel line by line and never held whole. expires_after travels as the
    fields expires_after[anchor] and expires_after[seconds], as OpenAI's SDK sends it."""
    purpose: Literal["batch"]
    expires_after: ExpiresAfter | None = None


class OutputExpiresAfter(Body):
    anchor: Literal["created_at"]
    seconds: Annotated[int, Field(ge=3600, le=30 * 86400)]


class BatchCreateRequest(Body):
    """POST /v1/batches."""
    input_file_id: text(256, 1)
    endpoint: Endpoint
    completion_window: text(16, 2, pattern=r"^[0-9]{1,15}[smhd]$",
                            description="'24h' (OpenAI's only value), or any N s|m|h|d up to 365d") | None = None
    metadata: Annotated[dict[text(64), text(512)], Field(max_length=16)] | None = None
    output_expires_after: OutputExpiresAfter | None = Field(
        None, description="accepted, not applied: output files live as long as their batch")


LINE_MESSAGES = {   # batchfile.py's sentences, as a line's errors always said them
    ("body", "missing"): "missing body",
    ("custom_id", "missing"): "missing custom_id",
    ("method", "missing"): "missing method",
    ("url", "missing"): "missing url",
    "custom_id": f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters",
    "method": 'method must be "POST", got {got}',
    "url": f"url must be one of {', '.join(ENDPOINTS)}, got {{got}}",
    "body": "body must be a JSON object",
}
BATCH_MESSAGES = {
    "input_file_id": "input_file_id is required (a string of 1 to 256 characters)",
    "endpoint": f"endpoint must be one of {', '.join(ENDPOINTS)}, got {{got}}",
    "completion_window": "completion_window must be like '24h' (a number and s, m, h or d), got {got}",
    "metadata": "metadata must be an object of at most 16 string keys (64) and values (512)",
}
UPLOAD_MESSAGES = {
    ("purpose", "missing"): "purpose is required (only 'batch' is supported)",
    "purpose": "purpose {got} is not supported (only 'batch')",
    "expires_after.anchor": "expires_after[anchor] must be 'created_at'",
    "expires_after.seconds": "expires_after[seconds] must be a whole number of seconds",
}
