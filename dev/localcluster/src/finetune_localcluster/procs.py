"""Process bookkeeping: pid files that survive the starting process, and clean kills.

A pid file holds "PID STARTTIME" (the kernel's start time of the process, from
/proc/PID/stat) so a recycled pid is never mistaken for our process and never killed.
Every process we start leads its own process group, so killing the group reaches its
children too; descendants that left it for a session of their own (torchrun starts its workers
so) are killed once the group is gone, as everything in a container dies with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (None if gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The comm field may contain spaces; fields after the last ')' are fixed.
    rest = stat.rsplit(")", 1)[1].split()
    if rest[0] in ("Z", "X"):
        return None
    return rest[19]


def write_pidfile(path: Path, pid: int) -> None:
    """Record ``pid`` with its start time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid} {start_time(pid) or ''}\n")


def read_pidfile(path: Path) -> int | None:
    """Return the pid in ``path`` if that very process is still alive."""
    try:
        parts = path.read_text().split()
    except OSError:
        return None
    if not parts:
        return None
    pid = int(parts[0])
    st = start_time(pid)
    if st is None or (len(parts) > 1 and parts[1] != st):
        return None
    return pid


def alive(pid: int) -> bool:
    """True while ``pid`` runs (zombies count as dead)."""
    return start_time(pid) is not None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) succeeds on a group of zombies; look for a live member.
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(rest[2]) == pgid and rest[0] not in ("Z", "X"):
            return True
    return False


def descendants(pgid: int) -> list[int]:
    """Processes below the members of process group ``pgid`` that are not in it themselves."""
    parent: dict[int, int] = {}
    group: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d.name)], group[int(d.name)] = int(rest[1]), int(rest[2])
    found: list[int] = []
    frontier = [pid for pid, pg in group.items() if pg == pgid]
    while frontier:
        below = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += [pid for pid in below if group[pid] != pgid]
        frontier = below
    return found


def kill_group(pgid: int, grace: float) -> bool:
    """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL; True if it had to. Descendants
    in sessions of their own get SIGKILL once the group is gone (they had the grace period to follow
    their parent's SIGTERM).

    Never reaps: a caller holding a Popen must still get the real exit status.
    """
    escaped = [(pid, start_time(pid)) for pid in descendants(pgid)]
    try:
        return _kill_group(pgid, grace)
    finally:
        for pid, started in escaped:
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _kill_group(pgid: int, grace: float) -> bool:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return False
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    for _ in range(100):
        if not _group_alive(pgid):
            break
        time.sleep(0.05)
    return True


def tail(path: Path, lines: int = 25) -> str:
    """Last lines of a log file, for error messages."""
    try:
        data = path.read_bytes()[-16384:].decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(data.splitlines()[-lines:])
