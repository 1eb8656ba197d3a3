"""GPU memory: the per-process cap (TORCH_PER_PROCESS_MEMORY_LIMIT), out-of-memory explained, and
the estimate of what a configuration needs, shown before a run starts."""

import os
from dataclasses import dataclass

import torch

from engine.anyprecision import parse_options, state_bytes_per_param
from engine.config import Optim

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


def configure_allocator() -> None:
    """Expandable segments, unless the user chose allocator settings: PyTorch's allocator then grows
    a segment instead of reserving a new one for each odd-sized request. Under a cap this is what
    decides whether a long pass fits: at 57,344 tokens of a 7B QLoRA, a step peaking at 13.6 GiB
    allocated failed under a 16 GiB cap without it (one H200). Read at CUDA's first allocation."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def apply_memory_limit(device_index: int) -> float | None:
    """Caps this process's GPU memory when the env var is set; returns the fraction applied."""
    text = os.environ.get(LIMIT_ENV, "").strip()
    if not text or not torch.cuda.is_available():
        return None
    total_mib = torch.cuda.get_device_properties(device_index).total_memory / 2**20
    fraction = parse_memory_limit(text, total_mib)
    torch.cuda.set_per_process_memory_fraction(fraction, device_index)
    return fraction


def memory_limit(device: torch.device) -> tuple[int, str]:
    """Bytes this process may hold on a GPU, and where that comes from: the cap, but never more than
    is free now plus what this process holds (other processes and CUDA contexts take the rest)."""
    free, total = torch.cuda.mem_get_info(device)
    reachable = free + torch.cuda.memory_reserved(device)
    text = os.environ.get(LIMIT_ENV, "").strip()
    cap = parse_memory_limit(text, total / 2**20) * total if text else total
    if reachable < cap:
        return reachable, f"free on the GPU, of {total / 2**30:.1f} GiB"
    return int(cap), f"{LIMIT_ENV}={text}" if text else "the whole GPU"


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


# ---- the estimate shown before a run starts ----
#
# Calibrated on the seed recipe (QLoRA nf4 + double quantization, LoRA r=32 on all 7 projections,
# gradient checkpointing, SDPA, micro-batch 1) with a Mistral-7B-shaped model on one H200
# (../shared/notes/GPU.md): 7.75 GiB peak allocated at 2,048 tokens, growing about 0.95 GiB per
# 1,000 tokens (13.47 at 8,192; 21.28 at 16,384). Each term below is a count of bytes with the
# reason beside it; the two constants that are not derivable (the recomputed layer's working set
# and the workspace) are what make the formula meet those measurements.

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit weights + 8-bit absmax per 64 + fp32 per 256 absmax
WEIGHT_AND_GRADIENT_BYTES = 8  # of a trainable parameter: fp32 weight + fp32 gradient
# Optimizer state per trainable parameter: AdamW's two moments in fp32, or in 8 bits (bitsandbytes:
# uint8 each, plus an fp32 scale per block of 256). Paged states live in CUDA unified memory, on the
# GPU until it runs short: counted here, though torch.cuda.max_memory_allocated() never sees them.
# adamw_anyprecision's depend on its options (engine/anyprecision.py).
OPTIMIZER_BYTES = {
    Optim.adamw_torch: 8, Optim.adamw_torch_fused: 8, Optim.paged_adamw_32bit: 8,
    Optim.adamw_bnb_8bit: 2 + 2 * 4 / 256, Optim.paged_adamw_8bit: 2 + 2 * 4 / 256,
}  # fmt: skip
WORKSPACE_GIB = 0.7  # dequantised weight buffers, cuBLAS workspace, allocator rounding (measured)
CUDA_CONTEXT_GIB = 0.5  # held by every process, outside PyTorch's allocator
FRAGMENTATION = 1.10  # reserved / allocated, as measured under load
TIGHT_ABOVE = 0.85  # above this share of a GPU's memory a longer batch or a spike can fail


