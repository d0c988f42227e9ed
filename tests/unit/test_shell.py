"""The reconciler shell both kinds share (``finetune_operator.controller.shell``): locks, conflict retries, timing,
the status write with its events, and the resync round, with a fake API client.

The same behaviour is proven on the real API server by tests/integration/test_resync.py and the e2e
tests of both kinds (tests/e2e/test_operator.py, test_hardening.py, test_sweeps.py); here each rule
is reached alone."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from finetune_operator.controller.clients import CONFLICT_RETRIES, ApiError, ConflictError, Kube
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.controller.shell import Key, ObjectLoop
from finetune_operator.reconcile.status import Event

NOW = datetime(2026, 1, 1, tzinfo=UTC)
BODY: dict[str, Any] = {"metadata": {"namespace": "ml", "name": "a", "resourceVersion": "7"}}


class FakeKube:
    """Records status patches and events; answers as told."""

    def __init__(self, stored: dict[str, Any] | None = BODY, event_error: bool = False) -> None:
        self.stored, self.event_error = stored, event_error
        self.patches: list[tuple[str, str, dict[str, Any], str | None, str]] = []
        self.events: list[str] = []

    async def patch_status(
        self, namespace: str, name: str, patch: dict[str, Any], version: str | None, kind: str
    ) -> dict[str, Any] | None:
        self.patches.append((namespace, name, patch, version, kind))
        return self.stored

    async def post_event(self, body: dict[str, Any], type_: str, reason: str, message: str, now: datetime) -> None:
        if self.event_error:
            raise ApiError(403, "Forbidden", "")
        self.events.append(reason)


class Loop(ObjectLoop):
    """A kind whose reconcile runs a given coroutine factory and remembers what it was asked."""

    def __init__(self, kube: FakeKube | None = None, **options: Any) -> None:
        super().__init__(
            cast(Kube, kube or FakeKube()), OperatorMetrics(), kind="Thing", log=logging.getLogger("test"), **options
        )
        self.forgotten: list[Key] = []
        self.resynced: list[tuple[Key, bool]] = []
        self.flagged: set[Key] = set()

    def forget_key(self, key: Key) -> None:
        self.forgotten.append(key)

    async def before_resync(self) -> set[Key]:
        return self.flagged

    async def reconcile_key(self, key: Key, flagged: bool) -> None:
        self.resynced.append((key, flagged))
        if key[1] == "broken":
            raise RuntimeError("boom")


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


def errors(loop: ObjectLoop) -> float:
    return loop.metrics.registry.get_sample_value("finetune_reconcile_errors_total") or 0.0


def timed(loop: ObjectLoop) -> float:
    return loop.metrics.registry.get_sample_value("finetune_reconcile_duration_seconds_count") or 0.0


def test_a_conflict_drops_the_stale_copy_and_decides_again() -> None:
    loop, calls, stale = Loop(), [], []

    async def attempt() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise ConflictError(409, "Conflict", "")

    run(loop.serially(("ml", "a"), attempt, lambda: stale.append(1)))
    assert (len(calls), len(stale), errors(loop), timed(loop)) == (3, 2, 0, 1)


def _always(error: ApiError) -> tuple[int, float, float]:
    """(attempts, errors counted, reconciles timed) of a reconcile that always raises ``error``."""
    loop, calls = Loop(), []

    async def attempt() -> None:
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        run(loop.serially(("ml", "a"), attempt))
    return len(calls), errors(loop), timed(loop)


def test_conflicts_beyond_the_retries_raise_and_count_as_an_error() -> None:
    assert _always(ConflictError(409, "Conflict", "")) == (CONFLICT_RETRIES, 1, 1)


def test_another_error_is_not_retried() -> None:
    assert _always(ApiError(500, "Internal", "")) == (1, 1, 1)


async def _overlaps(loop: ObjectLoop, keys: list[Key]) -> tuple[int, int]:
    """(reconciles run, the most under way at once) for one call per key, all started together."""
    running, most, runs = 0, 0, 0

    async def attempt() -> None:
        nonlocal running, most, runs
        running += 1
        runs += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1

    await asyncio.gather(*(loop.serially(key, attempt) for key in keys))
    return runs, most


def test_reconciles_of_one_object_never_overlap_and_all_run() -> None:
    assert run(_overlaps(Loop(), [("ml", "a")] * 3)) == (3, 1)


def test_reconciles_of_different_objects_run_together_up_to_the_bound() -> None:
    keys = [("ml", str(i)) for i in range(4)]
    assert run(_overlaps(Loop(), keys)) == (4, 4)
    assert run(_overlaps(Loop(max_concurrent=2), keys)) == (4, 2)


def test_coalescing_reconciles_asked_for_meanwhile_cost_one_more_round() -> None:
    assert run(_overlaps(Loop(coalesce=True), [("ml", "a")] * 5)) == (2, 1)


def test_drop_waits_for_the_reconcile_in_flight() -> None:
    """A reconcile finishing after ``forget`` would put the object's caches and series back."""
    loop = Loop()
    order: list[str] = []

    async def attempt() -> None:
        loop.known.add(("ml", "a"))
        await asyncio.sleep(0.01)
        order.append("reconciled")

    async def scenario() -> None:
        reconcile = asyncio.create_task(loop.serially(("ml", "a"), attempt))
        await asyncio.sleep(0)
        await loop.drop("ml", "a")
        order.append("dropped")
        await reconcile

    run(scenario())
    assert order == ["reconciled", "dropped"]
    assert loop.known == set() and loop.forgotten == [("ml", "a")] and loop._locks == {}


