"""Memory-aware DeepSpeed ZeRO settings (the seed's to-do), filled in by each rank at start.

A preset's DeepSpeed JSON says "auto" for the settings that trade memory for speed; the rules
below (documented in presets/README.md) pick them from the model's shape, what is trained and the
memory of the GPU the rank runs on. HF's Trainer fills the remaining "auto" values (batch sizes,
precision, clipping). The engine does it, not the launcher, so the seed-style CLI gets it too.
"""

import json
from pathlib import Path

import psutil

from engine.config import PeftType, TrainConfig
from engine.memory import ModelShape

DEFAULT_BUCKET = 500_000_000  # DeepSpeed's own default bucket, in elements
MIN_BUCKET = 5_000_000
OVERLAP_SHARE = 0.05  # overlap_comm may take this share of GPU memory for its buffers
GATHERED_SHARE = 0.10  # ZeRO-3's gathered (whole) weights may take this share of GPU memory
PERSISTENT_SHARE = 0.02  # ZeRO-3 keeps adapters whole on every GPU when they take at most this share
NORM_PERSISTENCE = 10  # x hidden size: HF's own threshold, which keeps norms and biases whole
# ZeRO-3 values for a model whose shape cannot be read: DeepSpeed's defaults (HF fills the
# prefetch bucket and persistence threshold from the hidden size), and weights gathered on save.
STAGE3_DEFAULTS = {"stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000,
                   "stage3_gather_16bit_weights_on_model_save": True}


