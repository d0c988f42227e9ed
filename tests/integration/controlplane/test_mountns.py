"""A container's private mount namespace (:mod:`finetune_localcluster.mountns`), on the real kernel: no cluster.

A pod's ``/tmp`` is an emptyDir of its own even when the checkout and its ``.venv`` live under ``/tmp`` (a CI
clone there): the bind is made and the Python environment is bound back inside it. Before, the bind was skipped,
so every pod on the machine shared the host's ``/tmp`` and a retried pod found what the killed one had left there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from finetune_localcluster import mountns

pytestmark = pytest.mark.skipif(not mountns.available(), reason="needs root and util-linux unshare")


def _run(argv: list[str], binds: list[tuple[str, str, bool]]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mountns.wrap(argv, binds), capture_output=True, text=True, timeout=60, check=False)


def test_a_bind_over_the_python_environments_ancestor_is_private_and_the_interpreter_still_runs(
    tmp_path: Path,
) -> None:
    environment = {Path(e).resolve() for e in [sys.prefix, *sys.path] if e and Path(e).is_dir()}
    prefix = Path(sys.prefix).resolve()
    target = prefix.parent.parent  # /tmp for a clone at /tmp/ci/.venv; a directory above the checkout in any case
    if target == Path("/"):
        pytest.skip(f"{prefix} is too near the root to mount over its grandparent")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    binds = mountns.plan([(str(scratch), str(target), False)], keep=[])
    assert binds == [(str(scratch), str(target), False)], "the bind is made, not skipped"
    marker = f"written-by-the-pod-{uuid.uuid4().hex}"
    script = (
        "import json, os, sys, finetune_localcluster; "
        f"open(os.path.join({str(target)!r}, {marker!r}), 'w').write('x'); "
        f"print(json.dumps(sorted(os.listdir({str(target)!r}))))"
    )
    try:
        done = _run([sys.executable, "-c", script], binds)
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout)
    finally:
        leaked = (target / marker).exists()
        (target / marker).unlink(missing_ok=True)
    assert not leaked, f"the pod wrote into the host's {target}"
    assert (scratch / marker).read_text() == "x", "the pod's writes land in its own volume"
    revealed = {p.relative_to(target).parts[0] for p in environment if target in p.parents}
    assert seen == sorted(revealed | {marker}), "the pod sees its volume and the environment's mount points only"


def test_every_source_is_opened_before_a_bind_hides_it(tmp_path: Path) -> None:
    """A bind over a directory that holds a later bind's source (a pod's /tmp over the cluster's volumes)."""
    outer = tmp_path / "outer"
    (outer / "claim").mkdir(parents=True)
    (outer / "claim" / "seed.txt").write_text("from the claim\n")
    (outer / "venv").mkdir()
    (outer / "venv" / "kept.txt").write_text("kept\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    mounted = tmp_path / "mnt"
    spec = {
        "binds": [[str(scratch), str(outer), False], [str(outer / "claim"), str(mounted), True]],
        "reveal": [str(outer / "venv")],
        "workdir": None,
    }
    script = (
        f"import os; print(open({str(mounted / 'seed.txt')!r}).read().strip()); "
        f"print(open({str(outer / 'venv' / 'kept.txt')!r}).read().strip()); "
        f"print(sorted(os.listdir({str(outer)!r})))"
    )
    argv = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m"]
    done = subprocess.run(
        [*argv, "finetune_localcluster.mountns", json.dumps(spec), "--", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["from the claim", "kept", "['venv']"]
