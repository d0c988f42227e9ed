"""The operator's API client waits as told when the API server sheds load (429 Retry-After).

API priority and fairness answers 429 with Retry-After under overload; a client that treats it
as an error turns a busy API server into failed reconciles. A local HTTP server plays the
overloaded API server (only the status code and header matter here)."""

from __future__ import annotations

import asyncio
import time

import kopf
from aiohttp import web

from finetune_operator.controller.clients import Kube


async def _throttled_then_served(answers: list[int]) -> tuple[float, dict[str, object] | None]:
    async def handler(request: web.Request) -> web.Response:
        answers.append(429 if len(answers) < 2 else 200)
        if answers[-1] == 429:
            return web.Response(status=429, headers={"Retry-After": "1"}, text="{}")
        return web.json_response({"metadata": {"name": "x", "namespace": "ns"}})

    app = web.Application()
    app.router.add_get("/apis/batch/v1/namespaces/ns/jobs/x", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    kube = Kube(lambda: kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}"))
    try:
        started = time.monotonic()
        job = await kube.read_job("ns", "x")
        return time.monotonic() - started, job
    finally:
        await kube.close()
        await runner.cleanup()


def test_429_is_retried_after_the_time_the_server_asks_for() -> None:
    answers: list[int] = []
    elapsed, job = asyncio.run(_throttled_then_served(answers))
    assert answers == [429, 429, 200]
    assert job is not None and job["metadata"]["name"] == "x"
    assert elapsed >= 2.0, "Retry-After: 1, twice"