def test_a_reconcile_of_an_object_no_longer_known_leaves_no_lock_behind() -> None:
    """A trainer Job's DELETED event comes after its FineTuneJob's (the garbage collector deletes it): its
    reconcile finds the job gone and forgets it, and its lock must go too, else one stays per deleted job.
    A known object's lock goes too once nobody holds or awaits it: a lock kept per job is ~0.8 KB."""
    for coalesce in (False, True):
        loop = Loop(coalesce=coalesce)

        async def gone(loop: Loop = loop) -> None:
            loop.forget("ml", "gone")

        async def there(loop: Loop = loop) -> None:
            loop.known.add(("ml", "a"))

        run(loop.serially(("ml", "gone"), gone))
        run(loop.serially(("ml", "a"), there))
        assert loop._locks == {}, f"coalesce={coalesce}"
        assert loop._lock_users == {}


def test_record_writes_conditionally_then_posts_the_events() -> None:
    kube = FakeKube()
    loop = Loop(kube)
    stored = run(loop.record(BODY, {"phase": "Running"}, [Event("Normal", "Started", "")], NOW))
    assert stored == BODY
    assert kube.patches == [("ml", "a", {"phase": "Running"}, "7", "Thing")] and kube.events == ["Started"]


def test_record_with_nothing_to_write_only_posts_events() -> None:
    kube = FakeKube()
    assert run(Loop(kube).record(BODY, {}, [Event("Normal", "Noted", "")], NOW)) is BODY
    assert kube.patches == [] and kube.events == ["Noted"]


def test_record_of_an_object_gone_meanwhile_forgets_it_and_posts_nothing() -> None:
    kube = FakeKube(stored=None)
    loop = Loop(kube)
    loop.known.add(("ml", "a"))
    assert run(loop.record(BODY, {"phase": "Running"}, [Event("Normal", "Started", "")], NOW)) is None
    assert loop.known == set() and loop.forgotten == [("ml", "a")] and kube.events == []


def test_an_event_refused_is_best_effort() -> None:
    assert run(Loop(FakeKube(event_error=True)).record(BODY, {}, [Event("Warning", "X", "")], NOW)) is BODY


def test_a_resync_round_reaches_every_object_despite_a_failure() -> None:
    loop = Loop()
    loop.known |= {("ml", "a"), ("ml", "broken"), ("ml", "c")}
    loop.flagged = {("ml", "c")}
    run(loop.resync_round())
    assert sorted(loop.resynced) == [(("ml", "a"), False), (("ml", "broken"), False), (("ml", "c"), True)]


def test_a_resync_round_lets_other_work_run_between_its_reconciles() -> None:
    """Reconciles with nothing to fetch (every job steady, its state cached) never yield: a thousand of them
    ran in one pass of the event loop, and a new job's create waited 1-1.5 s behind the round."""
    loop = Loop(resync_concurrency=4)
    loop.known |= {("ml", f"job-{i}") for i in range(100)}
    ticks: list[int] = []  # reconciles done, each time the other work ran

    async def scenario() -> None:
        round_ = asyncio.ensure_future(loop.resync_round())
        while not round_.done():
            ticks.append(len(loop.resynced))
            await asyncio.sleep(0)
        await round_

    run(scenario())
    runs_between = [later - earlier for earlier, later in zip(ticks, [*ticks[1:], 100], strict=True)]
    assert len(loop.resynced) == 100 and max(runs_between) <= 4, runs_between


def test_a_failed_cache_check_still_resyncs_every_object() -> None:
    class Failing(Loop):
        async def before_resync(self) -> set[Key]:
            raise ApiError(500, "Internal", "")

    loop = Failing()
    loop.known.add(("ml", "a"))
    run(loop.resync_round())
    assert loop.resynced == [(("ml", "a"), False)]
