"""Spec loading (bare or a FineTuneJob manifest) and location schemes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune_trainer.config import RuntimeEnv, load_spec, local_path, location_uri
from finetune_trainer.errors import ConfigError

BARE = {
    "model": {"source": "hf://org/name", "revision": "main", "task": "sequence-classification", "numLabels": 2},
    "dataset": {"source": "pvc://data/sst"},
    "output": {"location": "pvc://runs/job-1"},
}


def test_manifest_spec_is_taken_and_kubernetes_fields_ignored(tmp_path: Path) -> None:
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "x"},
        "spec": {
            **BARE,
            "resources": {"gpusPerNode": 1},
            "suspend": False,
            "backoffLimit": 2,
            "activeDeadlineSeconds": 60,
            "ttlSecondsAfterFinished": 5,
            "stallTimeoutSeconds": 9,
            "stopGracePeriodSeconds": 30,
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    spec = load_spec(path)
    assert spec.model.revision == "main" and spec.output.location == "pvc://runs/job-1"
    assert load_spec(path, output_override="/tmp/elsewhere").output.location == "/tmp/elsewhere"


def test_unknown_field_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BARE, "hyperparameters": {"learningrate": 1}}))
    with pytest.raises(ConfigError, match=r"hyperparameters\.learningrate: Extra inputs are not permitted"):
        load_spec(path)


def test_locations() -> None:
    root = Path("/mnt/pvc")
    assert local_path("pvc://claim/sub/path", root) == Path("/mnt/pvc/claim/sub/path")
    assert local_path("pvc://claim", root) == Path("/mnt/pvc/claim")
    assert local_path("file:///x/y", root) == Path("/x/y")
    assert local_path("/x/y", root) == Path("/x/y")
    ckpt = Path("/mnt/pvc/claim/run/checkpoints/checkpoint-5")
    assert location_uri(ckpt, "pvc://claim/run", root) == "pvc://claim/run/checkpoints/checkpoint-5"
    assert location_uri(Path("/x/checkpoints/c"), "file:///x/", root) == "file:///x/checkpoints/c"


def test_env_defaults_and_token_never_in_repr() -> None:
    env = RuntimeEnv.from_environ({"HF_TOKEN": "hf_secret", "FINETUNE_PVC_ROOT": "/p"})
    assert env.metrics_port == 9400 and env.report_interval_seconds == 10.0 and env.pvc_root == Path("/p")
    assert not env.in_cluster_reporting and "hf_secret" not in repr(env)
    with pytest.raises(ConfigError):
        RuntimeEnv.from_environ({"FINETUNE_METRICS_PORT": "x"})


@pytest.mark.parametrize(
    ("environ", "token"),
    [
        ({"HF_TOKEN": "model-token", "FINETUNE_DATASET_HF_TOKEN": "data-token"}, "data-token"),
        ({"HF_TOKEN": "model-token"}, "model-token"),  # no token of its own: the model's, as before
    ],
)
def test_a_hub_dataset_is_loaded_with_its_subset_revision_and_token(
    environ: dict[str, str], token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub is not reachable here: the arguments ``datasets.load_dataset`` gets are the proof."""
    from datasets import Dataset

    from finetune_trainer.data import splits
    from finetune_trainer.spec import TrainingSpec

    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []

    def load_dataset(*args: object, **kwargs: object) -> Dataset:
        calls.append((args, kwargs))
        return Dataset.from_dict({"text": ["a"], "label": [0]})

    monkeypatch.setattr(splits, "load_dataset", load_dataset)
    spec = TrainingSpec.model_validate(
        {
            "model": {"source": "/models/m", "task": "sequence-classification", "numLabels": 2},
            "dataset": {
                "source": "hf://datasets/nyu-mll/glue",
                "subset": "sst2",
                "revision": "bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c",
                "tokenSecretRef": {"name": "data-token"},
                "train": "train",
            },
            "output": {"location": "/out"},
        }
    )
    env = RuntimeEnv.from_environ(environ)
    assert "data-token" not in repr(env)
    split = splits.read_hub(spec, env, "train", "dataset.train")
    assert len(split) == 1
    assert calls == [
        (
            ("nyu-mll/glue", "sst2"),
            {"split": "train", "revision": "bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c", "token": token},
        )
    ]
