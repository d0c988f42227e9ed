"""The kubelet's ``/containerLogs`` endpoint, so ``kubectl logs`` works on the local node.

The API server proxies ``pods/log`` to ``https://<node InternalIP>:<kubeletEndpoint port>``
with its kubelet client certificate; we require a client certificate signed by the
cluster CA and serve the container log files the agent writes.
"""

from __future__ import annotations

import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def find_log(state_dir: Path, ns: str, pod: str, container: str) -> Path | None:
    """The newest log of ``container`` among pods named ``ns/pod`` (any uid)."""
    dirs = sorted((state_dir / "pods").glob(f"{ns}_{pod}_*"), key=lambda p: p.stat().st_mtime)
    for d in reversed(dirs):
        f = d / f"{container}.log"
        if f.exists():
            return f
    return None


def _tail(data: bytes, lines: int) -> bytes:
    if lines <= 0:
        return b""
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


class LogServer:
    """HTTPS server on 127.0.0.1; ``running(ns, pod, container)`` says whether to keep following."""

    def __init__(
        self,
        state_dir: Path,
        cert: Path,
        key: Path,
        client_ca: Path,
        running: Callable[[str, str, str], bool],
    ) -> None:
        self.state_dir = state_dir
        self.running = running
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet
                return

            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "only /containerLogs/{ns}/{pod}/{container} is served")
                    return
                _, ns, pod, container = parts
                query = urllib.parse.parse_qs(url.query)
                f = find_log(server.state_dir, ns, pod, container)
                if f is None:
                    self.send_error(404, f"no log for {ns}/{pod}/{container} on this node")
                    return
                data = f.read_bytes()
                if "tailLines" in query:
                    data = _tail(data, int(query["tailLines"][0]))
                if "limitBytes" in query:
                    data = data[: int(query["limitBytes"][0])]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                follow = query.get("follow", ["false"])[0] == "true"
                if not follow:
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.end_headers()
                self.wfile.write(data)
                offset = f.stat().st_size
                try:
                    while True:
                        self.wfile.flush()
                        size = f.stat().st_size
                        if size > offset:
                            with f.open("rb") as fh:
                                fh.seek(offset)
                                self.wfile.write(fh.read(size - offset))
                            offset = size
                        elif not server.running(ns, pod, container):
                            return
                        time.sleep(0.2)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, name="logserver", daemon=True).start()
