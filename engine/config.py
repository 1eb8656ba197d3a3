"""Every engine flag, once: name, type, default and help live beside each other here.

The CLI (`python -m engine.train --help`), config.json in a run folder and the UI's form are all
built from `TrainConfig`, so a flag, a config key and a UI label key are the same word. Names,
value syntax (`true`/`false`, `NA`, `auto`, fractional steps) and meaning follow the seed
recipe's README (TrueFoundry llm-finetune).
"""

import argparse
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class PeftType(enum.StrEnum):
    lora = "lora"
    ia3 = "ia3"
    none = "none"  # full finetuning


class Strategy(enum.StrEnum):
    no = "no"
    steps = "steps"
    epoch = "epoch"


class Optim(enum.StrEnum):
    """transformers' names, so the seed's `--optim` values keep working."""

    adamw_torch = "adamw_torch"
    adamw_torch_fused = "adamw_torch_fused"
    adamw_bnb_8bit = "adamw_bnb_8bit"
    paged_adamw_8bit = "paged_adamw_8bit"
    paged_adamw_32bit = "paged_adamw_32bit"
    adamw_anyprecision = "adamw_anyprecision"


class ReportTo(enum.StrEnum):
    none = "none"
    tensorboard = "tensorboard"
    mlflow = "mlflow"
    wandb = "wandb"


def _flag(default: Any, help: str, group: str = "training", **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, "group": group, **extra})


