"""A minimal JSON client for the Kubernetes API, used by the node agent.

The agent speaks raw JSON on purpose: it must round-trip every pod field it does not
know about, start fast (no generated client to import), and not depend on which
``kubernetes`` client generation is installed.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]


class ApiError(RuntimeError):
    """Non-2xx answer from the API server."""

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body
        try:
            msg = str(json.loads(body).get("message", body))
        except ValueError:
            msg = body
        super().__init__(f"HTTP {status}: {msg}")


class Rest:
    """Thread-safe: each thread keeps its own keep-alive connection."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, token: str | None = None) -> None:
        self.host = host
        self.port = port
        self.ctx = ctx
        self.token = token
        self._local = threading.local()

    @classmethod
    def from_kubeconfig(cls, path: Path) -> Rest:
        """Build from a kubeconfig written by :mod:`finetune_localcluster.kubeconfig`."""
        doc = yaml.safe_load(path.read_text())
        cluster = doc["clusters"][0]["cluster"]
        user = doc["users"][0]["user"]
        ctx = ssl.create_default_context(cafile=cluster["certificate-authority"])
        ctx.load_cert_chain(user["client-certificate"], user["client-key"])
        url = urllib.parse.urlparse(cluster["server"])
        return cls(url.hostname or "127.0.0.1", url.port or 443, ctx)

    def _conn(self) -> http.client.HTTPSConnection:
        c: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
        if c is None:
            c = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)
            self._local.conn = c
        return c

    def _headers(self, content_type: str = "application/json") -> dict[str, str]:
        h = {"Accept": "application/json", "Content-Type": content_type, "User-Agent": "finetune-node-agent"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def request(
        self, method: str, path: str, body: Obj | None = None, *, content_type: str = "application/json"
    ) -> Obj:
        """Send one request; retry once on a dropped keep-alive connection."""
        data = json.dumps(body).encode() if body is not None else None
        for attempt in (0, 1):
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=self._headers(content_type))
                resp = conn.getresponse()
                raw = resp.read().decode(errors="replace")
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
                continue
            if resp.status >= 300:
                raise ApiError(resp.status, raw)
            return dict(json.loads(raw)) if raw else {}
        raise AssertionError("unreachable")

    def get(self, path: str) -> Obj:
        return self.request("GET", path)

    def post(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body)

    def put(self, path: str, body: Obj) -> Obj:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Obj, kind: str = "strategic-merge-patch") -> Obj:
        return self.request("PATCH", path, body, content_type=f"application/{kind}+json")

    def delete(self, path: str, body: Obj | None = None) -> Obj:
        return self.request("DELETE", path, body)

    def watch(self, path: str, timeout: int = 300) -> Iterator[Obj]:
        """Yield watch events (``{"type", "object"}``) until the server ends the stream."""
        sep = "&" if "?" in path else "?"
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout + 30)
        try:
            conn.request(
                "GET", f"{path}{sep}watch=1&timeoutSeconds={timeout}&allowWatchBookmarks=true", headers=self._headers()
            )
            resp = conn.getresponse()
            if resp.status >= 300:
                raise ApiError(resp.status, resp.read().decode(errors="replace"))
            while True:
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    yield dict(json.loads(line))
        finally:
            conn.close()


def q(value: str) -> str:
    """URL-quote a query value."""
    return urllib.parse.quote(value, safe="")
