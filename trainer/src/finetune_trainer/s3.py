"""``s3://`` in and out: download sources once (cached by content), publish directories manifest-last.

Torch-free: sources are staged by the CLI before the training stack loads, and the spec is
rewritten to the staged local directories, so everything after reads local files as before.

The client is obstore (Rust's ``object_store``): S3-compatible endpoints, path-style addressing,
retries with exponential backoff, multipart uploads, credentials from the environment (IRSA's web
identity token included), and no Python dependencies. boto3 was the first choice, but botocore pins
``python-dateutil<3`` while the trainer's kubernetes client needs ``>=3``.

- **Download once.** A source is a prefix; its listing (key, size, ETag) is hashed into the cache
  key, so a retry, a resume and the trials of a sweep that share the cache (a claim) find the same
  entry and fetch nothing (one LIST request); pods staging the same content at once hold a lock on
  the entry, so one downloads and the others wait for it. Each file's size is checked, and its MD5 when the
  ETag is one (single-part uploads). The cache stays under ``storage.cache.maxSizeGib``: least
  recently used entries go first (their ``.complete`` marker's mtime is touched on every use).
- **Publish manifest-last.** ``publish`` uploads every file of a directory, then its manifest
  (``finetune_trainer.manifest``): an interrupted upload leaves no manifest, so nothing that looks
  complete. Several writers each publish a part manifest; the one that merges waits for them all.
- **Faults.** Wrong credentials or a missing bucket are the spec's fault (``StorageError`` with
  the field and the URI: not retried); a network fault is retried with backoff inside the client,
  then raised as ``TransientStorageError`` (a crash: the Job retries and resumes).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from queue import Queue
from typing import TYPE_CHECKING, Any, Final

import obstore
from obstore.exceptions import BaseError, NotFoundError, PermissionDeniedError, UnauthenticatedError

from finetune_trainer.config import RuntimeEnv, local_path
from finetune_trainer.contract import s3_env_prefix
from finetune_trainer.errors import ConfigError, DataError, ModelError, TrainerError
from finetune_trainer.manifest import MANIFEST_NAME, Manifest, build_manifest, merge, write_manifest
from finetune_trainer.spec import S3Storage, TrainingSpec

if TYPE_CHECKING:
    from obstore.store import S3Store

__all__ = [
    "CHECKPOINTS",
    "CheckpointMirror",
    "S3Location",
    "StorageError",
    "TransientStorageError",
    "is_s3",
    "prepare",
    "publish",
    "stage",
    "upload_file",
]

CHECKPOINTS: Final = "checkpoints"
COMPLETE: Final = ".complete"
PART_PREFIX: Final = ".part-"
_PERMANENT_HINTS: Final = (
    "NoSuchBucket",
    "InvalidBucketName",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "status: 403",
    "status: 404",
    "Forbidden",
)
_CHUNK: Final = 8 * 1024 * 1024
_ERRORS: Final = (BaseError, OSError)
"""What obstore raises: its own errors, and the builtin FileNotFoundError / PermissionError for some."""


class StorageError(TrainerError):
    """A permanent storage fault (credentials, bucket, nothing at the URI): the spec must change."""

    def __init__(self, message: str, error: type[TrainerError]) -> None:
        super().__init__(message)
        self.code = error.code


class TransientStorageError(RuntimeError):
    """The endpoint did not answer after the client's retries: a crash, retried by the Job."""


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix (no leading or trailing slash), with the settings to reach it."""

    bucket: str
    prefix: str
    settings: S3Storage | None
    role: str
    """model, dataset or output: which env prefix holds its credentials, which field errors name."""

    @classmethod
    def parse(cls, uri: str, settings: S3Storage | None, role: str) -> S3Location:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        return cls(bucket, prefix.strip("/"), settings, role)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def store(self) -> S3Store:
        from obstore.store import S3Store  # noqa: PLC0415 (the extension module loads only when s3:// is used)

        settings = self.settings or S3Storage()
        config: dict[str, Any] = {}
        if settings.endpoint:
            config["endpoint"] = settings.endpoint
        config["region"] = settings.region or os.environ.get("AWS_REGION") or "us-east-1"
        path_style = settings.path_style if settings.path_style is not None else bool(settings.endpoint)
        config["virtual_hosted_style_request"] = not path_style
        prefix = s3_env_prefix(self.role) if settings.credentials_secret_ref else ""
        for name, key in (
            ("AWS_ACCESS_KEY_ID", "access_key_id"),
            ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
            ("AWS_SESSION_TOKEN", "session_token"),
        ):
            if os.environ.get(prefix + name):
                config[key] = os.environ[prefix + name]
        return S3Store(
            self.bucket,
            config=config,  # type: ignore[arg-type]
            client_options={
                "allow_http": bool(settings.endpoint and settings.endpoint.startswith("http://")),
                "connect_timeout": timedelta(seconds=5),
                "timeout": timedelta(minutes=5),
            },
            retry_config={
                "max_retries": 5,
                "retry_timeout": timedelta(seconds=60),
                "backoff": {"init_backoff": timedelta(milliseconds=200), "max_backoff": timedelta(seconds=10)},
            },
        )


_FIELD: Final = {"model": "model.source", "dataset": "dataset.source", "output": "output.location"}
_ERROR: Final[dict[str, type[TrainerError]]] = {"model": ModelError, "dataset": DataError, "output": ConfigError}


def _fault(location: S3Location, error: BaseException) -> Exception:
    """The error to raise for ``error``: permanent (names the field and URI) or transient (a crash)."""
    full = str(error)
    code = re.search(r"<Code>(\w+)</Code>(?:<Message>([^<]*)</Message>)?", full)
    if code:
        text = f"{code.group(1)}: {code.group(2)}" if code.group(2) else code.group(1)
    else:
        text = full.splitlines()[0] if full else type(error).__name__
    permanent = isinstance(
        error, (NotFoundError, PermissionDeniedError, UnauthenticatedError, FileNotFoundError, PermissionError)
    ) or any(hint in full for hint in _PERMANENT_HINTS)
    if permanent:
        return StorageError(
            f"{_FIELD[location.role]}: {location.uri}: {text[:300]} (check the bucket and the credentials)",
            _ERROR[location.role],
        )
    return TransientStorageError(f"{_FIELD[location.role]}: {location.uri}: {text[:300]}")


def _listing(store: S3Store, location: S3Location) -> list[dict[str, Any]]:
    """Every object under the prefix (the prefix as a directory), sorted by key."""
    prefix = f"{location.prefix}/" if location.prefix else None
    objects: list[dict[str, Any]] = []
    for chunk in obstore.list(store, prefix, chunk_size=1000):
        objects.extend(dict(meta) for meta in chunk)
    return sorted(objects, key=lambda meta: str(meta["path"]))


@dataclass
class CacheStats:
    """What a staging did: for the log line and the tests (a hit downloads nothing)."""

    uri: str
    path: Path
    hit: bool
    files: int
    bytes: int
    seconds: float


def stage(uri: str, settings: S3Storage | None, role: str, cache_dir: Path, max_bytes: int) -> CacheStats:
    """The local directory holding ``uri``'s objects, downloaded only when the cache lacks them."""
    location = S3Location.parse(uri, settings, role)
    start = time.monotonic()
    try:
        store = location.store()
        objects = _listing(store, location)
    except _ERRORS as error:
        raise _fault(location, error) from error
    if not objects:
        raise StorageError(f"{_FIELD[role]}: {uri}: no objects under this prefix", _ERROR[role])
    base = f"{location.prefix}/" if location.prefix else ""
    entries = [(str(meta["path"])[len(base) :], int(meta["size"]), str(meta.get("e_tag") or "")) for meta in objects]
    endpoint = (settings.endpoint if settings else None) or "aws"
    digest = hashlib.sha256(json.dumps([endpoint, location.bucket, entries]).encode()).hexdigest()[:32]
    entry = cache_dir / digest
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _entry_lock(cache_dir, digest):  # pods staging the same content at once: one downloads, the others wait
        if (entry / COMPLETE).exists():
            os.utime(entry / COMPLETE)
            return CacheStats(uri, entry, True, len(entries), 0, time.monotonic() - start)
        return _fill(store, location, entries, entry, max_bytes, start)


