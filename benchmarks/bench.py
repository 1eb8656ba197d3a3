"""One GPU, one command: the seed recipe against our engine's default and each of its levers.

    python -m benchmarks.bench prepare              # here (CPU): tokenizer and data into .bench/
    python -m benchmarks.bench run [VARIANT ...]    # on the GPU, with .bench/ carried along

`run` builds a Mistral-7B-shaped model with random bf16 weights on the GPU (no hub), then runs each
variant in a fresh process and prints one JSON line per variant; RESULTS.md keeps the table.

Method, the same for every variant:
- data: log-normal lengths (median 350, sigma 0.885, clipped to [16, 2048], fixed seed) or fixed
  2,048- or 8,192-token examples, cut from seeded English-like text tokenized with Mistral's
  tokenizer; every token is trained (train_on_prompt), so trained tokens = non-padding input tokens;
- one epoch over the same examples (order shuffled by the same seed), learning rate 1e-5, cosine
  schedule with 3% warm-up, bf16, QLoRA nf4 + double quantization, r=32, alpha=64 on all 7 linear
  projections, gradient checkpointing;
- speed: the Trainer logs every optimizer step (the loss read syncs the GPU); tokens/s is
  trained tokens over wall time from the end of step WARMUP_STEPS to the last step; steady
  tokens/s leaves out the seconds torch.compile spent in that window (a new pass shape's graph);
- MFU = tokens/s x (4 x N_frozen + 6 x N_lora) / PEAK_FLOPS, N_frozen the base's matmul
  parameters (all but the input embedding): forward 2N + input gradients 2N for a frozen base,
  forward + input + weight gradients 6N for the adapters; recomputation and attention not counted;
- loss: eval loss on the same held-out examples after the epoch;
- memory: PyTorch's peak allocated (over the run, and training's own before the evaluation) and
  reserved, and the whole GPU's used memory before training and at its peak (device_used_gib), which
  alone sees paged optimizer states (DeviceMemory).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from engine.presets import load_preset

BENCH = Path(".bench")  # prepared inputs, carried to the GPU
# Built on the GPU machine, outside the repo copy (which a carried .bench/ replaces each call).
# BENCH_MODEL points elsewhere, e.g. at a tiny model to try the plumbing on a CPU.
MODEL = Path(os.environ.get("BENCH_MODEL", "/tmp/mistral-7b-random"))
SETS = {  # name: (train examples, eval examples); about 96k, 82k and 164k train tokens
    "realistic": (192, 8),
    "fixed2048": (40, 4),
    "fixed8192": (20, 2),
}
WARMUP_STEPS = 2
PEAK_FLOPS = 989e12  # dense bf16, H100 / H200 SXM datasheet
SEED = 0

# Shared by every variant: the seed README's recipe at bench scale.
COMMON = {
    "use_qlora": "true", "bf16": "true", "lora_r": 32, "lora_alpha": 64, "learning_rate": 1e-5,
    "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "gradient_checkpointing": "true",
    "num_train_epochs": 1, "train_on_prompt": "true", "save_strategy": "no", "eval_strategy": "epoch",
    "logging_steps": 1, "eval_size": 0, "report_to": "none", "seed": SEED,
    "per_device_eval_batch_size": 8,  # the HF default the seed recipe runs with: a token-weighted eval loss
}
# name: (data set, engine flags beyond COMMON). SEED runs the plain seed recipe, an UNSLOTH tuple
# (batch, accumulation) runs Unsloth (benchmarks/unsloth_run.py) instead of our engine.
SEED_RECIPE = None
BS16 = {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1}  # Unsloth's best: 16 x 1
# Eval's own full logits (8 x 2,048 tokens: 3 GiB) would set the peak that the chunked loss lowers in training.
EVAL1 = {"per_device_eval_batch_size": 1}
PASS1 = {"pack_tokens": 2048, **EVAL1}  # micro-batch 1 at 2,048 tokens: one example a pass, never grown
LONG = {"max_length": 8192, "pack_tokens": 8192, **EVAL1}
LOWMEM_BF16 = {"optim": "adamw_bnb_8bit", "offload_activations": "true", "lora_dropout": 0, "upcast_layernorm": "false",
               **PASS1}  # issue 12's 5.0 GiB: every memory lever, bf16 hidden states as Unsloth's
# What a user gets: the qlora-zero2 preset's engine flags (its DeepSpeed launcher aside: one GPU).
PRESET = {k: str(v).lower() if isinstance(v, bool) else v
          for k, v in load_preset("qlora-zero2").train.items() if v is not None}  # None: the engine's auto
VARIANTS = {
    "preset-realistic": ("realistic", PRESET),
    # the compiled layers keeping 90% or 70% of what they would for the backward pass (the preset: all)
    "preset-amb90-fixed2048": ("fixed2048", {**PRESET, "activation_memory_budget": 0.9}),
    "preset-bs16-amb90-realistic": ("realistic", {**PRESET, **BS16, "activation_memory_budget": 0.9}),
    "preset-bs16-amb70-realistic": ("realistic", {**PRESET, **BS16, "activation_memory_budget": 0.7}),
    "preset-bs16-realistic": ("realistic", {**PRESET, **BS16}),
    "preset-fixed2048": ("fixed2048", PRESET),
    # the grown pass's feed-forward block in slices of hidden_size tokens, and without LoRA dropout:
    # what each takes off the peak that a whole step in one pass sets, and what each costs in speed
    # the pass size alone (the preset grows it to a whole step's 8,192 tokens where memory allows)
    "preset-pass2k-fixed2048": ("fixed2048", {**PRESET, "pack_tokens": 2048}),
    "preset-pass4k-fixed2048": ("fixed2048", {**PRESET, "pack_tokens": 4096}),
    "preset-pass8k-fixed2048": ("fixed2048", {**PRESET, "pack_tokens": 8192}),
    # Unsloth's best batch within the seed's memory: a step of 16 in passes of at most 4,096 / 6,144 tokens
    "preset-bs16-pass4k-realistic": ("realistic", {**PRESET, **BS16, "pack_tokens": 4096}),
    "preset-bs16-pass6k-realistic": ("realistic", {**PRESET, **BS16, "pack_tokens": 6144}),
    # what a user gets at 1 x 16: the same 16 examples a step, in passes grown to 4,096 tokens
    "preset-acc16-realistic": ("realistic", {**PRESET, "per_device_train_batch_size": 1,
                                             "gradient_accumulation_steps": 16}),
    "preset-pass2k-realistic": ("realistic", {**PRESET, "pack_tokens": 2048}),
    "preset-pass4k-realistic": ("realistic", {**PRESET, "pack_tokens": 4096}),
    "preset-tiled-fixed2048": ("fixed2048", {**PRESET, "tiled_mlp": "true"}),
    "preset-nodropout-fixed2048": ("fixed2048", {**PRESET, "lora_dropout": 0}),
    "preset-tiled-bs16-realistic": ("realistic", {**PRESET, **BS16, "tiled_mlp": "true"}),
    "preset-nodropout-bs16-realistic": ("realistic", {**PRESET, **BS16, "lora_dropout": 0}),
    "seed-realistic": ("realistic", SEED_RECIPE),
    "engine-realistic": ("realistic", {}),  # the default: packed steps, passes of 2,048 tokens
    "engine-nopacking-realistic": ("realistic", {"packing": "false"}),
    "engine-bf16-realistic": ("realistic", {"upcast_layernorm": "false"}),  # hidden states in bf16, as Unsloth
    "engine-liger-realistic": ("realistic", {"use_liger_kernel": "true"}),
    "engine-pass8k-realistic": ("realistic", {"pack_tokens": 8192}),  # a step's 4 examples in one pass
    "engine-pass8k-liger-realistic": ("realistic", {"pack_tokens": 8192, "use_liger_kernel": "true"}),
    "engine-compile-realistic": ("realistic", {"torch_compile": "true"}),
    "engine-compile-pass8k-offload-realistic": ("realistic", {"torch_compile": "true", "pack_tokens": 8192,
                                                              "offload_activations": "true"}),
    "engine-bs16-compile-nodropout-realistic": ("realistic", {**BS16, "torch_compile": "true", "lora_dropout": 0}),
    "engine-bs16-compile-lowmem-realistic": ("realistic", {**BS16, "torch_compile": "true", "lora_dropout": 0,
                                                           "upcast_layernorm": "false", "offload_activations": "true"}),
    # ... with 8-bit AdamW states: 0.47 GiB less, under the seed's 7.75 GiB if the 7.93 measured above holds
    "engine-bs16-compile-lowmem8bit-realistic": ("realistic", {
        **BS16, "torch_compile": "true", "lora_dropout": 0, "upcast_layernorm": "false", "offload_activations": "true",
        "optim": "adamw_bnb_8bit"}),
    "engine-bs16-realistic": ("realistic", BS16),
    "engine-bs16-liger-realistic": ("realistic", {**BS16, "use_liger_kernel": "true"}),
    "engine-bs16-liger-nodropout-realistic": ("realistic", {**BS16, "use_liger_kernel": "true", "lora_dropout": 0}),
    "unsloth-realistic": ("realistic", ("unsloth", 1, 4)),
    "unsloth-bs16-realistic": ("realistic", ("unsloth", 16, 1)),
    "seed-fixed2048": ("fixed2048", SEED_RECIPE),
    "engine-fixed2048": ("fixed2048", {}),
    "engine-nopacking-fixed2048": ("fixed2048", {"packing": "false"}),
    "engine-liger-fixed2048": ("fixed2048", {"use_liger_kernel": "true"}),
    # torch_compile (engine/compile.py): each decoder layer compiled; its compile time falls in step 1
    "engine-compile-fixed2048": ("fixed2048", {"torch_compile": "true"}),
    "engine-compile-nopacking-fixed2048": ("fixed2048", {"torch_compile": "true", "packing": "false"}),
    # a whole step in one pass (4 x 2,048 tokens, varlen attention): a quarter of the 4-bit
    # dequantizations and kernel launches; offloading the checkpoints keeps the memory of a 2,048 pass
    "engine-compile-pass8k-fixed2048": ("fixed2048", {"torch_compile": "true", "pack_tokens": 8192}),
    "engine-compile-pass8k-offload-fixed2048": ("fixed2048", {"torch_compile": "true", "pack_tokens": 8192,
                                                              "offload_activations": "true"}),
    "unsloth-fixed2048": ("fixed2048", ("unsloth", 1, 4)),
    # --optim on the seed's 2,048-token recipe (engine-fixed2048 is adamw_torch, the seed's).
    "engine-fused-fixed2048": ("fixed2048", {"optim": "adamw_torch_fused"}),
    "engine-adamw8bit-fixed2048": ("fixed2048", {"optim": "adamw_bnb_8bit"}),
    "engine-paged8bit-fixed2048": ("fixed2048", {"optim": "paged_adamw_8bit"}),
    "engine-paged32bit-fixed2048": ("fixed2048", {"optim": "paged_adamw_32bit"}),
    "engine-anyprecision-fixed2048": ("fixed2048", {"optim": "adamw_anyprecision"}),
    "engine-anyprecision-kahan-fixed2048": ("fixed2048", {"optim": "adamw_anyprecision",
                                                          "optim_args": "use_kahan_summation=true"}),
    # --auto_find_batch_size on steps of 16 full-length examples (32,768 tokens), the most a pass could
    # hold, so that the limit decides; run them under TORCH_PER_PROCESS_MEMORY_LIMIT (tests/README.md).
    # No eval: its batches are not the finder's, and the peak reported is then training's own.
    "engine-auto-bs16-fixed2048": ("fixed2048", {**BS16, "auto_find_batch_size": "true", "eval_strategy": "no"}),
    "engine-auto-nopacking-bs16-fixed2048": (
        "fixed2048", {**BS16, "packing": "false", "auto_find_batch_size": "true", "eval_strategy": "no"}),
    # chunked_loss (engine/loss.py, on by default) against the full logits, one example a pass
    "engine-chunked-fixed2048": ("fixed2048", {"chunked_loss": "true", **PASS1}),
    "engine-nochunk-fixed2048": ("fixed2048", {"chunked_loss": "false", **PASS1}),
    "engine-chunked-fixed8192": ("fixed8192", {"chunked_loss": "true", **LONG}),
    "engine-nochunk-fixed8192": ("fixed8192", {"chunked_loss": "false", **LONG}),
    # issue 12's 5.0 GiB at 2,048 tokens, micro-batch 1: every memory lever that keeps the numbers
    # (dropout 0 as Unsloth's default; the loss is compared against engine-fixed2048's)
    "engine-lowmem-fixed2048": ("fixed2048", {"optim": "adamw_bnb_8bit", "offload_activations": "true",
                                              "lora_dropout": 0, **PASS1}),
    "engine-lowmem-bf16-fixed2048": ("fixed2048", LOWMEM_BF16),
    # ... and the feed-forward block in slices of 512 tokens (measured 5.30 GiB without; estimate ~4.8)
    "engine-lowmem-tiled512-fixed2048": ("fixed2048", {"optim": "adamw_bnb_8bit", "offload_activations": "true",
                                                       "lora_dropout": 0, "tiled_mlp": "true", "tiled_mlp_tokens": 512,
                                                       **PASS1}),
    "engine-lowmem-tiled512-bf16-fixed2048": ("fixed2048", {
        "optim": "adamw_bnb_8bit", "offload_activations": "true", "lora_dropout": 0, "upcast_layernorm": "false",
        "tiled_mlp": "true", "tiled_mlp_tokens": 512, **PASS1}),
    # ... with the embedding table in CPU memory (0.24 GiB), compiled layers, slices of 1,024
    "engine-lowmem-emb-bf16-fixed2048": ("fixed2048", {**LOWMEM_BF16, "offload_embeddings": "true"}),
    "engine-lowmem-emb-compile-bf16-fixed2048": ("fixed2048", {
        **LOWMEM_BF16, "offload_embeddings": "true", "torch_compile": "true"}),
    "engine-lowmem-emb-compile-tiled1024-bf16-fixed2048": ("fixed2048", {
        **LOWMEM_BF16, "offload_embeddings": "true", "torch_compile": "true", "tiled_mlp": "true",
        "tiled_mlp_tokens": 1024}),
}
UNSLOTH_SITE = Path(".site-unsloth")  # its packages (trl, datasets 4, unsloth): see unsloth_run.py


# ---- prepare (CPU): tokenizer and data ----

def _words(rng: np.random.Generator, n: int) -> str:
    """English-looking text: Zipf-distributed words from a fixed list, so tokens look like real text."""
    vocab = ("the of and to in is was for that with as on by at from this be are or an it not which "
             "model data training token memory attention layer gradient batch example learning rate "
             "paris france capital river city history science language question answer because "
             "however therefore during between through important different several system process").split()
    ranks = (rng.zipf(1.3, n) - 1) % len(vocab)
    return " ".join(vocab[r] for r in ranks)


def _texts(sp, lengths: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Texts that tokenize to about `lengths` tokens (cut at a token, decoded back)."""
    texts = []
    for n in lengths:
        ids = sp.encode(_words(rng, int(n)))[: int(n)]
        texts.append(sp.decode(ids))
    return texts


