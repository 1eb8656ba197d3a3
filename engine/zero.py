"""Memory-aware DeepSpeed ZeRO settings (the seed's to-do), filled in by each rank at start.

A preset's DeepSpeed JSON says "auto" for the settings that trade memory for speed; the rule
below (documented in presets/README.md) picks them from what is trained and the memory of the
GPU the rank runs on. HF's Trainer fills the remaining "auto" values (batch sizes, precision,
clipping). The engine does it, not the launcher, so the seed-style CLI gets it too.
"""

import json
from pathlib import Path

from engine.config import TrainConfig
from engine.memory import ModelShape

DEFAULT_BUCKET = 500_000_000  # DeepSpeed's own default bucket, in elements
MIN_BUCKET = 5_000_000
OVERLAP_SHARE = 0.05  # overlap_comm may take this share of GPU memory for its buffers


def model_shape(model_id: str) -> ModelShape | None:
    """The decoder's shape from its config, or None when the config cannot be read (offline hub id)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_id)
        return ModelShape.from_config(getattr(config, "text_config", config).to_dict())
    except (OSError, ValueError, KeyError):
        return None


def zero_settings(trainable: int | None, total: int | None, num_gpus: int, gpu_memory_gib: float | None) -> dict:
    """The rule: buckets sized to what is trained, overlap when memory allows, offload when it must.

    - reduce/allgather bucket: a quarter of the trainable parameters (so gradient reduction overlaps
      with about four chunks of the backward pass), between 5M and DeepSpeed's 500M elements. A
      LoRA trains ~0.5% of a model: DeepSpeed's default bucket would reserve ~1 GB for a few MB.
    - overlap_comm: on when its buffers (about 4.5 x bucket x 2 bytes) fit in 5% of GPU memory.
    - contiguous_gradients: on; copying gradients into one buffer avoids fragmentation OOMs.
    - offload_optimizer to CPU: only when full finetuning's 16-bit weights plus ZeRO-2-sharded
      gradients and Adam states (2 + 14 / N bytes a parameter) exceed 80% of GPU memory.
    """
    bucket = DEFAULT_BUCKET if trainable is None else min(DEFAULT_BUCKET, max(MIN_BUCKET, trainable // 4))
    overlap = gpu_memory_gib is None or 4.5 * bucket * 2 <= OVERLAP_SHARE * gpu_memory_gib * 2**30
    offload = (
        trainable is not None and total is not None and gpu_memory_gib is not None and trainable == total
        and total * (2 + 14 / num_gpus) > 0.8 * gpu_memory_gib * 2**30
    )
    return {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "overlap_comm": overlap,
        "contiguous_gradients": True,
        "offload_optimizer": {"device": "cpu", "pin_memory": True} if offload else {"device": "none"},
    }


def resolve_deepspeed_config(path: str, config: TrainConfig, num_gpus: int, gpu_memory_gib: float | None) -> dict:
    """The JSON at path with our "auto" ZeRO values filled; HF's "auto" values are left for HF."""
    ds = json.loads(Path(path).read_text())
    shape = model_shape(config.model_id)
    trainable = shape.trainable_params(config.peft_type.value, config.lora_r) if shape else None
    total = shape.num_params if shape else None
    filled = zero_settings(trainable, total, max(num_gpus, 1), gpu_memory_gib)
    zero = ds.setdefault("zero_optimization", {})
    for key, value in filled.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return ds
