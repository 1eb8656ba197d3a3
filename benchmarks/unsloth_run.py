"""Unsloth as one more benchmark variant: a peer to measure our engine against, never its dependency.

Same model folder, data, tokenization and recipe as `bench.run_seed`, trained Unsloth's way
(FastLanguageModel + TRL's SFTTrainer). Unsloth patches transformers when imported, so a variant
runs it in its own process (bench.run does), and its packages come from `.site-unsloth/`:

    PYTHONPATH=$PWD/.site-unsloth:$PWD/.site:$PWD python -m benchmarks.bench run unsloth-realistic
"""

import json
import os
from pathlib import Path

from benchmarks.bench import BENCH, MODEL, SEED


def _load(max_length: int):
    """Unsloth's model and LoRA, as its notebooks set them up, on the benchmark's model folder."""
    # Read when these packages are first imported: no usage report, no hub look-ups, and the
    # modules Unsloth generates go to /tmp instead of the working directory.
    os.environ["UNSLOTH_DISABLE_STATISTICS"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", "/tmp/unsloth_compiled_cache")
    # Before transformers, peft and trl: Unsloth patches them as it is imported.
    from unsloth import FastLanguageModel  # noqa: I001
    import torch

    model, tokenizer = FastLanguageModel.from_pretrained(
        str(MODEL), max_seq_length=max_length, dtype=torch.bfloat16, load_in_4bit=True, local_files_only=True,
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = FastLanguageModel.get_peft_model(model, r=32, lora_alpha=64, lora_dropout=0, target_modules=targets,
                                             use_gradient_checkpointing="unsloth", random_state=SEED)
    return model, tokenizer


def longest_unsloth(limits: list[float], ladder: list[int]) -> None:
    """benchmarks/memory.py's `longest`, for Unsloth: one step of 8-bit AdamW per length."""
    model, tokenizer = _load(max(ladder))
    import time

    import torch
    from trl import SFTConfig, SFTTrainer

    from benchmarks.memory import _cap, _free, _one_example, _report

    start = 0
    for limit in sorted(limits):
        _cap(limit)
        for i in range(start, len(ladder)):
            began = time.time()
            args = SFTConfig(output_dir="/tmp/unsloth-longest", per_device_train_batch_size=1, max_steps=1,
                             gradient_accumulation_steps=1, learning_rate=1e-5, bf16=True, optim="adamw_8bit",
                             save_strategy="no", report_to="none", disable_tqdm=True, max_length=ladder[i],
                             padding_free=True, logging_steps=1)
            trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                                 train_dataset=_one_example(ladder[i]).remove_columns("labels"))
            torch.cuda.reset_peak_memory_stats()
            try:
                trainer.train()
                peak, ok = torch.cuda.max_memory_allocated() / 2**30, True
            except torch.OutOfMemoryError:
                peak, ok = None, False
            del trainer
            _free(model)
            _report(tool="unsloth", limit_gib=limit, tokens=ladder[i], ok=ok, peak_gib=peak,
                    seconds=time.time() - began)
            if not ok:
                break
            start = i + 1


def run_unsloth(data: str, out: Path, batch: int, accumulation: int, callbacks: tuple = ()) -> None:
    """One epoch of QLoRA on `data` with Unsloth, writing our events to `out / "events.jsonl"`;
    `callbacks` join the trainer's."""
    os.environ["UNSLOTH_COMPILE_LOCATION"] = str(out / "unsloth_compiled_cache")
    model, tokenizer = _load(2048)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from engine.callbacks import EventsCallback
    from engine.events import EventWriter

    def tokenized(split: str) -> Dataset:
        # As run_seed: bos + prompt + completion + eos, every token trained (the collator copies
        # input_ids into labels).
        with open(BENCH / f"{data}-{split}.jsonl") as f:
            rows = [json.loads(line) for line in f]
        texts = [tokenizer.bos_token + r["prompt"] + r["completion"] + tokenizer.eos_token for r in rows]
        return Dataset.from_dict({"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]})

    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0.03, num_train_epochs=1, bf16=True,
        seed=SEED, logging_steps=1, save_strategy="no", eval_strategy="epoch", report_to="none",
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, max_length=2048,
        # Unsloth's SFTConfig changes these defaults (adamw_8bit, 0.001, 4); keep run_seed's.
        optim="adamw_torch_fused", weight_decay=0.0, per_device_eval_batch_size=8,
        # Unsloth's own choice on H100 / H200 when left unset; a micro-batch is its examples
        # end to end, with no padding.
        padding_free=True,
    )
    events = EventWriter(out / "events.jsonl", enabled=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=tokenized("train"), eval_dataset=tokenized("eval"),
                         processing_class=tokenizer, callbacks=[EventsCallback(events, {}), *callbacks])
    trainer.train()
