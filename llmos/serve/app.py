"""The Ray Serve application: an ingress (the HTTP routes) in front of the replica deployment.

    from ray import serve
    from llmos.serve import ServeConfig, build_app
    serve.run(build_app(ServeConfig(models=["smollm2"], min_replicas=2, max_replicas=4)))

The ingress owns no daemon and needs no CPU: it checks the optional key, builds a
ProxyRequest and sends it through the replica deployment's handle, whose router keeps
requests that share a prefix on one replica. A request whose daemon failed before the
client saw any of its answer is sent again (through the router, so to a live replica) until
retry_deadline_s."""
# no `from __future__ import annotations`: FastAPI reads the route annotations (Request) at runtime

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from llmos.serve import batch_tasks
from llmos.serve.batches import BatchRefused
from llmos.serve.config import ServeConfig
from llmos.serve.proxy import DaemonUnavailable, ProxyRequest
from llmos.serve.replica import LlmosReplica

api = FastAPI(title="llmos on Ray Serve")
PREFIX_ROUTERS = ("ray.serve.llm.request_router.PrefixCacheAffinityRouter",
                  # the same class; its public path above imports ray.serve.llm, which needs pyarrow
                  "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router.PrefixCacheAffinityRouter")


def _retryable(exc: BaseException) -> bool:
    kinds = (DaemonUnavailable, ActorDiedError, ActorUnavailableError)
    return isinstance(exc, kinds) or isinstance(getattr(exc, "cause", None), kinds)


def _error(status: int, message: str, code: str, **extra) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                   else "server_error", "code": code, **extra}}, status_code=status)


@serve.deployment(name="ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class LlmosIngress:
    def __init__(self, replicas, config: dict):
        self.replicas = replicas
        self.cfg = ServeConfig(**config)

    async def _retrying(self, call):
        deadline, delay = time.monotonic() + self.cfg.retry_deadline_s, 0.2
        while True:
            try:
                return await call()
            except Exception as exc:
                if not _retryable(exc) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(delay)   # the health check is replacing that replica meanwhile
            delay = min(delay * 2, 2.0)

    def _denied(self, request: Request) -> JSONResponse | None:
        if self.cfg.api_key and request.headers.get("authorization") != f"Bearer {self.cfg.api_key}":
            return _error(401, "a valid API key is required", "invalid_api_key")
        return None

    async def _proxy(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        req = ProxyRequest.build(request.url.path, await request.body(), request.headers)
        if not req.stream:
            status, ctype, body = await self._retrying(lambda: self.replicas.generate.remote(req))
            return Response(body, status_code=status, media_type=ctype)

        async def opened():
            gen = self.replicas.options(stream=True).stream.remote(req)
            return gen, await gen.__anext__()
        gen, (status, ctype, first) = await self._retrying(opened)
        if status != 200:
            return Response(first + b"".join([c async for c in gen]), status_code=status, media_type=ctype)

        async def body():
            yield first
            async for chunk in gen:
                yield chunk
        return StreamingResponse(body(), media_type=ctype)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._proxy(request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._proxy(request)

    @api.get("/v1/models")
    async def models(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        status, body = await self._retrying(lambda: self.replicas.models.remote())
        return Response(body, status_code=status, media_type="application/json")

    @api.get("/health")
    async def health(self):
        return {"status": "ok"}

    @api.post("/cluster/v1/batches")
    async def submit_batch(self, request: Request):
        """Body: OpenAI batch JSONL; `?model=` fills lines that name none. Split across the
        live replicas' daemons; answers the merged status, whose id finds every part."""
        if (denied := self._denied(request)) is not None:
            return denied
        lines = (await request.body()).decode("utf-8", "replace").split("\n")
        try:
            return await batch_tasks.submit(self.cfg.home_root, lines, request.query_params.get("model"))
        except BatchRefused as exc:
            return _error(400, str(exc), "invalid_batch", lines=exc.lines)

    @api.get("/cluster/v1/batches/{batch_id}")
    async def batch_status(self, batch_id: str, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            return await batch_tasks.status(batch_id)
        except ValueError as exc:
            return _error(404, str(exc), "not_found")

    @api.get("/cluster/v1/batches/{batch_id}/results")
    async def batch_results(self, batch_id: str, request: Request, errors: bool = False):
        """The parts' output lines (or error lines) merged, JSONL in input order."""
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            lines = await batch_tasks.results(batch_id, errors)
        except ValueError as exc:
            return _error(404, str(exc), "not_found")
        return Response("".join(x + "\n" for x in lines), media_type="application/jsonl")


def router_config(cfg: ServeConfig) -> RequestRouterConfig | None:
    """Ray's PrefixCacheAffinityRouter, by whichever of its paths imports here."""
    if cfg.router != "prefix":
        return None
    import importlib
    for path in PREFIX_ROUTERS:
        module, _, name = path.rpartition(".")
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        return RequestRouterConfig(request_router_class=path, request_router_kwargs={"imbalanced_threshold": 8})
    raise RuntimeError("this Ray has no PrefixCacheAffinityRouter (Ray >= 2.47 has); use router='pow2'")


def build_app(cfg: ServeConfig):
    """The bound application for serve.run: ingress -> replicas."""
    cfg = cfg.resolved()
    replicas = LlmosReplica.options(
        autoscaling_config=AutoscalingConfig(
            min_replicas=cfg.min_replicas, max_replicas=max(cfg.max_replicas, cfg.min_replicas),
            initial_replicas=cfg.initial_replicas, target_ongoing_requests=cfg.target_ongoing_requests),
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.replica_num_cpus},
        health_check_period_s=cfg.health_check_period_s, health_check_timeout_s=cfg.health_check_timeout_s,
        graceful_shutdown_timeout_s=40,
        **({"request_router_config": rc} if (rc := router_config(cfg)) else {}),
    ).bind(cfg.as_dict())
    return LlmosIngress.bind(replicas, cfg.as_dict())
