"""The operator process's memory (``finetune_operator.controller.allocator``)."""

from __future__ import annotations

import gc
import json
from typing import Any

from finetune_operator.controller.allocator import decode_json


def _collections_while(decode: Any, data: str) -> tuple[Any, int]:
    seen: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(count)
    try:
        return decode(data), len(seen)
    finally:
        gc.callbacks.remove(count)


def test_a_large_api_answer_is_decoded_without_the_cyclic_collector() -> None:
    """A resync LIST of a thousand trainer Jobs ran full collections midway through its decode (the event loop
    stopped for up to 1.5 s); JSON makes no cycles, so the collector waits until it is decoded."""
    items = [
        {"metadata": {"name": f"job-{i}", "labels": {"a": "b"}}, "status": {"conditions": [{}]}} for i in range(20_000)
    ]
    answer = json.dumps({"items": items})
    assert gc.isenabled()
    _, plain = _collections_while(json.loads, answer)
    assert plain > 0, "json.loads of this much runs the collector (the case this test is about)"
    decoded, paused = _collections_while(decode_json, answer)
    assert decoded == {"items": items}
    assert paused == 0
    assert gc.isenabled(), "the collector runs again afterwards"
    gc.disable()
    try:
        decode_json("{}")
        assert not gc.isenabled(), "a caller's own pause is kept"
    finally:
        gc.enable()
