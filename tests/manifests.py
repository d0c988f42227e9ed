"""Shared FineTuneJob manifests for tests: one valid baseline and a table of invalid edits.

The same invalid cases run against the pydantic models (unit) and the real API server with
the generated CRD (integration), so the two validators are held to the same answers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.api.sweep import FineTuneSweepSpec, choices
from finetune_trainer.contract import (
    MAX_ARTIFACTS,
    MAX_CHECKPOINT_URI_LENGTH,
    MAX_EVALUATIONS,
    MAX_LINEAGE_LENGTH,
    MAX_METRIC_NAME_LENGTH,
    MAX_METRICS_PER_EVALUATION,
    Artifact,
    BaseModelLineage,
    BestResult,
    EvaluationRecord,
    MemoryPlan,
    Progress,
    TrackingStatus,
    TrainerStatus,
)

ROOT = Path(__file__).resolve().parent.parent


def _examples(kind: str) -> list[Path]:
    return [p for p in sorted((ROOT / "examples").glob("*.yaml")) if yaml.safe_load(p.read_text())["kind"] == kind]


EXAMPLES = _examples("FineTuneJob")
SWEEP_EXAMPLES = _examples("FineTuneSweep")
Manifest = dict[str, Any]


def baseline(name: str = "valid") -> Manifest:
    """A small valid text-classification FineTuneJob."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "file:///models/minilm", "task": "sequence-classification", "numLabels": 2},
            "dataset": {"source": "file:///data/rt", "validation": "validation.jsonl"},
            "freeze": {"strategy": "bottom-layers", "layers": 2},
            "hyperparameters": {"learningRate": 3e-5},
            "evaluation": {"metrics": ["loss", "accuracy"]},
            "earlyStopping": {"metric": "accuracy", "patience": 2},
            "output": {"location": "file:///out/valid"},
        },
    }


def example(path: Path) -> Manifest:
    loaded: Manifest = yaml.safe_load(path.read_text())
    return loaded


def sweep_trial_values(spec: FineTuneSweepSpec) -> list[dict[str, Any]]:
    """The trials to check of a sweep: a grid's every combination (as the operator enumerates it); else
    each range's ends and every categorical choice or preset, one parameter at a time."""
    if spec.algorithm.name == "grid":
        from finetune_operator.reconcile.sweep_engine import grid  # Optuna: only for the tests that need it

        combos = grid(spec)
        assert len(combos) <= spec.max_trials, "maxTrials cuts the grid short: it never reaches SearchSpaceExhausted"
        return combos
    trials: list[dict[str, Any]] = []
    for p in spec.parameters:
        domain = p.float_range or p.int_range
        trials += [{p.name: v} for v in ([domain.min, domain.max] if domain is not None else choices(p))]
    return trials


@dataclass(frozen=True)
class Invalid:
    """An edit that makes the baseline invalid, and what the error must name."""

    id: str
    edit: Callable[[Manifest], None]
    field: str
    """Dotted camelCase path below ``spec`` that the API server's message must name (pydantic's names its leaf)."""


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    def edit(manifest: Manifest) -> None:
        node = manifest["spec"]
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return edit


def _all(*edits: Callable[[Manifest], None]) -> Callable[[Manifest], None]:
    def edit(manifest: Manifest) -> None:
        for one in edits:
            one(manifest)

    return edit


def _delete(path: str) -> Callable[[Manifest], None]:
    def edit(manifest: Manifest) -> None:
        node = manifest["spec"]
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        del node[leaf]

    return edit


