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
            assert kernel.health().dead_loops == {}

            async def broken():
                raise RuntimeError("a bug nobody caught")

            async def forever():
                await asyncio.Event().wait()
            alive = kernel._long_lived("healthy loop", forever())
            task = kernel._long_lived("job manager", broken())
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0)   # done-callbacks run on the next turn of the loop
            health = kernel.health()
            assert health.status == "degraded"
            assert health.dead_loops == {"job manager": "RuntimeError: a bug nobody caught"}
            alive.cancel()            # a cancelled loop (shutdown) is not a death
            await asyncio.gather(alive, return_exceptions=True)
            await asyncio.sleep(0)
            assert list(kernel.health().dead_loops) == ["job manager"]
        finally:
            kernel.bus.close()
    asyncio.run(scenario())


def test_a_loop_waiting_on_its_wakeup_is_cancelled_even_as_the_event_is_set():
    """The race that hung test_step_isolation once: cancel and set in the same turn of the loop."""
    from llmos.kernel.waiting import wait_event

    async def scenario():
        for _ in range(200):
            event = asyncio.Event()

            async def loop():
                while True:
                    await wait_event(event, 0.5)
            task = asyncio.ensure_future(loop())
            await asyncio.sleep(0)
            event.set()
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5)
            assert done and task.cancelled()
    asyncio.run(scenario())
