"""The podman runtime: a container whose image is in the local store runs as a podman container.

The command line comes from :class:`containers.Podman`; the container runs attached, so the worker
treats it like a process (see :mod:`containers`). ``kubernetes.default.svc`` resolves to the
agent's API service forwarder through ``--add-host`` instead of the bind-mounted hosts file.
"""

from __future__ import annotations

import subprocess

from finetune_localcluster import apiservice
from finetune_localcluster.containers import Podman, podman_env
from finetune_localcluster.projection import PASSTHROUGH_ENV
from finetune_localcluster.runtime import Container, Launch, PodContext


class PodmanRuntime:
    """Runs containers of images in the local podman store."""

    def __init__(self, podman: Podman, service_address: str | None) -> None:
        self.podman = podman
        self.service_address = service_address  # of kubernetes.default.svc, None without it

    def has_image(self, image: str) -> bool:
        return self.podman.image_user(image) is not None

    def launch(self, pod: PodContext, c: Container) -> Launch:
        image_user = self.podman.image_user(str(c.spec.get("image", "")))
        if image_user is None:
            raise ValueError(f"image {c.spec.get('image')!r} is no longer in the local store")
        env = {k: v for k, v in pod.projection.build_env(c.spec, pod.api_port).items() if k not in PASSTHROUGH_ENV}
        c.podman_name = f"ftl-{pod.projection.uid[:13]}-{c.name}-{c.restart_count}"
        binds = [b for b in pod.projection.binds.get(c.name, []) if b[1] != "/etc/hosts"]
        hosts = {}
        if self.service_address is not None:
            hosts = dict.fromkeys(apiservice.SERVICE_NAMES, self.service_address)
        hosts.update(dict.fromkeys(pod.projection.dns_names, "127.0.0.1"))  # see poddns
        argv = self.podman.run_argv(c.podman_name, pod.projection.pod(), c.spec, sorted(env), binds, hosts, image_user)
        return Launch(argv, {**podman_env(), **env}, pod.projection.dir)

    def exec(self, pod: PodContext, c: Container, argv: list[str], timeout: float) -> int:
        assert c.podman_name is not None
        done = subprocess.run(
            self.podman.exec_argv(c.podman_name, argv),
            env=podman_env(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        return done.returncode

    def stopped(self, c: Container) -> None:
        if c.podman_name is not None:
            self.podman.remove(c.podman_name)
