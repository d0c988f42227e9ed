"""Load a training spec (bare or inside a FineTuneJob manifest) and the runtime environment."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from finetune_trainer.contract import (
    DATASET_HF_TOKEN_ENV,
    DEFAULT_LOG_EVERY_STEPS,
    DEFAULT_METRICS_PORT,
    DEFAULT_PVC_ROOT,
    DEFAULT_REPORT_INTERVAL_SECONDS,
    GPU_MEMORY_ENV,
    HF_TOKEN_ENV,
    JOB_NAME_ENV,
    JOB_NAMESPACE_ENV,
    JOB_UID_ENV,
    LOG_EVERY_STEPS_ENV,
    METRICS_ADDRESS_ENV,
    METRICS_PORT_ENV,
    PVC_ROOT_ENV,
    REPORT_INTERVAL_ENV,
)
from finetune_trainer.errors import ConfigError
from finetune_trainer.spec import TrainingSpec

KUBERNETES_ONLY_FIELDS = frozenset(
    {
        "resources",
        "suspend",
        "backoffLimit",
        "activeDeadlineSeconds",
        "ttlSecondsAfterFinished",
        "stallTimeoutSeconds",
        "stopGracePeriodSeconds",
    }
)
"""FineTuneJob spec fields that belong to the operator; the trainer ignores them."""


@dataclass(frozen=True)
class RuntimeEnv:
    """What the operator (or a user) tells the trainer through the environment."""

    job_name: str | None = None
    job_namespace: str | None = None
    job_uid: str | None = None
    """The FineTuneJob's uid: checkpoints of another uid at the same output location are not resumed."""
    report_interval_seconds: float = DEFAULT_REPORT_INTERVAL_SECONDS
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_address: str = ""
    """Where /metrics listens: the pod IP (downward API) so pods sharing a network never collide; empty: all."""
    pvc_root: Path = Path(DEFAULT_PVC_ROOT)
    hf_token: str | None = field(default=None, repr=False)
    dataset_hf_token: str | None = field(default=None, repr=False)
    """``spec.dataset.tokenSecretRef``'s token; a hub dataset falls back to ``hf_token`` without it."""
    log_every_steps: int = DEFAULT_LOG_EVERY_STEPS
    gpu_memory: int | None = None
    """Bytes of each GPU the job asked for (the memory plan's check where CUDA cannot tell); None: unknown."""

    @property
    def in_cluster_reporting(self) -> bool:
        return bool(self.job_name and self.job_namespace)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> RuntimeEnv:
        """The trainer's side of the environment contract (``finetune_trainer.contract``)."""
        env = os.environ if environ is None else environ
        try:
            interval = float(env.get(REPORT_INTERVAL_ENV, str(DEFAULT_REPORT_INTERVAL_SECONDS)))
            port = int(env.get(METRICS_PORT_ENV, str(DEFAULT_METRICS_PORT)))
            log_every = int(env.get(LOG_EVERY_STEPS_ENV, str(DEFAULT_LOG_EVERY_STEPS)))
            gpu_memory = int(env.get(GPU_MEMORY_ENV) or 0) or None
        except ValueError as exc:
            raise ConfigError(f"environment: {exc}") from exc
        return cls(
            job_name=env.get(JOB_NAME_ENV) or None,
            job_namespace=env.get(JOB_NAMESPACE_ENV) or None,
            job_uid=env.get(JOB_UID_ENV) or None,
            report_interval_seconds=max(interval, 0.0),
            metrics_port=port,
            metrics_address=env.get(METRICS_ADDRESS_ENV, ""),
            pvc_root=Path(env.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT),
            hf_token=env.get(HF_TOKEN_ENV) or None,
            dataset_hf_token=env.get(DATASET_HF_TOKEN_ENV) or None,
            log_every_steps=max(log_every, 1),
            gpu_memory=gpu_memory,
        )


def _validation_message(exc: ValidationError) -> str:
    """First error as ``a.b.c: message`` (camelCase, like the manifest the user wrote)."""
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "spec"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


def spec_from_document(document: Any) -> TrainingSpec:
    """A bare TrainingSpec mapping, or a FineTuneJob manifest whose ``spec`` is taken."""
    if not isinstance(document, dict):
        raise ConfigError("config: expected a mapping (a TrainingSpec or a FineTuneJob manifest)")
    if "kind" in document or "apiVersion" in document:
        document = document.get("spec")
        if not isinstance(document, dict):
            raise ConfigError("config: the FineTuneJob manifest has no spec mapping")
    wire = {key: value for key, value in document.items() if key not in KUBERNETES_ONLY_FIELDS}
    try:
        return TrainingSpec.model_validate(wire)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc)) from exc


def read_document(path: str | Path) -> Any:
    """The YAML or JSON document at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"config: {path} is not valid YAML/JSON: {exc}") from exc


def resources_of(path: str | Path) -> dict[str, Any]:
    """A FineTuneJob manifest's ``spec.resources`` (wire form; empty for a bare TrainingSpec): what the memory
    plan reads for the GPUs a job asks for."""
    document = read_document(path)
    spec = document.get("spec") if isinstance(document, dict) and "kind" in document else None
    resources = spec.get("resources") if isinstance(spec, dict) else None
    return resources if isinstance(resources, dict) else {}


def load_spec(path: str | Path, output_override: str | None = None) -> TrainingSpec:
    """Read YAML or JSON from ``path``; ``output_override`` replaces ``output.location``."""
    spec = spec_from_document(read_document(path))
    if output_override is not None:
        wire = spec.to_wire()
        wire["output"]["location"] = output_override
        try:
            spec = TrainingSpec.model_validate(wire)
        except ValidationError as exc:
            raise ConfigError(f"--output: {_validation_message(exc)}") from exc
    return spec


def local_path(location: str, pvc_root: Path) -> Path:
    """``file:///x`` and ``/x`` are local; ``pvc://claim/sub`` is ``<pvc_root>/claim/sub``; an ``s3://``
    output is written to the pod's scratch (``<tmp>/finetune-s3/bucket/prefix``) and uploaded from there."""
    if location.startswith("s3://"):
        return Path(tempfile.gettempdir()) / "finetune-s3" / location.removeprefix("s3://").strip("/")
    if location.startswith("file://"):
        return Path(location[len("file://") :])
    if location.startswith("pvc://"):
        return pvc_root / location[len("pvc://") :].strip("/")
    if location.startswith("/"):
        return Path(location)
    raise ConfigError(f"location {location!r} is not a local, file:// or pvc:// location")


def location_uri(path: Path, base_location: str, pvc_root: Path) -> str:
    """Name ``path`` (inside ``base_location``) in the scheme the user wrote ``base_location`` in."""
    base = local_path(base_location, pvc_root)
    relative = path.relative_to(base).as_posix()
    if relative == ".":
        return base_location
    return f"{base_location.rstrip('/')}/{relative}"
