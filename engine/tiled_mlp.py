"""Tiled MLP: each decoder layer's feed-forward block run over the sequence a slice at a time.

At long sequences the feed-forward block is what a layer's recomputation holds most of: per token
its gate, up, activation and product outputs (4 x intermediate_size values, 14,336 each for a 7B
model) and their LoRA inputs, about 8 GiB at 65,536 tokens. The block treats each token on its own,
so slices of the sequence give the same result; each slice is checkpointed, so its intermediates
live only while that slice's backward runs. The price is one more forward of the block, paid only
by passes longer than a slice. The slice is hidden_size tokens by default, as in Arctic Long
Sequence Training's TiledMLP, which keeps a slice's intermediates about the size of the attention's
inputs; `tiled_mlp_tokens` makes it smaller, which also pays at ordinary lengths: at 2,048 tokens
the feed-forward intermediates are most of what a 7B QLoRA holds beyond its weights.
"""

import types

import torch
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer


def tile_mlps(model: PreTrainedModel, tokens: int = 0) -> int:
    """Makes every decoder layer's `mlp` run in slices of `tokens` (0: hidden_size); returns how
    many layers were changed."""
    tile = tokens or model.config.get_text_config().hidden_size
    changed = 0
    for layer in model.modules():
        mlp = getattr(layer, "mlp", None)
        if not isinstance(layer, GradientCheckpointingLayer) or not isinstance(mlp, torch.nn.Module):
            continue
        if getattr(mlp.forward, "__func__", None) is not _tiled:  # not a second train() on the same model
            mlp.untiled_forward = mlp.forward
        # A method of one shared function, the slice an int attribute: a compiled layer's graph
        # guards on the function, so all layers share it (a partial per layer would make each
        # layer its own graph, past torch.compile's limit of 8, and the rest run uncompiled).
        mlp.forward, mlp.tile_tokens = types.MethodType(_tiled, mlp), tile
        changed += 1
    return changed


class TileMLPs(TrainerCallback):
    """tile_mlps at the start of training: after the Trainer has put Liger's kernels in (train()
    binds them to each layer's mlp), so that tiling wraps whichever forward runs."""

    def __init__(self, tokens: int = 0):
        self.tokens = tokens

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tile_mlps(model, self.tokens)


def _tiled(mlp: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.shape[-2] <= mlp.tile_tokens:
        return mlp.untiled_forward(hidden_states)
    return _slices(mlp, hidden_states)


@torch.compiler.disable
def _slices(mlp: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    slices = hidden_states.split(mlp.tile_tokens, dim=-2)
    if torch.is_grad_enabled():
        outputs = [checkpoint(mlp.untiled_forward, part, use_reentrant=False) for part in slices]
    else:  # the forward of a checkpointed layer: nothing is kept, but one slice at a time still peaks lower
        outputs = [mlp.untiled_forward(part) for part in slices]
    return torch.cat(outputs, dim=-2)
