"""The OpenAPI 3.1 description of the request bodies that models.py and batch_models.py
define, served by the io driver at GET /openapi.json.

pydantic writes each model's JSON Schema (draft 2020-12, which OpenAPI 3.1 takes as it is);
this module only lays the paths around them. No library builds it: the document is a few
dozen lines of paths over pydantic's own output, and the OpenAPI generators (FastAPI's,
apispec, spectree) would each bring a framework or a plugin layer for an aiohttp app that
validates its bodies itself. The description is of what is validated, and so cannot drift
from it: the schemas are the validators'.
"""
from __future__ import annotations

import copy
import functools

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

import llmos
from llmos.openai_format import batch_models, models

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape. A 400 about the body names the field: `param` is the field (the
    whole path under tools and tool_choice) and `message` starts with its full path."""
    error: ErrorDetail


BODIES = {   # path -> (model, summary, streams)
    "/v1/chat/completions": (models.ChatCompletionRequest, "A chat completion (stream: true for SSE)", True),
    "/v1/completions": (models.CompletionRequest, "A completion (stream: true for SSE)", True),
    "/v1/chat/completions/render": (models.ChatCompletionRequest, "The token ids a chat completion would see", False),
    "/v1/completions/render": (models.CompletionRequest, "The token ids a completion would see", False),
    "/tokenize": (models.TokenizeRequest, "Tokenize a prompt or a chat", False),
    "/detokenize": (models.DetokenizeRequest, "Token ids to text", False),
    "/v1/batches": (batch_models.BatchCreateRequest, "Start a batch over an uploaded file", False),
}
DOCUMENTED = [m for m, _, _ in BODIES.values()] + [batch_models.FileUpload, batch_models.BatchRequestLine,
                                                    ErrorResponse]


@functools.cache
def document() -> dict:
    """The whole document (built once; callers must not change it)."""
    _, defs = models_json_schema([(m, "validation") for m in dict.fromkeys(DOCUMENTED)], ref_template=REF)
    schemas = defs["$defs"]
    schemas["FileUploadForm"] = _upload_form(schemas["FileUpload"])
    paths = {path: {"post": _operation(model, summary, streams)} for path, (model, summary, streams) in BODIES.items()}
    paths["/v1/files"] = {"post": {
        "summary": "Upload a batch input file (JSONL, one BatchRequestLine per line)",
        "requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"$ref": REF.format(model="FileUploadForm")},
            "encoding": {"expires_after": {"style": "deepObject", "explode": True}}}}},
        "responses": _responses("the file object")}}
    paths["/openapi.json"] = {"get": {"summary": "This document", "responses": {
        "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}},
        "default": _error()}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "llmos", "version": llmos.__version__,
                 "description": "The OpenAI-compatible API of llmosd and its extensions, on the daemon's Unix "
                                "socket ($LLMOS_HOME/run/llmos.sock; the peer's uid authenticates) and, when "
                                "enabled, its TCP listener (a bearer key). Request bodies only: responses are "
                                "OpenAI's shapes."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "an llmos key (llmos keys create)"}}},
        "security": [{}, {"bearer": []}],
    }


def request_schema(path: str) -> dict:
    """The JSON schema of a path's request body, with the components it refers to beside it
    (a self-contained document for a JSON-schema tool)."""
    doc = document()
    content = doc["paths"][path]["post"]["requestBody"]["content"]
    return {**next(iter(content.values()))["schema"], "components": doc["components"]}


def _operation(model: type[BaseModel], summary: str, streams: bool) -> dict:
    ok = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        ok["text/event-stream"] = {"schema": {"type": "string", "description": "server-sent events, then [DONE]"}}
    return {"summary": summary,
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}},
            "responses": {"200": {"description": "OpenAI's response object", "content": ok}, "default": _error()}}


def _responses(what: str) -> dict:
    return {"200": {"description": what, "content": {"application/json": {"schema": {"type": "object"}}}},
            "default": _error()}


def _error() -> dict:
    return {"description": "an error in OpenAI's shape",
            "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}}


def _upload_form(fields: dict) -> dict:
    """FileUpload's text fields and the `file` part; other parts are ignored."""
    form = copy.deepcopy(fields)
    form.pop("additionalProperties", None)
    form["title"] = "FileUploadForm"
    form["properties"]["file"] = {"type": "string", "contentMediaType": "application/jsonl",
                                  "description": "the batch input file: one BatchRequestLine per line"}
    form["required"] = [*form.get("required", []), "file"]
    return form