@dataclass
class TrainConfig:
    # --- data ---
    model_id: str = _flag("", "Hub id or local folder of the base model.", "model", required=True)
    train_data: str = _flag("", "JSONL file of training examples (prompt/completion or chat messages).", "data", required=True)
    eval_data: str | None = _flag(None, "JSONL file for evaluation; NA splits it off train_data (see eval_size).", "data")
    eval_size: float = _flag(0.1, "With eval_data NA: below 1, the fraction of train_data held out; 1 or more, that many examples; 0, no eval.", "data")
    max_num_samples: int = _flag(0, "Train on the first N examples only; 0 uses them all.", "data")
    max_length: int = _flag(2048, "Tokens per example; longer ones are truncated (and counted).", "data")
    train_on_prompt: bool = _flag(False, "Also train on prompt / user / system tokens; false trains only on completions and assistant turns.", "data")
    chat_template: str | None = _flag(None, "Jinja chat template (text or a file path); NA uses the tokenizer's own, else a Mistral-style default.", "data")
    streaming: bool = _flag(False, "Read train_data lazily while training (for files larger than RAM); false tokenizes once into a memory-mapped cache.", "data")
    seed: int = _flag(42, "Random seed for the eval split, data order and adapter init.", "data")

    # --- model and adapter ---
    use_flash_attention: bool = _flag(False, "Use the fastest attention installed (flash-attn 2, then 4, then SDPA); false uses SDPA.", "model")
    use_qlora: bool = _flag(False, "Load the base model in 4-bit nf4 (double quantization) and train a LoRA on top.", "model")
    upcast_layernorm: bool = _flag(True, "With use_qlora: cast the base's 16-bit weights (norms, embeddings, output head) to fp32, as the seed recipe (PEFT's prepare_model_for_kbit_training) does, so the hidden states are fp32 too; false keeps them in bf16/fp16: about 1.2 GB less for a 7B model, but small updates round away (it learned slower than the seed recipe on our benchmark, as Unsloth does).", "model")
    peft_type: PeftType = _flag(PeftType.lora, "Adapter kind: lora, ia3, or none for full finetuning.", "model")
    use_dora: bool = _flag(False, "Weight-decomposed LoRA (DoRA): often better quality, slower.", "model")
    lora_target_modules: list[str] | None = _flag(None, "Layers to adapt, comma separated; auto adapts every linear layer but the output head.", "model")
    lora_r: int = _flag(32, "LoRA rank: adapter capacity (8-64 typical).", "model")
    lora_alpha: int = _flag(64, "LoRA scaling numerator; the update is scaled by alpha / r (2 x r is common).", "model")
    lora_dropout: float = _flag(0.05, "Dropout on the LoRA input during training.", "model")
    merge_adapter: bool = _flag(False, "Also write the base model with the adapter merged in (output_dir/merged).", "model")

    # --- optimisation ---
    num_train_epochs: float = _flag(1.0, "Passes over the training data.")
    max_steps: int = _flag(-1, "Stop after this many optimizer steps; -1 uses num_train_epochs.")
    per_device_train_batch_size: int = _flag(1, "Examples per GPU per micro-batch; a step trains this x gradient_accumulation_steps.")
    per_device_eval_batch_size: int = _flag(1, "Examples per GPU per eval batch.")
    gradient_accumulation_steps: int = _flag(4, "Micro-batches per optimizer step (effective batch = this x batch size x GPUs).")
    auto_find_batch_size: bool = _flag(False, "Before training, try growing batches on the GPU and train with the largest that fits with a tenth of the memory to spare: pack_tokens when packing, else per_device_train_batch_size (gradient_accumulation_steps then keeps the effective batch). Works with every preset.")
    learning_rate: float = _flag(2e-4, "Peak learning rate (2e-4 suits LoRA; 1e-5 for full finetuning).")
    lr_scheduler_type: str = _flag("cosine", "Learning-rate schedule: linear, cosine, constant, constant_with_warmup, ...")
    warmup_ratio: float = _flag(0.03, "Fraction of total steps spent warming the learning rate up from 0.")
    weight_decay: float = _flag(0.0, "AdamW weight decay.")
    optim: Optim = _flag(Optim.adamw_torch, "Optimizer (AdamW in each case): adamw_torch keeps 8 bytes of state per trained weight; adamw_torch_fused is the same, faster on a GPU; adamw_bnb_8bit keeps 2 bytes (8-bit states, bitsandbytes); paged_adamw_8bit and paged_adamw_32bit move their states to CPU memory when the GPU runs short; adamw_anyprecision keeps 4 (bf16 states; see optim_args).")
    optim_args: str | None = _flag(None, "Options of adamw_anyprecision, as key=value pairs separated by commas: use_kahan_summation=true (keeps 16-bit weights learning at small learning rates, 2 bytes more per weight), momentum_dtype and variance_dtype (bfloat16, the default, or float32); NA for none.", aliases=["optim-args"])
    gradient_checkpointing: bool = _flag(True, "Recompute activations in the backward pass: much less memory, about 30% slower.")
    packing: bool = _flag(True, "Run each optimizer step's examples packed back to back, with no padding and no attention between examples, in as few forward passes of up to pack_tokens tokens as they fit: the same examples, steps and gradients as padded micro-batches, several times faster on examples of mixed lengths; false pads each micro-batch to its longest example, as the seed recipe does.")
    pack_tokens: int = _flag(0, "Most tokens in one packed forward pass. 0: on a GPU, passes grow from what a padded micro-batch holds (per_device_train_batch_size x max_length) up to 4,096 tokens or a whole step, as far as the memory estimate fits the GPU's free memory; elsewhere a padded micro-batch's. More tokens a pass is faster and takes more GPU memory.")
    chunked_loss: bool = _flag(True, "Compute the training and evaluation loss a few hundred tokens at a time instead of holding the model's score for every word of its vocabulary at every position at once: the same losses with much less memory on long examples (those scores take over 1 GB for one 8,192-token example). Chat is unchanged. Off while use_liger_kernel runs on a GPU, which does the same.")
    offload_activations: bool = _flag(False, "With gradient_checkpointing: keep the input each layer saves for its backward pass in CPU memory instead of on the GPU, copied in the background while the GPU computes: the same results with layers x tokens x hidden size x 4 bytes less GPU memory (1 GB for a 7B model at 2,048 tokens, 32 GB at 65,536). Needs as much free CPU memory; CUDA only, and only with gradient_checkpointing, ignored otherwise.", "hardware")
    offload_embeddings: bool = _flag(False, "Keep the input embedding table in CPU memory and look each pass's tokens up there: the same results with vocabulary x hidden size x 2 bytes less GPU memory (0.24 GB for a 7B model), for one short copy a pass. Ignored for full finetuning, for models whose output head shares the table, and under ZeRO-3.", "hardware")
    tiled_mlp: bool = _flag(False, "Run each layer's feed-forward block over long sequences in slices of tiled_mlp_tokens tokens, so that only one slice's intermediate values are held at a time: the same results, much less GPU memory for sequences of tens of thousands of tokens, one more forward of the block for passes longer than a slice.", "hardware")
    tiled_mlp_tokens: int = _flag(0, "Tokens in one slice of tiled_mlp; 0 uses the model's hidden_size (4,096 for a 7B model). Smaller slices hold less: for a 7B model at 2,048 tokens, slices of 512 hold about 0.5 GB less than none.", "hardware")
    use_liger_kernel: bool = _flag(False, "Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE, and linear + cross-entropy that never holds the full logits); CUDA only, ignored elsewhere.", "hardware")
    bf16: bool = _flag(False, "bfloat16 mixed precision (Ampere or newer GPUs, and CPUs).", "hardware")
    fp16: bool = _flag(False, "float16 mixed precision (V100, T4 and other GPUs without bf16).", "hardware")
    torch_compile: bool = _flag(False, "Compile each decoder layer with torch.compile, which fuses the small steps between its matrix products: faster steps once compiled, after a first step that takes tens of seconds longer. Off under ZeRO-3 and with use_liger_kernel.", "hardware")
    activation_memory_budget: float = _flag(1.0, "With torch_compile: how much of what a compiled layer would keep for its backward pass it may keep, from 0 to 1 (1: all). Below 1 the compiler recomputes the cheapest steps (element-wise ones first) in the backward pass instead: less GPU memory for a little more compute (0.9: 0.28 GB less for a 7B model at 7,840-token passes, 2-6% slower).", "hardware")
    deepspeed: str | None = _flag(None, "DeepSpeed JSON config file; NA for none.", "hardware")
    use_ddp: bool = _flag(False, "Plain data-parallel training across the launched processes (no DeepSpeed).", "hardware")

    # --- logging, eval, checkpoints ---
    output_dir: str = _flag("./model", "Where checkpoints and the final adapter are written.", "output")
    cleanup_output_dir_on_start: bool = _flag(False, "Delete output_dir before training (loses its checkpoints).", "output")
    resume_from_checkpoint: str | None = _flag(None, "false, true (latest checkpoint in output_dir) or a checkpoint folder.", "output")
    logging_strategy: Strategy = _flag(Strategy.steps, "When to log: no, steps, epoch.", "output")
    logging_steps: float = _flag(1.0, "Log every N steps; below 1, a fraction of total steps.", "output")
    save_strategy: Strategy = _flag(Strategy.steps, "When to save a checkpoint: no, steps, epoch.", "output")
    save_steps: float = _flag(0.1, "Save every N steps; below 1, a fraction of total steps.", "output")
    save_total_limit: int = _flag(2, "Keep at most this many checkpoints (oldest deleted); 0 keeps all.", "output")
    eval_strategy: Strategy = _flag(Strategy.steps, "When to evaluate: no, steps, epoch (alias: evaluation_strategy).", "output", aliases=["evaluation_strategy"])
    eval_steps: float = _flag(0.1, "Evaluate every N steps; below 1, a fraction of total steps.", "output")
    events_file: str | None = _flag(None, "Where rank 0 writes events (JSON lines); NA writes output_dir/events.jsonl.", "output")
    report_to: ReportTo = _flag(ReportTo.none, "Experiment tracker: none, tensorboard, mlflow, wandb.", "output")

    # --- TrueFoundry tracking (the seed's flags) ---
    mlfoundry_enable_reporting: bool = _flag(False, "Report metrics (and optionally checkpoints) to TrueFoundry.", "tracking")
    mlfoundry_ml_repo: str | None = _flag(None, "TrueFoundry ML repo to report to.", "tracking")
    mlfoundry_run_name: str | None = _flag(None, "Run name in TrueFoundry; NA lets it pick one.", "tracking")
    mlfoundry_checkpoint_artifact_name: str | None = _flag(None, "Artifact name for checkpoints uploaded to TrueFoundry.", "tracking")
    mlfoundry_log_checkpoints: bool = _flag(False, "Upload every checkpoint to TrueFoundry.", "tracking")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, as written to config.json and events."""
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(self).items()}

    def to_argv(self) -> list[str]:
        """The flags that differ from the defaults, as `--name value` pairs that parse back to self."""
        argv = []
        defaults = TrainConfig()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != getattr(defaults, f.name) or f.metadata.get("required"):
                argv += [f"--{f.name}", format_value(value)]
        return argv


# ---- value syntax (the seed's): true/false, NA, auto, comma lists ----

_TRUE = {"true", "1", "yes", "y"}
_FALSE = {"false", "0", "no", "n"}
_NONE = {"na", "none", "null", ""}


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_optional_str(text: str) -> str | None:
    return None if text.strip().lower() in _NONE else text


def parse_target_modules(text: str) -> list[str] | None:
    """`auto` → None (resolved from the model later); else a comma or space separated list."""
    if text.strip().lower() in {"auto"} | _NONE:
        return None
    names = text.replace(",", " ").replace("[", " ").replace("]", " ").split()
    return [n.strip("'\"") for n in names]


def parse_resume(text: str) -> str | None:
    """`false` → None, `true` → "true" (the latest checkpoint in output_dir), else a path."""
    low = text.strip().lower()
    if low in _FALSE | _NONE:
        return None
    return "true" if low in _TRUE else text


def parse_choice(kind: type[enum.Enum]) -> Any:
    """An enum's value from its text; the error lists the values it may take."""

    def parse(text: str) -> enum.Enum:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not one of {', '.join(m.value for m in kind)}"
            ) from None

    return parse


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "NA"
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _parser_type(f: dataclasses.Field) -> Any:
    if f.name == "lora_target_modules":
        return parse_target_modules
    if f.name == "resume_from_checkpoint":
        return parse_resume
    kind = f.type
    if kind is bool:
        return parse_bool
    if kind in (int, float):
        return kind
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return parse_choice(kind)
    return parse_optional_str if f.default is None else str