@contextlib.contextmanager
def _entry_lock(cache_dir: Path, digest: str) -> Iterator[None]:
    """An exclusive lock on one cache entry, across the pods that share the cache (flock: released when the
    holder exits, even killed, so a dead download never blocks the next pod)."""
    with (cache_dir / f".{digest}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fill(
    store: S3Store, location: S3Location, entries: list[tuple[str, int, str]], entry: Path, max_bytes: int, start: float
) -> CacheStats:
    """Download every object into a temporary directory renamed into ``entry`` once complete."""
    cache_dir, digest, uri = entry.parent, entry.name, location.uri
    base = f"{location.prefix}/" if location.prefix else ""
    size = sum(item[1] for item in entries)
    _evict(cache_dir, max_bytes - size)
    partial = cache_dir / f".{digest}.tmp-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for relative, expected, etag in entries:
            _download(store, location, base + relative, partial / relative, expected, etag)
        (partial / COMPLETE).write_text(json.dumps({"uri": uri, "bytes": size}) + "\n")
        try:
            partial.rename(entry)
        except OSError:  # staged by a pod whose storage ignored the lock: keep theirs
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return CacheStats(uri, entry, False, len(entries), size, time.monotonic() - start)


def _download(store: S3Store, location: S3Location, key: str, target: Path, size: int, etag: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    md5 = hashlib.md5(usedforsecurity=False)
    written = 0
    try:
        result = obstore.get(store, key)
        with target.open("wb") as out:
            for chunk in result.stream(min_chunk_size=_CHUNK):
                out.write(chunk)
                md5.update(chunk)
                written += len(chunk)
    except _ERRORS as error:
        raise _fault(location, error) from error
    plain_etag = etag.strip('"')
    if written != size or (len(plain_etag) == 32 and "-" not in plain_etag and md5.hexdigest() != plain_etag):
        raise TransientStorageError(f"{_FIELD[location.role]}: s3://{location.bucket}/{key}: download corrupted")


def _evict(cache_dir: Path, budget: int) -> None:
    """Remove least recently used entries until the cache holds at most ``budget`` bytes."""
    entries = []
    for marker in cache_dir.glob(f"*/{COMPLETE}"):
        try:
            stat = marker.stat()
            entries.append((stat.st_mtime, json.loads(marker.read_text()).get("bytes", 0), marker.parent))
        except (OSError, ValueError):
            continue
    total = sum(item[1] for item in entries)
    for _, size, directory in sorted(entries):
        if total <= budget:
            break
        shutil.rmtree(directory, ignore_errors=True)
        total -= size


def _upload(store: S3Store, location: S3Location, local_dir: Path, relative: str) -> None:
    try:
        obstore.put(store, location.key(relative), local_dir / relative, chunk_size=_CHUNK, max_concurrency=4)
    except _ERRORS as error:
        raise _fault(location, error) from error


def _read_remote_manifest(store: S3Store, key: str) -> Manifest | None:
    try:
        return Manifest.model_validate_json(bytes(obstore.get(store, key).bytes()))
    except (NotFoundError, FileNotFoundError):
        return None


def publish(
    local_dir: Path,
    location: str,
    settings: S3Storage | None = None,
    *,
    rank: int = 0,
    writers: int = 1,
    only: Callable[[str], bool] | None = None,
    timeout: float = 600.0,
    manifest: Manifest | None = None,
    part: str = "",
) -> str:
    """Publish ``local_dir`` at ``location`` (its URI back); its manifest is written last.

    Local locations (pvc://, file://): the manifest is written into the directory itself. ``s3://``:
    every file is uploaded, then the manifest object. With several ``writers`` each rank uploads the
    files ``only`` accepts and a part manifest; rank 0 waits for every part, merges them and writes
    the manifest. ``manifest``: the directory's, when the caller just built it (its files are not hashed
    again). ``part``: a token naming this publication, the same on every writer (a part left in the bucket
    by an earlier, interrupted publication of the same directory is never merged into this one).
    """
    if not is_s3(location):
        write_manifest(local_dir)
        return location
    target = S3Location.parse(location, settings, "output")
    try:
        store = target.store()
        own = manifest if manifest is not None else build_manifest(local_dir, only)  # hashed once, not twice
        for entry in own.files:
            _upload(store, target, local_dir, entry.path)
        if writers == 1:
            obstore.put(store, target.key(MANIFEST_NAME), own.serialise())
            return target.uri
        suffix = f".{part.lstrip('.')}" if part else ""
        obstore.put(store, target.key(f"{PART_PREFIX}{rank}{suffix}.json"), own.serialise())
        if rank != 0:
            return target.uri
        parts = [own]
        deadline = time.monotonic() + timeout
        for other in range(1, writers):
            while (found := _read_remote_manifest(store, target.key(f"{PART_PREFIX}{other}{suffix}.json"))) is None:
                if time.monotonic() > deadline:
                    raise TransientStorageError(f"output.location: {location}: rank {other} published no part")
                time.sleep(0.5)
            parts.append(found)
        obstore.put(store, target.key(MANIFEST_NAME), merge(parts).serialise())
        obstore.delete(store, [target.key(f"{PART_PREFIX}{r}{suffix}.json") for r in range(writers)])
    except _ERRORS as error:
        raise _fault(target, error) from error
    return target.uri


def upload_file(path: Path, location: str, settings: S3Storage | None) -> None:
    """Put one small record (``result.json``) at ``location`` (s3://), as one atomic PUT."""
    target = S3Location.parse(location, settings, "output")
    try:
        obstore.put(target.store(), target.prefix, path.read_bytes())
    except _ERRORS as error:
        raise _fault(target, error) from error


def published(location: str, settings: S3Storage | None) -> Manifest | None:
    """The manifest at ``location`` (s3://), or None while its publication is not complete."""
    target = S3Location.parse(location, settings, "output")
    try:
        return _read_remote_manifest(target.store(), target.key(MANIFEST_NAME))
    except _ERRORS as error:
        raise _fault(target, error) from error


def _walk(local_dir: Path) -> Iterator[str]:
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            yield path.relative_to(local_dir).as_posix()


def _discard(directory: Path, only: Callable[[str], bool] | None) -> None:
    """Remove the files ``only`` accepts under ``directory``, then the directories left empty (other ranks of
    the node may still be uploading theirs from it)."""
    for relative in list(_walk(directory)):
        if only is None or only(relative):
            (directory / relative).unlink(missing_ok=True)
    for path in [*sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), directory]:
        with contextlib.suppress(OSError):
            path.rmdir()


