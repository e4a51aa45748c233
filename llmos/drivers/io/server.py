"""The HTTP side of the io driver: an aiohttp app serving the OpenAI-compatible API and the
admin API on a Unix socket, translating each request into kernel messages via KernelLink.

Every error reaches the client in OpenAI's shape. A request whose client goes away, or that
times out waiting for the kernel, is aborted on the kernel so its memory is freed.
"""
from __future__ import annotations

import asyncio
import functools
import json
import math
import logging
import re
import uuid

from aiohttp import web

from llmos import protocol
from llmos import openai_format
from llmos.drivers.io import batches, gateway_headers, metrics_route, model_admin, model_ops, readiness, tokenize_routes
from llmos.drivers.io.bodies import parse_json, read_body
from llmos.drivers.io.credentials import attach_credentials
from llmos.drivers.io.kernel_link import AuthRefused, KernelLink, KernelUnavailable, QueryFailed
from llmos.openai_format import ApiError, ParsedRequest, ResponseShaper, openapi

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 32 * 1024 * 1024
LINK = web.AppKey("link", KernelLink)
TIMEOUT = web.AppKey("timeout", float)
# Admin routes: path -> (the kernel Query, its answer -> the JSON served).
ADMIN_QUERIES = {
    "/llmos/v1/ps": ("ps", protocol.plain),
    "/llmos/v1/alerts": ("alerts", protocol.plain),   # active and recent (kernel/alerts.py)
    "/llmos/v1/memory": ("memory", lambda models: {name: protocol.plain(report) if report is not None
                                                   else {"state": "loading"} for name, report in models.items()}),
}
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")   # a client's own X-Request-Id


def make_app(link: KernelLink, timeout: float = 600.0) -> web.Application:
    """`timeout`: seconds to wait for each answer of the kernel to a generation request
    (its first answer may wait behind a long queue) before failing it with 504."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors, attach_credentials])
    app[LINK], app[TIMEOUT] = link, timeout
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    for path, (what, to_json) in ADMIN_QUERIES.items():
        app.router.add_get(path, _query_route(what, to_json))
    app.router.add_post("/llmos/v1/drivers/{name}/restart", restart_driver)
    app.router.add_post("/llmos/v1/requests/{id}/cancel", cancel_request)
    app.router.add_post("/llmos/v1/keys/changed", key_changed)
    model_ops.add_routes(app, link)    # /llmos/v1/models/{name}/load, unload, scale, upgrade, rollback
    batches.add_routes(app, link)  # /v1/files, /v1/batches, /llmos/v1/jobs
    model_admin.add_routes(app, link)  # /llmos/v1/models, /llmos/v1/models/{name}
    metrics_route.add_routes(app, link)  # /metrics, /version
    readiness.add_routes(app, link)  # /ready, /ready?model=X
    tokenize_routes.add_routes(app, link)  # /tokenize, /detokenize, /v1/completions/render, /v1/chat/completions/render
    return app


def error_response(err: ApiError) -> web.Response:
    headers = {"Retry-After": str(max(1, math.ceil(err.retry_after)))} if err.retry_after else {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"   # RFC 6750
    resp = web.json_response(err.body(), status=err.status, headers=headers)
    if err.status in (408, 413, 415):   # the body was not read whole: this connection cannot go on
        resp.force_close()
    return resp


@web.middleware
async def _errors(request: web.Request, handler):
    """Turn every failure into OpenAI's error shape with a precise status."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err)
    except KernelUnavailable as exc:
        return error_response(ApiError(exc.status, str(exc), code="kernel_unavailable"))
    except AuthRefused as exc:
        return error_response(ApiError(exc.status, str(exc),
                                       code="invalid_api_key" if exc.status == 401 else "permission_denied"))
    except QueryFailed as exc:
        return error_response(ApiError(500, f"kernel query failed: {exc}", code="query_failed"))
    except protocol.Unencodable as exc:   # e.g. a lone surrogate in a query string or a path
        return error_response(ApiError(400, f"the request cannot be sent to the kernel: {exc}"))
    except web.HTTPException as exc:  # aiohttp's own 404/405/413...
        if exc.status < 400:
            raise
        return error_response(ApiError(exc.status, exc.reason if exc.status != 413 else
                                       f"request body larger than {MAX_BODY_BYTES} bytes"))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal error in the io driver", code="internal_error"))


# ---------------------------------------------------------------- queries


async def health(request: web.Request) -> web.Response:
    try:
        data = await request.app[LINK].query("health")
    except KernelUnavailable as exc:
        return web.json_response({"status": "unavailable", "error": str(exc)}, status=503)
    report: protocol.HealthReport = data
    return web.json_response(protocol.plain(report), status=200 if report.status == "ok" else 503)


async def models(request: web.Request) -> web.Response:
    entries: list[protocol.ModelEntry] = await request.app[LINK].query("models")
    out = [{"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by,
            "max_model_len": m.max_model_len, "state": m.state} for m in entries]
    return web.json_response({"object": "list", "data": out})


async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI description of the request bodies (openai_format/openapi.py), for any
    principal: the kernel says who the caller is (the models query, open to all; 401/403)."""
    await request.app[LINK].query("models")
    return web.Response(body=_openapi_bytes(), content_type="application/json")


@functools.cache
def _openapi_bytes() -> bytes:
    return json.dumps(openapi.document(), ensure_ascii=False).encode()


async def restart_driver(request: web.Request) -> web.Response:
    """Restart one driver by name (a failed one gets a fresh restart budget)."""
    try:
        data = await request.app[LINK].command("restart", {"name": request.match_info["name"]})
    except QueryFailed as exc:
        raise ApiError(404, str(exc), "name", code="driver_not_found") from None
    return web.json_response(data)


async def cancel_request(request: web.Request) -> web.Response:
    """The abort call: stop generating now; the request's own answer ends with what it has
    (finish_reason "cancelled"). The id is the response id, or the client's X-Request-Id."""
    try:
        data = await request.app[LINK].command("cancel", {"id": request.match_info["id"]})
    except QueryFailed as exc:
        raise ApiError(404, str(exc), "id", code="request_not_found") from None
    return web.json_response(data)


