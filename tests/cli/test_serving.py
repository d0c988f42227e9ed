"""``kubectl finetune export`` and the artifacts in ``describe``: pure rendering from a job's status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from finetune_cli.render import describe, parse_job
from finetune_cli.serving import ExportError, serving
from tests.cli.jobs import job

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lora_job(output: str = "pvc://models/sentiment-lora") -> dict[str, Any]:
    """A finished LoRA job (Hub base at a pinned commit) that published its adapter and merged model."""
    manifest = job("sentiment-lora")
    spec = manifest["spec"]
    spec["model"].update(source="hf://org/base", revision="main")
    spec["freeze"] = {"strategy": "lora", "lora": {"r": 4}}
    spec["output"]["location"] = output
    lineage = {
        "baseModel": {"source": "hf://org/base", "revision": COMMIT},
        "datasetFingerprint": "sha256:" + "d" * 64,
    }
    manifest["status"] = {
        "artifacts": [
            {"uri": f"{output}/adapter", "kind": "adapter", "sizeBytes": 1_234, "sha256": "a" * 64, "dtype": "bf16"}
            | lineage,
            {"uri": f"{output}/model", "kind": "merged", "sizeBytes": 3 << 20, "sha256": "b" * 64, "dtype": "bf16"}
            | lineage,
        ]
    }
    return manifest


def test_a_lora_job_exports_vllm_lines_for_the_adapter_and_the_merged_model_and_an_isvc() -> None:
    parsed = parse_job(lora_job())
    config = serving(parsed.name, parsed.namespace, parsed.spec, parsed.status.artifacts)
    assert config.vllm == [
        f"vllm serve org/base --revision {COMMIT} --enable-lora "
        "--lora-modules sentiment-lora=/mnt/pvc/models/sentiment-lora/adapter --max-lora-rank 8",
        "vllm serve /mnt/pvc/models/sentiment-lora/model --served-model-name sentiment-lora --dtype bfloat16",
    ]
    assert config.prepare == []
    (isvc,) = config.inference_services
    assert isvc["metadata"]["name"] == "sentiment-lora-merged"
    assert isvc["metadata"]["annotations"]["finetune.dev/artifact-sha256"] == "b" * 64
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "huggingface"}
    assert model["storageUri"] == "pvc://models/sentiment-lora/model"
    assert "--task=sequence_classification" in model["args"] and "--dtype=bfloat16" in model["args"]
    text = config.yaml()
    assert text.startswith("# vLLM:\n#   vllm serve org/base") and "kind: InferenceService" in text


def test_an_s3_artifact_is_synced_before_vllm_reads_it_and_only_adapters_may_be_asked_for() -> None:
    parsed = parse_job(lora_job("s3://team-models/runs/sentiment"))
    config = serving(parsed.name, parsed.namespace, parsed.spec, parsed.status.artifacts, {"adapter"})
    assert config.prepare == ["aws s3 sync s3://team-models/runs/sentiment/adapter /mnt/models/sentiment-lora-adapter"]
    assert "--lora-modules sentiment-lora=/mnt/models/sentiment-lora-adapter" in config.vllm[0]
    assert config.inference_services == []


def test_a_job_without_artifacts_has_nothing_to_export() -> None:
    parsed = parse_job(job("fresh"))
    with pytest.raises(ExportError, match="no published artifacts"):
        serving(parsed.name, parsed.namespace, parsed.spec, parsed.status.artifacts)


def test_describe_lists_the_artifacts_with_hashes_and_lineage() -> None:
    text = describe(parse_job(lora_job()), datetime(2026, 1, 1, tzinfo=UTC))
    section = text[text.index("Artifacts:") :]
    rows = [line.split() for line in section.splitlines()]
    assert ["adapter", "bf16", "1.2", "KiB", "pvc://models/sentiment-lora/adapter"] in rows
    assert f"adapter: sha256 {'a' * 64}" in section and f"base hf://org/base @ {COMMIT}" in section
    assert "3.0 MiB" in section and "data sha256:" in section
