"""Pure helpers that turn a pod spec into a local process: env, paths, images.

Path rule (we cannot chroot, so mounts cannot appear at their container paths):
every volume mount of a container is materialised in a host directory
(``<podDir>/volumes/<volume>[/<subPath>]``, the claim directory for a PVC, the path
itself for hostPath). Any occurrence of a mount path as a whole path prefix in the
container's command, args, env values and workingDir is rewritten to that host
directory (longest mount path first). The process also gets
``FINETUNE_MOUNTS`` (JSON ``{mountPath: hostDir}``) and, when the service-account volume
is mounted, ``FINETUNE_SA_DIR`` (host dir holding ``token``, ``ca.crt``, ``namespace``).

Image rule: ``command``/``args`` run as given (argv[0] resolved on the agent's PATH,
whose first entry is the project venv's ``bin``). If ``command`` is empty the image's
entrypoint comes from the image map: entries of the YAML file named by
``FINETUNE_IMAGE_MAP`` first, then :data:`DEFAULT_IMAGE_MAP`; each entry is
``{match: <regex searched in the image>, entrypoint: [...], cmd: [...]}`` and, like a
container runtime, ``args`` replace ``cmd``. An unmapped image with no command runs
its ``args`` as the command.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"

DEFAULT_IMAGE_MAP: list[Obj] = [
    {"match": r"finetune-trainer|finetune-operator/trainer", "entrypoint": ["finetune-trainer"], "cmd": []},
    {"match": r"finetune-operator(/operator)?(:|@|$)", "entrypoint": ["finetune-operator"], "cmd": []},
    {"match": r"(^|/)(busybox|alpine|debian|ubuntu)(:|@|$)", "entrypoint": [], "cmd": ["/bin/sh"]},
    {"match": r"(^|/)python(:|@|$)", "entrypoint": [], "cmd": ["python3"]},
]

_SUFFIX: dict[str, Decimal | int] = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


def parse_quantity(q: str | int | float) -> Decimal:
    """Parse a Kubernetes resource quantity ("500m", "2Gi", "1e3")."""
    s = str(q).strip()
    m = re.fullmatch(r"([+-]?[0-9.]+)([eE][+-]?[0-9]+)?([a-zA-Z]*)", s)
    if not m or m.group(3) not in _SUFFIX:
        raise ValueError(f"invalid quantity {q!r}")
    value = Decimal(m.group(1) + (m.group(2) or ""))
    return value * Decimal(_SUFFIX[m.group(3)])


def image_command(image: str, path: str | None = None) -> tuple[list[str], list[str]] | None:
    """(entrypoint, cmd) for ``image`` from the image map, or None if unmapped."""
    entries: list[Obj] = []
    path = path or os.environ.get("FINETUNE_IMAGE_MAP")
    if path and Path(path).exists():
        entries += list(yaml.safe_load(Path(path).read_text()) or [])
    entries += DEFAULT_IMAGE_MAP
    for e in entries:
        if re.search(str(e["match"]), image):
            return [str(x) for x in e.get("entrypoint") or []], [str(x) for x in e.get("cmd") or []]
    return None


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubelet-style ``$(VAR)`` expansion: unknown vars stay literal, ``$$`` escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR.sub(sub, value)


def rewrite_paths(value: str, mounts: list[tuple[str, str]]) -> str:
    """Replace mount paths used as whole path prefixes by their host directories.

    One pass over the value (longest mount path wins), so a host directory that itself lies
    under another mount path (e.g. a state dir under /tmp) is never rewritten twice.
    """
    table = {mp: host for mount_path, host in mounts if (mp := mount_path.rstrip("/") or "/") != "/"}
    if not table:
        return value
    alternatives = "|".join(re.escape(mp) for mp in sorted(table, key=len, reverse=True))
    pattern = r"(?<![\w./-])(" + alternatives + r")(?=$|[/\s:;,\"'=])"
    return re.sub(pattern, lambda m: table[m.group(1)], value)


def _label_value(d: Obj, expr: str) -> str:
    m = re.fullmatch(r"\w+\['(.*)'\]", expr)
    if not m:
        raise ValueError(f"unsupported fieldPath {expr!r}")
    return str(d.get(m.group(1), ""))


def pod_ip(pod: Obj) -> str:
    """The pod's own loopback address, as a cluster gives each pod its own IP.

    Pods share the node's network, so two pods listening on the same port (trainers' /metrics)
    would collide on 0.0.0.0; bound to their pod IPs they do not. Derived from the UID (stable
    across agent restarts, distinct across the local clusters on one machine); never a
    ``127.x.y.1`` (the API service stand-ins, :mod:`apiservice`) nor 127.0.0.1. A hostNetwork
    pod has the node's address.
    """
    if pod.get("spec", {}).get("hostNetwork"):
        return "127.0.0.1"
    digest = hashlib.sha256(str(pod["metadata"]["uid"]).encode()).digest()
    return f"127.{digest[0]}.{digest[1]}.{2 + digest[2] % 253}"


def field_value(pod: Obj, path: str) -> str:
    """Resolve a downward-API ``fieldRef.fieldPath``."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
        "status.podIP": status.get("podIP") or "127.0.0.1",
        "status.podIPs": status.get("podIP") or "127.0.0.1",
    }
    if path in simple:
        return str(simple[path] or "")
    if path == "metadata.labels":
        return "\n".join(f'{k}="{v}"' for k, v in sorted(meta.get("labels", {}).items()))
    if path == "metadata.annotations":
        return "\n".join(f'{k}="{v}"' for k, v in sorted(meta.get("annotations", {}).items()))
    if path.startswith("metadata.labels["):
        return _label_value(meta.get("labels", {}), path[len("metadata.") :])
    if path.startswith("metadata.annotations["):
        return _label_value(meta.get("annotations", {}), path[len("metadata.") :])
    raise ValueError(f"unsupported fieldPath {path!r}")


