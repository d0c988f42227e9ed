"""The operator process's memory: freed memory given back after a burst, and the cyclic collector kept off
the event loop's critical path.

A burst of creates queues thousands of watch events (their JSON bodies are large ``malloc`` blocks); once they
are handled the memory is free inside glibc's heap, but glibc returns only the top of the heap on its own, so
the process's RSS stays at the burst's high-water mark for good. ``malloc_trim`` releases every free page, and
costs a few milliseconds: the operator calls it on a timer. Elsewhere than glibc (musl, macOS) it does nothing.

A full collection walks every container object the process holds (at a thousand jobs, 100-450 ms with the
event loop stopped), and CPython starts one whenever the objects promoted since the last reach a quarter of
the old ones. Decoding one LIST of a thousand trainer Jobs (the resync's, every 30 s) makes a few hundred
thousand objects, all alive until the decode ends: it ran two or three full collections back to back, a
stall of up to a second and a half that every job created meanwhile waited out.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import json
from typing import Any, Final

TRIM_INTERVAL_SECONDS: Final = 10.0


def decode_json(data: bytes | str) -> Any:
    """``json.loads`` with the cyclic collector paused: JSON makes no reference cycles, so collecting while it
    builds the objects finds nothing, yet a large answer used to trigger full collections midway."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(data)
    finally:
        if was_enabled:
            gc.enable()


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


async def release_free_memory_periodically(interval: float = TRIM_INTERVAL_SECONDS) -> None:
    """``release_free_memory`` every ``interval`` seconds, for the operator's lifetime."""
    libc = _glibc()
    if libc is None:
        return
    while True:
        await asyncio.sleep(interval)
        libc.malloc_trim(0)