def prepare() -> None:
    import sentencepiece

    from engine.tiny_model import mistral_spm, write_mistral_tokenizer

    BENCH.mkdir(exist_ok=True)
    write_mistral_tokenizer(BENCH / "tokenizer")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_spm()))
    rng = np.random.default_rng(SEED)
    for name, (n_train, n_eval) in SETS.items():
        n = n_train + n_eval
        if name == "realistic":
            lengths = np.clip(np.round(rng.lognormal(math.log(350), 0.885, n)), 16, 2048)
        else:
            lengths = np.full(n, int(name.removeprefix("fixed")))
        lengths = lengths - 2  # bos and eos complete each example
        for split, part in (("train", lengths[:n_train]), ("eval", lengths[n_train:])):
            with open(BENCH / f"{name}-{split}.jsonl", "w") as f:
                for text in _texts(sp, part, rng):
                    f.write(json.dumps({"prompt": "", "completion": text}) + "\n")
    print(f"wrote {BENCH}/: tokenizer and {', '.join(SETS)} train/eval sets")


# ---- run (GPU) ----

def build_model(folder: Path = MODEL, config=None) -> None:
    """A model of `config`'s shape (default: Mistral-7B's) with random bf16 weights, built on the
    GPU into `folder` with the benchmark's tokenizer: seconds, no download."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    if (folder / "tokenizer_config.json").exists():  # written last: a build cut short is redone
        return
    config = config or MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        rope_theta=1e6, sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(SEED)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for f in (BENCH / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    # This process goes on to sample or launch runs: hand the 14 GiB back, or nvidia-smi counts
    # them in every run's per-GPU memory (it did in the first 2-GPU stop test).
    del model
    torch.cuda.empty_cache()


def _flags(values: dict) -> list[str]:
    return [str(x) for k, v in values.items() for x in (f"--{k}", v)]


def compile_clock():
    """A TrainerCallback noting the seconds torch.compile has spent by the end of each step.

    A step whose passes need a new graph (the first of a new shape, a one-example pass) stops to
    compile once; in a timed window of a few dozen steps those seconds would count as training.
    Every runner gets one, Unsloth's included (it compiles too).
    """
    from torch._dynamo.utils import calculate_time_spent
    from transformers import TrainerCallback

    class CompileClock(TrainerCallback):
        def __init__(self):
            self.seconds: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds[state.global_step] = calculate_time_spent()["total_wall_time"]

    return CompileClock()


def run_engine(data: str, flags: dict, out: Path, callbacks: tuple = ()) -> None:
    """Runs the engine in this process; `callbacks` join its own (benchmark-only, so the engine
    does not know of them)."""
    from engine import train

    model_callbacks = train.Recipe._model_callbacks
    train.Recipe._model_callbacks = lambda self: [*model_callbacks(self), *callbacks]
    argv = ["--model_id", str(MODEL), "--train_data", str(BENCH / f"{data}-train.jsonl"),
            "--eval_data", str(BENCH / f"{data}-eval.jsonl"), "--output_dir", str(out),
            "--cleanup_output_dir_on_start", "true", *_flags({**COMMON, **flags})]
    if train.main(argv) != 0:
        raise SystemExit("engine run failed")


def run_seed(data: str, out: Path, callbacks: tuple = ()) -> None:
    """The seed recipe written plainly: HF Trainer + PEFT QLoRA, SDPA, padding to the longest;
    `callbacks` join the trainer's."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from engine.callbacks import EventsCallback
    from engine.events import EventWriter

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    tokenizer.pad_token = tokenizer.unk_token

    def tokenize(row):
        ids = tokenizer(tokenizer.bos_token + row["prompt"] + row["completion"] + tokenizer.eos_token,
                        add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "labels": list(ids)}

    files = {s: str(BENCH / f"{data}-{s}.jsonl") for s in ("train", "eval")}
    sets = load_dataset("json", data_files=files).map(tokenize, remove_columns=["prompt", "completion"])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa",
                                                 device_map={"": 0 if torch.cuda.is_available() else "cpu"})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=32, lora_alpha=64, lora_dropout=0.05,
                                             target_modules=targets))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=4, learning_rate=1e-5,
        per_device_eval_batch_size=COMMON["per_device_eval_batch_size"],
        lr_scheduler_type="cosine", warmup_steps=0.03, num_train_epochs=1, bf16=True, seed=SEED,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", eval_strategy="epoch", report_to=[],
        include_num_input_tokens_seen="non_padding", disable_tqdm=True,
    )
    events = EventWriter(out / "events.jsonl", enabled=True)
    trainer = Trainer(model=model, args=args, train_dataset=sets["train"], eval_dataset=sets["eval"],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      processing_class=tokenizer, callbacks=[EventsCallback(events, {}), *callbacks])
    trainer.train()


