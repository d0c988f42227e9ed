"""s3:// transfer figures against the project's S3 server (SeaweedFS on loopback; prints, asserts nothing).

    .venv/bin/python benchmarks/s3_io.py [--mib 256] [--files 4]

- download: a source of ``--mib`` MiB staged into an empty cache (first run), then again (a retry:
  one LIST, nothing fetched);
- upload vs local save: the same directory written locally (write + fsync, as a checkpoint save)
  and published to the bucket (files, then the manifest);
- step time: a CPU training step (a small MLP, forward + backward + SGD) timed alone and while a
  background upload of the directory runs, as the checkpoint mirror does during training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from finetune_devtools.seaweedfs import SeaweedFS
from finetune_trainer import s3
from finetune_trainer.contract import s3_env_prefix
from finetune_trainer.spec import LocalSecretRef, S3Storage


def _write(directory: Path, files: int, mib: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        with (directory / f"shard-{index}.bin").open("wb") as out:
            out.write(os.urandom(mib * 2**20 // files))
            out.flush()
            os.fsync(out.fileno())


def _steps(seconds: float) -> list[float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batch, labels = torch.randn(64, 512), torch.randint(0, 10, (64,))
    times: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(batch), labels).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = SeaweedFS(root / "s3")
        endpoint = server.up()
        try:
            for role in ("model", "dataset", "output"):
                os.environ[s3_env_prefix(role) + "AWS_ACCESS_KEY_ID"] = endpoint.access_key
                os.environ[s3_env_prefix(role) + "AWS_SECRET_ACCESS_KEY"] = endpoint.secret_key
            settings = S3Storage(endpoint=endpoint.endpoint, credentials_secret_ref=LocalSecretRef(name="bench"))
            start = time.monotonic()
            _write(root / "local-save", args.files, args.mib)
            local = time.monotonic() - start
            start = time.monotonic()
            uri = s3.publish(root / "local-save", "s3://bench/model", settings)
            upload = time.monotonic() - start
            print(f"checkpoint of {args.mib} MiB: local save {local:.2f} s, upload {upload:.2f} s")
            for label in ("first run", "retry"):
                stats = s3.stage(uri, settings, "model", root / "cache", 2**40)
                print(f"download, {label}: {stats.seconds:.2f} s, {stats.bytes / 2**20:.0f} MiB, cached={stats.hit}")
            alone = _steps(5.0)
            background = threading.Thread(
                target=s3.publish, args=(root / "local-save", "s3://bench/ckpt", settings), daemon=True
            )
            background.start()
            during = _steps(upload)
            background.join()
            print(
                f"step time: {statistics.median(alone) * 1000:.1f} ms alone, "
                f"{statistics.median(during) * 1000:.1f} ms while an upload runs (median; {len(during)} steps)"
            )
        finally:
            server.down()


if __name__ == "__main__":
    main()
