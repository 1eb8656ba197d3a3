"""Padding-free step packing: each optimizer step's examples in as few forward passes as fit.

The seed recipe pads each micro-batch to its longest example and runs gradient_accumulation_steps
micro-batches per optimizer step. On realistic data most of that is padding, and a GPU fed one
short example at a time waits on the host (thousands of small kernels per pass). We keep what a
step means (per_device_train_batch_size x gradient_accumulation_steps examples per device, the
same examples in the same order, the gradient normalised by the label tokens of the whole step)
and change how it runs:

- the dataloader hands over a whole step's examples (the Trainer sees one micro-batch a step);
- `StepCollator` packs them best-fit into passes of at most `token_budget` tokens, back to back
  with no padding; `position_ids` restart at 0 for each example, which is how attention keeps
  examples apart (varlen kernels get `cu_seq_lens_*` boundaries, SDPA and eager get a
  block-diagonal mask that transformers builds from the position ids);
- `StepPackingTrainer.training_step` runs the passes as gradient accumulation does: gradients
  synchronised (DDP, DeepSpeed) on the last pass only, every rank running as many passes.

The budget defaults to per_device_train_batch_size x max_length, the most tokens a padded
micro-batch could hold, so a pass never needs more activation memory than the seed's micro-batch.
TRL's packing packs across steps (an epoch then has fewer, larger steps, which changes what the
seed's batch size means and how far a run learns); its padding-free collator flattens one
micro-batch only. Neither merges the micro-batches of one step, so this is ours.
"""

import bisect
from collections.abc import Sequence

import torch

from engine.checkpoints import AtomicCheckpointTrainer


def pack_lengths(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` grouped into bins of at most `budget` tokens.

    Each example goes, longest first, to the fullest bin it still fits in; bins come back in the
    order of their first (longest) example. An example longer than the budget gets a bin alone.
    """
    lengths = [int(n) for n in lengths]  # numpy's uint32 would wrap in the subtractions below
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)  # stable for ties
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, bin index), sorted: best fit by bisection
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            left, b = budget - lengths[i], len(bins) - 1
        else:
            left, b = free.pop(slot)
            bins[b].append(i)
            left -= lengths[i]
        if left > 0:
            bisect.insort(free, (left, b))
    return bins


def pack(examples: list[dict]) -> dict[str, torch.Tensor | int]:
    """Examples → one (1, tokens) pass with no padding.

    Each example's first label becomes -100: the loss shifts labels by one, so it was never a
    target, and counting it would skew the step's normalisation. A pass of one example carries the
    same arguments (its bounds are its ends), so that every pass runs one compiled graph: under
    ZeRO-2, ranks running different graphs in one pass summed different gradients (the passes of
    one example took another attention path; benchmarks/RESULTS.md, runs 33-42).
    """
    input_ids, labels, position_ids, bounds = [], [], [], [0]
    for example in examples:
        n = len(example["input_ids"])
        input_ids += example["input_ids"]
        labels += [-100, *example["labels"][1:]]
        position_ids += range(n)
        bounds.append(bounds[-1] + n)
    batch: dict[str, torch.Tensor | int] = {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels])}
    positions = torch.tensor(position_ids)
    starts = torch.tensor(bounds, dtype=torch.int32)
    longest = max(len(example["input_ids"]) for example in examples)
    # The names transformers' flash-attention path reads; other backends use the position ids.
    batch.update(position_ids=positions[None], cu_seq_lens_q=starts, cu_seq_lens_k=starts,
                 max_length_q=longest, max_length_k=longest)
    return batch


class StepCollator:
    """One optimizer step's examples → its passes, beside the whole step as one packed row.

    The Trainer reads the whole row to count tokens and to normalise the loss; an eval batch
    (no gradients, little memory) runs as that one row.
    """

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, examples: list[dict]) -> dict:
        bins = pack_lengths([len(e["input_ids"]) for e in examples], self.budget)
        passes = [pack([examples[i] for i in members]) for members in bins]
        return {**pack([examples[i] for members in bins for i in members]), "passes": passes}


# A pass that trains nothing (its labels are ignored): a rank with fewer passes runs these, so that
# every rank joins the same number of gradient collectives (ZeRO-2 reduces in each backward). Packed
# like the others and two tokens long (a length of 1 would get a graph of its own), it runs their graph.
_IDLE_PASS = pack([{"input_ids": [0, 0], "labels": [-100, -100]}])


class StepPackingTrainer(AtomicCheckpointTrainer):
    """Runs each step's passes (StepCollator) as gradient accumulation runs micro-batches."""

    def training_step(self, model, inputs: dict, num_items_in_batch=None):
        passes = inputs["passes"]
        missing = self._most_passes(len(passes)) - len(passes)
        passes = passes + [_IDLE_PASS] * missing
        loss = 0.0
        for i, one in enumerate(passes):
            last = i == len(passes) - 1
            # What the Trainer's own accumulation loop sets: DeepSpeed reads it as the boundary.
            self.accelerator.gradient_state._set_sync_gradients(last)
            if last:
                loss = loss + super().training_step(model, one, num_items_in_batch)
            else:
                with self.accelerator.no_sync(model):
                    loss = loss + super().training_step(model, one, num_items_in_batch)
        return loss

    def _most_passes(self, mine: int) -> int:
        if self.accelerator.num_processes == 1:
            return mine
        count = torch.tensor([mine], device=self.accelerator.device)
        return int(self.accelerator.reduce(count, reduction="max").item())

    def prediction_step(self, model, inputs: dict, prediction_loss_only: bool, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k != "passes"}  # the whole batch in one pass
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
