"""A model's life over HTTP: load, unload, scale, upgrade, rollback, and the upgrade's status.

    POST /llmos/v1/models/{name}/load | /unload
    POST /llmos/v1/models/{name}/scale     {"replicas": N}
    POST /llmos/v1/models/{name}/upgrade   {"version": V}   (a registered version; see `llmos models upgrade`)
    POST /llmos/v1/models/{name}/rollback
    GET  /llmos/v1/models/{name}/upgrade   the upgrade in progress and the last one's outcome

404 for a model nobody registered; 409 with the kernel's reason when it refuses (it does not
fit, it holds requests, an upgrade runs already); 400 for a body of the wrong shape.
"""
from __future__ import annotations

from aiohttp import web

from llmos.drivers.io.kernel_link import KernelLink, QueryFailed
from llmos.drivers.io.model_admin import _body
from llmos.openai_format import ApiError

LINK = web.AppKey("model_ops_link", KernelLink)


def add_routes(app: web.Application, link: KernelLink) -> None:
    app[LINK] = link
    for what, fields in (("load", None), ("unload", None), ("scale", {"replicas": (int,)}),
                         ("upgrade", {"version": (int,), "in_place": (bool,)}), ("rollback", None)):
        app.router.add_post(f"/llmos/v1/models/{{name}}/{what}", _command(what, fields))
    app.router.add_get("/llmos/v1/models/{name}/upgrade", upgrade_status)


async def _known(request: web.Request) -> str:
    name = request.match_info["name"]
    if not any(m.id == name for m in await request.app[LINK].query("models")):
        raise ApiError(404, f"The model '{name:.256}' does not exist", "name", code="model_not_found")
    return name


def _command(what: str, fields: dict | None):
    async def route(request: web.Request) -> web.Response:
        args = await _body(request, fields, tuple(k for k in fields if k != "in_place")) if fields else {}
        args["name"] = await _known(request)
        try:
            return web.json_response(await request.app[LINK].command(what, args))
        except QueryFailed as exc:
            raise ApiError(409, str(exc), "name", code="model_unavailable") from None
    route.__name__ = f"model_{what}"
    return route


async def upgrade_status(request: web.Request) -> web.Response:
    name = await _known(request)
    return web.json_response(await request.app[LINK].query("upgrade_status", {"name": name}))
