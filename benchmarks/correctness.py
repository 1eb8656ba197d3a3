"""DDP against ZeRO-2 on GPUs: the same data, seed and steps; their loss curves and largest gap (issue 13).

    python -m benchmarks.bench prepare        # here (CPU), once: Mistral's tokenizer into .bench/tokenizer
    # device: carry .site .site-ds .bench
    export PYTHONPATH=$PWD/.site:$PWD/.site-ds:$PWD HF_HUB_OFFLINE=1
    python -m benchmarks.correctness          # 1,000 steps of a 1B-shaped model, each preset

The CPU tests (tests/test_correctness.py) prove the two presets equal in fp32 on a tiny model; this
measures how far apart they end up on real GPUs, in the presets' own bf16, over a long run.

Method: a 1.1B model of TinyLlama's shape (hidden 2048, 22 layers, MLP 5632, 32 heads / 4 KV heads,
Mistral's 32,000-token vocabulary) with random bf16 weights, built on the GPU; 2,000 synthetic
prompt/completion examples (Zipf-distributed words, completions of log-normal length, median 60
words), two epochs. Each variant is one run started through engine.launch.start_run as the app
starts it: `ddp` is the ddp preset, `zero2` the qlora-zero2 preset with use_qlora false, so both
train a bf16 LoRA on the same 16-bit base and differ only in DDP against DeepSpeed ZeRO-2. Over the
presets' flags: 4 examples a step (2 processes of one GPU each x 2 examples when 2 GPUs are visible,
else one GPU x 2 examples x accumulation 2), lora_dropout 0 (dropout draws are the one thing the two
could consume differently), gradient checkpointing off (memory is plentiful; same numbers), no eval,
no checkpoints, seed 0, learning rate 2e-4 with the default cosine schedule.

Prints one JSON line per variant (its loss and gradient-norm curves), then one line with the largest
gaps: per step (bf16 rounding makes single steps wander) and of 50-step means (drift, if any).
On a CPU, `--model_dir` (a tiny model, tests/conftest.py) and `--steps` try the plumbing in minutes.
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.bench import _words, build_model
from engine.events import read_events
from engine.hardware import detect_gpus
from engine.launch import ACTIVE, run_status, start_run
from engine.presets import load_preset, make_config

MODEL = Path("/tmp/tinyllama-1b-random")  # outside the repo copy, which a carried .bench/ replaces each call
RUNS = Path("/tmp/correctness-runs")
SEED = 0
EXAMPLES_PER_STEP = 4
WINDOW = 50  # steps per mean in the drift gap
VARIANTS = {"ddp": ("ddp", {}), "zero2": ("qlora-zero2", {"use_qlora": False})}


def tinyllama_shape():
    """TinyLlama-1.1B's shape with Mistral's vocabulary (benchmarks.bench.build_model gives it random weights)."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
        sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )


def write_data(path: Path, examples: int) -> Path:
    rng = np.random.default_rng(SEED)
    with open(path, "w") as f:
        for i in range(examples):
            words = int(np.clip(round(rng.lognormal(math.log(60), 0.8)), 4, 300))
            row = {"prompt": f"Question {i}: {_words(rng, int(rng.integers(4, 16)))}\nAnswer:",
                   "completion": " " + _words(rng, words)}
            f.write(json.dumps(row) + "\n")
    return path


def run_variant(name: str, model_dir: Path, data: Path, steps: int, gpus: list[int]) -> dict:
    preset_name, flags = VARIANTS[name]
    preset = load_preset(preset_name)
    processes = len(gpus) or 1
    per_device = 2
    config = make_config(preset, **{
        "model_id": str(model_dir), "train_data": str(data), "max_steps": steps, "seed": SEED,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": EXAMPLES_PER_STEP // (per_device * processes),
        "learning_rate": 2e-4, "lora_dropout": 0.0, "gradient_checkpointing": False, "max_length": 512,
        "eval_size": 0, "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1, **flags,
    })
    started = time.time()
    info = start_run(preset, config, gpus=gpus, runs_dir=RUNS, num_processes=processes)
    while (info := run_status(info.run_id, RUNS)).status in ACTIVE:
        time.sleep(2)
    logs = [e for e in read_events(info.run_dir / "events.jsonl")[0] if e["event"] == "log"]
    result = {"variant": name, "preset": preset_name, "flags": flags, "processes": processes, "gpus": gpus,
              "per_device_train_batch_size": per_device, "gradient_accumulation_steps":
              config.gradient_accumulation_steps, "status": info.status, "reason": info.reason,
              "wall_s": round(time.time() - started, 1), "command": info.command}
    if len(logs) > 1:
        result["step_s"] = round((logs[-1]["time"] - logs[0]["time"]) / (len(logs) - 1), 4)
    return result | {"losses": [e["loss"] for e in logs], "grad_norms": [e["grad_norm"] for e in logs]}


def gaps(a: dict, b: dict) -> dict:
    """Largest differences between two variants' curves, per step and of WINDOW-step means."""
    n = min(len(a["losses"]), len(b["losses"]))
    if n == 0:
        return {"steps_compared": 0}
    loss_a, loss_b = np.array(a["losses"][:n]), np.array(b["losses"][:n])
    norm_a, norm_b = np.array(a["grad_norms"][:n]), np.array(b["grad_norms"][:n])
    step_gap = np.abs(loss_a - loss_b)
    window = min(WINDOW, n)
    means = [np.convolve(x, np.ones(window) / window, mode="valid") for x in (loss_a, loss_b)]
    mean_gap = np.abs(means[0] - means[1])
    return {
        "steps_compared": n,
        "largest_loss_gap": round(float(step_gap.max()), 6), "at_step": int(step_gap.argmax()) + 1,
        "largest_loss_gap_rel": round(float((step_gap / np.abs(loss_b)).max()), 6),
        "largest_grad_norm_gap_rel": round(float((np.abs(norm_a - norm_b) / np.abs(norm_b)).max()), 6),
        f"largest_gap_of_{window}_step_means": round(float(mean_gap.max()), 6),
        "final_losses": [round(float(loss_a[-1]), 5), round(float(loss_b[-1]), 5)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.correctness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per variant")
    parser.add_argument("--model_dir", type=Path, default=None,
                        help=f"an existing model (a tiny one on a CPU); default: build the 1B shape in {MODEL}")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="run only these (a device call too short for both)")
    parser.add_argument("--earlier", type=Path, default=None,
                        help="JSON lines printed by an earlier call: its variants join the comparison")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    results = {}
    if args.earlier:
        lines = [json.loads(line) for line in args.earlier.read_text().splitlines() if line.startswith('{"variant"')]
        results = {r["variant"]: r for r in lines if r["variant"] not in args.variants}
    model_dir = args.model_dir or MODEL
    if args.model_dir is None:
        build_model(MODEL, tinyllama_shape())
    gpus = [g.index for g in detect_gpus()][:2]
    RUNS.mkdir(parents=True, exist_ok=True)
    data = write_data(RUNS / "data.jsonl", examples=max(EXAMPLES_PER_STEP, args.steps * EXAMPLES_PER_STEP // 2))
    for name in args.variants:
        results[name] = run_variant(name, model_dir, data, args.steps, gpus)
        print(json.dumps(results[name]), flush=True)
    if len(results) == len(VARIANTS):
        print(json.dumps({"compared": list(VARIANTS), **gaps(*(results[name] for name in VARIANTS))}), flush=True)


if __name__ == "__main__":
    main()
