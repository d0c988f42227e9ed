"""``/metrics`` behind Kubernetes authentication and authorization, as kube-rbac-proxy does it, in-process.

The operator's series name every watched job by namespace and name: a tenant should not read another's.
With ``--metrics-auth=kubernetes`` each scrape must carry a bearer token; the API server says who it
belongs to (TokenReview) and whether that identity may ``get`` the non-resource URL ``/metrics``
(SubjectAccessReview), the same check the API server and kubelets make for their own ``/metrics``, so
Prometheus' usual ClusterRole (``nonResourceURLs: ["/metrics"], verbs: ["get"]``) is all it needs. A
verdict is kept for ``CACHE_SECONDS`` per token, so a scrape every few seconds costs two API calls a
minute. Chosen over a kube-rbac-proxy sidecar: no second image to build, ship and patch; the operator
already holds API credentials.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

import kopf

CACHE_SECONDS = 60.0
MAX_CACHED = 1024
METRICS_PATH = "/metrics"

Verdict = int
"""HTTP status of a scrape: 200 allowed, 401 no or unknown token, 403 known but not allowed."""


class KubernetesAuth:
    """Bearer token -> verdict, asked of the API server with the operator's own credentials (which hold
    ``create`` on tokenreviews and subjectaccessreviews: ``rbac.OPERATOR_RULES``)."""

    def __init__(self, credentials: Callable[[], kopf.ConnectionInfo], timeout: float = 5.0) -> None:
        self._credentials = credentials
        self._info = credentials()
        self._timeout = timeout
        self._lock = threading.Lock()
        self._verdicts: dict[str, tuple[Verdict, float]] = {}

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(2):
            info = self._info
            request = urllib.request.Request(
                info.server.rstrip("/") + path,
                data=json.dumps(body).encode(),
                headers={**info.as_http_headers(), "Content-Type": "application/json"},
                method="POST",
            )
            context: ssl.SSLContext = info.as_ssl_context()
            try:
                with urllib.request.urlopen(request, timeout=self._timeout, context=context) as response:
                    answer: dict[str, Any] = json.loads(response.read())
                    return answer
            except urllib.error.HTTPError as error:
                if error.code != 401 or attempt:
                    raise
                self._info = self._credentials()  # a rotated service account token
        raise AssertionError("unreachable")

    def _review(self, token: str) -> Verdict:
        review = self._post("/apis/authentication.k8s.io/v1/tokenreviews", {"spec": {"token": token}})
        status = review.get("status") or {}
        if not status.get("authenticated"):
            return 401
        user = status.get("user") or {}
        access = self._post(
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            {
                "spec": {
                    "user": user.get("username"),
                    "uid": user.get("uid"),
                    "groups": user.get("groups") or [],
                    "extra": user.get("extra") or {},
                    "nonResourceAttributes": {"path": METRICS_PATH, "verb": "get"},
                }
            },
        )
        return 200 if (access.get("status") or {}).get("allowed") else 403

    def verdict(self, authorization: str | None) -> Verdict:
        """The verdict on an ``Authorization`` header; an API server that cannot answer refuses (503 is not
        told apart: the scrape fails either way, and nothing is served unchecked)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return 401
        key = hashlib.sha256(token.strip().encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            cached = self._verdicts.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            verdict = self._review(token.strip())
        except (OSError, ValueError):
            return 401
        with self._lock:
            if len(self._verdicts) >= MAX_CACHED:
                self._verdicts.clear()
            self._verdicts[key] = (verdict, now + CACHE_SECONDS)
        return verdict


_REASONS = {401: "401 Unauthorized", 403: "403 Forbidden"}


def guarded(app: Callable[..., Iterable[bytes]], auth: KubernetesAuth) -> Callable[..., Iterable[bytes]]:
    """The WSGI ``app`` behind ``auth``: a refused scrape gets 401/403 and no series."""

    def checked(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        verdict = auth.verdict(environ.get("HTTP_AUTHORIZATION"))
        if verdict != 200:
            headers = [("Content-Type", "text/plain")]
            if verdict == 401:
                headers.append(("WWW-Authenticate", 'Bearer realm="finetune-operator"'))
            start_response(_REASONS[verdict], headers)
            return [_REASONS[verdict].encode() + b"\n"]
        return app(environ, start_response)

    return checked
