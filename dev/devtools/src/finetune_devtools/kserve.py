"""KServe's InferenceService CRD (only the CRD: nothing serves), to check ``kubectl finetune export`` against.

The CRD comes from the Go module proxy (``github.com/kserve/kserve@VERSION`` holds
``config/crd/full/serving.kserve.io_inferenceservices.yaml``, Apache-2.0) and is cached in
``~/.cache/finetune-operator/kserve/VERSION/``, once per machine and version, like Kueue's CRDs. It is not vendored:
the file is about 1 MB of generated schema.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from finetune_assets import project_cache
from finetune_localcluster.build import BuildError

KSERVE_VERSION = "v0.16.0"
MODULE = "github.com/kserve/kserve"
CRD_FILE = "serving.kserve.io_inferenceservices.yaml"


def ensure_inferenceservice_crd(version: str = KSERVE_VERSION) -> Path:
    """The cached InferenceService CRD of KServe ``version``, downloaded from the Go module proxy on first use."""
    final = project_cache() / "kserve" / version / CRD_FILE
    if final.is_file():
        return final
    go = shutil.which("go")
    if not go:
        raise BuildError("cannot fetch KServe's CRD: the Go toolchain ('go') is not on PATH")
    with tempfile.TemporaryDirectory(prefix="kserve-") as scratch:
        proc = subprocess.run(
            [go, "mod", "download", "-json", f"{MODULE}@{version}"],
            cwd=scratch,
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise BuildError(f"could not download {MODULE}@{version} (is the Go module proxy reachable?): {proc.stderr}")
    source = Path(json.loads(proc.stdout)["Dir"]) / "config" / "crd" / "full" / CRD_FILE
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{CRD_FILE}.{os.getpid()}")
    shutil.copyfile(source, partial)
    partial.replace(final)  # whole or absent: concurrent sessions may race to fill the cache
    return final