def build_parser(only_given: bool = False) -> argparse.ArgumentParser:
    """The CLI of TrainConfig. only_given: flags left out are absent from the result (for layering
    the given flags over a preset's), rather than set to their defaults."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.train",
        description="Finetune an LLM with LoRA, QLoRA, IA3 or full finetuning. Booleans take "
        "true/false; optional paths take NA for none. Env: TORCH_PER_PROCESS_MEMORY_LIMIT "
        "(fraction of GPU memory, or MiB) caps each process's GPU memory; CUDA_VISIBLE_DEVICES "
        "picks the GPUs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        group_name = f.metadata["group"]
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        kind = f.type
        names = [f"--{f.name}"] + [f"--{a}" for a in f.metadata.get("aliases", [])]
        extra: dict[str, Any] = {}
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            extra["choices"] = list(kind)
            extra["metavar"] = "{" + ",".join(m.value for m in kind) + "}"
        default = argparse.SUPPRESS if only_given else None if f.metadata.get("required") else f.default
        group.add_argument(
            *names,
            dest=f.name,
            type=_parser_type(f),
            default=default,
            required=bool(f.metadata.get("required")),
            help=f.metadata["help"] + ("" if f.name != "lora_target_modules" else " (default: auto)"),
            **extra,
        )
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    namespace = build_parser().parse_args(argv)
    return TrainConfig(**vars(namespace))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def coerce(name: str, value: Any) -> Any:
    """A flag's value from JSON/YAML/a form, checked and typed exactly as the CLI would.

    Raises ValueError, its text starting with the flag's name, for a value the flag can't take.
    """
    if name not in FIELDS:
        raise ValueError(f"unknown flag {name!r}")
    try:
        return _parser_type(FIELDS[name])(format_value(value))
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"{name}: {value!r} is not valid ({e})") from None


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """config.json (or a preset's flags plus a form's values) into a TrainConfig.

    Unknown keys are an error, not silently dropped: ValueError, as for a bad value (see coerce).
    """
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    return TrainConfig(**{name: coerce(name, value) for name, value in values.items()})


def padded_tokens(config: TrainConfig) -> int:
    """Tokens one padded micro-batch holds: per_device_train_batch_size examples of max_length."""
    return config.per_device_train_batch_size * config.max_length


def token_budget(config: TrainConfig) -> int:
    """Tokens one packed forward pass may hold: pack_tokens, else what a padded micro-batch could
    (on a GPU, engine/train.py sets pack_tokens 0 to a grown pass first)."""
    return config.pack_tokens or padded_tokens(config)
