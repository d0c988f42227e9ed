"""``kubectl finetune export``: serving config for what a job published (``status.artifacts``).

Two forms: a KServe ``InferenceService`` on the Hugging Face runtime for a full model (a merged or plain model: its
``storageUri`` is the artifact's URI, since pvc:// and s3:// are KServe storage URIs), and a vLLM command line (an
adapter is served beside its base with ``--enable-lora --lora-modules NAME=PATH``; a full model with
``vllm serve PATH``). vLLM reads local paths: a pvc:// artifact is named where the claim is mounted, under
``/mnt/pvc/<claim>`` as in the trainer's pods; an s3:// one where it is synced to first.

Pure: a job in, text out (the caller escapes it, as it does every string a trainer wrote).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

from finetune_operator.api.job import DEFAULT_PVC_ROOT, GROUP, Artifact, FineTuneJobSpec
from finetune_trainer.contract import ArtifactKind

__all__ = ["ExportError", "Serving", "serving"]

ISVC_API_VERSION = "serving.kserve.io/v1beta1"
HF_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
HF_TASKS = {
    "causal-lm": "text_generation",
    "sequence-classification": "sequence_classification",
    "image-classification": "image_classification",
}
S3_MOUNT = "/mnt/models"
"""Where a vLLM line expects an s3:// artifact synced to (``aws s3 sync URI DIR``)."""


class ExportError(Exception):
    """The job has nothing servable (yet), or not in the form asked for."""


@dataclass(frozen=True)
class Serving:
    """The serving config of one job: InferenceServices, vLLM lines and the steps they need first."""

    inference_services: list[dict[str, Any]]
    vllm: list[str]
    prepare: list[str]

    def yaml(self, comments: bool = True) -> str:
        """Ready for ``kubectl apply -f -``; with ``comments`` the vLLM lines (and what they need) ride along."""
        notes = [f"#   {line}" for line in (*self.prepare, *self.vllm)] if comments else []
        head = "# vLLM:\n" + "\n".join(notes) + "\n" if notes else ""
        docs = yaml.safe_dump_all(self.inference_services, sort_keys=False) if self.inference_services else ""
        return head + docs


def _dns_label(name: str, suffix: str) -> str:
    """An InferenceService name (a DNS-1035 label: KServe prefixes its Services with it)."""
    base = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-") or "model"
    if not base[0].isalpha():
        base = f"m-{base}"
    return f"{base[: 62 - len(suffix)].rstrip('-')}-{suffix}"


def _local_path(uri: str, prepare: list[str], name: str) -> str:
    """Where a server process reads ``uri`` from (see the module docstring)."""
    if uri.startswith("pvc://"):
        return f"{DEFAULT_PVC_ROOT}/{uri.removeprefix('pvc://')}"
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    if uri.startswith("s3://"):
        target = f"{S3_MOUNT}/{name}"
        prepare.append(f"aws s3 sync {shlex.quote(uri)} {shlex.quote(target)}")
        return target
    return uri


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's --max-lora-rank accepts."""


def _lora_rank_slot(rank: int) -> int:
    return next((slot for slot in VLLM_LORA_RANKS if slot >= rank), rank)


def _base_for_vllm(artifact: Artifact, prepare: list[str]) -> list[str]:
    """The base model argument(s) of ``vllm serve``: a Hub id at its recorded commit, or a local path."""
    lineage = artifact.base_model
    if lineage is None:
        raise ExportError(f"{artifact.uri}: status.artifacts records no base model for this adapter")
    if lineage.source.startswith("hf://"):
        args = [lineage.source.removeprefix("hf://")]
        if lineage.revision and not lineage.revision.startswith("sha256:"):
            args += ["--revision", lineage.revision]
        return args
    return [_local_path(lineage.source, prepare, "base")]


def _inference_service(
    name: str, namespace: str, job: str, spec: FineTuneJobSpec | None, artifact: Artifact
) -> dict[str, Any]:
    args = [f"--model_name={job}"]
    if spec is not None:
        args.append(f"--task={HF_TASKS[spec.model.task]}")
        if spec.model.task != "causal-lm":
            args.append("--backend=huggingface")  # vLLM serves generation; classifiers run on transformers
    if artifact.dtype in HF_DTYPES:
        args.append(f"--dtype={HF_DTYPES[artifact.dtype]}")
    model: dict[str, Any] = {"modelFormat": {"name": "huggingface"}, "storageUri": artifact.uri, "args": args}
    if spec is not None and spec.resources.gpus_per_node > 0:
        model["resources"] = {"limits": {spec.resources.gpu_resource_name: "1"}}
    return {
        "apiVersion": ISVC_API_VERSION,
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {f"{GROUP}/job": job},
            "annotations": {f"{GROUP}/artifact-sha256": artifact.sha256},
        },
        "spec": {"predictor": {"model": model}},
    }


def serving(
    name: str,
    namespace: str,
    spec: FineTuneJobSpec | None,
    artifacts: list[Artifact],
    kinds: set[ArtifactKind] | None = None,
) -> Serving:
    """Serving config for ``artifacts`` (those of ``kinds``, all when None); ExportError when none is servable."""
    chosen = [a for a in artifacts if kinds is None or a.kind in kinds]
    if not chosen:
        what = "no published artifacts" if not artifacts else f"no artifact of kind {', '.join(sorted(kinds or ()))}"
        raise ExportError(f"FineTuneJob {namespace}/{name} has {what} (status.artifacts)")
    services: list[dict[str, Any]] = []
    vllm: list[str] = []
    prepare: list[str] = []
    for artifact in chosen:
        if artifact.kind == "adapter":
            path = _local_path(artifact.uri, prepare, f"{name}-adapter")
            rank = spec.freeze.lora.r if spec is not None and spec.freeze.lora is not None else None
            line = ["vllm", "serve", *_base_for_vllm(artifact, prepare), "--enable-lora"]
            line += ["--lora-modules", f"{name}={path}"]
            line += ["--max-lora-rank", str(_lora_rank_slot(rank))] if rank is not None else []
            vllm.append(shlex.join(line))
            continue
        path = _local_path(artifact.uri, prepare, name)
        line = ["vllm", "serve", path, "--served-model-name", name]
        if artifact.dtype in HF_DTYPES:
            line += ["--dtype", HF_DTYPES[artifact.dtype]]
        vllm.append(shlex.join(line))
        if artifact.uri.startswith(("pvc://", "s3://")):
            services.append(_inference_service(_dns_label(name, artifact.kind), namespace, name, spec, artifact))
    return Serving(services, vllm, prepare)
