"""TrainConfig → transformers.TrainingArguments: the one place our flags meet the HF Trainer's."""

import math
import os

import torch
from transformers import TrainingArguments

from engine.config import Optim, PeftType, TrainConfig


def _train_batch_size(config: TrainConfig) -> int:
    """Examples the dataloader hands over at once: a whole optimizer step's when packing
    (engine/packing.py runs them in passes), else a micro-batch's."""
    if config.packing:
        return config.per_device_train_batch_size * config.gradient_accumulation_steps
    return config.per_device_train_batch_size


def _accumulation_steps(config: TrainConfig) -> int:
    return 1 if config.packing else config.gradient_accumulation_steps


def _max_steps(config: TrainConfig, datasets) -> int:
    """A streaming dataset has no length, so the Trainer needs max_steps; we know the count."""
    if config.max_steps > 0 or not config.streaming:
        return config.max_steps
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world
    return max(1, math.ceil(datasets.num_train_examples * config.num_train_epochs / per_step))


def _deepspeed(config: TrainConfig) -> dict | None:
    if not config.deepspeed:
        return None
    from engine.zero import resolve_deepspeed_config

    world = int(os.environ.get("WORLD_SIZE", 1))
    memory = None
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory / 2**30
    return resolve_deepspeed_config(config.deepspeed, config, world, memory)


def deepspeed_keeps_adapter_fp32(config: TrainConfig) -> bool:
    """DeepSpeed's bf16/fp16 mode casts every trainable weight to 16 bits. A LoRA's updates (lr x ~1
    on weights of ~0.05) then round away in the 16-bit copy and ZeRO-2 learns slower than DDP,
    whose autocast keeps adapters in fp32: the seed recipe's "loss diverges compared to DDP".
    So with an adapter, DeepSpeed runs in fp32 mode instead of bf16 and the recipe wraps the forward
    in bf16 autocast, as accelerate does for DDP: bf16 matmuls, fp32 adapter weights and optimizer.
    fp16 keeps DeepSpeed's fp16 mode: its loss scaling is what keeps fp16 gradients from underflowing."""
    return bool(config.deepspeed) and config.peft_type != PeftType.none


def uses_liger(config: TrainConfig) -> bool:
    """Liger's kernels are Triton: CUDA only; elsewhere the model's own modules run."""
    return config.use_liger_kernel and torch.cuda.is_available()


def training_arguments(config: TrainConfig, datasets) -> TrainingArguments:
    has_eval = datasets.eval is not None
    args = TrainingArguments(
        output_dir=config.output_dir,
        seed=config.seed,
        data_seed=config.seed,
        num_train_epochs=config.num_train_epochs,
        max_steps=_max_steps(config, datasets),
        per_device_train_batch_size=_train_batch_size(config),
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=_accumulation_steps(config),
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of total steps
        weight_decay=config.weight_decay,
        optim=config.optim.value,
        optim_args=config.optim_args,
        gradient_checkpointing=config.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and with DDP.
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        use_cpu=not torch.cuda.is_available(),  # HF refuses bf16 on a CPU unless told it is one
        bf16=config.bf16 and not deepspeed_keeps_adapter_fp32(config),
        fp16=config.fp16,
        use_liger_kernel=uses_liger(config),
        deepspeed=_deepspeed(config),
        # LoRA leaves most parameters frozen; DDP must not search the graph for unused ones.
        ddp_find_unused_parameters=False,
        logging_strategy=config.logging_strategy.value,
        logging_steps=config.logging_steps,
        save_strategy=config.save_strategy.value,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit or None,
        eval_strategy=config.eval_strategy.value if has_eval else "no",
        eval_steps=config.eval_steps,
        report_to=[] if config.report_to.value == "none" else [config.report_to.value],
        run_name=config.mlfoundry_run_name,
        # Counts trained tokens (not padding) across ranks, for tokens/s in the events.
        include_num_input_tokens_seen="non_padding",
        # Each rank's loss is its label tokens' summed loss over the label tokens of the whole step
        # on every rank (gathered), so DDP's and ZeRO's gradient average is one process's step.
        # True is transformers 5's default; said here because correctness rests on it.
        average_tokens_across_devices=True,
        remove_unused_columns=False,
        # Our collators build the inputs; the Trainer must not drop the labels column it does not know.
        label_names=["labels"],
        disable_tqdm=True,  # progress goes to events.jsonl; a bar would flood stdout.log
    )
    # With bf16 and fp16 both off, HF takes the precision from the launcher's environment
    # (ACCELERATE_MIXED_PRECISION): `accelerate launch --mixed_precision bf16` then trained a
    # bf16-false config in bf16 autocast, and DDP learned differently from one process. Our flags decide.
    if not (args.bf16 or args.fp16):
        args.mixed_precision = "no"
    return args


def optimizer_cls_and_kwargs(config: TrainConfig, args: TrainingArguments) -> tuple[type, dict] | None:
    """Our AnyPrecisionAdamW for `adamw_anyprecision` (transformers' needs torchdistx, which torch 2
    lacks: engine/anyprecision.py); None leaves every other optimizer to transformers. The Trainer
    builds it from this in create_optimizer, which DeepSpeed also calls for its client optimizer."""
    if config.optim != Optim.adamw_anyprecision:
        return None
    from engine.anyprecision import AnyPrecisionAdamW, parse_options

    kwargs = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    return AnyPrecisionAdamW, {**kwargs, **parse_options(config.optim_args)}
