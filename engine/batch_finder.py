"""--auto_find_batch_size: the largest pass that fits, found by running it before training starts.

HF's auto_find_batch_size only halves a batch after an out-of-memory, restarting the training loop,
which cannot re-create a DeepSpeed engine (the seed's known issue). This measures instead, on the
built model before the Trainer takes it, and sets what a pass holds:
- packing (the default): pack_tokens, the most tokens of one forward pass; per_device_train_batch_size
  and gradient_accumulation_steps stay the user's, so a step trains the same examples;
- no packing: per_device_train_batch_size, a divisor of the examples a step trains per process, with
  gradient_accumulation_steps set so that the effective batch stays what the user asked for.

Each size tried runs one forward and backward pass of synthetic max_length examples (packed as the
collator packs them) on the real model, with checkpointing, mixed precision and Liger as the Trainer
sets them, and reads the peak allocated memory. A size fits when it did not run out of memory and
its peak plus what training adds later (`unprobed_bytes`: optimizer states, DeepSpeed's and DDP's
gradient buffers) stays MARGIN under the limit (TORCH_PER_PROCESS_MEMORY_LIMIT, else the GPU).
Sizes grow by doubling, then bisect; every process measures and all take the smallest result, so
DeepSpeed and DDP see one value. On a CPU there is no memory counter: a size fits when it runs.
"""

import bisect
import contextlib
import dataclasses
import functools
import gc
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import TrainerControl, TrainerState

from engine.config import TrainConfig
from engine.memory import is_out_of_memory, memory_limit, optimizer_state_bytes, release_cached

log = logging.getLogger(__name__)

MARGIN = 0.10  # of the limit, left for fragmentation (reserved over allocated) and longer-lived buffers
GIB = 2**30


def largest_fitting(candidates: Sequence[int], fits: Callable[[int], bool]) -> int | None:
    """The largest candidate that fits (ascending candidates; fits true up to some size, false above),
    trying few: the first that fits, then doubling, then bisection. None when the first does not fit."""
    if not fits(candidates[0]):
        return None
    low, high = 0, len(candidates)  # candidates[low] fits; candidates[high:] do not
    while low < len(candidates) - 1:
        bigger = min(max(bisect.bisect_left(candidates, 2 * candidates[low]), low + 1), len(candidates) - 1)
        if not fits(candidates[bigger]):
            high = bigger
            break
        low = bigger
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(candidates[middle]) else (low, middle)
    return candidates[low]


