"""torch_compile: each decoder layer compiled, the rest of the model left as it is.

Between a layer's matrix products sit a dozen small element-wise steps (norms, rotary embeddings,
SwiGLU, residual adds, each adapter's dropout, scaling and add), each its own kernel reading and
writing the whole activation: at micro-batch 1 they take much of a step. Compiling the layer lets
inductor fuse them. Only the layers: compiling the whole PEFT model (what TrainingArguments'
torch_compile does) traces the 4-bit loading code, the adapter wrapper, the loss and the
checkpointing too and breaks its graph at each. The layers share one code, so the graph traced
for the first is reused by all (PyTorch's "regional compilation"), and the checkpointing, the
offload hooks (engine/offload.py) and the loss around them run as before. The layer's inner
forward is compiled, not the checkpointing call around it, so a recomputation reuses the graph.
"""

import torch
from transformers import PreTrainedModel, TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

from engine.config import TrainConfig
from engine.trainer_args import uses_liger
from engine.zero import zero_stage


def why_not_compiled(config: TrainConfig) -> str | None:
    """Why torch_compile cannot run for this run, or None when it can."""
    if zero_stage(config.deepspeed) == 3:
        return "ZeRO-3 gathers each weight in hooks on every module, which a compiled layer would trace through"
    if uses_liger(config):
        # The compiler cannot see into Liger's Triton kernels: the layer's graph breaks at each, and
        # together they ran slower than either alone (benchmarks/RESULTS.md, run 20).
        return "use_liger_kernel's kernels already fuse these steps"
    return None


def compile_layers(model: PreTrainedModel, activation_memory_budget: float = 1.0) -> int:
    """Compiles every decoder layer's forward once; returns how many layers are compiled.

    dynamic=True: packed passes change length every step, so the graph is traced for any length
    from the start, instead of once for the first pass's length and again at the next.
    """
    # Read when a graph is partitioned into forward and backward, at the first call of each.
    torch._functorch.config.activation_memory_budget = activation_memory_budget
    compiled = 0
    for layer in model.modules():
        if not isinstance(layer, GradientCheckpointingLayer):
            continue
        if not hasattr(layer.forward, "_torchdynamo_orig_callable"):  # a second train() on the same model
            layer.forward = torch.compile(layer.forward, dynamic=True)
        compiled += 1
    return compiled


class CompileLayers(TrainerCallback):
    """compile_layers at the start of training: after Liger's kernels and tiled MLPs are in, so
    that the graph is traced through whichever forward runs."""

    def __init__(self, activation_memory_budget: float = 1.0):
        self.activation_memory_budget = activation_memory_budget

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        compile_layers(model, self.activation_memory_budget)
