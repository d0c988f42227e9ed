"""Killing a container's process group leaves nothing behind (no cluster needed)."""

from __future__ import annotations

import subprocess
import time

from finetune_localcluster import procs


def test_a_child_in_a_session_of_its_own_dies_with_the_group() -> None:
    # torchrun starts its workers so: a worker must not outlive its killed pod
    shell = subprocess.Popen(
        ["bash", "-c", "setsid sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert shell.stdout is not None
    worker = int(shell.stdout.readline())
    deadline = time.monotonic() + 10
    while procs.descendants(shell.pid) != [worker]:  # until setsid has run
        assert time.monotonic() < deadline, "the worker never left the group"
        time.sleep(0.05)
    procs.kill_group(shell.pid, 1.0)
    shell.wait(timeout=10)
    for _ in range(100):
        if not procs.alive(worker):
            break
        time.sleep(0.05)
    assert not procs.alive(worker), "the worker outlived its process group"
