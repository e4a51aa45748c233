"""The model registry over HTTP: /llmos/v1/models (list, add) and /llmos/v1/models/{name}
(show, remove, copy, change defaults). The kernel does the work (kernel/registry_admin.py);
this module checks the body's shape, so that a bad field is a 400 naming it, and turns the
kernel's coded refusals into statuses:

    unknown_model -> 404; bad_request(FIELD) -> 400 naming FIELD; registry_unavailable -> 503;
    model_exists, model_loaded, model_builtin, model_not_prepared -> 409

(load, unload, scale, upgrade and rollback live in model_ops.py.)
"""
from __future__ import annotations

import re

from aiohttp import web

from llmos.drivers.io.bodies import parse_json, read_body
from llmos.drivers.io.kernel_link import KernelLink, QueryFailed
from llmos.openai_format import ApiError

LINK = web.AppKey("model_admin_link", KernelLink)
# The kernel's refusal: "WHAT: CODE(FIELD): message" (Kernel._command adds "WHAT: ").
REFUSAL = re.compile(r"^(?P<code>[a-z_]+)(?:\((?P<field>\w+)\))?: (?P<message>.*)$", re.S)
STATUS = {"unknown_model": 404, "bad_request": 400, "registry_unavailable": 503}
# Fields of each body, with the JSON types each takes (the kernel checks values and bounds).
ADD = {"name": (str,), "path": (str,), "note": (str, type(None))}
COPY = {"to": (str,)}
DEFAULTS = {"keep_alive_s": (int, float, type(None)), "replicas": (int,)}
FORCE = {"true": True, "1": True, "false": False, "0": False}


def add_routes(app: web.Application, link: KernelLink) -> None:
    app[LINK] = link
    r = app.router
    r.add_get("/llmos/v1/models", list_models)
    r.add_post("/llmos/v1/models", add_model)
    r.add_get("/llmos/v1/models/{name}", show_model)
    r.add_delete("/llmos/v1/models/{name}", remove_model)
    r.add_patch("/llmos/v1/models/{name}", set_defaults)
    r.add_post("/llmos/v1/models/{name}/copy", copy_model)


async def list_models(request: web.Request) -> web.Response:
    """Every registered model with its facts (architecture, parameters, ...) and state."""
    data = await _ask(request, "query", "models.list", {})
    return web.json_response({"object": "list", "data": data})


async def show_model(request: web.Request) -> web.Response:
    """One model: its facts, defaults, state, every version and its history."""
    return web.json_response(await _ask(request, "query", "models.show", {"name": request.match_info["name"]}))


async def add_model(request: web.Request) -> web.Response:
    """{"name", "path" (an absolute path to an HF directory), "note"?}: 201 with the model."""
    body = await _body(request, ADD, required=("name", "path"))
    return web.json_response(await _ask(request, "command", "models.add", body), status=201)


async def remove_model(request: web.Request) -> web.Response:
    """?force=true removes a model the daemon has loaded (it serves on until it unloads)."""
    force = request.query.get("force", "false").lower()
    if force not in FORCE:
        raise ApiError(400, "force must be true or false", "force")
    args = {"name": request.match_info["name"], "force": FORCE[force]}
    return web.json_response(await _ask(request, "command", "models.rm", args))


async def copy_model(request: web.Request) -> web.Response:
    """{"to": NEW}: NEW names the weights of this model's active version; 201 with NEW."""
    body = await _body(request, COPY, required=("to",))
    args = {"name": request.match_info["name"], **body}
    return web.json_response(await _ask(request, "command", "models.cp", args), status=201)


async def set_defaults(request: web.Request) -> web.Response:
    """{"keep_alive_s"?: seconds or null (the daemon's default), "replicas"?}: the model after."""
    body = await _body(request, DEFAULTS, required=())
    if not body:
        raise ApiError(400, "give keep_alive_s or replicas (or both)", "keep_alive_s")
    args = {"name": request.match_info["name"], **body}
    return web.json_response(await _ask(request, "command", "models.defaults", args))


async def _body(request: web.Request, fields: dict, required: tuple) -> dict:
    body = parse_json(await read_body(request))
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key, value in body.items():
        if key not in fields:
            raise ApiError(400, f"unknown field {key[:64]!r} (known: {', '.join(fields)})", key[:64])
        if not isinstance(value, fields[key]) or (isinstance(value, bool) and bool not in fields[key]):
            kinds = " or ".join("null" if t is type(None) else {str: "a string", int: "an integer",
                                                                 float: "a number", bool: "true or false"}[t] for t in fields[key])
            raise ApiError(400, f"{key} must be {kinds}", key)
    for key in required:
        if key not in body:
            raise ApiError(400, f"{key} is required", key)
    return body


async def _ask(request: web.Request, kind: str, what: str, args: dict):
    link = request.app[LINK]
    try:
        return await (link.command(what, args) if kind == "command" else link.query(what, args))
    except QueryFailed as exc:
        raise _refusal(what, str(exc)) from None


def _refusal(what: str, text: str) -> ApiError:
    if text.startswith(("unknown command", "unknown query")):
        return ApiError(501, "this daemon's kernel has no model registry API", code="not_implemented")
    m = REFUSAL.match(text.removeprefix(f"{what}: "))
    if m is None:   # not a refusal: the handler failed
        return ApiError(500, f"the kernel failed {what}: {text}", code="internal_error")
    code, field, message = m["code"], m["field"], m["message"]
    if code == "unknown_model":
        return ApiError(404, message, "name", code="model_not_found")
    status = STATUS.get(code, 409)
    return ApiError(status, message, field, code="invalid_request" if status == 400 else code)
