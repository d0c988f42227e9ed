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
the host. A mount path that would hide something the process needs (an ancestor of the state
dir, the Python environment, or a host directory being mounted) is not mounted: the process sees
the host's directory there (a pod's ``/tmp`` is the host's ``/tmp`` when the cluster state lives
under it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def available() -> bool:
    """True when this process can create mount namespaces (root with util-linux)."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("mount") is not None


def _hides(mount_path: Path, keep: list[Path]) -> bool:
    return any(k == mount_path or mount_path in k.parents for k in keep)


def plan(mounts: list[tuple[str, str, bool]], keep: list[Path]) -> list[tuple[str, str, bool]]:
    """The (hostDir, mountPath, readOnly) binds that are safe to make, shortest mount path first."""
    keep = [*keep, *(Path(host).resolve() for host, _, _ in mounts), Path(sys.prefix).resolve()]
    chosen = []
    for host, target, read_only in sorted(mounts, key=lambda m: len(m[1])):
        path = Path(target)
        if path == Path("/") or _hides(path, keep):
            continue
        chosen.append((host, target, read_only))
    return chosen


def wrap(argv: list[str], binds: list[tuple[str, str, bool]], workdir: str | None = None) -> list[str]:
    """The command line that runs ``argv`` with ``binds`` in a fresh mount namespace, in ``workdir``
    (entered after mounting, so a working directory inside a volume is the volume's)."""
    if not binds:
        return argv
    spec = json.dumps({"binds": [list(b) for b in binds], "workdir": workdir})
    unshare = ["unshare", "--mount", "--propagation", "private", "--"]
    return [*unshare, sys.executable, "-m", "finetune_localcluster.mountns", spec, "--", *argv]


def under_binds(path: str, binds: list[tuple[str, str, bool]]) -> bool:
    return any(Path(path) == Path(target) or Path(target) in Path(path).parents for _, target, _ in binds)


def main(args: list[str]) -> None:
    spec_text, separator, *argv = args
    if separator != "--" or not argv:
        raise SystemExit("usage: python -m finetune_localcluster.mountns SPEC -- ARGV...")
    spec = json.loads(spec_text)
    for host, target, read_only in spec["binds"]:
        if Path(host).is_file():  # a single file (the pod's /etc/hosts): onto an existing file only
            if not Path(target).is_file():
                raise SystemExit(f"mountns: {host} is a file and {target} is not one")
        else:
            Path(target).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", host, target], check=True)
        if read_only:
            subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)
    if spec.get("workdir"):
        Path(spec["workdir"]).mkdir(parents=True, exist_ok=True)
        os.chdir(spec["workdir"])
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
