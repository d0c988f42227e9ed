"""One table for a GPU: causal-LM tokens/s and MFU (ours vs plain transformers.Trainer, +/- torch.compile),
MiniLM sequence-classification samples/s with and without the frozen-prefix activation cache, and the memory rows
(issue 27): a ~0.9B Llama fully fine-tuned with distributed.strategy ddp vs fsdp on one GPU, LoRA vs QLoRA (4-bit
base) of the ~150M one, each with its peak ``max_memory_allocated`` beside the memory plan's estimate
(``finetune_trainer.memory_plan``). A memory row that fails (no bitsandbytes, a strategy not built yet) prints
why and the table goes on; QLoRA is skipped without CUDA.

The causal LM is a Llama built from a config (~150M parameters; no weights ship on PyPI except as GGUF) with
MiniLM's tokenizer, trained on packed Rotten Tomatoes text in bf16 (fp32 on CPU). ``--tiny`` shrinks everything
so the script runs on CPU in a minute (tests/trainer/test_benchmarks.py): it must not break unseen. Each row runs
in its own process on a GPU; at --tiny all rows share one. Run through ``benchmarks/gpu.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
"""Dense bf16 tensor-core peaks (datasheets), for MFU."""

LM_ROWS = ["lm:plain", "lm:ours", "lm:plain+compile", "lm:ours+compile"]
CLS_ROWS = ["minilm:ours", "minilm:ours+cache"]
MEM_ROWS = ["mem:ddp", "mem:fsdp", "mem:lora", "mem:qlora"]
"""Not at --tiny unless asked (``--only mem``): they would only lengthen the CPU test."""


BILLION = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16}
"""~0.9B parameters with MiniLM's 30522-token vocabulary (tied embeddings)."""


def lm_config(tiny: bool, vocab: int, size: dict[str, int] | None = None) -> Any:
    from transformers import LlamaConfig

    size = size or (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
        if tiny
        else {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12}
    )
    return LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=2048,
        num_key_value_heads=size["num_attention_heads"],
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
        **size,
    )


