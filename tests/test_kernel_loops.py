"""A long-lived kernel loop that dies anyway makes the daemon say so (issue 10, point 2):
/health turns `degraded` and names the loop and why, instead of looking healthy."""
from __future__ import annotations

import asyncio

from llmos.bus import KernelBus
from llmos.config import DaemonConfig
from llmos.kernel.core import Kernel
from llmos.paths import Paths


def test_a_dead_kernel_loop_makes_health_degraded(tmp_path):
    async def scenario():
        kernel = Kernel(DaemonConfig(models=[], device="cpu"), Paths(tmp_path))
        kernel.paths.ensure()
        kernel.bus = KernelBus(kernel.paths.kernel_endpoint)
        try:
            assert kernel.health()["dead_loops"] == {}

            async def broken():
                raise RuntimeError("a bug nobody caught")

            async def forever():
                await asyncio.Event().wait()
            alive = kernel._long_lived("healthy loop", forever())
            task = kernel._long_lived("job manager", broken())
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0)   # done-callbacks run on the next turn of the loop
            health = kernel.health()
            assert health["status"] == "degraded"
            assert health["dead_loops"] == {"job manager": "RuntimeError: a bug nobody caught"}
            alive.cancel()            # a cancelled loop (shutdown) is not a death
            await asyncio.gather(alive, return_exceptions=True)
            await asyncio.sleep(0)
            assert list(kernel.health()["dead_loops"]) == ["job manager"]
        finally:
            kernel.bus.close()
    asyncio.run(scenario())
