"""What a pod sees of the API: volumes (emptyDir, hostPath, PVC, configMap, secret, downwardAPI,
projected service-account tokens) materialised under the pod dir, and the container environment
(service env, env, envFrom, valueFrom).

Layout under the pod dir: ``volumes/<volume>/``; claims live in :func:`provisioner.claim_dir`.
Projected tokens are rotated at 80% of their lifetime, like kubelet.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from pathlib import Path

from finetune_localcluster import poddns, podspec
from finetune_localcluster.agentlog import log
from finetune_localcluster.provisioner import claim_dir
from finetune_localcluster.rest import ApiError, Obj, Rest, q

PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")

Mount = tuple[str, str]  # (mount path, host path): rewriting paths when there are no mount namespaces
Bind = tuple[str, str, bool]  # (host path, mount path, read-only)


class NotReadyError(RuntimeError):
    """A referenced object (configMap, secret, SA token) is missing; retry later."""


def write_files(base: Path, files: dict[str, bytes], mode: int) -> None:
    """Write each file atomically (readers never see half a token or config)."""
    base.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        f = base / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        tmp.replace(f)


class PodProjection:
    """Volumes, tokens and env of one pod; ``pod`` returns the newest pod object."""

    def __init__(
        self,
        api: Rest,
        pod: Callable[[], Obj],
        pod_dir: Path,
        state_dir: Path,
        node_name: str,
        allocatable: dict[str, str],
    ) -> None:
        self.api = api
        self.pod = pod
        meta = pod()["metadata"]
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.dir = pod_dir
        self.state_dir = state_dir
        self.node_name = node_name
        self.allocatable = allocatable
        self.tokens: list[tuple[Path, Obj, float]] = []  # (file, request, refresh_at)
        self.mounts: dict[str, list[Mount]] = {}
        self.binds: dict[str, list[Bind]] = {}
        self.dns_names: list[str] = []
        """The pod's cluster DNS names, all 127.0.0.1 (see :mod:`poddns`)."""
        self.rendezvous_port: int | None = None
        """MASTER_PORT of this pod's Job on the shared host network (see :mod:`poddns`)."""

    # -------------------------------------------------------------- API objects

    def object_files(self, kind: str, name: str, items: list[Obj] | None, optional: bool) -> dict[str, bytes]:
        plural = "configmaps" if kind == "configMap" else "secrets"
        try:
            obj = self.api.get(f"/api/v1/namespaces/{self.ns}/{plural}/{q(name)}")
        except ApiError as e:
            if e.status == 404 and optional:
                return {}
            raise NotReadyError(f"{kind} {self.ns}/{name} not found") from e
        data: dict[str, bytes] = {}
        if kind == "configMap":
            data.update({k: v.encode() for k, v in (obj.get("data") or {}).items()})
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        else:
            data.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
        if items:
            picked = {}
            for it in items:
                if it["key"] not in data:
                    if optional:
                        continue
                    raise NotReadyError(f"{kind} {self.ns}/{name} has no key {it['key']}")
                picked[it["path"]] = data[it["key"]]
            return picked
        return data

    def _downward_files(self, items: list[Obj]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        pod = self.pod()
        for it in items:
            if "fieldRef" in it:
                out[it["path"]] = podspec.field_value(pod, it["fieldRef"]["fieldPath"]).encode()
            elif "resourceFieldRef" in it:
                ref = it["resourceFieldRef"]
                out[it["path"]] = podspec.resource_value(
                    pod, ref, ref.get("containerName", ""), self.allocatable
                ).encode()
        return out

    def _token(self, src: Obj) -> str:
        sa = self.pod()["spec"].get("serviceAccountName") or "default"
        req: Obj = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [src["audience"]] if src.get("audience") else [],
                "expirationSeconds": int(src.get("expirationSeconds") or 3600),
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.pod_name, "uid": self.uid},
            },
        }
        try:
            resp = self.api.post(f"/api/v1/namespaces/{self.ns}/serviceaccounts/{q(sa)}/token", req)
        except ApiError as e:
            raise NotReadyError(f"token for serviceaccount {self.ns}/{sa}: {e}") from e
        return str(resp["status"]["token"])

    # -------------------------------------------------------------- volumes

    def prepare_volumes(self, containers: list[Obj], hosts_file: Path | None, mount_namespaces: bool) -> None:
        """Materialise every volume under the pod dir and plan each container's binds (raises
        NotReadyError to retry)."""
        vols: dict[str, Path] = {}
        pod_hosts = hosts_file
        if hosts_file is not None and self.dns_names:
            pod_hosts = poddns.write_hosts(hosts_file, self.dir / "hosts", self.dns_names)
        for v in self.pod()["spec"].get("volumes", []):
            name = v["name"]
            d = self.dir / "volumes" / name
            if "hostPath" in v:
                d = Path(v["hostPath"]["path"])
                if v["hostPath"].get("type") in ("DirectoryOrCreate", None, ""):
                    d.mkdir(parents=True, exist_ok=True)
            elif "persistentVolumeClaim" in v:
                d = claim_dir(self.state_dir, self.ns, v["persistentVolumeClaim"]["claimName"])
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(0o777)  # writable by a container's non-root user, like a fresh volume
            elif "emptyDir" in v:
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(0o777)  # kubelet creates emptyDirs world-writable
            elif "configMap" in v or "secret" in v:
                kind = "configMap" if "configMap" in v else "secret"
                src = v[kind]
                name_key = "name" if kind == "configMap" else "secretName"
                files = self.object_files(kind, src[name_key], src.get("items"), bool(src.get("optional")))
                write_files(d, files, int(src.get("defaultMode", 0o644)))
            elif "downwardAPI" in v:
                src = v["downwardAPI"]
                write_files(d, self._downward_files(src.get("items", [])), int(src.get("defaultMode", 0o644)))
            elif "projected" in v:
                mode = int(v["projected"].get("defaultMode", 0o644))
                for s in v["projected"].get("sources", []):
                    if "serviceAccountToken" in s:
                        st = s["serviceAccountToken"]
                        write_files(d, {st["path"]: self._token(st).encode()}, mode)
                        ttl = int(st.get("expirationSeconds") or 3600)
                        self.tokens.append((d / st["path"], st, time.monotonic() + 0.8 * ttl))
                    elif "configMap" in s or "secret" in s:
                        kind = "configMap" if "configMap" in s else "secret"
                        src = s[kind]
                        files = self.object_files(kind, src["name"], src.get("items"), bool(src.get("optional")))
                        write_files(d, files, mode)
                    elif "downwardAPI" in s:
                        write_files(d, self._downward_files(s["downwardAPI"].get("items", [])), mode)
            else:
                d.mkdir(parents=True, exist_ok=True)  # unsupported type: an empty dir
            vols[name] = d
        for c in containers:
            mounts = []
            binds: list[Bind] = []
            for m in c.get("volumeMounts", []):
                host = vols.get(m["name"])
                if host is None:
                    raise NotReadyError(f"container {c['name']}: no volume named {m['name']}")
                if m.get("subPath"):
                    host = host / m["subPath"]
                    host.mkdir(parents=True, exist_ok=True)
                mounts.append((str(m["mountPath"]), str(host)))
                binds.append((str(host), str(m["mountPath"]), bool(m.get("readOnly"))))
            if hosts_file is not None:  # kubernetes.default.svc -> the agent's forwarder
                binds.append((str(pod_hosts), "/etc/hosts", True))
            # With mount namespaces the volumes are at their real paths, so nothing is rewritten
            # (rewriting would also mangle host paths that merely lie under a mount path, such as
            # a checkout in /tmp when a pod mounts /tmp).
            self.mounts[c["name"]] = [] if mount_namespaces else mounts
            self.binds[c["name"]] = binds

    def refresh_tokens(self) -> None:
        """Rotate projected tokens at 80% of their lifetime, like kubelet."""
        for i, (f, st, at) in enumerate(self.tokens):
            if time.monotonic() >= at:
                try:
                    write_files(f.parent, {f.name: self._token(st).encode()}, 0o644)
                    ttl = int(st.get("expirationSeconds") or 3600)
                    self.tokens[i] = (f, st, time.monotonic() + 0.8 * ttl)
                except (NotReadyError, OSError) as e:
                    log(f"{self.ns}/{self.pod_name}: token refresh failed: {e}")

    # -------------------------------------------------------------- env

    def _lookup(self, kind: str, name: str, key: str, optional: bool) -> str | None:
        files = self.object_files(kind, name, [{"key": key, "path": key}], optional)
        return files[key].decode(errors="replace") if key in files else None

    def build_env(self, container: Obj, api_port: int) -> dict[str, str]:
        """The process environment: passthrough, service env, envFrom, then env."""
        name = str(container["name"])
        mounts = self.mounts.get(name, [])
        port = str(api_port)
        env: dict[str, str] = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        pod = self.pod()
        env.update(
            {
                "HOSTNAME": str(pod["spec"].get("hostname") or self.pod_name),
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port,
                "KUBERNETES_PORT": f"tcp://127.0.0.1:{port}",
                "KUBERNETES_PORT_443_TCP": f"tcp://127.0.0.1:{port}",
                "KUBERNETES_PORT_443_TCP_ADDR": "127.0.0.1",
                "KUBERNETES_PORT_443_TCP_PORT": port,
                "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
                "FINETUNE_POD_DIR": str(self.dir),
                "FINETUNE_NODE_NAME": self.node_name,
            }
        )
        env.update(podspec.gpu_env(container))
        env.update(podspec.mounts_env(mounts))
        for ef in container.get("envFrom", []):
            prefix = ef.get("prefix", "")
            for kind in ("configMap", "secret"):
                ref = ef.get(f"{kind}Ref")
                if ref:
                    files = self.object_files(kind, ref["name"], None, bool(ref.get("optional")))
                    env.update({prefix + k: v.decode(errors="replace") for k, v in files.items()})
        for e in container.get("env", []):
            if "value" in e:
                val: str | None = podspec.expand(str(e["value"]), env)
            elif "valueFrom" in e:
                vf = e["valueFrom"]
                if "fieldRef" in vf:
                    val = podspec.field_value(pod, vf["fieldRef"]["fieldPath"])
                elif "resourceFieldRef" in vf:
                    val = podspec.resource_value(pod, vf["resourceFieldRef"], name, self.allocatable)
                elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                    kind = "configMap" if "configMapKeyRef" in vf else "secret"
                    ref = vf[f"{kind}KeyRef"]
                    val = self._lookup(kind, ref["name"], ref["key"], bool(ref.get("optional")))
                else:
                    val = None
            else:
                val = ""
            if val is not None:
                env[e["name"]] = podspec.rewrite_paths(val, mounts)
        if self.rendezvous_port is not None and "MASTER_PORT" in env:
            env["MASTER_PORT"] = str(self.rendezvous_port)
        return env
