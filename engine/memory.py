"""GPU memory: the per-process cap (TORCH_PER_PROCESS_MEMORY_LIMIT), out-of-memory explained, and
the estimate of what a configuration needs, shown before a run starts."""

import bisect
import dataclasses
import os
from dataclasses import dataclass

import torch

from engine.anyprecision import parse_options, state_bytes_per_param
from engine.config import Optim, PeftType, TrainConfig, padded_tokens, token_budget
from engine.embeddings import why_not_offloaded

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
    padded = padded_tokens(config)
    if config.packing and config.pack_tokens > padded:  # set by hand, or grown from 0 (grown_pack_tokens)
        steps.append(f"lower pack_tokens (now {config.pack_tokens}) to {padded}, what one padded micro-batch holds")
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
# Each term is a count of bytes with its reason. Peak allocated memory comes at the start of the
# backward pass: the weights, the trainable weights' optimizer state (gradients come and go layer by
# layer), every layer's checkpointed input, and then the larger of the loss's buffers and one
# layer's recomputation. The working set of that layer (LAYER_HIDDEN and LAYER_INTERMEDIATE values
# of 16 bits per token) and WORKSPACE_GIB are the two constants not derived; they are fitted to our
# engine's measured peaks on one H200 (benchmarks/RESULTS.md, run 14's probes: a 7B QLoRA at 2,048,
# 4,096 and 8,192 tokens a pass, 1.0 MB a token) and the seed recipe's slope (GPU.md: 0.95 GiB per
# 1,000 tokens).

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit weights + 8-bit absmax per 64 + fp32 per 256 absmax
MASTER_BYTES = 4  # a trainable parameter's own fp32 weight
OPTIMIZER_BYTES = {
    Optim.adamw_torch: 8, Optim.adamw_torch_fused: 8, Optim.paged_adamw_32bit: 8,
    Optim.adamw_bnb_8bit: 2 + 2 * 4 / 256, Optim.paged_adamw_8bit: 2 + 2 * 4 / 256,
}  # fmt: skip
WORKSPACE_GIB = 0.2  # a dequantised weight, cuBLAS workspace, allocator rounding
LAYER_HIDDEN = 14  # 16-bit values per token of one layer's recomputation, in units of hidden_size
LAYER_INTERMEDIATE = 13  # and of intermediate_size (gate, up, activation, product, LoRA inputs)
LOSS_BYTES = 14  # per token and vocabulary entry: 16-bit logits, their fp32 copy and its gradient
CHUNK_LOGITS = 2**24  # engine/loss.py's chunk: the loss's largest buffer with chunked_loss
CUDA_CONTEXT_GIB = 0.5  # held by every process, outside PyTorch's allocator
FRAGMENTATION = 1.10  # reserved / allocated, as measured under load
# pack_tokens 0 grows a pass up to this many tokens. A 7B QLoRA step of 4 x 2,048 tokens (one H100,
# benchmarks/RESULTS.md run 25): 6,811 tokens/s in passes of 2,048 at 6.08 GiB, 8,637 in passes of 4,096
# at 7.02, 9,211 in one pass of 8,192 at 8.84: past 4,096, 7% more speed for 1.8 GiB more memory.
GROWN_PASS_TOKENS = 4096
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
    grown_pack_tokens: int | None = None  # the pass pack_tokens 0 grew to on this GPU (None: not grown)
    least_gib_per_gpu: float | None = None  # gib_per_gpu with passes of a padded micro-batch's tokens

    def summary(self) -> str:
        """One line for a person: the number, against what, and the verdict."""
        if self.available_gib is None:
            return f"About {self.gib_per_gpu:.1f} GiB per GPU."
        return (
            f"About {self.gib_per_gpu:.1f} GiB of {self.available_gib:.0f} GiB per GPU: "
            f"{self.verdict}."
        )


def largest_pass_tokens(config: TrainConfig) -> int:
    """The most tokens one forward pass holds: a padded micro-batch's, or when packing the budget,
    or more for an example longer than the budget, which runs in a pass of its own."""
    if not config.packing:
        return padded_tokens(config)
    return max(token_budget(config), config.max_length)


class HostMemoryError(MemoryError):
    """CPU memory too small for what a run would keep there; args: (what went wrong, what to do)."""


def _hidden_bytes(config: TrainConfig) -> int:
    """Bytes of one residual-stream value: fp32 under QLoRA's upcast_layernorm and in fp32 training."""
    return 4 if (config.use_qlora and config.upcast_layernorm) or not (config.bf16 or config.fp16) else 2


def offloaded_gib(shape: ModelShape, config: TrainConfig) -> float:
    """CPU memory offload_activations takes per process: every layer's input for the largest pass."""
    return shape.num_layers * shape.hidden_size * _hidden_bytes(config) * largest_pass_tokens(config) / 2**30


