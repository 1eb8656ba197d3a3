"""GPU memory, measured: the longest sequence that trains under a cap, and the estimate's error.

    python -m benchmarks.bench prepare                         # here (CPU): tokenizer and data
    python -m benchmarks.memory longest --limits 16 24 80 [--tool unsloth] [-- ENGINE FLAGS]
    python -m benchmarks.memory matrix                         # predicted vs measured peak

`longest` loads the 7B-shaped model of benchmarks/bench.py once, caps the process's GPU memory the
way TORCH_PER_PROCESS_MEMORY_LIMIT does (torch.cuda.set_per_process_memory_fraction), and trains
one optimizer step on one example of each length of a ladder until a step runs out of memory,
for each cap in turn; a line per attempt. Our engine runs its own Recipe and Trainer, Unsloth its
FastLanguageModel and SFTTrainer (benchmarks/unsloth_run.py), each with 8-bit AdamW, LoRA r=32 on
all projections, dropout 0, gradient checkpointing.

`matrix` trains 2 steps of each configuration of the issue's matrix (1B- and 7B-shaped, LoRA and
QLoRA, 512/2,048/8,192 tokens, micro-batch 1/4) and prints the peak allocated memory beside
engine.memory's estimate for it.
"""

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

from benchmarks.bench import BENCH, MODEL, build_model

LADDER = [8192 * k for k in range(1, 13)] + [114688, 131072, 163840, 196608, 262144]
# The benchmark recipe (bench.COMMON) at one example a step, fit for any length.
BASE = {
    "use_qlora": "true", "bf16": "true", "lora_r": 32, "lora_alpha": 64, "lora_dropout": 0,
    "optim": "adamw_bnb_8bit", "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
    "gradient_checkpointing": "true", "train_on_prompt": "true", "save_strategy": "no", "eval_size": 0,
    "logging_steps": 1, "report_to": "none", "max_steps": 1,
}  # fmt: skip
SHAPES = {  # name: config.json fields (random weights, built on the GPU like bench.build_model)
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}


def _flags(values: dict) -> list[str]:
    return [str(x) for k, v in values.items() for x in (f"--{k}", v)]


def _one_example(tokens: int, examples: int = 1):
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(tokens)
    rows = [rng.integers(3, 32000, tokens).tolist() for _ in range(examples)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def _cap(gib: float) -> None:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))


def _free(model) -> None:
    import torch

    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()


def _recipe(model_dir: Path, flags: dict):
    from engine.config import parse_args
    from engine.train import Recipe

    argv = ["--model_id", str(model_dir), "--train_data", str(BENCH / "fixed2048-train.jsonl"),
            "--output_dir", "/tmp/memory-runs", *_flags({**BASE, **flags})]
    recipe = Recipe(parse_args(argv))
    recipe.setup()
    return recipe


def _train_step(recipe, config_changes: dict, tokens: int, examples: int) -> float:
    """One run of `max_steps` on examples of `tokens` tokens; returns peak allocated GiB."""
    import torch

    recipe.config = dataclasses.replace(recipe.config, **config_changes)
    data = _one_example(tokens, examples)
    recipe.datasets = dataclasses.replace(recipe.datasets, train=data, eval=None, num_train_examples=examples,
                                          num_eval_examples=0, train_tokens=tokens * examples)
    recipe.trainer = recipe._build_trainer()
    torch.cuda.reset_peak_memory_stats()
    try:
        recipe.trainer.train()
        return torch.cuda.max_memory_allocated() / 2**30
    finally:
        recipe.trainer = None
        _free(recipe.model)


def longest_engine(limits: list[float], flags: dict, ladder: list[int]) -> None:
    import torch

    from engine.memory import configure_allocator

    configure_allocator()  # before build_model's first allocation, as the engine does before its own
    build_model()
    recipe = _recipe(MODEL, {"max_length": max(ladder), **flags})
    start = 0
    for limit in sorted(limits):
        _cap(limit)
        for i in range(start, len(ladder)):
            began = time.time()
            try:
                peak, ok = _train_step(recipe, {}, ladder[i], 1), True
            except torch.OutOfMemoryError:
                peak, ok = None, False
            _report(tool="engine", flags=flags, limit_gib=limit, tokens=ladder[i], ok=ok, peak_gib=peak,
                    seconds=time.time() - began)
            if not ok:
                break
            start = i + 1


def _report(**fields) -> None:
    fields = {k: round(v, 3) if isinstance(v, float) else v for k, v in fields.items()}
    print(json.dumps(fields), flush=True)


def matrix() -> None:
    """Predicted vs measured peak on one GPU, for every configuration of the matrix."""
    import torch
    from transformers import LlamaConfig

    from engine.memory import ModelShape, estimate_memory

    for shape_name, fields in SHAPES.items():
        model_dir = Path(f"/tmp/memory-{shape_name}")
        build_model(model_dir, LlamaConfig(**fields, bos_token_id=1, eos_token_id=2, max_position_embeddings=32768))
        shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
        for qlora in (True, False):
            recipe = _recipe(model_dir, {"use_qlora": str(qlora).lower(), "max_length": 8192, "max_steps": 2,
                                         "optim": "adamw_torch", "lora_dropout": 0.05})
            loaded = torch.cuda.memory_allocated() / 2**30  # the model and adapter weights, as placed
            for tokens in (512, 2048, 8192):
                for batch in (1, 4):
                    changes = {"per_device_train_batch_size": batch, "max_length": tokens}
                    try:
                        measured = _train_step(recipe, changes, tokens, 2 * batch)
                    except torch.OutOfMemoryError:
                        measured = None
                    predicted = estimate_memory(shape, recipe.config)
                    error = None if measured is None else predicted.peak_allocated_gib / measured - 1
                    _report(shape=shape_name, qlora=qlora, tokens=tokens, batch=batch, measured_gib=measured,
                            predicted_gib=predicted.peak_allocated_gib, error=error, parts=predicted.parts,
                            model_gib=loaded)
            del recipe
            _free(torch.nn.Linear(1, 1))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    longest = sub.add_parser("longest", help="longest example one step trains under each cap")
    longest.add_argument("--limits", type=float, nargs="+", default=[16, 24, 80], help="GiB per process")
    longest.add_argument("--tool", choices=["engine", "unsloth"], default="engine")
    longest.add_argument("--max_tokens", type=int, default=131072, help="the ladder's top")
    longest.add_argument("--min_tokens", type=int, default=8192, help="the ladder's first step (known to fit)")
    longest.add_argument("flags", nargs=argparse.REMAINDER, help="engine flags after --, as --name value")
    sub.add_parser("matrix", help="the estimate against measured peaks")
    args = parser.parse_args()
    if args.command == "matrix":
        return matrix()
    ladder = [n for n in LADDER if args.min_tokens <= n <= args.max_tokens]
    if args.tool == "unsloth":
        from benchmarks.unsloth_run import longest_unsloth

        return longest_unsloth(args.limits, ladder)
    words = [w for w in args.flags if w != "--"]
    flags = dict(zip((w.removeprefix("--") for w in words[::2]), words[1::2], strict=True))
    longest_engine(args.limits, flags, ladder)


if __name__ == "__main__":
    sys.exit(main())
