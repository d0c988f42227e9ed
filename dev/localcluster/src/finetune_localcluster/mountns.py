"""Give a container process its volumes at their real mount paths, in a private mount namespace.

Path rewriting (see :mod:`podspec`, the fallback) covers only paths that appear in command, args
and env; programs that use fixed paths of their own — the Kubernetes client reading
``/var/run/secrets/kubernetes.io/serviceaccount``, a trainer resolving ``pvc://claim/x`` under
``/mnt/pvc`` — also need the directories to *be* there. When the agent may create mount
namespaces (root, util-linux ``unshare``), each container runs as

    unshare --mount --propagation private -- python -m finetune_localcluster.mountns SPEC -- ARGV...

which bind-mounts every ``hostDir`` onto its ``mountPath`` (read-only where asked; a file onto
a file for the pod's ``/etc/hosts``) and then execs ARGV (same PID, so signals and exit codes are
the container's). The mounts vanish with the process; the empty mount-point directories stay on
the host.

Every source is opened before the first mount and bound from ``/proc/self/fd``, so a mount never
hides the source of a later one. A mount over the Python environment's ancestors (a pod's
``/tmp`` emptyDir when the checkout and its ``.venv`` live under ``/tmp``) is made, and the
environment's directories are bound back at their own paths inside it: the pod's ``/tmp`` is its
own, as on a real node, and the interpreter still finds its code. A mount path that would hide the
cluster's state dir is not mounted: the process sees the host's directory there (a pod's ``/tmp``
is the host's ``/tmp`` when the cluster state lives under it, which the tests that read what a
pod wrote under their ``/tmp`` rely on).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Final


def available() -> bool:
    """True when this process can create mount namespaces (root with util-linux)."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None


def _hides(mount_path: Path, keep: list[Path]) -> bool:
    return any(k == mount_path or mount_path in k.parents for k in keep)


def python_environment() -> list[Path]:
    """The directories this interpreter runs from: its prefixes and every directory on its path (the
    checkout's ``src`` folders of editable installs among them), outermost only."""
    found = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    found |= {Path(entry).resolve() for entry in sys.path if entry and Path(entry).is_dir()}
    return sorted(p for p in found if not any(q in p.parents for q in found))


def plan(mounts: list[tuple[str, str, bool]], keep: list[Path]) -> list[tuple[str, str, bool]]:
    """The (hostDir, mountPath, readOnly) binds that are safe to make, shortest mount path first: none
    onto ``/``, none that would hide a ``keep`` path, none exactly onto the Python environment."""
    environment = python_environment()
    chosen = []
    for host, target, read_only in sorted(mounts, key=lambda m: len(m[1])):
        path = Path(target)
        if path == Path("/") or _hides(path, keep) or path in environment:
            continue
        chosen.append((host, target, read_only))
    return chosen


def wrap(argv: list[str], binds: list[tuple[str, str, bool]], workdir: str | None = None) -> list[str]:
    """The command line that runs ``argv`` with ``binds`` in a fresh mount namespace, in ``workdir``
    (entered after mounting, so a working directory inside a volume is the volume's). The Python
    environment's directories that a bind would hide are bound back over it."""
    if not binds:
        return argv
    targets = [Path(target) for _, target, _ in binds]
    reveal = [str(p) for p in python_environment() if any(t in p.parents for t in targets)]
    spec = json.dumps({"binds": [list(b) for b in binds], "reveal": reveal, "workdir": workdir})
    unshare = ["unshare", "--mount", "--propagation", "private", "--"]
    return [*unshare, sys.executable, "-m", "finetune_localcluster.mountns", spec, "--", *argv]


def under_binds(path: str, binds: list[tuple[str, str, bool]]) -> bool:
    return any(Path(path) == Path(target) or Path(target) in Path(path).parents for _, target, _ in binds)


_MS_RDONLY: Final = 1
_MS_REMOUNT: Final = 32
_MS_BIND: Final = 4096
_MS_REC: Final = 16384


def _mount(source: str | None, target: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode() if source else None, target.encode(), None, flags, None) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount {source} on {target}: {os.strerror(error)}")


def main(args: list[str]) -> None:
    spec_text, separator, *argv = args
    if separator != "--" or not argv:
        raise SystemExit("usage: python -m finetune_localcluster.mountns SPEC -- ARGV...")
    spec = json.loads(spec_text)
    # Opened before any mount: a bind over /tmp must not hide a later bind's source or what it reveals.
    sources = {p: os.open(p, os.O_PATH) for p in {h for h, _, _ in spec["binds"]} | set(spec.get("reveal", []))}
    for host, target, read_only in spec["binds"]:
        source = f"/proc/self/fd/{sources[host]}"  # the host path itself may be hidden by an earlier bind
        if Path(source).is_file():  # a single file (the pod's /etc/hosts): onto an existing file only
            if not Path(target).is_file():
                raise SystemExit(f"mountns: {host} is a file and {target} is not one")
        else:
            Path(target).mkdir(parents=True, exist_ok=True)
        _mount(source, target, _MS_BIND)
        for hidden in [p for p in spec.get("reveal", []) if Path(target) in Path(p).parents]:
            Path(hidden).mkdir(parents=True, exist_ok=True)  # a mount point inside the new mount
            _mount(f"/proc/self/fd/{sources[hidden]}", hidden, _MS_BIND | _MS_REC)
        if read_only:
            _mount(None, target, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
    for fd in sources.values():
        os.close(fd)
    if spec.get("workdir"):
        Path(spec["workdir"]).mkdir(parents=True, exist_ok=True)
        os.chdir(spec["workdir"])
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
