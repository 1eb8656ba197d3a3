"""Padding-free packing: examples share a micro-batch up to a token budget, with no padding.

Each packed row holds whole examples back to back; `position_ids` restart at 0 for each, which
is how attention keeps examples apart (varlen flash kernels get `cu_seq_lens_*` boundaries,
SDPA and eager get a block-diagonal mask that transformers builds from the position ids). The
collator sets the first label of each example to -100, so no example learns to predict the next
one's first token (the loss shifts labels by one, so that label was never a target anyway).

Why our own packer: TRL's `pack_dataset` comes with its SFTTrainer collator and truncation
rules; ours is 30 lines over the lengths alone, so the same code packs and counts packs.
"""

import bisect
from collections.abc import Sequence

import datasets
import torch

from engine.config import TrainConfig

PACK_WINDOW = 2000  # examples packed together; a larger window fills rows better, at more RAM


def token_budget(config: TrainConfig) -> int:
    """Tokens a packed micro-batch may hold: pack_tokens, else what a padded micro-batch could."""
    return config.pack_tokens or config.per_device_train_batch_size * config.max_length


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


def count_packs(lengths: Sequence[int], budget: int) -> int:
    """Rows pack_dataset makes of examples of these lengths, in this order."""
    windows = range(0, len(lengths), PACK_WINDOW)
    return sum(len(pack_lengths(lengths[w : w + PACK_WINDOW], budget)) for w in windows)


def _pack_batch(batch: dict[str, list], budget: int) -> dict[str, list]:
    rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in pack_lengths([len(ids) for ids in batch["input_ids"]], budget):
        input_ids, labels, position_ids = [], [], []
        for i in members:
            input_ids += batch["input_ids"][i]
            labels += batch["labels"][i]
            position_ids += range(len(batch["input_ids"][i]))
        rows["input_ids"].append(input_ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(position_ids)
    return rows


def pack_dataset(
    dataset: "datasets.Dataset | datasets.IterableDataset", budget: int
) -> "datasets.Dataset | datasets.IterableDataset":
    """Rows of whole examples, at most `budget` tokens each, packed within windows of examples.

    Works on an Arrow dataset (cached like any map) and on a streamed one (packed as it is read).
    """
    return dataset.map(
        _pack_batch,
        batched=True,
        batch_size=PACK_WINDOW,
        fn_kwargs={"budget": budget},
        remove_columns=["input_ids", "labels"],
    )


class PackedCollator:
    """Rows (packed or single examples) → one (1, tokens) micro-batch with no padding.

    Beside input_ids, labels and position_ids it passes the boundaries that varlen attention
    needs (the names transformers' flash-attention path reads); other backends ignore them.
    A row without position_ids is one example.
    """

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor | int]:
        input_ids, labels, position_ids = [], [], []
        for row in rows:
            n = len(row["input_ids"])
            input_ids += row["input_ids"]
            positions = row.get("position_ids") or range(n)
            position_ids += positions
            labels += [-100 if p == 0 else label for p, label in zip(positions, row["labels"], strict=True)]
        positions = torch.tensor(position_ids)
        starts = torch.cat([torch.nonzero(positions == 0).flatten(), torch.tensor([len(positions)])])
        return {
            "input_ids": torch.tensor([input_ids]),
            "labels": torch.tensor([labels]),
            "position_ids": positions[None],
            "cu_seq_lens_q": starts.to(torch.int32),
            "cu_seq_lens_k": starts.to(torch.int32),
            "max_length_q": int(starts.diff().max()),
            "max_length_k": int(starts.diff().max()),
        }