def model_shape(model_id: str) -> ModelShape | None:
    """The decoder's shape from its config, or None when the config cannot be read (offline hub id)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_id)
        return ModelShape.from_config(getattr(config, "text_config", config).to_dict())
    except (OSError, ValueError, KeyError):
        return None


def zero_stage(path: str | None) -> int:
    """The ZeRO stage a DeepSpeed JSON asks for (0 when it has none, or there is no JSON)."""
    if not path:
        return 0
    return int(json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0))


def zero_settings(trainable: int | None, total: int | None, num_gpus: int, gpu_memory_gib: float | None,
                  stage: int = 2) -> dict:
    """The rule: buckets sized to what is trained, overlap when memory allows, offload when it must.

    - reduce/allgather bucket: a quarter of the trainable parameters (so gradient reduction overlaps
      with about four chunks of the backward pass), between 5M and DeepSpeed's 500M elements. A
      LoRA trains ~0.5% of a model: DeepSpeed's default bucket would reserve ~1 GB for a few MB.
    - overlap_comm: on when its buffers (about 4.5 x bucket x 2 bytes) fit in 5% of GPU memory.
    - contiguous_gradients: on; copying gradients into one buffer avoids fragmentation OOMs.
    - offload_optimizer to CPU: only when full finetuning's sharded training state exceeds 80% of
      GPU memory: 2 + 14 / N bytes a parameter over N GPUs under ZeRO-2 (16-bit weights whole,
      gradients and Adam states sharded), 16 / N under ZeRO-3 (weights sharded too).
    """
    bucket = DEFAULT_BUCKET if trainable is None else min(DEFAULT_BUCKET, max(MIN_BUCKET, trainable // 4))
    overlap = gpu_memory_gib is None or 4.5 * bucket * 2 <= OVERLAP_SHARE * gpu_memory_gib * 2**30
    per_param = 16 / num_gpus if stage == 3 else 2 + 14 / num_gpus
    offload = (
        trainable is not None and total is not None and gpu_memory_gib is not None and trainable == total
        and total * per_param > 0.8 * gpu_memory_gib * 2**30
    )
    return {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "overlap_comm": overlap,
        "contiguous_gradients": True,
        "offload_optimizer": {"device": "cpu", "pin_memory": True} if offload else {"device": "none"},
    }


def stage3_settings(shape: ModelShape, config: TrainConfig, gpu_memory_gib: float | None,
                    ram_gib: float) -> dict:
    """ZeRO-3's gather settings: whole weights for about two decoder layers at a time.

    Counted in stored elements, as DeepSpeed counts them: a 4-bit weight stored in a 16-bit tensor
    (bnb_4bit_quant_storage, engine/model.py) packs 4 values an element, in fp32 8.
    - stage3_prefetch_bucket_size: one decoder layer, so the next layer's weights are gathered
      while this one computes. HF's default (0.9 x hidden^2) is a single projection's worth.
    - stage3_max_live_parameters: two layers (the one computing, the one arriving). DeepSpeed's
      default, 1e9 elements, lets 2 GB of 16-bit weights sit gathered on every GPU.
    - stage3_max_reuse_distance: one layer. A weight used again within it stays gathered: with
      gradient checkpointing, a layer's recomputed forward and its backward. DeepSpeed's 1e9
      keeps the last ~18 layers of a 7B QLoRA gathered between the forward and the backward.
      These three shrink together to fit 10% of GPU memory (full finetuning of a large model).
    - stage3_param_persistence_threshold: the largest adapter matrix (r x the widest layer), so
      adapters stay whole on every GPU instead of being gathered 3 times a step in hundreds of
      latency-bound collectives, when a whole fp32 copy of them fits 2% of GPU memory; else HF's
      10 x hidden (norms and biases). Never as large as the smallest base weight, which must shard.
    - stage3_gather_16bit_weights_on_model_save: true, so saving writes usable weights. transformers
      (5.17) gathers a PEFT adapter either way; a full model it saves only with this on, else it
      writes ZeRO shards (turn them into a model with DeepSpeed's zero_to_fp32.py). Off only when
      full finetuning's 16-bit model is more than half of this machine's RAM, where rank 0 gathers it.
    """
    sixteen_bit = config.bf16 or config.fp16
    element_bytes = 2 if sixteen_bit else 4
    pack = (element_bytes * 2) if config.use_qlora else 1  # 4-bit values per stored element
    projections = shape.projections().values()
    adapter = shape.trainable_params(config.peft_type.value, config.lora_r) if config.peft_type != PeftType.none else 0
    layer = sum(i * o for i, o in projections) // pack + adapter // shape.num_layers + 2 * shape.hidden_size
    live = 2 * layer
    if gpu_memory_gib is not None:
        live = min(live, int(GATHERED_SHARE * gpu_memory_gib * 2**30 / element_bytes))
    live = max(live, 2 * MIN_BUCKET)

    persistence = NORM_PERSISTENCE * shape.hidden_size
    adapter_fits = gpu_memory_gib is None or adapter * 4 <= PERSISTENT_SHARE * gpu_memory_gib * 2**30
    if config.peft_type == PeftType.lora and adapter_fits:
        persistence = max(persistence, config.lora_r * max(max(i, o) for i, o in projections))
    smallest_base = min(i * o for i, o in projections) // pack
    persistence = min(persistence, smallest_base - 1)

    full_model_bytes = shape.num_params * element_bytes if config.peft_type == PeftType.none else 0
    return {
        "stage3_prefetch_bucket_size": live // 2,
        "stage3_max_live_parameters": live,
        "stage3_max_reuse_distance": live // 2,
        "stage3_param_persistence_threshold": persistence,
        "stage3_gather_16bit_weights_on_model_save": full_model_bytes <= 0.5 * ram_gib * 2**30,
    }


def weights_held_gib(model) -> float:
    """GiB of weights this process holds: under ZeRO-3 its shard of each weight (DeepSpeed keeps
    the shard in ds_tensor and empties the parameter), plus the weights kept whole (ds_persist)."""
    held = 0
    for param in model.parameters():
        sharded = hasattr(param, "ds_tensor") and not getattr(param, "ds_persist", False)
        tensor = param.ds_tensor if sharded else param
        held += tensor.numel() * tensor.element_size()
    return round(held / 2**30, 6)


def resolve_deepspeed_config(path: str, config: TrainConfig, num_gpus: int, gpu_memory_gib: float | None) -> dict:
    """The JSON at path with our "auto" ZeRO values filled; HF's "auto" values are left for HF."""
    ds = json.loads(Path(path).read_text())
    zero = ds.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    shape = model_shape(config.model_id)
    trainable = shape.trainable_params(config.peft_type.value, config.lora_r) if shape else None
    total = shape.num_params if shape else None
    filled = zero_settings(trainable, total, max(num_gpus, 1), gpu_memory_gib, stage)
    if stage == 3:
        ram_gib = psutil.virtual_memory().total / 2**30
        filled |= stage3_settings(shape, config, gpu_memory_gib, ram_gib) if shape else STAGE3_DEFAULTS
    for key, value in filled.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return ds
