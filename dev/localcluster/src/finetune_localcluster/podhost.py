"""What a pod worker needs from the node agent that runs it.

A :class:`typing.Protocol`, so :mod:`podworker` depends on this seam and not on :mod:`node`
(which imports the worker): the two modules no longer import each other.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

from finetune_localcluster.rest import Rest
from finetune_localcluster.runtime import Runtime


class PodHost(Protocol):
    """The node agent as a pod worker sees it (:class:`node.Agent` provides it)."""

    api: Rest
    state_dir: Path
    node_name: str
    allocatable: dict[str, str]
    hosts_file: Path | None
    stopping: threading.Event

    def runtime_for(self, image: str) -> Runtime:
        """The runtime that runs containers of ``image``."""
        ...

    def pidfile(self, uid: str, container: str) -> Path:
        """Where a live container's pid is kept (for cleanup after a restart)."""
        ...

    def forget(self, uid: str) -> None:
        """Drop a finished pod's worker."""
        ...