def resource_value(pod: Obj, ref: Obj, container: str, node_allocatable: dict[str, str]) -> str:
    """Resolve a ``resourceFieldRef`` (limits fall back to node allocatable, like kubelet)."""
    name = ref.get("containerName") or container
    c: Obj = next(
        (c for c in pod["spec"].get("containers", []) + pod["spec"].get("initContainers", []) if c["name"] == name), {}
    )
    kind, _, res = str(ref["resource"]).partition(".")
    resources = c.get("resources", {})
    raw = resources.get(kind, {}).get(res)
    if raw is None and kind == "limits":
        raw = node_allocatable.get(res, "0")
    if raw is None:
        raw = "0"
    divisor = parse_quantity(ref.get("divisor") or "1")
    if divisor == 0:
        divisor = Decimal(1)
    value = (parse_quantity(raw) / divisor).to_integral_value(rounding=ROUND_CEILING)
    return str(int(value))


def mounts_env(mounts: list[tuple[str, str]]) -> dict[str, str]:
    """Env vars that tell a process where its mounts really are."""
    env = {"FINETUNE_MOUNTS": json.dumps(dict(mounts), sort_keys=True)}
    for mp, host in mounts:
        if mp.rstrip("/") == SA_MOUNT:
            env["FINETUNE_SA_DIR"] = host
    return env


GPU_RESOURCE = "nvidia.com/gpu"
SIMULATED_GPUS_ENV = "FINETUNE_SIMULATED_GPUS"
"""The mark of this node's simulated devices (read by finetune_trainer.accelerator): CPU training is intended."""


def gpu_env(container: dict[str, Any]) -> dict[str, str]:
    """What the NVIDIA device plugin sets for a container given GPUs, plus the mark that they are simulated."""
    resources = container.get("resources") or {}
    count = (resources.get("limits") or {}).get(GPU_RESOURCE) or (resources.get("requests") or {}).get(GPU_RESOURCE)
    if not count or int(count) <= 0:
        return {}
    devices = ",".join(f"GPU-simulated-{index}" for index in range(int(count)))
    return {"NVIDIA_VISIBLE_DEVICES": devices, SIMULATED_GPUS_ENV: devices}
