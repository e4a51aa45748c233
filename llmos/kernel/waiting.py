"""Waiting for an event with a timeout, without losing a cancellation.

Python 3.11's asyncio.wait_for can swallow a cancel that arrives as the awaited event is
set (the inner wait finishes, wait_for returns its result, the CancelledError is gone):
a loop cancelled at that moment would run on forever. asyncio.wait never cancels or
swallows anything: a cancel always reaches the caller."""
from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Whether `event` was set within `timeout` seconds."""
    if event.is_set():
        await asyncio.sleep(0)   # still a point where a cancel is delivered
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()