def optimizer_state_bytes(optim: str, optim_args: str | None = None) -> float:
    """Bytes of optimizer state per trainable parameter; ValueError for options it cannot parse."""
    if Optim(optim) == Optim.adamw_anyprecision:
        return state_bytes_per_param(parse_options(optim_args))
    return OPTIMIZER_BYTES[Optim(optim)]


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer's config.json that decide its memory."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        """From a Llama/Mistral/Qwen-style config.json dict; KeyError names a missing field."""
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder layer: what `auto` LoRA targets."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, self.intermediate_size), "up_proj": (h, self.intermediate_size),
            "down_proj": (self.intermediate_size, h),
        }  # fmt: skip

    @property
    def linear_params(self) -> int:
        return self.num_layers * sum(i * o for i, o in self.projections().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @property
    def num_params(self) -> int:
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return self.linear_params + self.embedding_params + norms

    def trainable_params(self, peft: str, lora_r: int) -> int:
        """What training updates, with `auto` targets (every projection): all of it for peft none;
        IA3's scaling vectors (input size for the feed-forward down projection, else output size);
        LoRA's r x (in + out) per projection."""
        if peft == "none":
            return self.num_params
        if peft == "ia3":
            return self.num_layers * sum(i if name == "down_proj" else o for name, (i, o) in self.projections().items())
        return self.num_layers * sum(lora_r * (i + o) for i, o in self.projections().values())


@dataclass
class MemoryEstimate:
    gib_per_gpu: float  # what the GPU must hold: peak allocated + CUDA context + fragmentation
    peak_allocated_gib: float  # comparable to torch.cuda.max_memory_allocated()
    parts: dict[str, float]  # GiB of each term of peak_allocated_gib
    available_gib: float | None
    verdict: str  # "fits", "tight", "will not fit", or "unknown" without a memory size
    advice: list[str]  # what to change, most effective first (empty when it fits)

    def summary(self) -> str:
        """One line for a person: the number, against what, and the verdict."""
        if self.available_gib is None:
            return f"About {self.gib_per_gpu:.1f} GiB per GPU."
        return (
            f"About {self.gib_per_gpu:.1f} GiB of {self.available_gib:.0f} GiB per GPU: "
            f"{self.verdict}."
        )


def _parts(
    shape: ModelShape, *, qlora: bool, peft: str, lora_r: int, tokens: int,
    gradient_checkpointing: bool, num_gpus: int, zero2: bool, optimizer_bytes: float,
) -> dict[str, float]:  # fmt: skip
    gib = 2**30
    if qlora:
        weights = shape.linear_params * NF4_BITS / 8 + shape.embedding_params * 2  # embeddings stay 16-bit
    else:
        weights = shape.num_params * 2
    trainable = shape.trainable_params(peft, lora_r)
    # ZeRO-2 splits gradients and optimizer moments across GPUs (the fp32 weight stays whole);
    # DDP keeps everything on every GPU, plus a bucket copy of the gradients for the all-reduce.
    if zero2 and num_gpus > 1:
        state = trainable * (4 + (WEIGHT_AND_GRADIENT_BYTES - 4 + optimizer_bytes) / num_gpus)
    else:
        state = trainable * (WEIGHT_AND_GRADIENT_BYTES + optimizer_bytes + (4 if num_gpus > 1 else 0))
    # Activations per token: with checkpointing, one hidden state per layer is kept and a single
    # layer is recomputed at a time; without it every layer's working set stays alive. Logits
    # (bf16, their fp32 upcast and its gradient) are the largest single buffer for big vocabularies.
    layer_working_set = (10 * shape.hidden_size + 8 * shape.intermediate_size) * 2
    if gradient_checkpointing:
        per_token = shape.num_layers * shape.hidden_size * 2 + layer_working_set
    else:
        per_token = shape.num_layers * layer_working_set
    per_token += shape.vocab_size * 14
    return {
        "model weights": weights / gib,
        "trainable weights, gradients and optimizer": state / gib,
        "activations": per_token * tokens / gib,
        "workspace": WORKSPACE_GIB,
    }


def estimate_memory(
    shape: ModelShape,
    *,
    qlora: bool,
    peft: str = "lora",
    lora_r: int = 32,
    batch_size: int = 1,
    max_length: int = 2048,
    pack_tokens: int = 0,
    gradient_checkpointing: bool = True,
    num_gpus: int = 1,
    zero2: bool = False,
    optim: str = "adamw_torch",
    optim_args: str | None = None,
    available_gib: float | None = None,
) -> MemoryEstimate:
    """Per-GPU memory for training `shape` with these settings, and a verdict against `available_gib`.

    A worst case: every forward pass full, `batch_size` examples of `max_length` tokens, or with
    `pack_tokens` that many tokens (or one example of max_length, if longer). ValueError for
    optim_args that adamw_anyprecision cannot parse.
    """
    settings = dict(qlora=qlora, peft=peft, lora_r=lora_r, gradient_checkpointing=gradient_checkpointing,
                    num_gpus=num_gpus, zero2=zero2, optimizer_bytes=optimizer_state_bytes(optim, optim_args))

    def needed_with(changes: dict) -> tuple[float, dict[str, float]]:
        merged = {**settings, "batch_size": batch_size, "max_length": max_length, "pack_tokens": pack_tokens,
                  **changes}
        batch, length, packed = merged.pop("batch_size"), merged.pop("max_length"), merged.pop("pack_tokens")
        tokens = max(packed, length) if packed else batch * length
        parts = _parts(shape, tokens=tokens, **merged)
        return sum(parts.values()) * FRAGMENTATION + CUDA_CONTEXT_GIB, parts

    total, parts = needed_with({})
    estimate = MemoryEstimate(
        gib_per_gpu=round(total, 2), peak_allocated_gib=round(sum(parts.values()), 2),
        parts={k: round(v, 2) for k, v in parts.items()}, available_gib=available_gib,
        verdict="unknown", advice=[],
    )  # fmt: skip
    if available_gib is None:
        return estimate
    if total <= TIGHT_ABOVE * available_gib:
        estimate.verdict = "fits"
        return estimate
    estimate.verdict = "tight" if total <= available_gib else "will not fit"
    # Levers, most effective first, applied one after another until the estimate fits the budget.
    budget = TIGHT_ABOVE * available_gib
    levers = [
        (pack_tokens > batch_size * max_length, dict(pack_tokens=0),
         f"lower pack_tokens (now {pack_tokens}) to 0: a pass then holds what one padded micro-batch would"),
        (peft == "none", dict(peft="lora", qlora=True), "train a LoRA adapter (QLoRA) instead of the full model"),
        (peft != "none" and not qlora, dict(qlora=True), "use 4-bit QLoRA (the qlora-zero2 or fp16 preset)"),
        (not gradient_checkpointing, dict(gradient_checkpointing=True), "turn on gradient checkpointing"),
        (batch_size > 1, dict(batch_size=1),
         "lower the batch size to 1 (raise gradient accumulation to keep the effective batch)"),
    ]
    changes: dict = {}
    for applies, change, words in levers:
        if applies and needed_with(changes)[0] > budget:
            changes.update(change)
            estimate.advice.append(words)
    if needed_with(changes)[0] > budget:
        fitting = _longest_fitting_length(lambda n: needed_with({**changes, "max_length": n})[0], budget, max_length)
        if fitting:
            estimate.advice.append(f"lower max_length to {fitting} tokens")
        else:
            estimate.advice.append("pick a smaller model or a GPU with more memory")
    return estimate


def _longest_fitting_length(needed, budget: float, max_length: int) -> int | None:
    """The largest multiple of 128 below max_length whose estimate is within budget (None: none)."""
    # needed() is linear in the length, so solve for it instead of searching.
    base, slope = needed(0), needed(1000) - needed(0)
    if slope <= 0 or base >= budget:
        return None
    longest = int((budget - base) / slope * 1000) // 128 * 128
    return longest if 128 <= longest < max_length else None
