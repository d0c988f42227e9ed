"""The reconciler shell both kinds share: per-object locks, conflict retries, timing, events, resync.

A kind (FineTuneJob in ``handlers``, FineTuneSweep in ``sweep_handlers``) subclasses ``ObjectLoop``
and brings only what is its own: how one object is observed, decided and carried out
(``reconcile``), what it forgets, and what a resync round checks first. Everything about *when*
and *how safely* a reconcile runs lives here, once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import kopf

from finetune_operator.controller.clients import CONFLICT_RETRIES, ApiError, ConflictError, Kube
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.reconcile.status import Event

Manifest = dict[str, Any]
Key = tuple[str, str]
"""(namespace, name) of a reconciled object."""


def _nothing() -> None:
    return None


class ObjectLoop:
    """Serialises the reconciles of each object and runs them with retries, timing and a resync round.

    ``coalesce``: a reconcile asked for while one of the same object is in flight does not queue
    behind it; the one in flight goes round once more (a burst of child events costs one or two
    reconciles). Without it every call runs, in arrival order, which a kind needs when its calls
    carry arguments (a FineTuneJob's ``ensure_children``). ``max_concurrent`` bounds the reconciles
    under way at once across objects; ``resync_concurrency`` the ones a resync round starts."""

    def __init__(
        self,
        kube: Kube,
        metrics: OperatorMetrics,
        *,
        kind: str,
        log: logging.Logger,
        coalesce: bool = False,
        max_concurrent: int = 64,
        resync_concurrency: int = 16,
    ) -> None:
        self.kube = kube
        self.metrics = metrics
        self.kind = kind
        self.log = log
        self.known: set[Key] = set()
        self.resync_task: asyncio.Task[None] | None = None
        self._coalesce = coalesce
        self._locks: dict[Key, asyncio.Lock] = {}
        self._lock_users: dict[Key, int] = {}
        """Coroutines holding or awaiting each lock: it goes once none do."""
        self._dirty: set[Key] = set()
        self._slots = asyncio.Semaphore(max_concurrent)
        self._resync_concurrency = resync_concurrency

    # What a kind brings.

    async def reconcile(self, namespace: str, name: str) -> None:
        """Reconcile one object on its watch event."""
        raise NotImplementedError

    async def reconcile_key(self, key: Key, flagged: bool) -> None:
        """One resync reconcile of ``key``; ``flagged`` when ``before_resync`` named it."""
        raise NotImplementedError

    async def before_resync(self) -> set[Key]:
        """Checks made once per resync round; returns the objects that need more than a plain reconcile."""
        return set()

    def after_resync(self) -> None:
        """Called when a resync round's reconciles are all done (or it failed)."""

    def forget_key(self, key: Key) -> None:
        """Drop a kind's own caches and metric series of an object that is gone."""

    def saw(self, body: Manifest) -> bool:
        """Take note of the object from its watch event; False when the event needs no reconcile."""
        return True

    # The shell.

    @asynccontextmanager
    async def _lock_of(self, key: Key) -> AsyncIterator[asyncio.Lock]:
        """The object's lock, kept while anyone holds or awaits it and dropped after its last use: nothing
        else needs it, and one per object kept would be ~0.8 KB a job (and one per deleted job, from a Job's
        DELETED event after its FineTuneJob's)."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._lock_users[key] = self._lock_users.get(key, 0) + 1
        try:
            yield lock
        finally:
            self._lock_users[key] -= 1
            if not self._lock_users[key]:
                del self._lock_users[key]
                del self._locks[key]

    @asynccontextmanager
    async def locked(self, key: Key) -> AsyncIterator[None]:
        """Hold the object's lock: no reconcile of it runs meanwhile."""
        async with self._lock_of(key) as lock, lock:
            yield

    async def serially(
        self, key: Key, attempt: Callable[[], Awaitable[None]], stale: Callable[[], None] = _nothing
    ) -> None:
        """Run ``attempt`` under the object's lock, timed, again on a conflict.

        Every status write is conditional on the resourceVersion it was decided on, so a decision
        made on a stale copy is refused with ``ConflictError``: ``stale`` drops that copy and the
        attempt decides again, up to ``CONFLICT_RETRIES`` times."""
        if not self._coalesce:
            async with self.locked(key), self._slots:
                await self._timed(attempt, stale)
            return
        async with self._lock_of(key) as lock:
            if lock.locked():
                self._dirty.add(key)  # the reconcile in flight goes round once more
                return
            async with lock:
                self._dirty.add(key)
                while key in self._dirty:
                    self._dirty.discard(key)
                    async with self._slots:
                        await self._timed(attempt, stale)

    async def _timed(self, attempt: Callable[[], Awaitable[None]], stale: Callable[[], None]) -> None:
        started = time.perf_counter()
        try:
            for round_ in range(CONFLICT_RETRIES):
                try:
                    await attempt()
                    return
                except ConflictError:
                    stale()
                    if round_ == CONFLICT_RETRIES - 1:
                        raise
        except Exception:
            self.metrics.reconcile_errors.inc()
            raise
        finally:
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)

    def forget(self, namespace: str, name: str) -> None:
        """Drop everything about an object; call with its lock held (``drop`` takes it)."""
        key = (namespace, name)
        self.known.discard(key)
        self._dirty.discard(key)
        self.forget_key(key)

    async def drop(self, namespace: str, name: str) -> None:
        """Forget a deleted object after any reconcile of it in flight: one finishing after ``forget``
        would put its caches and metrics series back."""
        key = (namespace, name)
        async with self.locked(key):
            self.forget(namespace, name)

    async def record(self, body: Manifest, patch: Manifest, events: Iterable[Event], now: datetime) -> Manifest | None:
        """Write a status patch (if any) conditional on the body's resourceVersion, then post the events.

        Returns the object as stored (the body itself when there was nothing to write), or None when
        it is gone, which forgets it."""
        metadata = body["metadata"]
        namespace, name = metadata["namespace"], metadata["name"]
        stored: Manifest | None = body
        if patch:
            stored = await self.kube.patch_status(
                namespace, name, patch, metadata.get("resourceVersion"), kind=self.kind
            )
            if stored is None:
                self.forget(namespace, name)  # deleted meanwhile: nothing to record
                return None
        await asyncio.gather(*(self.post(body, event, now) for event in events))
        return stored

    async def post(self, body: Manifest, event: Event, now: datetime) -> None:
        """Post an event on the object; best effort, since the status already says it."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        self.log.info("%s/%s %s: %s", namespace, name, event.reason, event.message)
        try:
            await self.kube.post_event(body, event.type, event.reason, event.message, now)
        except ApiError as error:
            self.log.warning("could not post event %s on %s/%s: %s", event.reason, namespace, name, error.reason)

    async def resync_round(self) -> None:
        """Reconcile every known object once: nothing stays wrong longer than one round (a missed
        event, a restart, a stall only time reveals). One object's failure does not stop the others."""
        try:
            flagged = await self.before_resync()
        except Exception:
            self.log.exception("checking the caches failed; retrying next round")
            flagged = set()
        keys = iter(sorted(self.known))

        async def worker() -> None:
            # ``resync_concurrency`` workers share one walk of the objects, instead of a task per object waiting
            # on a semaphore (a thousand tasks and futures made, queued and woken every round).
            for key in keys:
                # A reconcile with nothing to fetch never yields to the loop: without this the whole round ran in
                # one pass (1.5 s at a thousand jobs, while new jobs' creates waited behind it).
                await asyncio.sleep(0)
                try:
                    await self.reconcile_key(key, key in flagged)
                except Exception:
                    self.log.exception("resync of %s %s/%s failed; retrying next round", self.kind, *key)

        try:
            await asyncio.gather(*(worker() for _ in range(self._resync_concurrency)))
        finally:
            self.after_resync()

    async def resync_forever(self, interval: float) -> None:
        """A resync round every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await self.resync_round()

    def start_resync(self, interval: float) -> None:
        """Start the resync loop (kopf's startup); ``stop_resync`` at its cleanup."""
        self.resync_task = asyncio.create_task(self.resync_forever(interval))

    def stop_resync(self) -> None:
        if self.resync_task is not None:
            self.resync_task.cancel()


def register_kind(
    registry: kopf.OperatorRegistry, loop: ObjectLoop, group: str, version: str, plural: str, interval: float
) -> None:
    """Reconcile the kind's objects on their events, and run ``loop``'s resync while the operator runs.

    One loop for all objects of a kind instead of a kopf timer per object: timers need a finalizer on
    every object, and ownerReferences already make deletion clean without one."""

    @kopf.on.event(group, version, plural, id=f"{loop.kind}-event", registry=registry)
    async def object_event(type: str, body: kopf.Body, **_: Any) -> None:
        metadata = body["metadata"]
        key = (metadata["namespace"], metadata["name"])
        if type == "DELETED" or metadata.get("deletionTimestamp"):
            await loop.drop(*key)
        elif loop.saw(dict(body)):
            await loop.reconcile(*key)

    @kopf.on.startup(id=f"start-resync-{loop.kind}", registry=registry)
    async def start_resync(**_: Any) -> None:
        loop.start_resync(interval)

    @kopf.on.cleanup(id=f"stop-resync-{loop.kind}", registry=registry)
    async def stop_resync(**_: Any) -> None:
        loop.stop_resync()
