"""Text a trainer wrote (status messages, trial conditions, Events) reaches the terminal without
its escape sequences: every view prints through ``printable`` (no cluster: a stub serves the objects)."""

from __future__ import annotations

import argparse
import copy
import io
from typing import Any

import pytest

from finetune_cli.main import cmd_describe, cmd_list, cmd_stop, cmd_sweep_describe, cmd_sweep_list, cmd_watch
from tests.cli.jobs import condition, failed_status, job
from tests.cli.sweeps import sweep, sweep_status, trial_jobs

# clear screen, set the window title, write the clipboard (OSC 52), 8-bit CSI, bidi override, carriage return
EVIL = "\x1b[2J\x1b]0;pwned\x07\x1b]52;c;Y3VybCBldmlsLnNo\x07\x9b31m\u202e\rboom"
FORBIDDEN = ("\x1b", "\x07", "\x9b", "\u202e", "\r")


def _evil_job() -> dict[str, Any]:
    status = failed_status()
    status["message"] = f"trainer exited with code 1: {EVIL}"
    status["conditions"] = [condition("Failed", "True", "TrainerError", f"trainer exited with code 1: {EVIL}")]
    return job(status=status)


def _evil_sweep_trials() -> list[dict[str, Any]]:
    trials = trial_jobs()
    for trial in trials:
        for cond in trial["status"].get("conditions", []):
            cond["message"] = f"{cond['message']} {EVIL}"
    return trials


class StubKube:
    namespace = "default"

    def get_job(self, name: str, namespace: str) -> dict[str, Any]:
        return _evil_job()

    def list_jobs(self, namespace: str | None) -> list[dict[str, Any]]:
        return [_evil_job()]

    def get_sweep(self, name: str, namespace: str) -> dict[str, Any]:
        status = copy.deepcopy(sweep_status())
        status["conditions"][0]["message"] = EVIL
        return sweep(status=status)

    def list_sweeps(self, namespace: str | None) -> list[dict[str, Any]]:
        return [self.get_sweep("tune", "default")]

    def sweep_trials(self, sweep: str, namespace: str) -> list[dict[str, Any]]:
        return _evil_sweep_trials()

    def events(self, kind: str, name: str, namespace: str) -> list[dict[str, Any]]:
        return [{"type": "Warning", "reason": "TrialFailed", "message": EVIL, "lastTimestamp": "2026-11-23T12:00:00Z"}]


ARGS = argparse.Namespace(
    name="demo", namespace="default", all_namespaces=False, output=None, interval=0.0, sweep_command=None
)


@pytest.mark.parametrize("command", [cmd_list, cmd_describe, cmd_stop, cmd_sweep_list, cmd_sweep_describe])
def test_views_print_no_escape_sequences(command: Any, capsys: pytest.CaptureFixture[str]) -> None:
    command(StubKube(), ARGS)
    printed = capsys.readouterr().out
    assert printed.strip()
    for forbidden in FORBIDDEN:
        assert forbidden not in printed, (command.__name__, forbidden, printed)


def test_watch_prints_only_its_own_escapes() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    assert cmd_watch(StubKube(), ARGS, out) == 1  # type: ignore[arg-type]
    text = out.getvalue()
    assert "boom" in text
    assert text.replace("\x1b[K", "").count("\x1b") == 0
    for forbidden in ("\x07", "\x9b", "\u202e"):
        assert forbidden not in text
