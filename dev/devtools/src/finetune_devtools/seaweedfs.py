"""SeaweedFS, the project's S3 server: built from the Go module proxy, run on the local machine.

Tests and the examples read and write ``s3://`` against a real S3-compatible server with
authentication on (so the credentials path is proven), never a mock. SeaweedFS builds from the
module proxy; ``go install`` refuses its module (its go.mod has replace directives), so the
module is downloaded, copied out of the read-only module cache and ``./weed`` is built inside the
copy (minutes on 2 cores, once per machine and version) into
``~/.cache/finetune-operator/seaweedfs/VERSION/weed``.

``weed server -s3`` runs master, volume server, filer and the S3 gateway in one process. Every
port is chosen free on 127.0.0.1: pods of the local node run on the host network (process and
podman modes alike), so they reach the endpoint on loopback too (a container's signed GET is tested in
tests/integration/controlplane/test_containers.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from finetune_localcluster import procs
from finetune_localcluster.build import cache_root, go_build_into_cache, go_module_dir
from finetune_localcluster.cluster import ClusterError, free_port

SEAWEEDFS_VERSION = "v0.0.0-20261109003541-7506e5f91cd6"
MODULE = "github.com/seaweedfs/seaweedfs"


def seaweedfs_dir(version: str = SEAWEEDFS_VERSION) -> Path:
    """Where SeaweedFS ``version`` lives once built."""
    return cache_root().parent / "seaweedfs" / version


def ensure_seaweedfs(version: str = SEAWEEDFS_VERSION, *, log: bool = True) -> Path:
    """The cached ``weed`` binary, building it from the Go module proxy first if needed."""
    override = os.environ.get("FINETUNE_WEED")
    if override:
        return Path(override)
    final = seaweedfs_dir(version)
    if (final / "weed").is_file():
        return final / "weed"
    if log:
        print(f"[seaweedfs build] {MODULE}@{version} ./weed (~8 min once; cached)", file=sys.stderr)
    start = time.monotonic()
    module = go_module_dir(MODULE, version, final.parent)
    source = final.parent / f".src-{version}-{os.getpid()}"
    shutil.rmtree(source, ignore_errors=True)
    # the module cache is read-only and `go install` refuses modules with replace directives: build in a copy
    shutil.copytree(module, source, symlinks=True)
    subprocess.run(["chmod", "-R", "u+w", str(source)], check=True)
    try:
        go_build_into_cache(
            final,
            f"SeaweedFS {version}",
            lambda tmp: (["build", "-ldflags=-s -w", "-o", str(tmp / "weed"), "./weed"], {"CGO_ENABLED": "0"}),
            cwd=source,
        )
    finally:
        shutil.rmtree(source, ignore_errors=True)
    if log:
        print(f"[seaweedfs build] built in {time.monotonic() - start:.0f} s -> {final / 'weed'}", file=sys.stderr)
    return final / "weed"


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3 server: where it answers and the one identity it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def shell(self) -> str:
        """Shell-sourceable lines (what ``make s3-up`` prints last)."""
        return (
            f"S3_ENDPOINT={self.endpoint}\n"
            f"AWS_ACCESS_KEY_ID={self.access_key}\n"
            f"AWS_SECRET_ACCESS_KEY={self.secret_key}\n"
        )

    def env(self) -> dict[str, str]:
        return {
            "S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }


class SeaweedFS:
    """One ``weed server -s3`` rooted at ``state_dir`` (data, identities, log, pid and endpoint files)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.log = state_dir / "weed.log"
        self.pidfile = state_dir / "weed.pid"
        self.info = state_dir / "endpoint.json"

    def running(self) -> S3Endpoint | None:
        pid = procs.read_pidfile(self.pidfile)
        if pid is None or not procs.alive(pid) or not self.info.exists():
            return None
        return S3Endpoint(**json.loads(self.info.read_text()))

    def up(self, timeout: float = 120.0) -> S3Endpoint:
        """Start the server (or return the one already running here), authentication on."""
        found = self.running()
        if found is not None:
            return found
        weed = ensure_seaweedfs()
        (self.state_dir / "data").mkdir(parents=True, exist_ok=True)
        endpoint = S3Endpoint(
            f"http://127.0.0.1:{free_port()}", "finetune" + secrets.token_hex(4), secrets.token_urlsafe(24)
        )
        identities = {
            "identities": [
                {
                    "name": "finetune-admin",
                    "credentials": [{"accessKey": endpoint.access_key, "secretKey": endpoint.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        config = self.state_dir / "s3-identities.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        ports = {name: free_port() for name in ("master", "volume", "filer")}
        grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        args = [
            str(weed),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.state_dir / 'data'}",
            "-volume.max=0",
            "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={grpc['master']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={grpc['volume']}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={grpc['filer']}",
            "-s3",
            f"-s3.port={endpoint.endpoint.rsplit(':', 1)[1]}",
            f"-s3.port.grpc={grpc['s3']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
        ]
        with self.log.open("ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.write_pidfile(self.pidfile, proc.pid)
        self._wait(proc, endpoint, timeout)
        self.info.write_text(json.dumps(endpoint.__dict__))
        return endpoint

    def _wait(self, proc: subprocess.Popen[bytes], endpoint: S3Endpoint, timeout: float) -> None:
        """Until an unsigned request is refused with 403 (the gateway answers, authentication is on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(
                    f"SeaweedFS exited with {proc.returncode}; last lines of {self.log}:\n{procs.tail(self.log)}"
                )
            try:
                urllib.request.urlopen(endpoint.endpoint + "/", timeout=2)
            except urllib.error.HTTPError as error:
                if error.code == 403:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.down()
        raise ClusterError(f"SeaweedFS did not answer on {endpoint.endpoint} in {timeout:.0f} s; see {self.log}")

    def down(self) -> bool:
        """Stop the server; False when none ran. Its data stays in the state dir."""
        pid = procs.read_pidfile(self.pidfile)
        self.info.unlink(missing_ok=True)
        if pid is None or not procs.alive(pid):
            return False
        procs.kill_group(pid, grace=3.0)  # its data is a test's or a demo's: nothing to flush for long
        self.pidfile.unlink(missing_ok=True)
        return True