async def key_changed(request: web.Request) -> web.Response:
    """`llmos keys` made or revoked a key: the kernel records it in the audit log (admin only)."""
    body = parse_json(await read_body(request))
    if not isinstance(body, dict) or set(body) - {"action", "id", "tenant"}:
        raise ApiError(400, "give {action, id, tenant}")
    try:
        return web.json_response(await request.app[LINK].command("keys.changed", body))
    except QueryFailed as exc:
        raise ApiError(400, str(exc)) from None


def _query_route(what: str, to_json):
    async def route(request: web.Request) -> web.Response:
        return web.json_response(to_json(await request.app[LINK].query(what, dict(request.query))))
    route.__name__ = f"query_{what}"
    return route


# ---------------------------------------------------------------- generation


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, openai_format.parse_completion(await _json_body(request)))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, openai_format.parse_chat(await _json_body(request)))


async def _json_body(request: web.Request):
    return parse_json(await read_body(request))


async def _generate(request: web.Request, req: ParsedRequest) -> web.StreamResponse:
    link, timeout = request.app[LINK], request.app[TIMEOUT]
    given = request.headers.get("X-Request-Id")   # the client's: unique only among its principal's (kernel)
    if given is not None and not REQUEST_ID.fullmatch(given):
        raise ApiError(400, "X-Request-Id must be 1 to 128 characters of letters, digits and ._:-", "X-Request-Id")
    set_by = gateway_headers.apply(request.headers, req)   # the inference gateway's priority and tenant
    rid = f"cmpl-{uuid.uuid4().hex}"   # ours on the bus: unique and unguessable, so no client can take another's
    shown = given or rid
    done, reason = False, "client disconnected"
    try:  # registered inside the try: whatever fails below, `finally` frees the id
        queue = link.submit(protocol.Submit(
            request_id=rid, model=req.model, prompt=req.prompt, messages=req.messages,
            prompt_token_ids=req.prompt_token_ids, params=req.params.to_dict(), tenant=req.tenant,
            priority=req.priority, timeout_s=req.timeout_s, queue_timeout_s=req.queue_timeout_s, n=req.n,
            keep_alive_s=req.keep_alive_s, client_request_id=given, tools=req.tools))
        first = await _next(queue, timeout)
        if not isinstance(first, protocol.Accepted):
            done = isinstance(first, protocol.Rejected)  # anything else: the kernel may still hold it
            raise gateway_headers.name_header(_as_error(first), set_by)
        shaper = ResponseShaper(req, shown, first.prompt_tokens)
        if req.stream:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Request-Id": shown})
            try:
                done = await _stream(request, resp, queue, shaper, timeout)
            except ConnectionError:   # the client went away mid-stream: abort it (finally), quietly
                return resp
            reason = "timed out waiting for the kernel"
            return resp
        while not shaper.done:
            item = await _next(queue, timeout)
            if not isinstance(item, protocol.OutputItem):
                done = isinstance(item, protocol.Rejected)
                raise _as_error(item)
            shaper.add(item)
        done = True
        return web.json_response(shaper.response(), headers={"X-Request-Id": shown})
    except protocol.Unencodable as exc:   # nothing was sent
        done = True
        raise ApiError(400, f"the request cannot be sent to the kernel: {exc}") from None
    except ApiError as err:
        if err.status == 504:
            reason = "timed out waiting for the kernel"
        raise
    finally:  # reached on normal exit, errors, and the cancellation of a disconnect
        if not done:
            log.info("aborting %s: %s", rid, reason)
            link.abort(rid, reason)
        link.release(rid)


async def _next(queue: asyncio.Queue, timeout: float):
    if not queue.empty():  # the common case under load: skip wait_for's task per token
        return queue.get_nowait()
    try:
        return await asyncio.wait_for(queue.get(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(504, f"the kernel did not answer within {timeout:g} s", code="kernel_timeout") from None


def _as_error(answer) -> ApiError:
    """An ApiError for the kernel's answer that ended a request early (normally Rejected)."""
    if isinstance(answer, protocol.Rejected):
        err = ApiError(answer.status, answer.message, answer.param, answer.code)
        err.retry_after = answer.retry_after
        return err
    return ApiError(500, f"unexpected answer from the kernel: {type(answer).__name__}", code="internal_error")


async def _stream(request, resp: web.StreamResponse, queue, shaper: ResponseShaper, timeout: float) -> bool:
    """Serve the request as server-sent events. Returns whether the kernel is done with the
    request (False: it timed out and must be aborted). Raises ConnectionError when the
    client goes away."""
    await resp.prepare(request)
    for role in shaper.role_chunks():
        await _event(resp, role)
    done = True
    while not shaper.done:
        try:
            item = await _next(queue, timeout)
        except ApiError as err:
            await _event(resp, err.body())
            done = False
            break
        if not isinstance(item, protocol.OutputItem):  # failed mid-generation (Rejected: the kernel is done with it)
            await _event(resp, _as_error(item).body())
            done = isinstance(item, protocol.Rejected)
            break
        shaper.add(item)
        for chunk in shaper.chunks(item):
            await _event(resp, chunk)
    else:
        if shaper.req.include_usage:
            await _event(resp, shaper.usage_chunk())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return done


async def _event(resp: web.StreamResponse, obj: dict) -> None:
    await resp.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
