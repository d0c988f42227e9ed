"""The operator under tracemalloc, for ``operator_scale.py --tracemalloc`` (the benchmark only; the
operator itself knows nothing of it).

    python benchmarks/traced_operator.py OUT_DIR MODULE,MODULE,... [finetune-operator arguments ...]

The modules the operator image lacks are hidden first, as in ``deployed_operator.py``.

Each SIGUSR1 writes ``OUT_DIR/N.snapshot`` (a tracemalloc snapshot, after a full garbage collection)
and ``OUT_DIR/N.json``, a census of what holds memory per object: each of the reconcilers' own
dicts and sets (length, deep bytes), kopf's per-object memories, the prometheus series by metric,
and the count of live objects by type. ``operator_scale.py`` diffs two of them and divides by the
jobs in between.
"""

from __future__ import annotations

import gc
import json
import signal
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from deployed_operator import hide

FRAMES = 8
"""Frames kept per allocation: enough to see which of our calls a library allocated for."""


def deep_size(value: object, seen: set[int] | None = None) -> int:
    """Bytes of ``value`` and of everything it holds that nothing outside it shares (approximately: a
    shared object is counted once, by whichever holder reaches it first)."""
    seen = set() if seen is None else seen
    stack, total = [value], 0
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, type):
            continue
        seen.add(id(item))
        total += sys.getsizeof(item)
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple | set | frozenset):
            stack += list(item)
        elif hasattr(item, "__dict__") and not callable(item):
            stack.append(vars(item))
        for slot in getattr(type(item), "__slots__", ()):
            if isinstance(slot, str) and hasattr(item, slot):
                stack.append(getattr(item, slot))
    return total


def census() -> dict[str, Any]:
    """What the operator holds now, by holder."""
    from kopf._core.reactor.inventory import ResourceMemories  # imported by main before any signal

    from finetune_operator.controller.metrics import OperatorMetrics
    from finetune_operator.controller.shell import ObjectLoop

    objects = gc.get_objects()
    holders: dict[str, dict[str, int]] = {}
    for loop in (o for o in objects if isinstance(o, ObjectLoop)):
        for name, held in vars(loop).items():
            value = getattr(held, "packed", held)  # handlers.PackedCache
            if isinstance(value, dict | set):
                holders[f"{type(loop).__name__}.{name}"] = {"len": len(value), "bytes": deep_size(value)}
    for metrics in (o for o in objects if isinstance(o, OperatorMetrics)):
        for name, value in vars(metrics).items():
            if isinstance(value, dict):
                holders[f"OperatorMetrics.{name}"] = {"len": len(value), "bytes": deep_size(value)}
        per_job = [m for m in metrics.metrics() if "name" in m._labelnames]  # a job's or sweep's own series
        holders["prometheus per-job series"] = {"len": sum(len(m._metrics) for m in per_job), "bytes": 0}
    for memories in (o for o in objects if isinstance(o, ResourceMemories)):
        items = memories._items
        holders["kopf ResourceMemories"] = {"len": len(items), "bytes": deep_size(items)}
    types = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)
    return {"holders": holders, "types": dict(types), "traced": tracemalloc.get_traced_memory()}


def main() -> None:
    out = Path(sys.argv[1])
    tracemalloc.start(FRAMES)
    taken = 0

    def dump(signum: int, frame: FrameType | None) -> None:
        nonlocal taken
        gc.collect()
        tracemalloc.take_snapshot().dump(str(out / f"{taken}.snapshot"))
        (out / f"{taken}.json").write_text(json.dumps(census()))
        (out / f"{taken}.done").touch()
        taken += 1

    hide([m for m in sys.argv[2].split(",") if m])
    import kopf._core.reactor.inventory  # noqa: F401 (census's imports, done before a signal can interrupt one)

    from finetune_operator.controller.cli import main as operator

    signal.signal(signal.SIGUSR1, dump)
    sys.exit(operator(sys.argv[3:]))


if __name__ == "__main__":
    main()
