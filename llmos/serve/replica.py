"""The replica deployment: one llmosd per replica, proxied over its Unix socket.

Ray routes requests to replicas through a handle (with prefix affinity); the ingress calls
`generate` or `stream` with a ProxyRequest. A daemon that cannot answer raises
DaemonUnavailable, which the ingress re-routes; `check_health` fails the replica once its
daemon has exited (or stayed unhealthy), and Ray replaces it."""
from __future__ import annotations

import time

import httpx
import ray
from ray import serve

from llmos.serve.config import ServeConfig
from llmos.serve.daemon import SlotDaemon, health_ok
from llmos.serve.proxy import DaemonUnavailable, ProxyRequest, sse_error


@serve.deployment(name="llmos")
class LlmosReplica:
    def __init__(self, config: dict):
        self.cfg = ServeConfig(**config)
        self.daemon = SlotDaemon(self.cfg.home_root, self.cfg.models, self.cfg.daemon_args)
        self.daemon.start()
        try:
            self.daemon.wait_ready(self.cfg.ready_timeout_s)   # Ray sees the replica ready only after this
        except Exception:
            self.daemon.stop()
            raise
        self._client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.daemon.socket)),
                                         base_url="http://llmos", timeout=httpx.Timeout(None, connect=10))
        self._unhealthy_since: float | None = None

    def _unavailable(self, exc: Exception) -> DaemonUnavailable:
        code = self.daemon.exited()
        state = f"exited with {code}" if code is not None else "did not answer"
        return DaemonUnavailable(f"llmosd of slot {self.daemon.slot} {state}: {type(exc).__name__}: {exc}")

    async def generate(self, req: ProxyRequest) -> tuple[int, str, bytes]:
        """(status, content type, body) of a non-streamed request."""
        try:
            r = await self._client.post(req.route, content=req.body, headers=req.headers)
            body = await r.aread()
        except httpx.TransportError as exc:   # nothing reached the client yet: safe to re-route
            raise self._unavailable(exc) from None
        return r.status_code, r.headers.get("content-type", "application/json"), body

    async def stream(self, req: ProxyRequest):
        """Yields (status, content type, first bytes) once the daemon sent its first chunk,
        then the rest of the SSE bytes as they come."""
        try:
            ctx = self._client.stream("POST", req.route, content=req.body, headers=req.headers)
            r = await ctx.__aenter__()
            chunks = r.aiter_raw()
            first = await anext(chunks, b"")
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from None
        try:
            yield r.status_code, r.headers.get("content-type", "text/event-stream"), first
            async for chunk in chunks:
                yield chunk
        except httpx.TransportError as exc:   # mid-stream: the client already has some of it
            yield sse_error(str(self._unavailable(exc)))
        finally:
            await ctx.__aexit__(None, None, None)

    async def models(self) -> tuple[int, bytes]:
        try:
            r = await self._client.get("/v1/models")
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from None
        return r.status_code, r.content

    def where(self) -> dict:
        return {"node": ray.get_runtime_context().get_node_id(), **self.daemon.describe()}

    async def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising fails the replica."""
        code = self.daemon.exited()
        if code is not None:
            self.daemon.abandon()   # before raising: Ray starts the replacement once this fails
            raise RuntimeError(f"llmosd of slot {self.daemon.slot} exited with {code}:\n{self.daemon.log_tail(20)}")
        try:
            answer = (await self._client.get("/health", timeout=5)).json()
        except (httpx.HTTPError, ValueError):
            answer = None
        if health_ok(answer):
            self._unhealthy_since = None
            return
        # Its kernel restarts a failed driver itself: give it that long before Ray steps in.
        now = time.monotonic()
        self._unhealthy_since = self._unhealthy_since or now
        if now - self._unhealthy_since > self.cfg.health_grace_s:
            self.daemon.abandon()
            raise RuntimeError(f"llmosd of slot {self.daemon.slot} not ok for {now - self._unhealthy_since:.0f} s: "
                               f"{answer}")

    def __del__(self):
        # Serve calls this when it stops the replica (scale-down, replacement, shutdown)
        daemon = getattr(self, "daemon", None)
        if daemon is not None:
            daemon.stop()