@dataclass
class CheckpointMirror:
    """Checkpoints of an ``s3://`` output: restored from the bucket at start, uploaded in the background.

    ``submit`` queues a finished local checkpoint (training goes on); ``prune`` queues the removal of
    remote checkpoints no longer kept (after every upload queued before it, so the newest published
    checkpoint is never removed before its successor is complete). An upload that fails after the
    client's retries is raised on the training thread at the next ``submit`` or ``drain``.

    Sharded checkpoints have several ``writers`` (every rank, each with a mirror of its own): each rank
    uploads its own files as a part, wherever they lie (on several nodes, each node's scratch holds only its
    ranks' shards); rank 0 uploads the rest and writes the merged manifest once every part is in. So a
    checkpoint counts only when every node's shards are in the bucket. Pruning stays with rank 0.
    """

    location: str
    settings: S3Storage | None
    log: Callable[..., None] = field(default=lambda *a, **k: None)
    _queue: Queue[Callable[[], None] | None] = field(default_factory=Queue)
    _error: BaseException | None = None
    _thread: threading.Thread | None = None
    uploaded: list[str] = field(default_factory=list)
    """Checkpoints whose manifest is in the bucket (uploaded here, or found there by ``published_names``)."""
    rank: int = 0
    """This process's rank among the ``writers``; only rank 0 writes manifests (and fills ``uploaded``)."""
    writers: int = 1
    """How many ranks write each checkpoint's files: 1, or every rank (sharded checkpoints)."""

    @property
    def root(self) -> S3Location:
        return S3Location.parse(f"{self.location.rstrip('/')}/{CHECKPOINTS}", self.settings, "output")

    def _objects(self) -> tuple[S3Store, list[dict[str, Any]], list[str]]:
        """The store, every object under the checkpoints prefix, and the names of the complete checkpoints."""
        root = self.root
        try:
            store = root.store()
            objects = _listing(store, root)
        except _ERRORS as error:
            raise _fault(root, error) from error
        base = f"{root.prefix}/"
        names = sorted(
            {str(m["path"])[len(base) :].split("/")[0] for m in objects if str(m["path"]).endswith(MANIFEST_NAME)}
        )
        return store, objects, names

    def published_names(self) -> list[str]:
        """The checkpoints whose manifest is in the bucket."""
        return self._objects()[2]

    def restore(self, checkpoints_dir: Path) -> list[str]:
        """Download every complete remote checkpoint (and the owner record) missing locally; their names.

        The ranks of one node share its scratch: the first to take the lock downloads, the others then find
        every checkpoint there (one download per node, not one per GPU)."""
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        with _entry_lock(checkpoints_dir, "restore"):
            return self._restore(checkpoints_dir)

    def _restore(self, checkpoints_dir: Path) -> list[str]:
        root = self.root
        base = f"{root.prefix}/"
        store, objects, names = self._objects()
        restored = []
        for meta in objects:
            relative = str(meta["path"])[len(base) :]
            if "/" not in relative:  # owner.json and other records of the directory itself
                _download(store, root, str(meta["path"]), checkpoints_dir / relative, int(meta["size"]), "")
        for name in names:
            if (checkpoints_dir / name).exists():
                continue
            manifest = _read_remote_manifest(store, root.key(f"{name}/{MANIFEST_NAME}"))
            if manifest is None:
                continue
            partial = checkpoints_dir / f".{name}.restore-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            for entry in manifest.files:
                _download(store, root, root.key(f"{name}/{entry.path}"), partial / entry.path, entry.size, "")
            write_manifest(partial, manifest)
            partial.rename(checkpoints_dir / name)
            restored.append(name)
        return restored

    def _run(self) -> None:
        while (task := self._queue.get()) is not None:
            try:
                if self._error is None:
                    task()
            except BaseException as error:
                self._error = error
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
            self._thread.start()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(
        self,
        directory: Path,
        *,
        records: Path | None = None,
        name: str | None = None,
        only: Callable[[str], bool] | None = None,
        part: str = "",
        discard: bool = False,
    ) -> None:
        """Upload ``directory`` (a finished checkpoint) in the background, its manifest last.

        Several writers: this rank's files of checkpoint ``name`` (those ``only`` accepts) as a part of the
        publication ``part`` names; ``discard`` removes them locally once uploaded (a node that holds only its own
        shards, in an unfinished directory no reader looks at: the bucket has them now, and a resume restores the
        whole checkpoint from there)."""
        self._raise()
        self._start()
        name = name or directory.name
        destination = f"{self.root.uri}/{name}"

        def upload() -> None:
            start = time.monotonic()
            if records is not None and records.is_file():
                store = self.root.store()
                _upload(store, self.root, records.parent, records.name)
            publish(directory, destination, self.settings, rank=self.rank, writers=self.writers, only=only, part=part)
            if discard:
                _discard(directory, only)
            if self.rank == 0:
                self.uploaded.append(name)
                self.log("checkpoint_uploaded", checkpoint=destination, seconds=round(time.monotonic() - start, 3))

        self._queue.put(upload)

    def prune(self, keep: set[str]) -> None:
        """Remove remote checkpoints not in ``keep``: the manifest first, so a cut removal looks incomplete."""
        self._start()

        def remove() -> None:
            root = self.root
            store = root.store()
            base = f"{root.prefix}/"
            objects = [str(m["path"]) for m in _listing(store, root)]
            stale = {p[len(base) :].split("/")[0] for p in objects if "/" in p[len(base) :]} - keep
            for name in sorted(stale):
                keys = [p for p in objects if p.startswith(f"{base}{name}/")]
                manifest = [k for k in keys if k.endswith(f"/{MANIFEST_NAME}")]
                if manifest:
                    obstore.delete(store, manifest)
                obstore.delete(store, [k for k in keys if k not in manifest])

        self._queue.put(remove)

    def drain(self) -> None:
        """Wait until every queued upload is done (raises its error)."""
        if self._thread is not None:
            self._queue.join()
        self._raise()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=5)
            self._thread = None