INVALID: list[Invalid] = [
    Invalid("negative-learning-rate", _set("hyperparameters.learningRate", -1e-4), "hyperparameters.learningRate"),
    Invalid("zero-learning-rate", _set("hyperparameters.learningRate", 0), "hyperparameters.learningRate"),
    Invalid("learning-rate-wrong-type", _set("hyperparameters.learningRate", "fast"), "hyperparameters.learningRate"),
    Invalid("batch-size-wrong-type", _set("hyperparameters.batchSize", "big"), "hyperparameters.batchSize"),
    Invalid("patience-zero", _set("earlyStopping.patience", 0), "earlyStopping.patience"),
    Invalid("unknown-strategy", _set("freeze.strategy", "half"), "freeze.strategy"),
    Invalid("layers-missing", _delete("freeze.layers"), "freeze.layers"),
    Invalid("lora-without-lora-strategy", _set("freeze.lora", {"r": 8}), "freeze.lora"),
    Invalid("augmentation-on-text", _set("augmentation", {"horizontalFlip": 0.5}), "augmentation"),
    Invalid("bad-model-source", _set("model.source", "gs://bucket/model"), "model.source"),
    Invalid("s3-credentials-in-model-source", _set("model.source", "s3://AKIA:secret@bucket/model"), "model.source"),
    Invalid("s3-credentials-in-dataset", _set("dataset.source", "s3://key:secret@bucket/data"), "dataset.source"),
    Invalid("s3-credentials-in-output", _set("output.location", "s3://k:s@bucket/out"), "output.location"),
    Invalid("s3-block-without-s3-uri", _set("output.s3", {"endpoint": "http://minio:9000"}), "output.s3"),
    Invalid("s3-endpoint-not-a-url", _set("storage.s3", {"endpoint": "minio:9000"}), "storage.s3.endpoint"),
    Invalid("unknown-task", _set("model.task", "translation"), "model.task"),
    Invalid("warmup-both", _set("hyperparameters.warmupRatio", 0.1), "hyperparameters.warmupRatio"),
    Invalid("validation-both", _set("dataset.validationFraction", 0.1), "dataset.validationFraction"),
    Invalid("steps-without-interval", _set("evaluation.strategy", "steps"), "evaluation.interval"),
    Invalid("early-stop-metric-not-evaluated", _set("earlyStopping.metric", "f1"), "earlyStopping.metric"),
    Invalid("perplexity-on-classifier", _set("evaluation.metrics", ["loss", "perplexity"]), "evaluation.metrics"),
    Invalid("missing-labels", _delete("model.numLabels"), "model.numLabels"),
    Invalid("dataset-subset-on-files", _set("dataset.subset", "sst2"), "dataset.subset"),
    Invalid("dataset-revision-on-files", _set("dataset.revision", "main"), "dataset.revision"),
    Invalid("dataset-token-on-files", _set("dataset.tokenSecretRef", {"name": "hf"}), "dataset.tokenSecretRef"),
    Invalid("adapter-export-without-lora", _set("output.export", {"formats": ["adapter"]}), "output.export.formats"),
    Invalid("unknown-export-dtype", _set("output.export", {"dtype": "int4"}), "output.export.dtype"),
    Invalid("bad-cpu-quantity", _set("resources.cpu", "lots"), "resources.cpu"),
    Invalid("nodes-zero", _set("resources.nodes", 0), "resources.nodes"),
    Invalid(
        "auroc-with-three-labels",
        _all(
            _set("model.numLabels", 3),
            _set("evaluation.metrics", ["loss", "auroc"]),
            _set("earlyStopping.metric", "auroc"),
        ),
        "evaluation.metrics",
    ),
    Invalid(
        "f1-weighted-on-causal-lm",
        _all(
            _set("model.task", "causal-lm"),
            _set("evaluation.metrics", ["loss", "f1_weighted"]),
            _delete("earlyStopping"),
        ),
        "evaluation.metrics",
    ),
]
"""Each edit is applied to a fresh ``baseline()``; ``warmup-both`` relies on a warmupSteps it adds."""


def invalid_manifest(case: Invalid, name: str | None = None) -> Manifest:
    manifest = baseline(name or case.id)
    if case.id == "warmup-both":
        manifest["spec"]["hyperparameters"]["warmupSteps"] = 10
    case.edit(manifest)
    return copy.deepcopy(manifest)