def _matmul_params() -> tuple[int, int]:
    """(frozen base parameters in matmuls, LoRA parameters) of the benchmark's model and adapter."""
    config = json.loads((MODEL / "config.json").read_text())
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # q k v o gate up down
    frozen = layers * sum(a * b for a, b in shapes) + h * config["vocab_size"]  # + the output head
    lora = layers * sum(COMMON["lora_r"] * (a + b) for a, b in shapes)
    return frozen, lora


class DeviceMemory(threading.Thread):
    """The whole GPU's used memory (cudaMemGetInfo) sampled every 20 ms, its peak kept. Unlike
    max_memory_allocated it sees memory outside PyTorch's allocator: bitsandbytes' paged optimizer
    states live in CUDA unified memory, which PyTorch never counts. It also counts every CUDA
    context on the GPU (this process's and the `run` parent's), hence `start`, read before training."""

    def __init__(self):
        super().__init__(daemon=True)
        self.start_gib = self.peak_gib = self.used_gib()
        self.done = threading.Event()

    @staticmethod
    def used_gib() -> float:
        import torch

        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**30

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak_gib = max(self.peak_gib, self.used_gib())

    def result(self) -> dict:
        self.done.set()
        return {"start": round(self.start_gib, 2), "peak": round(self.peak_gib, 2)}


