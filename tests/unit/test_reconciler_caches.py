"""What the FineTuneJob reconciler keeps per job, and when an event is worth a reconcile
(``finetune_operator.controller.handlers.Reconciler``, without an API server: nothing here talks to one)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, cast

import pytest

from finetune_operator.controller import handlers
from finetune_operator.controller.clients import Kube
from finetune_operator.controller.handlers import Reconciler
from finetune_operator.controller.metrics import OperatorMetrics
from finetune_operator.reconcile import KueueWorkload, Observed, Settings, decide
from tests.unit.test_reconcile import NOW, job
from tests.unit.test_steer import trainer_of

KEY = ("ml", "a")


def _trainer_job(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "a-trainer", "namespace": "ml", "uid": "u1", "resourceVersion": "1", "labels": {}},
        "spec": {"suspend": True, "template": {"spec": {"containers": []}}},
        "status": status,
    }


def _reconciler() -> Reconciler:
    return Reconciler(cast(Kube, None), Settings(), OperatorMetrics())


def test_a_trainer_job_event_is_worth_a_reconcile_only_when_the_reconcile_would_see_something_new() -> None:
    reconciler = _reconciler()
    reconciler.known.add(KEY)
    assert reconciler.saw_trainer_job(KEY, _trainer_job()), "the first sight of it"
    same = {**_trainer_job(), "metadata": {**_trainer_job()["metadata"], "resourceVersion": "2"}}
    assert not reconciler.saw_trainer_job(KEY, same), "the Job we created, coming back as ADDED"
    suspended = [{"type": "Suspended", "status": "True"}]
    assert not reconciler.saw_trainer_job(KEY, _trainer_job(conditions=suspended)), "a condition it does not read"
    assert reconciler.saw_trainer_job(KEY, _trainer_job(active=1)), "a pod started"
    assert reconciler.saw_trainer_job(KEY, _trainer_job(active=1), deleted=True), "deleted"


def _body(name: str = "a") -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ml", "uid": "u0", "generation": 1, "resourceVersion": "5"},
        "spec": {
            "model": {"source": "file:///models/m", "task": "sequence-classification", "numLabels": 2},
            "dataset": {"source": "file:///data/d"},
            "output": {"location": "file:///out/a"},
        },
    }


def test_parsed_specs_are_kept_for_the_jobs_seen_last_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "PARSED_JOBS", 2)
    reconciler = _reconciler()
    for name in ("a", "b", "a", "c"):
        reconciler._parse(("ml", name), _body(name), keep=True)
    assert list(reconciler._parsed) == [("ml", "a"), ("ml", "c")]


def test_a_forgotten_job_leaves_nothing_in_the_reconcilers_caches() -> None:
    reconciler = _reconciler()
    body = _body()
    reconciler.saw(body)
    reconciler.saw_trainer_job(KEY, _trainer_job())
    assert reconciler._bodies.packed and reconciler._trainer_jobs.packed, "the caches this test checks"
    parsed = reconciler._parse(KEY, body, keep=True)
    assert reconciler._parse(KEY, {**body, "status": {"progress": {"step": 3}}}, keep=True) is parsed, (
        "status alone changed"
    )
    assert reconciler._parse(KEY, {**body, "metadata": {**body["metadata"], "generation": 2}}, keep=True) is not parsed

    async def drop() -> None:
        await reconciler.drop(*KEY)

    asyncio.run(drop())
    held = {
        name: value
        for name, cache in vars(reconciler).items()
        if isinstance(value := getattr(cache, "packed", cache), dict | set) and name != "namespaces" and value
    }
    assert held == {}, "a deleted job leaves nothing behind"


def test_kopf_keeps_no_memory_of_the_objects_it_passes_to_our_handlers() -> None:
    """kopf's default memories keep one record per object seen until its DELETED event (six per job);
    ours are on.event handlers only, which need none between events."""
    memories = handlers.NoMemories()

    async def recall() -> None:
        for uid in ("u1", "u2", "u1"):
            memory = await memories.recall(cast(Any, {"metadata": {"uid": uid, "name": "a", "namespace": "ml"}}))
            assert memory.memo is not None, "each event still gets a memory of its own"

    asyncio.run(recall())
    assert list(memories.iter_all_memories()) == []


class StoreKube:
    """An API server's store in a dict: creates (409 when it exists), reads, lists and status patches, each
    POST counted by kind."""

    def __init__(self, body: dict[str, Any]) -> None:
        key = ("FineTuneJob", "ml", body["metadata"]["name"])
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {key: body}
        self.posts: list[str] = []
        self.lists: list[tuple[str, bool]] = []
        self.version = 100

    def _stamped(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        metadata = {"uid": f"u{self.version}", **manifest["metadata"], "resourceVersion": str(self.version)}
        return {**manifest, "metadata": metadata}

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        self.posts.append(manifest["kind"])
        key = (manifest["kind"], manifest["metadata"]["namespace"], manifest["metadata"]["name"])
        if key in self.objects:
            return None
        self.objects[key] = self._stamped(manifest)
        return self.objects[key]

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, namespace, name))

    async def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get(("Job", namespace, name))

    async def list_watched(self, kind: str, *_: Any, metadata_only: bool = False) -> list[dict[str, Any]]:
        listed = [manifest for (stored, _namespace, _name), manifest in self.objects.items() if stored == kind]
        self.lists.append((kind, metadata_only))
        return [{"metadata": m["metadata"]} for m in listed] if metadata_only else listed

    async def patch_status(
        self, namespace: str, name: str, patch: dict[str, Any], version: str | None, kind: str
    ) -> dict[str, Any] | None:
        stored = self.objects[(kind, namespace, name)]
        self.objects[(kind, namespace, name)] = self._stamped({**stored, "status": patch})
        return self.objects[(kind, namespace, name)]

    async def post_event(self, *_: Any) -> None:
        return None


def test_a_resync_flag_on_children_ensured_since_its_lists_posts_nothing_again() -> None:
    """A burst's jobs still queued for their first reconcile have no children in a resync round's lists: each
    was flagged, and ensured a second time (every child POSTed again, to come back AlreadyExists). A child really
    missing when the round lists is still made again."""
    kube = StoreKube(_body())
    reconciler = Reconciler(cast(Kube, kube), Settings(), OperatorMetrics())

    async def scenario() -> tuple[list[str], list[str]]:
        reconciler.saw(_body())
        flagged = await reconciler.verify_caches()
        assert flagged == {KEY}, "no children yet when the round lists"
        await reconciler.reconcile(*KEY)  # the job's first reconcile, queued before the round
        first = list(kube.posts)
        await reconciler.reconcile_key(KEY, KEY in flagged)
        assert kube.posts == first, "the round's flag came before the children did"
        reconciler.after_resync()
        gone = next(key for key in kube.objects if key[0] == "ServiceAccount")
        del kube.objects[gone]  # deleted with its event missed (a watch relist)
        kube.posts.clear()
        await reconciler.resync_round()
        return first, kube.posts

    first, again = asyncio.run(scenario())
    assert {"Job", "ServiceAccount", "Role", "RoleBinding"} <= set(first)
    assert "ServiceAccount" in again, "a child missing from the round's lists is still made again"
    assert reconciler._ensured_since_check is None, "nothing kept between rounds"


def test_the_resync_lists_metadata_only_and_reads_a_trainer_job_the_watch_missed() -> None:
    """A resync round listed every trainer Job in full (8 MB at a thousand jobs, every 30 s, serialised by the
    API server while new jobs waited on it); it lists their metadata and reads in full only a Job the watch
    has not delivered."""
    kube = StoreKube(_body())
    reconciler = Reconciler(cast(Kube, kube), Settings(), OperatorMetrics())

    async def scenario() -> None:
        reconciler.saw(_body())
        await reconciler.reconcile(*KEY)  # creates the children and caches its Job
        trainer = next(key for key in kube.objects if key[0] == "Job")
        kube.objects[trainer] = {**kube.objects[trainer], "status": {"active": 1}}
        reconciler._trainer_jobs.pop(KEY)  # its watch event not delivered yet
        await reconciler.verify_caches()

    asyncio.run(scenario())
    assert kube.lists and all(metadata_only for _kind, metadata_only in kube.lists), kube.lists
    cached = reconciler._trainer_jobs.get(KEY)
    assert cached is not None and cached["status"]["active"] == 1, "the missed Job, read in full"


def test_a_resync_round_keeps_the_specs_parsed_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """With more jobs than ``PARSED_JOBS``, a round in name order evicted every kept spec before it came to it (and
    the running jobs', whose reports come back every few seconds): every spec was parsed again each round, and
    again on each job's next report."""
    monkeypatch.setattr(handlers, "PARSED_JOBS", 3)
    names = [f"j{i}" for i in range(6)]
    kube = StoreKube(_body(names[0]))
    kube.objects |= {("FineTuneJob", "ml", name): _body(name) for name in names[1:]}
    reconciler = Reconciler(cast(Kube, kube), Settings(), OperatorMetrics())
    parsed: list[str] = []
    parse = handlers.read_stored

    def counted(body: dict[str, Any]) -> Any:
        parsed.append(body["metadata"]["name"])
        return parse(body)

    monkeypatch.setattr(handlers, "read_stored", counted)

    async def scenario() -> None:
        for name in names:
            reconciler.saw(_body(name))
            await reconciler.reconcile("ml", name)
        await reconciler.resync_round()

    asyncio.run(scenario())
    assert [key[1] for key in reconciler._parsed] == ["j3", "j4", "j5"], "the jobs seen last, as before the round"
    assert parsed == [*names, "j0", "j1", "j2"], "the round parsed only those it did not keep"


class KueueKube(StoreKube):
    """The store, with the trainer Job's patches and the Workloads' switches recorded in the order they came."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.calls: list[tuple[str, Any]] = []

    async def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.calls.append(("Job", patch))

    async def set_kueue_workload_active(self, namespace: str, name: str, active: bool) -> None:
        self.calls.append(("Workload", active))


def test_a_queued_jobs_workload_is_switched_off_before_its_job_is_suspended_and_on_after_it_is_handed_back() -> None:
    """Kueue unsuspends any Job whose Workload it admitted while that Workload is active. With the Job suspended
    first, Kueue undid the user's suspend before the Workload went off (``tests/e2e/test_kueue.py`` read the Job
    running again after the job said Suspended)."""
    workload = KueueWorkload("ml", "w")
    running = replace(trainer_of(job(queueName="q"), active=1, ready=1), suspended=False)
    inactive = replace(workload, active=False)
    held = trainer_of(job(queueName="q"))
    suspended = [("Workload", False), ("Job", {"spec": {"suspend": True}})]
    handed_back = [("Workload", True)]  # Kueue unsuspends the Job when it admits it
    for ftj, observed, expected in (
        (job(queueName="q", suspend=True), Observed(job=running, kueue_workloads=(workload,)), suspended),
        (job(queueName="q"), Observed(job=held, kueue_workloads=(inactive,)), handed_back),
    ):
        body = ftj.model_dump(mode="json", by_alias=True, exclude_none=True)
        body["metadata"]["resourceVersion"] = "7"
        kube = KueueKube(body)
        reconciler = Reconciler(cast(Kube, kube), Settings(), OperatorMetrics())
        decision = decide(ftj, observed, NOW)
        asyncio.run(reconciler._execute(ftj, body, ftj.status, decision, NOW, "uid-1"))
        assert kube.calls == expected
