"""Fail fast instead of training on CPU while holding GPUs.

A pod that was given GPUs (the NVIDIA device plugin names them in ``NVIDIA_VISIBLE_DEVICES``)
but sees no CUDA (a driver or runtime problem on the node) would otherwise train on CPU,
hours slower, while the GPUs sit idle. Only nodes whose devices are simulated (the local test
node sets ``SIMULATED_GPUS_ENV``) may fall back to CPU. Torch-free: the caller says whether CUDA works.
"""

from __future__ import annotations

from collections.abc import Mapping

from finetune_trainer.errors import ConfigError, NoAcceleratorError

SIMULATED_GPUS_ENV = "FINETUNE_SIMULATED_GPUS"
"""Set (to the device ids) by a node whose GPUs are simulated: CPU training there is intended."""
_NO_DEVICES = ("", "void", "none", "all")
"""Values that name no devices. ``all`` is baked into CUDA base images; the device plugin writes ids."""


def given_devices(environ: Mapping[str, str]) -> list[str]:
    """The GPU devices the device plugin gave this container (empty when none)."""
    value = environ.get("NVIDIA_VISIBLE_DEVICES", "").strip()
    if value.lower() in _NO_DEVICES:
        return []
    return [device.strip() for device in value.split(",") if device.strip()]


def require_accelerator(environ: Mapping[str, str], cuda_available: bool) -> None:
    """Raise NoAcceleratorError when devices were given, CUDA is unavailable and they are not simulated."""
    devices = given_devices(environ)
    if devices and not cuda_available and not environ.get(SIMULATED_GPUS_ENV):
        raise NoAcceleratorError(
            f"the pod was given GPUs (NVIDIA_VISIBLE_DEVICES={','.join(devices)}) but CUDA is unavailable: "
            "check the node's NVIDIA driver and container runtime; not falling back to CPU"
        )


def require_cuda_for_quantization(quantization: str | None, cuda_available: bool) -> None:
    """QLoRA's 4-bit base (bitsandbytes) runs only on CUDA: refuse at once rather than train in fp32 instead."""
    if quantization is not None and not cuda_available:
        raise ConfigError(
            f"freeze.lora.quantization: {quantization} (QLoRA) needs a CUDA GPU (resources.gpusPerNode >= 1); "
            "this pod has none"
        )
