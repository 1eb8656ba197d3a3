"""GPU memory: the per-process cap (TORCH_PER_PROCESS_MEMORY_LIMIT) and out-of-memory explained."""

import os

import torch

LIMIT_ENV = "TORCH_PER_PROCESS_MEMORY_LIMIT"


def parse_memory_limit(text: str, total_mib: float) -> float:
    """The seed's syntax: a fraction of the GPU (0.95) or an amount in MiB (20000) → a fraction."""
    value = float(text)
    if value <= 0:
        raise ValueError(f"{LIMIT_ENV}={text!r}: must be a fraction in (0, 1] or a positive MiB amount")
    fraction = value if value <= 1 else value / total_mib
    if fraction > 1:
        raise ValueError(
            f"{LIMIT_ENV}={text!r} MiB is more than this GPU's {total_mib:.0f} MiB; "
            "use a smaller amount or a fraction such as 0.9"
        )
    return fraction


def apply_memory_limit(device_index: int) -> float | None:
    """Caps this process's GPU memory when the env var is set; returns the fraction applied."""
    text = os.environ.get(LIMIT_ENV, "").strip()
    if not text or not torch.cuda.is_available():
        return None
    total_mib = torch.cuda.get_device_properties(device_index).total_memory / 2**20
    fraction = parse_memory_limit(text, total_mib)
    torch.cuda.set_per_process_memory_fraction(fraction, device_index)
    return fraction


def release_cached() -> None:
    """Hands cached but unused GPU memory back, so nvidia-smi (and other processes) see the truth."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_memory_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "cuda_error_out_of_memory" in text


def out_of_memory_hint(config) -> str:
    """What to change, most effective first, skipping what the config already does."""
    steps = []
    if config.per_device_train_batch_size > 1:
        steps.append(f"lower per_device_train_batch_size (now {config.per_device_train_batch_size})")
    steps.append(f"lower max_length (now {config.max_length})")
    if not config.use_qlora:
        steps.append("enable QLoRA (use_qlora true)")
    if not config.gradient_checkpointing:
        steps.append("enable gradient_checkpointing")
    if os.environ.get(LIMIT_ENV):
        steps.append(f"raise or unset {LIMIT_ENV} (now {os.environ[LIMIT_ENV]})")
    return "Try: " + "; ".join(steps) + "."
