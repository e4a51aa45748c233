"""GET /ready: readiness, for a load balancer or a Kubernetes readinessProbe (GET /health is
liveness: the kernel's loop answers).

    /ready          200 when every preloaded model can serve (the kernel's health is "ok"),
                    else 503 with the kernel's status ("starting", "draining", "degraded").
    /ready?model=X  200 when X has an engine that serves now; 503 when it is loading,
                    unloaded (on demand: the next request loads it) or failed; 404 when the
                    caller may list the models and X is not one of them.

Like /health it needs no credentials, and says nothing more to a caller without them than
whether the daemon, or the model it named, can take a request.
"""
from __future__ import annotations

from aiohttp import web

from llmos import protocol
from llmos.drivers.io.kernel_link import AuthRefused, KernelLink, KernelUnavailable, QueryFailed
from llmos.models.names import NAME_RE

MAX_MODEL_CHARS = 128


def add_routes(app: web.Application, link: KernelLink) -> None:
    async def ready(request: web.Request) -> web.Response:
        try:
            health: protocol.HealthReport = await link.query("health")
        except KernelUnavailable as exc:
            return web.json_response({"ready": False, "status": "unavailable", "error": str(exc)}, status=503)
        model = request.query.get("model")
        if model is None:
            ok = health.status == "ok"
            return web.json_response({"ready": ok, "status": health.status}, status=200 if ok else 503)
        if len(model) > MAX_MODEL_CHARS or not NAME_RE.fullmatch(model):
            return web.json_response({"error": {"message": "model must be a model name", "type": "invalid_request_error",
                                                "param": "model", "code": "invalid_parameter"}}, status=400)
        return await _model_ready(link, health, model)
    app.router.add_get("/ready", ready)


async def _model_ready(link: KernelLink, health: protocol.HealthReport, model: str) -> web.Response:
    # Engines are named by their model: "m", and replicas "m~1", "m~2" (kernel/deployments.py).
    engines = {e: s for e, s in health.models.items() if e == model or e.startswith(model + "~")}
    serving = health.status != "draining" and any(s == "ready" for s in engines.values())
    if serving:
        return web.json_response({"ready": True, "model": model, "state": "loaded"})
    state = "loading" if engines else "unloaded"
    try:   # the model list is for principals only: an anonymous probe learns no more than 503
        entries: list[protocol.ModelEntry] = await link.query("models")
    except (AuthRefused, QueryFailed):
        entries = None
    if entries is not None:
        entry = next((m for m in entries if m.id == model), None)
        if entry is None:
            return web.json_response({"ready": False, "model": model, "state": "unknown"}, status=404)
        state = entry.state
    if health.status == "draining":
        state = "draining"
    return web.json_response({"ready": False, "model": model, "state": state}, status=503)
