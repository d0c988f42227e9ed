"""``s3://`` against the project's real S3 server (SeaweedFS, authentication on): staging cached by
content, manifest-last publication (one writer and several), checkpoints restored from the bucket on
a fresh scratch, and the faults (wrong credentials, missing bucket, endpoint gone)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import obstore
import pytest

from finetune_devtools.seaweedfs import S3Endpoint
from finetune_trainer import exitcodes, s3, sharding
from finetune_trainer.config import RuntimeEnv, local_path
from finetune_trainer.contract import s3_env_prefix
from finetune_trainer.manifest import MANIFEST_NAME, Manifest, build_manifest, merge
from finetune_trainer.reporting import JsonLines
from finetune_trainer.run import run
from finetune_trainer.spec import LocalSecretRef, S3Storage, TrainingSpec
from tests.trainer import tiny
from tests.trainer.helpers import of
from tests.trainer.test_checkpoints import sigterm_at  # noqa: F401 (a fixture)


@pytest.fixture
def settings(s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    """S3 settings naming a credentials Secret, its keys in the env the operator would inject."""
    for role in ("model", "dataset", "output"):
        monkeypatch.setenv(s3_env_prefix(role) + "AWS_ACCESS_KEY_ID", s3_server.access_key)
        monkeypatch.setenv(s3_env_prefix(role) + "AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    return S3Storage(endpoint=s3_server.endpoint, credentials_secret_ref=LocalSecretRef(name="s3-credentials"))


@pytest.fixture
def bucket() -> str:
    """A fresh bucket name (SeaweedFS creates a bucket on its first upload by an admin identity)."""
    return f"t-{uuid.uuid4().hex[:12]}"


def upload(directory: Path, uri: str, settings: S3Storage) -> str:
    return s3.publish(directory, uri, settings)


def test_a_source_is_downloaded_once_and_keyed_by_content(
    assets: dict[str, Path], tmp_path: Path, settings: S3Storage, bucket: str
) -> None:
    uri = upload(assets["sentiment"], f"s3://{bucket}/data/sentiment", settings)
    cache = tmp_path / "cache"
    first = s3.stage(uri, settings, "dataset", cache, 2**30)
    again = s3.stage(uri, settings, "dataset", cache, 2**30)
    assert not first.hit and first.bytes == sum(p.stat().st_size for p in first.path.iterdir() if p.name != ".complete")
    assert again.hit and again.bytes == 0 and again.path == first.path
    assert (first.path / "train.jsonl").read_bytes() == (assets["sentiment"] / "train.jsonl").read_bytes()
    # new content under the same key is a new cache entry, never the stale one
    store = s3.S3Location.parse(uri, settings, "dataset").store()
    obstore.put(store, "data/sentiment/train.jsonl", b'{"text": "changed", "label": 1}\n')
    changed = s3.stage(uri, settings, "dataset", cache, 2**30)
    assert not changed.hit and changed.path != first.path
    assert (changed.path / "train.jsonl").read_text().startswith('{"text": "changed"')


def test_three_sweep_trials_sharing_the_cache_download_the_base_model_once(
    assets: dict[str, Path], tmp_path: Path, settings: S3Storage, bucket: str
) -> None:
    """The trials of a sweep are jobs with the same sources and their own outputs; their cache is a claim.
    They start together: one downloads, the others wait for its entry (the e2e sweep shows it across pods)."""
    model = upload(assets["bert"], f"s3://{bucket}/models/bert", settings)
    stream = io.StringIO()
    log = JsonLines(stream)
    staged: list[str] = []

    def trial(number: int) -> None:
        wire = tiny.spec(
            Path("/unused"),
            assets["sentiment"],
            tmp_path / f"trial-{number}",
            model={"source": model, "task": "sequence-classification", "numLabels": 2},
            storage={"s3": settings.to_wire(), "cache": {"location": str(tmp_path / "claim")}},
        )
        staged.append(s3.prepare(TrainingSpec.model_validate(wire), RuntimeEnv(), log.emit).model.source)

    threads = [threading.Thread(target=trial, args=(number,)) for number in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(staged)) == 1 and staged[0].startswith(f"file://{tmp_path / 'claim'}/")
    downloads = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert sorted((d["cached"], d["bytes"] > 0) for d in downloads) == [(False, True), (True, False), (True, False)]


def test_the_cache_evicts_the_least_recently_used_entry(
    assets: dict[str, Path], tmp_path: Path, settings: S3Storage, bucket: str
) -> None:
    cache = tmp_path / "cache"
    a = s3.stage(upload(assets["sentiment"], f"s3://{bucket}/a", settings), settings, "dataset", cache, 2**30)
    size = a.bytes
    b = s3.stage(upload(assets["noisy"], f"s3://{bucket}/b", settings), settings, "dataset", cache, size + 1)
    assert not a.path.exists() and b.path.exists()


def test_publication_counts_only_with_its_manifest_written_last(
    tmp_path: Path, settings: S3Storage, bucket: str
) -> None:
    checkpoints = tmp_path / "local" / "checkpoints"
    for step in (1, 2):
        directory = checkpoints / f"checkpoint-{step}"
        directory.mkdir(parents=True)
        (directory / "weights.bin").write_bytes(bytes([step]) * 1000)
    root = f"s3://{bucket}/out/checkpoints"
    upload(checkpoints / "checkpoint-1", f"{root}/checkpoint-1", settings)
    # checkpoint-2's files are there but its manifest never came: an interrupted upload
    store = s3.S3Location.parse(root, settings, "output").store()
    obstore.put(store, "out/checkpoints/checkpoint-2/weights.bin", b"\x02" * 1000)
    assert s3.published(f"{root}/checkpoint-2", settings) is None
    remote = s3.published(f"{root}/checkpoint-1", settings)
    assert remote is not None and remote == build_manifest(checkpoints / "checkpoint-1")
    fresh = tmp_path / "fresh" / "checkpoints"
    mirror = s3.CheckpointMirror(f"s3://{bucket}/out", settings)
    assert mirror.restore(fresh) == ["checkpoint-1"]
    assert (fresh / "checkpoint-1" / "weights.bin").read_bytes() == b"\x01" * 1000
    assert not (fresh / "checkpoint-2").exists()


def test_several_writers_publish_parts_and_rank_0_writes_the_manifest_last(
    tmp_path: Path, settings: S3Storage, bucket: str
) -> None:
    directory = tmp_path / "sharded"
    directory.mkdir()
    for rank in range(3):
        (directory / f"shard-{rank}.bin").write_bytes(bytes([rank]) * 100)
    uri = f"s3://{bucket}/sharded"
    store = s3.S3Location.parse(uri, settings, "output").store()
    # The bucket exists before the writers start, as a real output bucket does: SeaweedFS creates one on its first
    # upload, and three first uploads at once race its creation (one PUT came back NoSuchBucket in CI).
    obstore.put(store, "README", b"the bucket\n")
    threads = [
        threading.Thread(
            target=s3.publish,
            args=(directory, uri, settings),
            kwargs={"rank": rank, "writers": 3, "only": lambda path, r=rank: path == f"shard-{r}.bin"},
        )
        for rank in (1, 2)
    ]
    for thread in threads:
        thread.start()
    s3.publish(directory, uri, settings, rank=0, writers=3, only=lambda path: path == "shard-0.bin")
    for thread in threads:
        thread.join()
    manifest = s3.published(uri, settings)
    assert manifest == build_manifest(directory)
    keys = sorted(str(m["path"]) for chunk in obstore.list(store, "sharded/") for m in chunk)
    assert keys == [f"sharded/{MANIFEST_NAME}", "sharded/shard-0.bin", "sharded/shard-1.bin", "sharded/shard-2.bin"]


def test_the_mirror_uploads_in_the_background_and_prunes_after_the_newer_upload(
    tmp_path: Path, settings: S3Storage, bucket: str
) -> None:
    checkpoints = tmp_path / "checkpoints"
    mirror = s3.CheckpointMirror(f"s3://{bucket}/run", settings)
    for step in (1, 2, 3):
        directory = checkpoints / f"checkpoint-{step}"
        directory.mkdir(parents=True)
        (directory / "state.bin").write_bytes(bytes([step]) * 10)
        mirror.submit(directory)
        mirror.prune({f"checkpoint-{step}", f"checkpoint-{max(step - 1, 1)}"})
    mirror.drain()
    mirror.close()
    fresh = tmp_path / "fresh"
    assert mirror.uploaded == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert s3.CheckpointMirror(f"s3://{bucket}/run", settings).restore(fresh) == ["checkpoint-2", "checkpoint-3"]


_RANK = """
import json, sys, time
from pathlib import Path
from finetune_trainer import s3
from finetune_trainer.spec import S3Storage