def candidates(config: TrainConfig) -> list[int]:
    """Sizes worth trying: tokens a pass from one max_length example to a whole step's, in steps of an
    eighth of max_length (packing); else the divisors of a step's examples per process."""
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if config.packing:
        whole_step = per_step * config.max_length
        return sorted({*range(config.max_length, whole_step + 1, max(1, config.max_length // 8)), whole_step})
    return [n for n in range(1, per_step + 1) if per_step % n == 0]


def unprobed_bytes(sizes: Sequence[tuple[int, int]], state_bytes: float, deepspeed: dict | None,
                   world: int) -> dict[str, int]:
    """GPU memory training holds beside a forward and backward pass that the probe does not, by part,
    for trainable tensors of (elements, bytes each) and an optimizer keeping state_bytes an element
    (engine/memory.py's optimizer_state_bytes; its states come at the first step).

    DeepSpeed ZeRO-1/2 (deepspeed/runtime/zero/stage_1_and_2.py, 0.19): each process clones its
    1/world partition of the trainable weights in fp32, keeps that partition's gradients (weight
    dtype) and the optimizer states on it, and stages gradients in reduce_bucket_size buffers (two
    with overlap_comm), allocated whole whatever the model's size; offload_optimizer moves all but the
    buffers to the CPU. Byte for byte what a ZeRO-2 engine of 2 CPU processes held mid-backward in
    its fp32 mode (our adapters' mode). ZeRO-3 is counted the same; the probe then holds the whole
    weights ZeRO-3 would shard, more than training needs. DDP keeps a flat copy of every gradient in
    its buckets. The optimizer's own temporaries come at the step, once the pass's activations are
    freed, so they add nothing to the peak.
    """
    elements = sum(n for n, _ in sizes)
    size = max((s for _, s in sizes), default=4)
    zero = (deepspeed or {}).get("zero_optimization", {})
    if deepspeed and zero.get("stage", 0) >= 1:
        from engine.zero import DEFAULT_BUCKET

        bucket = zero.get("reduce_bucket_size")
        bucket = int(bucket) if isinstance(bucket, int | float) else DEFAULT_BUCKET
        buffers = bucket * size * (2 if zero.get("overlap_comm") else 1) if zero.get("contiguous_gradients") else 0
        if zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None):
            return {"DeepSpeed gradient buffers": buffers}
        part = math.ceil(elements / world)
        step_grad = part * 4 if size != 4 else 0  # the fp32 copy of 16-bit gradients at the step
        return {
            "optimizer states": math.ceil(part * state_bytes),
            "DeepSpeed fp32 weights, gradients and buffers": part * 4 + part * size + step_grad + buffers,
        }
    parts = {"optimizer states": math.ceil(elements * state_bytes)}
    if world > 1:
        parts["gradient all-reduce buckets"] = sum(n * s for n, s in sizes)
    return parts


@dataclass
class Trial:
    size: int
    outcome: str  # "fits", "over the limit", "out of memory"; "ran" where nothing measures memory
    need_gib: float | None = None  # peak measured + unprobed

    def words(self) -> str:
        return f"{self.size} {self.outcome}" + (f" ({self.need_gib:.2f} GiB)" if self.need_gib is not None else "")


def search(sizes: Sequence[int], try_size: Callable[[int], int | None], unprobed: int,
           limit: int | None) -> tuple[int | None, list[Trial]]:
    """largest_fitting over sizes, where try_size runs a pass and returns its peak bytes (None where
    nothing measures) or raises an out-of-memory. Returns the size (None: not even the first) and
    every trial, in the order tried."""
    budget = None if limit is None else (1 - MARGIN) * limit
    trials: list[Trial] = []

    def fits(size: int) -> bool:
        peak = None
        try:
            peak = try_size(size)
        except Exception as e:  # noqa: BLE001 - only an out-of-memory is an answer; the rest is raised
            if not is_out_of_memory(e):
                raise
            trials.append(Trial(size, "out of memory"))
            return False
        if peak is None or budget is None:
            trials.append(Trial(size, "ran"))
            return True
        need = peak + unprobed
        trials.append(Trial(size, "fits" if need <= budget else "over the limit", round(need / GIB, 2)))
        return need <= budget

    return largest_fitting(sizes, fits), trials


class CudaMeter:
    """The GPU's memory counter and the limit it is held to. A test stands in its own: a CPU has none."""

    def __init__(self, device: torch.device):
        self.device = device

    def limit(self) -> tuple[int, str]:
        """Bytes this process may hold, and where that number comes from."""
        return memory_limit(self.device)

    def __call__(self, run: Callable[[], None]) -> int:
        """Runs a pass; returns the most it held allocated."""
        torch.cuda.reset_peak_memory_stats(self.device)
        run()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def synthetic_batch(config: TrainConfig, size: int, vocab_size: int, device: torch.device) -> dict:
    """A pass of `size` (tokens when packing, else examples) made of max_length examples, every token
    trained: packed as StepCollator packs a pass, else one padded micro-batch with nothing to pad."""
    from engine.packing import pack

    length = config.max_length
    count = size if not config.packing else math.ceil(size / length)
    ids = torch.randint(3, vocab_size, (count * length,), generator=torch.Generator().manual_seed(0))
    if config.packing:
        ids = ids[:size].tolist()
        batch = pack([{"input_ids": ids[i:i + length], "labels": ids[i:i + length]} for i in range(0, size, length)])
    else:
        ids = ids.view(count, length)
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class Found:
    config: TrainConfig  # the user's with the chosen values
    event: dict  # the started event's auto_batch field: what was chosen, from what, and why

    @property
    def why(self) -> str:
        return self.event["why"]


def find_batch(model, config: TrainConfig, args, callbacks: Sequence = (), meter: CudaMeter | None = None) -> Found:
    """Measures what fits (module docstring) on `model` as `args` (the run's TrainingArguments) and
    `callbacks` (those that change the model on_train_begin) will train it, and returns the config to
    train with. `meter` stands in for the GPU's counter."""
    device = args.device
    if meter is None and device.type == "cuda":
        meter = CudaMeter(device)
    limit, limit_source = meter.limit() if meter else (None, "")
    trainable = [(p.numel(), p.element_size()) for p in model.parameters() if p.requires_grad]
    state_bytes = optimizer_state_bytes(config.optim, config.optim_args)
    parts = unprobed_bytes(trainable, state_bytes, args.deepspeed, args.world_size)
    unprobed = sum(parts.values())
    _prepare_like_the_trainer(model, args, callbacks)
    dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    vocab = model.get_input_embeddings().num_embeddings

    def one_pass(batch: dict) -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()

    def try_size(size: int) -> int | None:
        out_of_memory = False
        try:
            run = functools.partial(one_pass, synthetic_batch(config, size, vocab, device))
            peak = meter(run) if meter else run()
        except Exception as e:  # noqa: BLE001 - only an out-of-memory is an answer; the rest is raised
            if not is_out_of_memory(e):
                raise
            out_of_memory = True
        # Out of the except block, the error and the frames that held the pass's tensors are gone,
        # cycles aside (a second or more to collect in a big process, so only after an error): the
        # next size starts from the memory this one started from.
        model.zero_grad(set_to_none=True)
        if out_of_memory:
            gc.collect()
        release_cached()
        if out_of_memory:
            raise torch.OutOfMemoryError(f"a pass of {size} ran out of memory")
        return peak

    sizes = candidates(config)
    started = time.time()
    # Dropout draws from the RNG: the run then starts where it would without the probe.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        own, trials = search(sizes, try_size, unprobed, limit)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the run's reported peak is then the run's own
    # An index into sizes, the same list in every process; -1: the first size ran but is over the
    # limit; -2: it ran out of memory.
    own_index = sizes.index(own) if own is not None else -2 if trials[0].outcome == "out of memory" else -1
    agreed_index = _smallest_across_processes(own_index, device)
    if agreed_index == -2:
        where = "this process" if own_index == -2 else "another process"
        raise torch.OutOfMemoryError(
            f"auto_find_batch_size: one example of max_length {config.max_length} tokens ran out of memory in {where}"
        )
    value = sizes[max(agreed_index, 0)]  # the first size, over the limit yet running, beats no run at all
    return _found(config, value, own, sizes, trials, parts, limit, limit_source, args.world_size, started)


def _prepare_like_the_trainer(model, args, callbacks: Sequence) -> None:
    """What Trainer.train does to the model before its first pass (transformers 5.17), in its order,
    so the probe runs the model that trains: on its device, Liger's kernels, checkpointing, our
    callbacks' on_train_begin (tiled MLPs, offloaded checkpoints), training mode. Each is one the
    Trainer then does again to the same effect (checkpointing re-enabled unwraps the offload first)."""
    if args.device.type != "cpu" and next(model.parameters()).device != args.device:
        model.to(args.device)  # DDP's Trainer and DeepSpeed move it there too; a 4-bit model is there already
    if args.use_liger_kernel:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, args.liger_kernel_config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    for callback in callbacks:
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    model.train()


def _smallest_across_processes(value: int, device: torch.device) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([value], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return int(tensor.item())


def _found(config: TrainConfig, value: int, own: int | None, sizes: list[int], trials: list[Trial],
           parts: dict[str, int], limit: int | None, limit_source: str, world: int, started: float) -> Found:
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if config.packing:
        from engine.config import token_budget

        setting, unit, was = "pack_tokens", "tokens", token_budget(config)
        changes = {"pack_tokens": value}
        keeps = (f"per_device_train_batch_size stays {config.per_device_train_batch_size}: a step still trains "
                 f"{per_step} examples per process")
        top = f"a whole step ({per_step} examples of max_length {config.max_length}) fits in one pass"
    else:
        setting, unit, was = "per_device_train_batch_size", "examples", config.per_device_train_batch_size
        changes = {"per_device_train_batch_size": value, "gradient_accumulation_steps": per_step // value}
        keeps = (f"gradient_accumulation_steps {per_step // value} (was {config.gradient_accumulation_steps}), "
                 f"so a step still trains {per_step} examples per process (micro-batches divide it)")
        top = "the whole step fits in one micro-batch"
    outcomes = {t.size: t.outcome for t in trials}
    reason = []
    if limit is None:
        reason.append("no memory counter on this device: the largest that ran without running out of memory")
    else:
        allowed = (1 - MARGIN) * limit / GIB
        unprobed = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items())
        reason.append(f"{(1 - MARGIN):.0%} of {limit / GIB:.2f} GiB ({limit_source}) allows {allowed:.2f} GiB; "
                      f"a pass's measured peak is counted with what training adds later ({unprobed} GiB)")
    if own is None:
        reason.append(f"even {sizes[0]} {unit} is over the limit, but ran: the run may run out of memory")
    else:  # the search tried the size above the one it found, unless there is none
        bigger = sizes.index(own) + 1
        reason.append(top if bigger == len(sizes) else f"{sizes[bigger]} {unit} {outcomes[sizes[bigger]]}")
    if world > 1:
        reason.append(f"this process alone could take {own or sizes[0]}; all {world} take the smallest, {value}")
    tried_words = ", ".join(t.words() for t in trials)
    reasons = "; ".join(reason)
    why = f"auto_find_batch_size: {setting} {value} (was {was}); {keeps}. {reasons[:1].upper()}{reasons[1:]}. " \
          f"Tried ({unit}): {tried_words}."
    event = {
        "setting": setting, "value": value, "was": was, **changes, "this_process": own, "processes": world,
        "limit_gib": None if limit is None else round(limit / GIB, 2), "margin": MARGIN,
        "unprobed_gib": {k: round(v / GIB, 3) for k, v in parts.items()},
        "tried": [dataclasses.asdict(t) for t in trials], "seconds": round(time.time() - started, 1), "why": why,
    }
    return Found(dataclasses.replace(config, **changes), event)
