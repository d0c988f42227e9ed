"""The API server under its in-cluster name, ``https://kubernetes.default.svc:443``, on the local node.

In a cluster, pods reach the API server through the ``kubernetes`` Service: cluster DNS resolves
``kubernetes.default.svc`` and kube-proxy routes port 443. Clients such as kopf's own in-cluster
login use that name and nothing else. Locally there is neither DNS nor Service routing, so:

- the node agent listens on a loopback address of its own, ``127.A.B.1:443`` where ``A.B`` is
  the API server's port (unique among the clusters on a machine, so concurrent clusters never
  collide), and forwards every connection to the API server: TLS stays end to end, and the
  serving certificate already names ``kubernetes.default.svc``, so the service-account CA
  verifies it;
- every container gets an ``/etc/hosts`` (bind-mounted in its mount namespace) that maps the
  Service's names to that address.

Binding port 443 needs root, as mount namespaces do; without it the agent logs why and pods
keep ``KUBERNETES_SERVICE_HOST``/``PORT`` (the real address), which the standard clients use.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

SERVICE_NAMES = ("kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")
SERVICE_PORT = 443


def service_address(api_port: int) -> str:
    """The cluster's loopback stand-in for the ``kubernetes`` Service IP (never 127.0.0.1)."""
    return f"127.{api_port >> 8}.{api_port & 0xFF}.1"


def write_hosts(path: Path, address: str) -> Path:
    """The pods' ``/etc/hosts``: the host's entries plus the Service names at ``address``."""
    try:
        base = Path("/etc/hosts").read_text()
    except OSError:
        base = "127.0.0.1\tlocalhost\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = f"{address}\t{' '.join(SERVICE_NAMES)}"
    path.write_text(f"{base.rstrip()}\n# the kubernetes Service (finetune_localcluster.apiservice)\n{entry}\n")
    return path


class Forwarder:
    """Accepts on ``address:443`` and pipes each connection to the API server, both ways."""

    def __init__(self, address: str, upstream: tuple[str, int]) -> None:
        self.address = address
        self.upstream = upstream
        self.sock = socket.create_server((address, SERVICE_PORT), backlog=128)
        threading.Thread(target=self._accept, name="apiservice", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            conn.close()
            return
        up.settimeout(None)
        threading.Thread(target=_pipe, args=(up, conn), daemon=True).start()
        _pipe(conn, up)

    def close(self) -> None:
        self.sock.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy until either side closes, then close both (long watches stay open as long as they need)."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
