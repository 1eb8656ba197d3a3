"""Every configuration and data problem, found at once, before any model loads."""

import importlib.util
import math
from pathlib import Path

import torch

from engine.anyprecision import parse_options
from engine.config import Optim, PeftType, ReportTo, TrainConfig
from engine.data import check_jsonl
from engine.tracking import tracking_problems


def _looks_like_path(model_id: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash or a leading dot is a folder.
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or Path(model_id).exists()


def _model_problems(config: TrainConfig) -> list[str]:
    if not config.model_id:
        return ["model_id: give a hub id (mistralai/Mistral-7B-Instruct-v0.2) or a local model folder"]
    if not _looks_like_path(config.model_id):
        return []
    try:
        folder = Path(config.model_id).expanduser()
    except RuntimeError:  # "~name/..." for a user this machine does not have
        return [f"model_id: {config.model_id} starts with an unknown user's home (~); write the full path"]
    if not folder.is_dir():
        return [f"model_id: the folder {folder} does not exist; check the path"]
    if not (folder / "config.json").exists():
        return [f"model_id: {folder} has no config.json; point at a saved Hugging Face model folder"]
    return []


def _number_problems(config: TrainConfig) -> list[str]:
    problems = []
    for name in ("lora_r", "lora_alpha", "max_length", "per_device_train_batch_size",
                 "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            problems.append(f"{name}: must be a positive whole number, got {value}")
    # Written so that nan fails each test too: "nan" and "inf" parse as floats.
    for name in ("learning_rate", "num_train_epochs", "logging_steps", "save_steps", "eval_steps"):
        if not 0 < getattr(config, name) < math.inf:
            problems.append(f"{name}: must be a number greater than 0, got {getattr(config, name)}")
    if not 0 <= config.weight_decay < math.inf:
        problems.append(f"weight_decay: must be 0 or more, got {config.weight_decay}")
    if not 0 <= config.eval_size < 1 and not (config.eval_size >= 1 and float(config.eval_size).is_integer()):
        problems.append(
            f"eval_size: use a fraction in [0, 1) or a whole number of examples, got {config.eval_size}"
        )
    if not 0 <= config.lora_dropout < 1:
        problems.append(f"lora_dropout: must be in [0, 1), got {config.lora_dropout}")
    if not 0 <= config.activation_memory_budget <= 1:
        problems.append(f"activation_memory_budget: must be in [0, 1], got {config.activation_memory_budget}")
    if not 0 <= config.warmup_ratio < 1:
        problems.append(f"warmup_ratio: must be in [0, 1), got {config.warmup_ratio}")
    if config.max_num_samples < 0:
        problems.append(f"max_num_samples: must be 0 (all) or more, got {config.max_num_samples}")
    for name in ("pack_tokens", "tiled_mlp_tokens"):
        if getattr(config, name) < 0:
            problems.append(f"{name}: must be 0 (the default) or more, got {getattr(config, name)}")
    return problems


def _combination_problems(config: TrainConfig) -> list[str]:
    problems = []
    if config.bf16 and config.fp16:
        problems.append("bf16 and fp16 are both true: pick one (bf16 on Ampere or newer, fp16 on V100/T4)")
    if config.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        problems.append(f"bf16: this GPU ({name}) has no bf16 support; use --bf16 false --fp16 true")
    if config.deepspeed and config.use_ddp:
        problems.append(
            "deepspeed and use_ddp are both set: DeepSpeed does its own data parallelism; drop one"
        )
    if config.deepspeed and not Path(config.deepspeed).is_file():
        problems.append(f"deepspeed: config file {config.deepspeed} not found")
    if config.use_qlora and config.peft_type == PeftType.none:
        problems.append("use_qlora needs an adapter: 4-bit weights cannot be trained directly; set peft_type lora")
    if config.use_dora and config.peft_type != PeftType.lora:
        problems.append(f"use_dora applies to LoRA only, but peft_type is {config.peft_type.value}")
    if config.resume_from_checkpoint and config.cleanup_output_dir_on_start:
        problems.append(
            "resume_from_checkpoint with cleanup_output_dir_on_start true would delete the checkpoint; set one false"
        )
    resume = config.resume_from_checkpoint
    if resume and resume != "true" and not Path(resume).is_dir():
        problems.append(f"resume_from_checkpoint: checkpoint folder {resume} not found")
    if resume == "true" and not any(Path(config.output_dir).glob("checkpoint-*")):
        problems.append(f"resume_from_checkpoint true: no checkpoint-* folder in {config.output_dir} to resume from")
    if config.chat_template and len(config.chat_template) < 256 and "{" not in config.chat_template:
        if not Path(config.chat_template).is_file():
            problems.append(f"chat_template: file {config.chat_template} not found (or pass the Jinja text itself)")
    return problems


def _optimizer_problems(config: TrainConfig) -> list[str]:
    if config.optim != Optim.adamw_anyprecision:
        if config.optim_args:
            return [f"optim_args: only adamw_anyprecision takes options, and optim is {config.optim.value}; "
                    "set optim_args NA or optim adamw_anyprecision"]
        return []
    try:
        parse_options(config.optim_args)
    except ValueError as e:
        return [str(e)]
    return []


def _package_problems(config: TrainConfig) -> list[str]:
    problems = []
    if config.use_qlora and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("use_qlora needs bitsandbytes: pip install bitsandbytes")
    bnb = (Optim.adamw_bnb_8bit, Optim.paged_adamw_8bit, Optim.paged_adamw_32bit)
    if config.optim in bnb and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"optim {config.optim.value} needs bitsandbytes: pip install bitsandbytes")
    if config.deepspeed and importlib.util.find_spec("deepspeed") is None:
        problems.append("deepspeed is set but DeepSpeed is not installed: pip install deepspeed")
    tracker_module = {ReportTo.tensorboard: "tensorboard", ReportTo.mlflow: "mlflow", ReportTo.wandb: "wandb"}
    module = tracker_module.get(config.report_to)
    if module and importlib.util.find_spec(module) is None:
        problems.append(
            f"report_to {config.report_to.value}: the {module} package is not installed: pip install {module}"
        )
    return problems + tracking_problems(config)


def _data_problems(config: TrainConfig) -> list[str]:
    problems = [] if config.train_data else ["train_data: give the path of a JSONL file of examples"]
    for name in ("train_data", "eval_data"):
        path = getattr(config, name)
        if not path:
            continue
        check = check_jsonl(path)
        problems += [f"{name}: {p}" for p in check.problems]
        if check.more_problems:
            problems.append(f"{name}: ... and {check.more_problems} more problems")
    return problems


def preflight(config: TrainConfig) -> list[str]:
    """All problems with this config and its data files, each naming the flag (and line) to fix."""
    return (
        _model_problems(config)
        + _number_problems(config)
        + _combination_problems(config)
        + _optimizer_problems(config)
        + _package_problems(config)
        + _data_problems(config)
    )
