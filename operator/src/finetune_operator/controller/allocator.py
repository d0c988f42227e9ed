"""Give freed memory back to the system after a burst.

A burst of creates queues thousands of watch events (their JSON bodies are large ``malloc`` blocks); once they
are handled the memory is free inside glibc's heap, but glibc returns only the top of the heap on its own, so
the process's RSS stays at the burst's high-water mark for good. ``malloc_trim`` releases every free page, and
costs a few milliseconds: the operator calls it on a timer. Elsewhere than glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from typing import Final

TRIM_INTERVAL_SECONDS: Final = 10.0


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
