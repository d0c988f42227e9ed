"""The process runtime: a container as a host process (the image map, see :mod:`podspec`).

With mount namespaces (:mod:`mountns`) its volumes appear at their real paths; without, mount
paths in command/args/env are rewritten to the host dirs. The working directory is the
``workingDir`` when it is mounted or exists on the host, else ``rootfs/<workingDir>`` under the
pod dir.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from finetune_localcluster import mountns, podspec
from finetune_localcluster.projection import NotReadyError
from finetune_localcluster.runtime import USE_MOUNT_NAMESPACES, Container, Launch, PodContext


class ProcessRuntime:
    """Runs a container's command as a host process."""

    def argv(self, pod: PodContext, c: Container, env: dict[str, str]) -> list[str]:
        """Resolve command/args (with the image map when command is empty)."""
        command = [podspec.expand(str(a), env) for a in c.spec.get("command", [])]
        args = [podspec.expand(str(a), env) for a in c.spec.get("args", [])]
        if not command:
            mapped = podspec.image_command(str(c.spec.get("image", "")))
            if mapped:
                entry, default_cmd = mapped
                command, args = entry, args or default_cmd
        argv = [podspec.rewrite_paths(a, pod.projection.mounts.get(c.name, [])) for a in command + args]
        if not argv:
            raise NotReadyError(
                f"image {c.spec.get('image')!r} is not in the image map and the container has no command"
            )
        if "/" not in argv[0]:
            found = shutil.which(argv[0], path=env.get("PATH"))
            if not found:
                raise FileNotFoundError(f"{argv[0]!r} not found on PATH")
            argv[0] = found
        return argv

    def workdir(self, pod: PodContext, c: Container) -> Path:
        wd = c.spec.get("workingDir")
        if not wd:
            d = pod.projection.dir / "work"
        else:
            rewritten = podspec.rewrite_paths(str(wd), pod.projection.mounts.get(c.name, []))
            d = Path(rewritten)
            if rewritten == wd and not d.is_dir():
                d = pod.projection.dir / "rootfs" / str(wd).lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def launch(self, pod: PodContext, c: Container) -> Launch:
        env = pod.projection.build_env(c.spec, pod.api_port)
        argv = self.argv(pod, c, env)
        cwd = self.workdir(pod, c)
        if USE_MOUNT_NAMESPACES:
            binds = mountns.plan(pod.projection.binds.get(c.name, []), [pod.state_dir.resolve()])
            wd = c.spec.get("workingDir")
            inside = bool(wd) and mountns.under_binds(str(wd), binds)
            argv = mountns.wrap(argv, binds, workdir=str(wd) if inside else None)
            cwd = pod.projection.dir if inside else cwd
        return Launch(argv, env, cwd)

    def exec(self, pod: PodContext, c: Container, argv: list[str], timeout: float) -> int:
        if argv and "/" not in argv[0]:
            argv = [shutil.which(argv[0], path=c.env.get("PATH")) or argv[0], *argv[1:]]
        if USE_MOUNT_NAMESPACES and c.proc is not None:
            # Into the container's own mount namespace, as kubelet's exec does: no interpreter to
            # start (a probe's 1 s default timeout is for the command, not for setting it up).
            argv = ["nsenter", f"--target={c.proc.pid}", "--mount", "--", *argv]
        done = subprocess.run(
            argv, env=c.env, cwd=pod.projection.dir, capture_output=True, timeout=timeout, check=False
        )
        return done.returncode

    def stopped(self, c: Container) -> None:
        """Nothing outlives the process group."""
