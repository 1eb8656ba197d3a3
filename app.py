"""Finetune Studio entry point.

Until the guided web UI lands, `python app.py` runs the whole engine once, offline: it builds a
tiny Mistral-shaped model with random weights, trains a LoRA adapter on a bundled example
dataset, and prints where the adapter and the events went.
"""

import argparse
import sys
from pathlib import Path

from engine import train
from engine.events import read_events
from engine.tiny_model import build_tiny_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="demo", help="where the tiny model and the run go")
    parser.add_argument("--train_data", default="examples/capitals-chat.jsonl")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    model_dir = workdir / "tiny-mistral"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir)
    output_dir = workdir / "run" / "output"
    code = train.main([
        "--model_id", str(model_dir), "--train_data", args.train_data,
        "--output_dir", str(output_dir), "--cleanup_output_dir_on_start", "true",
        "--events_file", str(workdir / "run" / "events.jsonl"),
        "--num_train_epochs", "3", "--learning_rate", "0.003", "--lora_r", "8", "--lora_alpha", "16",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
    ])
    events, _ = read_events(workdir / "run" / "events.jsonl")
    losses = [e["loss"] for e in events if e["event"] == "log"]
    if code == 0 and losses:
        print(f"\nTrained {len(losses)} steps: loss {losses[0]:.2f} → {losses[-1]:.2f}.")
        print(f"Adapter: {output_dir}  Events: {workdir / 'run' / 'events.jsonl'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
