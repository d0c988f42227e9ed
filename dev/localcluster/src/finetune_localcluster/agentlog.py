"""Timestamps and the log line format of the node agent (one place for every agent module)."""

from __future__ import annotations

import datetime as dt


def now() -> str:
    """RFC 3339 time, seconds precision."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    """RFC 3339 with microseconds (for Lease renewTime, a MicroTime)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log(msg: str) -> None:
    print(f"{now()} node-agent: {msg}", flush=True)