def sweep_baseline(name: str = "sweep") -> Manifest:
    """A small valid FineTuneSweep over the baseline FineTuneJob (the issue's shape)."""
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name},
        "spec": {
            "objective": {"metric": "accuracy", "direction": "maximize", "goal": 0.95},
            "algorithm": {"name": "tpe", "seed": 42},
            "pruning": {"name": "median", "warmupEvaluations": 1, "startupTrials": 3},
            "parameters": [
                {
                    "name": "lr",
                    "path": "hyperparameters.learningRate",
                    "float": {"min": 1e-5, "max": 3e-4, "log": True},
                },
                {"name": "batch", "path": "hyperparameters.batchSize", "int": {"min": 8, "max": 32, "step": 8}},
                {"name": "decay", "path": "hyperparameters.weightDecay", "categorical": {"values": [0.0, 0.01, 0.1]}},
                {
                    "name": "freeze",
                    "categorical": {
                        "presets": [
                            {"label": "bottom-4", "set": {"freeze.strategy": "bottom-layers", "freeze.layers": 4}},
                            {"label": "head-only", "set": {"freeze.strategy": "head-only"}, "unset": ["freeze.layers"]},
                        ]
                    },
                },
            ],
            "trialTemplate": {"metadata": {"labels": {"team": "ml"}}, "spec": baseline()["spec"]},
            "parallelism": 2,
            "maxTrials": 12,
            "maxFailedTrials": 3,
        },
    }


def trainer_status_at_the_bounds(output: str) -> TrainerStatus:
    """The largest status the contract lets a trainer write (its best checkpoint inside ``output``)."""
    names = [f"m{i:02d}".ljust(MAX_METRIC_NAME_LENGTH, "x") for i in range(MAX_METRICS_PER_EVALUATION)]
    evaluations = [
        EvaluationRecord(
            step=step,
            epoch=step / 10,
            metrics=dict.fromkeys(names, 0.5),
            time="2026-12-04T23:39:22Z",
            train_loss=None,
        )
        for step in range(1, MAX_EVALUATIONS + 1)
    ]
    checkpoint = f"{output}/checkpoints/" + "c" * (MAX_CHECKPOINT_URI_LENGTH - len(output) - len("/checkpoints/"))
    best = BestResult(metric=names[0], value=0.5, step=3, epoch=0.3, checkpoint=checkpoint, majority_baseline=None)
    progress = Progress(step=7, total_steps=70, epoch=0.7, percent=10.0, last_heartbeat_time="2026-12-04T23:39:22Z")
    lineage = BaseModelLineage(source="pvc://models/base", revision="r" * MAX_LINEAGE_LENGTH)
    artifacts = [
        Artifact(
            uri=f"{output}/a{i}/" + "u" * (MAX_CHECKPOINT_URI_LENGTH - len(output) - len(f"/a{i}/")),
            kind="adapter",
            size_bytes=2**40,
            sha256="f" * 64,
            dtype="bf16",
            base_model=lineage,
            dataset_fingerprint="d" * MAX_LINEAGE_LENGTH,
        )
        for i in range(MAX_ARTIFACTS)
    ]
    memory = MemoryPlan(strategy="fsdp", requested="auto", world_size=8, gpu_memory_gi_b=24.0, per_gpu_gi_b=17.95)
    tracking = TrackingStatus(
        run_id="r" * 64,
        url="h" * 2048,
        experiment_id="e" * 64,
        parent_run_id="p" * 64,
        registered_model="m" * 256,
        registered_version="9" * 64,
        behind=True,
        message="x" * 1024,
    )
    return TrainerStatus(
        progress=progress,
        evaluations=evaluations,
        best=best,
        artifacts=artifacts,
        memory_plan=memory,
        tracking=tracking,
    )
