"""offload_embeddings: the input embedding table kept in CPU memory, its rows looked up there.

A 7B model's table is vocabulary x hidden size 16-bit values (0.24 GiB) that the GPU holds only
to gather a pass's few thousand rows. Under an adapter the table is frozen, so no gradient goes
back to it: it can stay in CPU memory, and only the rows a pass needs are copied to the GPU
(tokens x hidden size x 2 bytes: 16 MiB at 2,048 tokens of a 7B model). The same numbers, and
the model's own embedding module runs (scaled embeddings included), only on the CPU.
"""

from typing import TYPE_CHECKING

import torch

from engine.config import PeftType, TrainConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def why_not_offloaded(config: TrainConfig, tied_embeddings: bool, zero_stage: int) -> str | None:
    """Why offload_embeddings cannot run for this run, or None when it can (zero_stage: DeepSpeed's, 0 without)."""
    if config.peft_type == PeftType.none:
        return "full finetuning trains the embedding table, which the optimizer must find on the GPU"
    if tied_embeddings:
        return "the output head shares the table and needs it on the GPU"
    if zero_stage == 3:
        return "ZeRO-3 splits the table across GPUs and gathers it in its own hooks"
    return None


class CpuEmbedding(torch.nn.Module):
    """Runs `embedding` in CPU memory and hands its rows to the device the table came from.

    The module is kept outside this one's parameters (a plain attribute): DDP, DeepSpeed, `.to()`
    and the optimizer never see it, so none moves it back or trains it.
    """

    def __init__(self, embedding: torch.nn.Module):
        super().__init__()
        self.device = embedding.weight.device
        self.__dict__["on_cpu"] = embedding.to("cpu").requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # what code that reads the table's dtype or size looks at
        return self.on_cpu.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Copying the ids back waits for the GPU's queue: one wait a pass, before its first kernel.
        return self.on_cpu(input_ids.to("cpu")).to(self.device)


def offload_embeddings(model: "PreTrainedModel") -> float:
    """Moves the model's input embedding table to CPU memory; returns the GiB it took on the device."""
    embedding = model.get_input_embeddings()
    gib = embedding.weight.numel() * embedding.weight.element_size() / 2**30
    model.set_input_embeddings(CpuEmbedding(embedding))
    return gib