def measure(variant: str) -> dict:
    """Runs one variant in this process; returns its result line."""
    import torch

    from engine.events import read_events

    data, flags = VARIANTS[variant]
    out = Path("/tmp/bench-runs") / variant
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    gpu = torch.cuda.is_available()
    device = DeviceMemory() if gpu else None
    if device:
        device.start()
    clock = compile_clock()
    from torch._dynamo.utils import counters

    if flags is SEED_RECIPE:
        run_seed(data, out, callbacks=(clock,))
    elif isinstance(flags, tuple):
        from benchmarks.unsloth_run import run_unsloth

        run_unsloth(data, out, batch=flags[1], accumulation=flags[2], callbacks=(clock,))
    else:
        run_engine(data, flags, out, callbacks=(clock,))
    events, _ = read_events(out / "events.jsonl")
    logs = [e for e in events if e["event"] == "log"]
    first, last = logs[WARMUP_STEPS - 1], logs[-1]
    tokens = last["tokens_seen"] - first["tokens_seen"]
    seconds = last["time"] - first["time"]
    steps = last["step"] - first["step"]
    frozen, lora = _matmul_params()
    rate = tokens / seconds
    compiling = clock.seconds[last["step"]] - clock.seconds[first["step"]]
    durations = [b["time"] - a["time"] for a, b in zip(logs[WARMUP_STEPS - 1:-1], logs[WARMUP_STEPS:], strict=True)]
    evals = [e for e in events if e["event"] == "eval"]
    # Training's own peak: the log events' running peak before the first evaluation adds eval's batches.
    before_eval = events[:events.index(evals[0])] if evals else events
    train_peaks = [e["gpu_memory_gib"] for e in before_eval if e["event"] == "log" and e.get("gpu_memory_gib")]
    started = next((e for e in events if e["event"] == "started" and e.get("config")), {})
    config = started.get("config", {})
    return {
        "variant": variant, "data": data, "flags": flags, "attention": config.get("attention", "sdpa"),
        "pack_tokens": config.get("pack_tokens"),
        "trained_tokens_per_s": round(rate), "step_time_s": round(seconds / steps, 3),
        # The same window less the seconds spent compiling new graphs in it: the speed of a long run.
        "compile_s_timed": round(compiling, 1), "steady_tokens_per_s": round(tokens / (seconds - compiling)),
        # A break splits a compiled layer into pieces with Python between them: what compile buys is lost.
        "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
        "median_step_s": round(float(np.median(durations)), 3), "slowest_step_s": round(max(durations), 3),
        "tokens_per_step": round(tokens / steps), "timed_steps": steps, "total_steps": last["step"],
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
        "train_peak_allocated_gib": max(train_peaks, default=None),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if gpu else None,
        "device_used_gib": device.result() if device else None,
        "mfu": round(rate * (4 * frozen + 6 * lora) / PEAK_FLOPS, 4),
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "memory_limit": os.environ.get("TORCH_PER_PROCESS_MEMORY_LIMIT"),  # caps grown passes too
        "auto_batch": started.get("auto_batch"),  # what --auto_find_batch_size chose, tried and why
        "final_train_loss": last["loss"],
    }