def _parts(shape: ModelShape, config: TrainConfig, num_gpus: int, zero_stage: int) -> dict[str, float]:
    gib = 2**30
    tokens = largest_pass_tokens(config)
    sixteen_bit = config.bf16 or config.fp16
    if config.use_qlora:  # the embedding and head stay 16-bit (engine/model.py)
        weights = shape.linear_params * NF4_BITS / 8 + shape.embedding_params * 2
    else:
        weights = shape.num_params * (2 if sixteen_bit else 4)
    if config.offload_embeddings and why_not_offloaded(config, shape.tied_embeddings, zero_stage) is None:
        weights -= shape.vocab_size * shape.hidden_size * (2 if config.use_qlora or sixteen_bit else 4)
    if zero_stage == 3 and num_gpus > 1:
        weights /= num_gpus  # once training starts; each GPU holds them whole while loading (presets/README.md)
    trainable = shape.trainable_params(config.peft_type.value, config.lora_r)
    optimizer = optimizer_state_bytes(config.optim.value, config.optim_args)
    # A LoRA's gradients come layer by layer, a few MB; a full finetune's all exist as backward ends.
    # ZeRO-2 and 3 split gradients and optimizer state; DDP keeps a bucket copy for its all-reduce.
    gradient = 4 if config.peft_type == PeftType.none else 0
    if zero_stage >= 2 and num_gpus > 1:
        state = trainable * (MASTER_BYTES + (4 + optimizer) / num_gpus)
    else:
        state = trainable * (MASTER_BYTES + gradient + optimizer + (4 if num_gpus > 1 else 0))

    hidden_bytes = _hidden_bytes(config)
    mlp_tokens = min(tokens, config.tiled_mlp_tokens or shape.hidden_size) if config.tiled_mlp else tokens
    layer = 2 * (LAYER_HIDDEN * shape.hidden_size * tokens + LAYER_INTERMEDIATE * shape.intermediate_size * mlp_tokens)
    if config.gradient_checkpointing:
        # Offloaded, two layers' inputs are on the GPU: the one recomputing and the one fetched next.
        kept = 2 if config.offload_activations and torch.cuda.is_available() else shape.num_layers
        activations = kept * shape.hidden_size * hidden_bytes * tokens + layer
    else:
        activations = shape.num_layers * layer
    if config.chunked_loss or config.use_liger_kernel:  # one chunk of logits, and the hidden states' gradient
        loss = min(tokens * shape.vocab_size, CHUNK_LOGITS) * 8 + 2 * shape.hidden_size * hidden_bytes * tokens
    else:
        loss = shape.vocab_size * LOSS_BYTES * tokens
    if not config.gradient_checkpointing:
        loss += layer  # nothing is recomputed: the loss's buffers come on top of every layer's
    return {
        "model weights": weights / gib,
        "trainable weights and optimizer": state / gib,
        "activations": activations / gib,
        "loss": max(0.0, loss - layer) / gib,  # only what the loss holds beyond a layer's recomputation
        "workspace": WORKSPACE_GIB,
    }