settings, location, fresh, log = S3Storage.model_validate_json(sys.argv[1]), *sys.argv[2:]
real_download = s3._download

def slow_download(store, root, key, *args):
    with open(log, "a") as out:
        out.write(key + "\\n")
    time.sleep(0.2)  # long enough that every rank is in restore before the first is done
    real_download(store, root, key, *args)

s3._download = slow_download
print(json.dumps(s3.CheckpointMirror(location, settings).restore(Path(fresh))))
"""


def test_the_ranks_of_one_node_restore_a_checkpoint_once(tmp_path: Path, settings: S3Storage, bucket: str) -> None:
    """Every rank runs the storage stage, and the ranks of a node share its scratch: with 8 GPUs a node would
    download each checkpoint 8 times. One rank (a process of its own, as under torchrun) downloads; the others
    wait and find it restored."""
    local = tmp_path / "checkpoints" / "checkpoint-4"
    local.mkdir(parents=True)
    for part in ("a", "b", "c"):
        (local / f"{part}.bin").write_bytes(part.encode() * 1000)
    upload(local, f"s3://{bucket}/run/checkpoints/checkpoint-4", settings)
    fresh, log = tmp_path / "node" / "checkpoints", tmp_path / "downloads.log"
    argv = [sys.executable, "-c", _RANK, settings.model_dump_json(), f"s3://{bucket}/run", str(fresh), str(log)]
    ranks = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0] * 4, [err for _, err in outputs]
    assert sorted(json.loads(out) for out, _ in outputs) == [[], [], [], ["checkpoint-4"]]
    downloaded = sorted(line.rsplit("/", 1)[1] for line in log.read_text().split())
    assert downloaded == ["a.bin", "b.bin", "c.bin"], "one download of each file on the node"
    assert (fresh / "checkpoint-4" / "b.bin").read_bytes() == b"b" * 1000


def test_every_node_publishes_its_own_shards_and_rank_0_completes_the_checkpoint(
    tmp_path: Path, settings: S3Storage, bucket: str
) -> None:
    """FSDP on two nodes, no shared volume: node 0's scratch holds the finished checkpoint with rank 0's files, node
    1's only rank 1's shards and RNG state, in the temporary directory rank 0 named (never renamed there). Each rank
    publishes its own files as a part; the checkpoint counts (manifest, ``uploaded``) only once both parts are in,
    and a fresh scratch restores it whole. (Before, only rank 0 uploaded: rank 1's shards never reached the bucket.)"""
    out = f"s3://{bucket}/fsdp"
    token = ".tmp-checkpoint-6-0123abcd"
    node0 = tmp_path / "node0" / "checkpoints" / "checkpoint-6"
    node1 = tmp_path / "node1" / "checkpoints" / token
    files = {
        node0: {"sharded/.metadata": b"m", "sharded/__0_0.distcp": b"\x00" * 300, "rng_state_0.pth": b"r0"},
        node1: {"sharded/__1_0.distcp": b"\x01" * 200, "rng_state_1.pth": b"r1"},
    }
    files[node0] |= {"run_state.json": b"{}", "finetune-complete": b"6 full\n"}
    for directory, contents in files.items():
        for relative, data in contents.items():
            (directory / relative).parent.mkdir(parents=True, exist_ok=True)
            (directory / relative).write_bytes(data)
    store = s3.S3Location.parse(out, settings, "output").store()
    earlier = tmp_path / "earlier"  # rank 1's part of an earlier save of checkpoint-6, whose rank 0 was killed
    (earlier / "sharded").mkdir(parents=True)
    (earlier / "sharded" / "__1_0.distcp").write_bytes(b"old")
    s3.publish(
        earlier, f"{out}/checkpoints/checkpoint-6", settings, rank=1, writers=2, only=sharding.files_of(1), part="old"
    )
    expected = merge([build_manifest(node0), build_manifest(node1)])
    ranks = [s3.CheckpointMirror(out, settings, rank=rank, writers=2) for rank in (0, 1)]
    ranks[0].submit(node0, only=sharding.files_of(0), part=token)
    assert s3.published(f"{out}/checkpoints/checkpoint-6", settings) is None, "rank 1's shards are not in yet"
    ranks[1].submit(node1, name="checkpoint-6", only=sharding.files_of(1), part=token, discard=True)
    for mirror in ranks:
        mirror.drain()
        mirror.close()
    assert (ranks[0].uploaded, ranks[1].uploaded) == (["checkpoint-6"], []), "only rank 0 publishes the manifest"
    manifest = s3.published(f"{out}/checkpoints/checkpoint-6", settings)
    assert manifest == expected, "every file of both nodes, as written now (never the earlier part's)"
    assert {e.path for e in manifest.files} == {r for contents in files.values() for r in contents}
    assert not node1.exists(), "node 1's uploaded shards leave its scratch"
    keys = [str(m["path"]) for chunk in obstore.list(store, "fsdp/") for m in chunk]
    parts = [key for key in keys if s3.PART_PREFIX in key]
    assert parts == ["fsdp/checkpoints/checkpoint-6/.part-1.old.json"], "only the earlier one"
    fresh = tmp_path / "fresh"
    assert s3.CheckpointMirror(out, settings).restore(fresh) == ["checkpoint-6"]
    for contents in files.values():
        for relative, data in contents.items():
            assert (fresh / "checkpoint-6" / relative).read_bytes() == data


def test_a_sharded_checkpoints_files_belong_to_the_rank_that_wrote_them() -> None:
    owners = {
        "sharded/__0_0.distcp": 0,
        "sharded/__1_0.distcp": 1,
        "sharded/__12_0.distcp": 12,
        "rng_state_3.pth": 3,
        "sharded/.metadata": 0,
        "scheduler.pt": 0,
        "rng_state.pth": 0,
        "finetune-complete": 0,
    }
    assert {path: sharding.writer(path) for path in owners} == owners


@pytest.mark.parametrize(
    ("role", "code"),
    [("model", exitcodes.MODEL_ERROR), ("dataset", exitcodes.DATA_ERROR), ("output", exitcodes.INVALID_CONFIG)],
)
def test_wrong_credentials_name_the_field_and_the_uri(
    role: str, code: exitcodes.ExitCode, settings: S3Storage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(s3_env_prefix(role) + "AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(s3.StorageError) as error:
        if role == "output":
            s3.CheckpointMirror("s3://models/out", settings).restore(tmp_path)
        else:
            s3.stage("s3://models/x", settings, role, tmp_path, 2**30)
    field = {"model": "model.source", "dataset": "dataset.source", "output": "output.location"}[role]
    assert error.value.exit_code == code.code and str(error.value).startswith(f"{field}: s3://models/")
    assert "\n" not in str(error.value)


def test_a_missing_bucket_is_a_data_error(settings: S3Storage, tmp_path: Path) -> None:
    with pytest.raises(s3.StorageError) as error:
        s3.stage("s3://no-such-bucket-here/data", settings, "dataset", tmp_path, 2**30)
    assert error.value.exit_code == exitcodes.DATA_ERROR.code
    assert "dataset.source: s3://no-such-bucket-here/data" in str(error.value)


def test_an_endpoint_that_does_not_answer_is_a_crash_after_retries(settings: S3Storage, tmp_path: Path) -> None:
    from finetune_localcluster.cluster import free_port

    gone = settings.model_copy(update={"endpoint": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(s3.TransientStorageError, match=r"dataset\.source: s3://bucket/data"):
        s3.stage("s3://bucket/data", gone, "dataset", tmp_path, 2**30)


def _run(wire: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """The CLI's order: the storage stage (download, restore), then training."""
    stream = io.StringIO()
    log = JsonLines(stream)
    env = RuntimeEnv(metrics_port=0, log_every_steps=1)
    spec = s3.prepare(TrainingSpec.model_validate(wire), env, log.emit)
    result = run(spec, env, log)
    return result.exit_code, [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_job_reads_and_writes_s3_and_resumes_from_the_bucket_on_a_fresh_scratch(
    assets: dict[str, Path],
    settings: S3Storage,
    bucket: str,
    tmp_path: Path,
    sigterm_at: list[int],  # noqa: F811 (the fixture imported above)
) -> None:
    model = upload(assets["bert"], f"s3://{bucket}/models/bert", settings)
    data = upload(assets["sentiment"], f"s3://{bucket}/data/sentiment", settings)
    out = f"s3://{bucket}/runs/one"
    wire = tiny.spec(
        Path("/unused"),
        Path("/unused"),
        Path("/unused"),
        model={"source": model, "task": "sequence-classification", "numLabels": 2},
        dataset={"source": data, "train": "train.jsonl", "validation": "validation.jsonl", "maxSeqLength": 32},
        output={"location": out},
        storage={"s3": settings.to_wire(), "cache": {"location": str(tmp_path / "cache")}},
    )
    sigterm_at.append(7)  # killed mid-epoch 1 (12 steps an epoch): the stop's checkpoint is uploaded first
    code, events = _run(wire)
    assert code == exitcodes.TERMINATED.code
    assert [e["cached"] for e in of(events, "s3_download")] == [False, False]
    assert of(events, "checkpoint_uploaded")[-1]["checkpoint"] == f"{out}/checkpoints/checkpoint-7"
    shutil.rmtree(local_path(out, Path("/")))  # a fresh pod: nothing of the run's scratch is left
    sigterm_at.clear()
    code, events = _run(wire)
    assert code == exitcodes.OK.code
    assert [e["cached"] for e in of(events, "s3_download")] == [True, True]  # the cache is a shared claim here
    assert of(events, "s3_restore")[0]["checkpoints"] == ["checkpoint-7"]
    assert of(events, "resume")[0]["step"] == 7
    result = of(events, "result")[0]
    assert result["model"] == f"{out}/model"
    # status names a checkpoint only once its manifest is in the bucket (the evaluation comes before the save)
    published = {f"{out}/checkpoints/{name}" for name in of(events, "s3_restore")[0]["checkpoints"]}
    for event in events:
        published |= {event["checkpoint"]} if event["event"] == "checkpoint_uploaded" else set()
        named = (event.get("best") or {}).get("checkpoint") or (
            event["event"] == "best_checkpoint" and event["checkpoint"]
        )
        assert not named or named in published, event
    assert s3.published(result["best"]["checkpoint"], settings) is not None
    # the lineage names the base as written (not the cache directory it was staged into) and what was read
    (artifact,) = result["artifacts"]
    assert artifact["baseModel"]["source"] == model and artifact["baseModel"]["revision"].startswith("sha256:")
    manifest = s3.published(f"{out}/model", settings)
    assert isinstance(manifest, Manifest) and any(f.path == "config.json" for f in manifest.files)
    store = s3.S3Location.parse(out, settings, "output").store()
    remote = bytes(obstore.get(store, f"runs/one/model/{MANIFEST_NAME}").bytes())
    assert Manifest.model_validate_json(remote).sha256 == manifest.sha256