def prepare_lm(root: Path, tiny: bool, size: dict[str, int] | None = None) -> tuple[Path, Path]:
    """A from-config Llama with MiniLM's tokenizer, and a train.jsonl of review text."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    import finetune_assets

    tokenizer = AutoTokenizer.from_pretrained(str(finetune_assets.minilm_dir()))
    model_dir = root / "llama"
    LlamaForCausalLM(lm_config(tiny, len(tokenizer), size)).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    train, _ = finetune_assets.rotten_tomatoes(n_train=400 if tiny else 4000, n_val=16, seed=0)
    return model_dir, train


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


@contextlib.contextmanager
def step_clock() -> Iterator[list[float]]:
    """The end time of every training step of any Trainer (ours builds its own) while inside."""
    from transformers import Trainer, TrainerCallback

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            step_ends.append(time.perf_counter())

    original = Trainer.train

    def timed(self: Any, *a: Any, **k: Any) -> Any:
        self.add_callback(StepClock())
        return original(self, *a, **k)

    Trainer.train = timed  # type: ignore[method-assign]
    try:
        yield step_ends
    finally:
        Trainer.train = original  # type: ignore[method-assign]


def run_row(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    kind, _, variant = args.row.partition(":")
    gpu = torch.cuda.is_available()
    precision = "bf16" if gpu else "fp32"
    estimate = None
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp, step_clock() as step_ends:
        root = Path(tmp)
        if kind == "mem":
            model_dir, train = prepare_lm(root, args.tiny, None if args.tiny or variant.endswith("lora") else BILLION)
            estimate = ours_mem(args, model_dir, train, root / "out", precision, variant)
            params, unit = 0, args.batch * args.seq
        elif kind == "lm":
            model_dir, train = prepare_lm(root, args.tiny)
            who, _, extra = variant.partition("+")
            compile_ = extra == "compile"
            if who == "ours":
                ours_lm(args, model_dir, train, root / "out", precision, compile_)
            else:
                plain_lm(args, model_dir, train, root / "out", precision, compile_)
            from transformers import AutoConfig, LlamaForCausalLM

            with torch.device("meta"):
                params = sum(
                    p.numel() for p in LlamaForCausalLM(AutoConfig.from_pretrained(str(model_dir))).parameters()
                )
            unit = args.batch * args.seq  # tokens per step
        else:
            import finetune_assets

            train, _ = finetune_assets.rotten_tomatoes(n_train=args.batch * args.steps, n_val=16, seed=0)
            ours_cls(args, finetune_assets.minilm_dir(), train, root / "out", precision, variant.endswith("+cache"))
            params = 0
            unit = args.batch  # samples per step
    warm = step_ends[len(step_ends) // 3 :]  # skip compilation and warm-up steps
    intervals = sorted(b - a for a, b in itertools.pairwise(warm))
    rate = unit / intervals[len(intervals) // 2]
    peak = peak_flops()
    return {
        "row": args.row,
        "rate": rate,
        "unit": "tokens/s" if kind in ("lm", "mem") else "samples/s",
        "mfu": 6 * params * rate / peak if peak and kind == "lm" else None,
        "params": params,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
        "estimate_mib": estimate,
    }


def ours_mem(
    args: argparse.Namespace, model_dir: Path, train: Path, out: Path, precision: str, variant: str
) -> float | None:
    """Train one memory row with our trainer; the memory plan's per-GPU estimate (MiB) for it, on this GPU."""
    import torch

    from finetune_trainer.memory_plan import Gpus, plan, read_config
    from finetune_trainer.spec import TrainingSpec

    spec = _common(args, out, precision, False)
    spec["hyperparameters"]["maxSteps"] = args.steps
    if variant in ("ddp", "fsdp"):
        spec["distributed"] = {"strategy": variant}
    else:
        lora: dict[str, Any] = {"r": 16, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
        spec["freeze"] = {"strategy": "lora", "lora": {**lora, "quantization": "4bit"} if variant == "qlora" else lora}
    wire = {
        "model": {"source": str(model_dir), "task": "causal-lm"},
        "dataset": {"source": str(train.parent), "train": train.name, "maxSeqLength": args.seq, "packing": True},
        **spec,
    }
    _run_ours(wire)
    config = read_config(model_dir)
    memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    found = plan(TrainingSpec.model_validate(wire), config or {}, Gpus(1, memory, "this GPU"), precision)
    gib = found.per_gpu_gib(found.strategy)
    return gib * 1024 if gib is not None else None


def _run_ours(spec: dict[str, Any]) -> None:
    import io

    from finetune_trainer.config import RuntimeEnv
    from finetune_trainer.reporting import JsonLines
    from finetune_trainer.run import run
    from finetune_trainer.spec import TrainingSpec

    run(TrainingSpec.model_validate(spec), RuntimeEnv(metrics_port=0, log_every_steps=10**6), JsonLines(io.StringIO()))


def _common(args: argparse.Namespace, out: Path, precision: str, compile_: bool) -> dict[str, Any]:
    return {
        "hyperparameters": {
            "learningRate": 3e-4,
            "batchSize": args.batch,
            "seed": 0,
            "precision": precision,
            "compile": compile_,
            "weightDecay": 0.0,
        },
        "evaluation": {"strategy": "no", "metrics": ["loss"]},
        "output": {"location": str(out), "checkpointIntervalSteps": 10**6, "saveFinalModel": False},
    }


def ours_lm(args: argparse.Namespace, model_dir: Path, train: Path, out: Path, precision: str, compile_: bool) -> None:
    spec = _common(args, out, precision, compile_)
    spec["hyperparameters"]["maxSteps"] = args.steps
    _run_ours(
        {
            "model": {"source": str(model_dir), "task": "causal-lm"},
            "dataset": {"source": str(train.parent), "train": train.name, "maxSeqLength": args.seq, "packing": True},
            **spec,
        }
    )


def ours_cls(args: argparse.Namespace, model_dir: Path, train: Path, out: Path, precision: str, cache: bool) -> None:
    spec = _common(args, out, precision, False)
    spec["hyperparameters"]["epochs"] = 3
    _run_ours(
        {
            "model": {"source": str(model_dir), "task": "sequence-classification", "numLabels": 2},
            "dataset": {"source": str(train.parent), "train": train.name, "maxSeqLength": 64},
            "freeze": {"strategy": "bottom-layers", "layers": 3, "cacheActivations": cache},
            **spec,
        }
    )


def plain_lm(args: argparse.Namespace, model_dir: Path, train: Path, out: Path, precision: str, compile_: bool) -> None:
    """What a user writes with transformers.Trainer: tokenize, concatenate, cut into blocks, train."""
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    data = load_dataset("json", data_files=str(train), split="train")

    def pack(batch: dict[str, Any]) -> dict[str, Any]:
        ids = [t for row in tokenizer(batch["text"])["input_ids"] for t in row]
        blocks = [ids[i : i + args.seq] for i in range(0, len(ids) - args.seq + 1, args.seq)]
        return {"input_ids": blocks}

    data = data.map(pack, batched=True, remove_columns=data.column_names)
    training_args = TrainingArguments(
        output_dir=str(out),
        learning_rate=3e-4,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        seed=0,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=precision == "bf16",
        torch_compile=compile_,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    Trainer(model=model, args=training_args, train_dataset=data, data_collator=collator).train()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes that run on CPU in about a minute")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--seq", type=int, default=0)
    parser.add_argument("--only", help="run only the rows whose name starts with this (lm, minilm, mem)")
    args = parser.parse_args(argv)
    if args.row:
        print("RESULT " + json.dumps(run_row(args)), flush=True)
        return
    rows = [r for r in LM_ROWS + CLS_ROWS + MEM_ROWS if not (args.tiny and r.endswith("+compile"))]  # no CPU compiler
    rows = (
        [r for r in rows if r.startswith(args.only)]
        if args.only
        else [r for r in rows if not (args.tiny and r.startswith("mem:"))]
    )
    results = []
    for row in rows:
        lm = row.startswith(("lm:", "mem:"))
        steps, batch, seq = (6, 4, 32) if args.tiny else ((60, 8, 1024) if lm else (30, 64, 64))
        if row.startswith("mem:") and not args.tiny:
            steps, batch = 12, 4
        flags = [f"--steps={steps}", f"--batch={batch}", f"--seq={seq}"]
        if row == "mem:qlora" and not cuda_available():
            print(f"{row}: skipped: QLoRA (bitsandbytes 4-bit) needs CUDA", file=sys.stderr)
            continue
        if args.tiny:  # one process for every row: the torch and transformers imports are most of a tiny row
            results.append(run_row(parser.parse_args(["--tiny", "--row", row, *flags])))
            continue
        # On a GPU each row has a process of its own: its memory peak, allocator and compile caches.
        proc = subprocess.run(
            [sys.executable, __file__, "--row", row, *flags], check=False, capture_output=True, text=True
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{row}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            if row.startswith("mem:"):  # they need parts other work builds (FSDP2, bitsandbytes): the table goes on
                continue
            sys.exit(1)
        results.append(json.loads(line.removeprefix("RESULT ")))
    print(f"{'row':<20}{'rate':>14}  {'unit':<10}{'MFU':>7}{'peak MiB':>10}")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
        print(f"{r['row']:<20}{r['rate']:>14.1f}  {r['unit']:<10}{mfu:>7}{peak:>10}")
    memory = [r for r in results if r["row"].startswith("mem:")]
    if memory:
        print(f"{'memory row':<20}{'tokens/s':>10}{'peak MiB':>10}{'plan MiB':>10}{'plan/peak':>10}")
    for r in memory:
        peak, plan_mib = r["peak_mib"], r["estimate_mib"]
        ratio = f"{plan_mib / peak:.2f}" if peak and plan_mib else "n/a"
        shown = [f"{v:.0f}" if v is not None else "n/a" for v in (peak, plan_mib)]
        print(f"{r['row']:<20}{r['rate']:>10.1f}{shown[0]:>10}{shown[1]:>10}{ratio:>10}")
    rate = {r["row"]: r["rate"] for r in results}
    for row, anchor in (
        ("lm:ours", "lm:plain"),
        ("lm:ours+compile", "lm:plain+compile"),
        ("minilm:ours+cache", "minilm:ours"),
    ):
        if row in rate and anchor in rate:
            print(f"{row} vs {anchor}: {rate[row] / rate[anchor]:.2f}x")


if __name__ == "__main__":
    main()