def estimate_memory(
    shape: ModelShape, config: TrainConfig, *, num_gpus: int = 1, zero_stage: int = 0,
    available_gib: float | None = None,
) -> MemoryEstimate:  # fmt: skip
    """Per-GPU memory to train `shape` as `config` says, and a verdict against `available_gib`.

    A worst case: every forward pass full (a padded micro-batch of max_length examples, or with packing
    pack_tokens tokens). zero_stage: the DeepSpeed ZeRO stage (0 without DeepSpeed). ValueError for
    optim_args that adamw_anyprecision cannot parse.
    """

    def needed_with(changes: dict) -> tuple[float, dict[str, float]]:
        parts = _parts(shape, dataclasses.replace(config, **changes), num_gpus, zero_stage)
        return _total(parts), parts

    # As training does (engine/train.py): passes grow on a GPU only. A grown pass only ever takes memory
    # that fits, so the levers below start from the least.
    grown = {}
    if config.packing and not config.pack_tokens and available_gib is not None and torch.cuda.is_available():
        grown = {"pack_tokens": grown_pack_tokens(shape, config, available_gib, num_gpus=num_gpus,
                                                  zero_stage=zero_stage)}
    total, parts = needed_with(grown)
    least = needed_with({})[0] if grown else total
    estimate = MemoryEstimate(
        gib_per_gpu=round(total, 2), peak_allocated_gib=round(sum(parts.values()), 2),
        parts={k: round(v, 2) for k, v in parts.items()}, available_gib=available_gib,
        verdict="unknown", advice=[],
        grown_pack_tokens=grown["pack_tokens"] if grown and total > least else None, least_gib_per_gpu=round(least, 2),
    )  # fmt: skip
    if available_gib is None:
        return estimate
    if total <= TIGHT_ABOVE * available_gib:
        estimate.verdict = "fits"
        return estimate
    estimate.verdict = "tight" if total <= available_gib else "will not fit"
    # Levers, most effective first, applied one after another until the estimate fits the budget.
    budget = TIGHT_ABOVE * available_gib
    batch, pack_tokens = config.per_device_train_batch_size, config.pack_tokens if config.packing else 0
    padded = padded_tokens(config)
    levers = [
        (pack_tokens > padded, dict(pack_tokens=padded),
         f"lower pack_tokens (now {pack_tokens}) to {padded}: what one padded micro-batch holds"),
        (config.peft_type == PeftType.none, dict(peft_type=PeftType.lora, use_qlora=True),
         "train a LoRA adapter (QLoRA) instead of the full model"),
        (config.peft_type != PeftType.none and not config.use_qlora, dict(use_qlora=True),
         "use 4-bit QLoRA (the qlora-zero2 or fp16 preset)"),
        (not config.gradient_checkpointing, dict(gradient_checkpointing=True), "turn on gradient checkpointing"),
        (not config.chunked_loss, dict(chunked_loss=True), "turn on chunked_loss"),
        (batch > 1, dict(per_device_train_batch_size=1),
         "lower the batch size to 1 (raise gradient accumulation to keep the effective batch)"),
        (torch.cuda.is_available() and not config.offload_activations, dict(offload_activations=True),
         "turn on offload_activations"),
        (not config.tiled_mlp and config.max_length > shape.hidden_size, dict(tiled_mlp=True), "turn on tiled_mlp"),
        (not config.offload_embeddings and why_not_offloaded(config, shape.tied_embeddings, zero_stage) is None,
         dict(offload_embeddings=True), "turn on offload_embeddings"),
    ]
    changes: dict = {}
    for applies, change, words in levers:
        now = needed_with(changes)[0]
        if applies and now > budget and needed_with({**changes, **change})[0] < now:
            changes.update(change)
            estimate.advice.append(words)
    if needed_with(changes)[0] > budget:
        fitting = _longest_fitting_length(lambda n: needed_with({**changes, "max_length": n})[0], budget,
                                          config.max_length)
        if fitting:
            estimate.advice.append(f"lower max_length to {fitting} tokens")
        else:
            estimate.advice.append("pick a smaller model or a GPU with more memory")
    return estimate


def grown_pack_tokens(
    shape: ModelShape, config: TrainConfig, available_gib: float, *, num_gpus: int = 1, zero_stage: int = 0,
) -> int:  # fmt: skip
    """What pack_tokens 0 means on a GPU: the most tokens a pass may hold, from a padded micro-batch's
    up to GROWN_PASS_TOKENS or a whole step's (per_device_train_batch_size x
    gradient_accumulation_steps x max_length), whichever is less, as far as the estimate still fits
    `available_gib` with the margin of a "fits" verdict.

    Each pass dequantizes every 4-bit weight three times and launches the same ~8,000 kernels, however
    few tokens it holds, so fuller passes are faster. Only memory that is free grows a pass: the least
    a run needs, and so which GPUs it can use, stays a padded micro-batch's.
    """
    least = padded_tokens(config)
    most = max(least, min(least * config.gradient_accumulation_steps, GROWN_PASS_TOKENS))

    def too_big(tokens: int) -> bool:
        parts = _parts(shape, dataclasses.replace(config, pack_tokens=tokens), num_gpus, zero_stage)
        return _total(parts) > TIGHT_ABOVE * available_gib

    if not too_big(most):
        return most
    sizes = range(least, most, 128)
    fitting = bisect.bisect_left(sizes, True, key=too_big)  # the estimate grows with the tokens
    return sizes[fitting - 1] if fitting else least


def _total(parts: dict[str, float]) -> float:
    """GiB a process needs: the parts' bytes as the allocator rounds them, and its CUDA context."""
    return sum(parts.values()) * FRAGMENTATION + CUDA_CONTEXT_GIB


def _longest_fitting_length(needed, budget: float, max_length: int) -> int | None:
    """The largest multiple of 128 below max_length whose estimate is within budget (None: none)."""
    # needed() is linear in the length, so solve for it instead of searching.
    base, slope = needed(0), needed(1000) - needed(0)
    if slope <= 0 or base >= budget:
        return None
    longest = int((budget - base) / slope * 1000) // 128 * 128
    return longest if 128 <= longest < max_length else None