def run(variants: list[str]) -> None:
    import torch

    build_model()
    card = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    print(json.dumps({"card": card.name if card else "cpu",
                      "memory_gib": round(card.total_memory / 2**30, 1) if card else None,
                      "torch": torch.__version__, **_versions()}), flush=True)
    results = Path(os.environ.get("OUT", "/tmp")) / "results.jsonl"
    for variant in variants:
        start = time.time()
        env = dict(os.environ)
        if isinstance(VARIANTS[variant][1], tuple):  # Unsloth's packages shadow ours in its process only
            env["PYTHONPATH"] = os.pathsep.join([str(UNSLOTH_SITE.resolve()), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "one", variant],
                              capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            tail = (proc.stdout + proc.stderr)[-1500:]
            result = {"variant": variant, "error": f"exit {proc.returncode}", "tail": tail}
        else:
            result = json.loads(line.removeprefix("RESULT "))
        result["process_s"] = round(time.time() - start, 1)
        with open(results, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "datasets", "liger-kernel", "triton"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="tokenizer and data into .bench/ (CPU)")
    runner = sub.add_parser("run", help="every variant (or those named), each in a fresh process (GPU)")
    runner.add_argument("variants", nargs="*", help=f"any of {', '.join(VARIANTS)}; none runs them all")
    one = sub.add_parser("one", help="one variant in this process (used by run)")
    one.add_argument("variant", choices=list(VARIANTS))
    args = parser.parse_args()
    if args.command == "prepare":
        prepare()
    elif args.command == "run":
        unknown = set(args.variants) - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
        run(args.variants or list(VARIANTS))
    else:
        print("RESULT " + json.dumps(measure(args.variant)), flush=True)


if __name__ == "__main__":
    main()
