"""``watch`` on a terminal redraws one line in place (no cluster: a stub stands in for the API)."""

from __future__ import annotations

import argparse
import io
from typing import Any

from finetune_cli.main import cmd_watch
from tests.cli.jobs import early_stopped_status, job, running_status


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class StubKube:
    """Serves a fixed sequence of objects, then keeps serving the last."""

    namespace = "default"

    def __init__(self, *objects: dict[str, Any]) -> None:
        self.objects = list(objects)

    def get_job(self, name: str, namespace: str) -> dict[str, Any]:
        return self.objects.pop(0) if len(self.objects) > 1 else self.objects[0]


def test_watch_redraws_in_place_on_a_tty_and_ends_with_the_outcome() -> None:
    kube = StubKube(job(status=running_status()), job(status=running_status()), job(status=early_stopped_status()))
    out = Terminal()
    args = argparse.Namespace(name="demo", interval=0.0)
    assert cmd_watch(kube, args, out) == 0  # type: ignore[arg-type]
    text = out.getvalue()
    assert text.count("\r") == 3 and text.count("\x1b[K") == 3
    assert text.endswith(
        "\ndemo Complete (EarlyStopped): accuracy did not improve by more than 0.0 (max) for 2 evaluations; "
        "best 0.86 at step 100\n"
    )
    assert "\n" not in text.split("\r")[1], "progress updates stay on one line"
