"""``kubectl finetune advise`` prints the memory plan of an 8B LoRA job from the model's config.json alone
(examples/models/llama-3-8b holds no weights), offline, as the installed command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_advise_plans_an_8b_lora_job_for_one_80g_gpu_and_eight_24g_gpus() -> None:
    command = Path(sys.executable).parent / "kubectl-finetune"
    env = {**os.environ, "FINETUNE_PVC_ROOT": str(ROOT / "examples")}  # pvc://models/llama-3-8b is the config
    done = subprocess.run(
        [str(command), "advise", "-f", str(ROOT / "examples/llama-3-8b-lora.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("memory plan: "))
    assert lines[start].startswith(
        "memory plan: 8 GPU(s), 24.0 GiB each (resources.gpuMemory 24Gi); 8,043,892,736 parameters, "
        "13,631,488 trainable (0.17%)"
    )
    rows = {line.split()[0]: line.split() for line in lines[start + 2 : start + 4]}
    assert (rows["ddp"][-1], rows["fsdp"][-1]) == ("no", "yes")
    assert lines[start + 4] == "strategy: auto: fsdp (GiB per GPU; TOTAL with gradientCheckpointing on)"
    picks = {line.split(":")[0]: line.split(": ", 1)[1] for line in lines if line.startswith("on ")}
    assert picks["on 1 x 80 GiB"].startswith("auto picks ddp (") and picks["on 1 x 80 GiB"].endswith(", fits)")
    assert picks["on 8 x 24 GiB"].startswith("auto picks fsdp (") and picks["on 8 x 24 GiB"].endswith(", fits)")
    assert lines[-1].startswith("Layer map: not shown: ") and "holds no weights" in lines[-1]
