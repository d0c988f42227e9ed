"""In which order the reconciler creates a FineTuneJob's children (``kinds.ChildKind.after``), without an API
server: each child waits only for what it needs, and never for someone else's object."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from finetune_operator.controller.clients import Kube
from finetune_operator.controller.handlers import Reconciler
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.reconcile import Settings
from finetune_operator.reconcile.children import Names
from tests.unit.test_reconciler_caches import KEY, StoreKube, _body


class GatedKube(StoreKube):
    """Creates of the ``held`` kinds wait at a gate, as a Role's and a RoleBinding's wait for the API server's
    escalation check (>= 100 ms each); ``posts`` then lists the creates that got through."""

    def __init__(self, body: dict[str, Any], held: set[str]) -> None:
        super().__init__(body)
        self.held = held
        self.gate = asyncio.Event()

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        if manifest["kind"] in self.held:
            await self.gate.wait()
        return await super().create(manifest)


def _first_reconcile(kube: StoreKube, gated: GatedKube | None = None) -> list[str]:
    """The job's first reconcile; returns the kinds POSTed before the gate opened (all of them without one)."""
    reconciler = Reconciler(cast(Kube, kube), Settings(), OperatorMetrics())

    async def scenario() -> list[str]:
        reconciler.saw(_body())
        run = asyncio.ensure_future(reconciler.reconcile(*KEY))
        for _ in range(200):  # every create that does not wait at the gate gets through
            await asyncio.sleep(0)
        through = list(kube.posts)
        if gated is not None:
            gated.gate.set()
        await run
        return through

    return asyncio.run(scenario())


def test_the_trainer_job_does_not_wait_for_the_trainers_role_and_binding() -> None:
    """The Job waited for its Role and then its RoleBinding: two escalation checks, the whole 200 ms from
    create to Job one at a time, and up to seconds each under load. The RoleBinding still waits for the Role."""
    kube = GatedKube(_body(), held={"Role"})
    through = _first_reconcile(kube, kube)
    assert {"ConfigMap", "ServiceAccount", "Job"} <= set(through), through
    assert "RoleBinding" not in through, "a RoleBinding is created once its Role is"
    assert sorted(kube.posts) == sorted(["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job"])


def _foreign(kind: str, name: str) -> tuple[tuple[str, str, str], dict[str, Any]]:
    """Someone else's object with the name a child of job ``a`` has."""
    return (kind, "ml", name), {"kind": kind, "metadata": {"name": name, "namespace": "ml", "uid": "theirs"}}


def test_a_child_that_is_not_ours_keeps_what_comes_after_it_uncreated() -> None:
    names = Names.of("a")
    kube = StoreKube(_body())
    kube.objects.update([_foreign("ConfigMap", names.config_map)])
    _first_reconcile(kube)
    assert "Job" not in kube.posts, "no Job mounts a config that is not ours"
    assert "RoleBinding" in kube.posts, "the rest is made: it needs nothing of the ConfigMap"

    kube = StoreKube(_body())
    kube.objects.update([_foreign("Role", names.role)])
    _first_reconcile(kube)
    assert "RoleBinding" not in kube.posts, "never a binding to someone else's Role"
    stalled = kube.objects[("FineTuneJob", "ml", "a")]["status"]
    assert f"Role {names.role}" in stalled["message"], stalled
