"""Silent CPU fallback: a pod given GPUs but without CUDA fails with NoAccelerator, unless the GPUs are simulated."""

from __future__ import annotations

import pytest

from finetune_localcluster import podspec
from finetune_trainer import exitcodes
from finetune_trainer.accelerator import SIMULATED_GPUS_ENV, given_devices, require_accelerator
from finetune_trainer.errors import NoAcceleratorError


@pytest.mark.parametrize(
    ("value", "devices"),
    [
        (None, []),
        ("", []),
        ("void", []),
        ("none", []),
        ("all", []),  # CUDA base images bake this in; the device plugin writes ids
        ("GPU-1f2e", ["GPU-1f2e"]),
        ("0, 1", ["0", "1"]),
    ],
)
def test_given_devices(value: str | None, devices: list[str]) -> None:
    environ = {} if value is None else {"NVIDIA_VISIBLE_DEVICES": value}
    assert given_devices(environ) == devices


def test_given_gpus_without_cuda_fail_with_no_accelerator() -> None:
    with pytest.raises(NoAcceleratorError) as error:
        require_accelerator({"NVIDIA_VISIBLE_DEVICES": "GPU-1f2e,GPU-77aa"}, cuda_available=False)
    assert error.value.exit_code == exitcodes.NO_ACCELERATOR.code == 5
    assert error.value.reason == "NoAccelerator"
    assert "NVIDIA_VISIBLE_DEVICES=GPU-1f2e,GPU-77aa" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("environ", "cuda"),
    [
        ({"NVIDIA_VISIBLE_DEVICES": "GPU-1f2e"}, True),  # a real GPU pod
        ({}, False),  # a CPU pod
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, False),  # a CPU pod on a CUDA base image
        ({"NVIDIA_VISIBLE_DEVICES": "GPU-simulated-0", SIMULATED_GPUS_ENV: "GPU-simulated-0"}, False),
    ],
)
def test_cpu_training_is_allowed(environ: dict[str, str], cuda: bool) -> None:
    require_accelerator(environ, cuda_available=cuda)


def test_the_local_node_marks_its_gpus_as_simulated() -> None:
    assert podspec.SIMULATED_GPUS_ENV == SIMULATED_GPUS_ENV
    given = podspec.gpu_env({"resources": {"limits": {"nvidia.com/gpu": "2"}, "requests": {"nvidia.com/gpu": "2"}}})
    assert given_devices(given) == ["GPU-simulated-0", "GPU-simulated-1"]
    require_accelerator(given, cuda_available=False)
    assert podspec.gpu_env({"resources": {"limits": {"cpu": "1"}}}) == {}
    assert podspec.gpu_env({}) == {}
