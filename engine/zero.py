"""Memory-aware DeepSpeed ZeRO settings (the seed's to-do), filled in by each rank at start.

A preset's DeepSpeed JSON says "auto" for the settings that trade memory for speed; the rule
below (documented in presets/README.md) picks them from what is trained and the memory of the
GPU the rank runs on. HF's Trainer fills the remaining "auto" values (batch sizes, precision,
clipping). The engine does it, not the launcher, so the seed-style CLI gets it too.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from engine.config import PeftType, TrainConfig

DEFAULT_BUCKET = 500_000_000  # DeepSpeed's own default bucket, in elements
MIN_BUCKET = 5_000_000
OVERLAP_SHARE = 0.05  # overlap_comm may take this share of GPU memory for its buffers


@dataclass
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // self.heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each decoder layer's linear layers: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def parameters(self) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes()) + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + embeddings

    def trainable(self, config: TrainConfig) -> int:
        if config.peft_type == PeftType.none:
            return self.parameters()
        if config.peft_type == PeftType.ia3:
            return self.layers * sum(b for _, b in self.linear_shapes())
        return self.layers * sum(config.lora_r * (a + b) for a, b in self.linear_shapes())


def model_shape(model_id: str) -> ModelShape | None:
    """The decoder's shape from its config, or None when the config cannot be read (offline hub id)."""
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError):
        return None
    c = getattr(c, "text_config", c)
    heads = c.num_attention_heads
    return ModelShape(
        hidden=c.hidden_size, layers=c.num_hidden_layers, intermediate=c.intermediate_size,
        vocab=c.vocab_size, heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        tied=bool(getattr(c, "tie_word_embeddings", False)),
    )


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
    trainable = shape.trainable(config) if shape else None
    total = shape.parameters() if shape else None
    filled = zero_settings(trainable, total, max(num_gpus, 1), gpu_memory_gib)
    zero = ds.setdefault("zero_optimization", {})
    for key, value in filled.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return ds