DEFAULT_CACHE: Final = "finetune-cache"
"""The cache's directory in the pod's scratch (``/tmp``) when ``storage.cache`` is unset."""


def prepare(spec: TrainingSpec, env: RuntimeEnv, log: Callable[..., None]) -> TrainingSpec:
    """The pre-torch storage stage: stage s3:// sources into the cache, restore an s3:// output's checkpoints.

    Returns the spec with its sources pointing at the staged directories (``file://``), so the rest of
    the run reads local files. Every rank runs it (each node has its own scratch).
    """
    storage = spec.storage
    cache = spec.storage.cache
    cache_dir = (
        local_path(cache.location, env.pvc_root) if cache is not None else Path(tempfile.gettempdir()) / DEFAULT_CACHE
    )
    max_bytes = (cache.max_size_gib if cache is not None else 50) * 2**30
    update: dict[str, Any] = {}
    for role, source in (("model", spec.model), ("dataset", spec.dataset)):
        if not is_s3(source.source):
            continue
        cache_dir.mkdir(parents=True, exist_ok=True)
        stats = stage(source.source, source.s3 or storage.s3, role, cache_dir, max_bytes)
        log(
            "s3_download",
            source=stats.uri,
            cached=stats.hit,
            files=stats.files,
            bytes=stats.bytes,
            seconds=round(stats.seconds, 3),
            path=str(stats.path),
        )
        update[role] = source.staged(str(stats.path))
    if is_s3(spec.output.location):
        mirror = CheckpointMirror(spec.output.location, spec.output.s3 or storage.s3)
        checkpoints = local_path(spec.output.location, env.pvc_root) / CHECKPOINTS
        start = time.monotonic()
        restored = mirror.restore(checkpoints)
        if restored:
            log("s3_restore", checkpoints=restored, seconds=round(time.monotonic() - start, 3))
    return spec.model_copy(update=update) if update else spec
