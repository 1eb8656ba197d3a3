"""Tiled MLP (engine/tiled_mlp.py): the same loss and gradients, without the whole sequence's
feed-forward intermediates ever saved at once."""

import torch
from transformers import AutoModelForCausalLM

from engine.tiled_mlp import tile_mlps


def _saved_and_grads(model, ids):
    """Loss, the most feed-forward values one saved tensor holds, and the gradients."""
    largest = 0

    def pack(tensor):
        nonlocal largest
        if tensor.dim() == 3 and tensor.shape[-1] == model.config.intermediate_size:  # activations, not weights
            largest = max(largest, tensor.numel())
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), largest, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_tiled_mlp_gives_the_same_gradients_and_never_saves_the_whole_feed_forward(tiny_mistral):
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.float32).train()
    config = model.config
    tokens = 4 * config.hidden_size + 5  # five slices, the last one short
    ids = torch.randint(3, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))

    whole_loss, whole_largest, whole = _saved_and_grads(model, ids)
    assert tile_mlps(model) == tile_mlps(model) == config.num_hidden_layers  # wrapping twice is wrapping once
    tiled_loss, tiled_largest, tiled = _saved_and_grads(model, ids)

    assert abs(tiled_loss - whole_loss) < 1e-6
    for name, grad in whole.items():
        torch.testing.assert_close(tiled[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert whole_largest == tokens * config.intermediate_size
    # Each slice's intermediates are held by its own checkpoint, recomputed one slice at a time in
    # the backward pass, and never saved for it by the forward.
    assert tiled_largest == 0


def test_smaller_slices_give_the_same_gradients_at_ordinary_lengths(tiny_mistral):
    """tiled_mlp_tokens below hidden_size: a pass shorter than hidden_size is sliced too."""
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.float32).train()
    tokens = model.config.hidden_size - 1  # one slice at the default, four of 16 (the last short)
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))

    whole_loss, whole_largest, whole = _saved_and_grads(model, ids)
    tile_mlps(model)  # the default slice: the whole pass, saved as without tiling
    assert _saved_and_grads(model, ids)[1] == whole_largest == tokens * model.config.intermediate_size
    assert tile_mlps(model, 16) == model.config.num_hidden_layers  # re-slicing replaces the default slice
    tiled_loss, tiled_largest, tiled = _saved_and_grads(model, ids)

    assert abs(tiled_loss - whole_loss) < 1e-6 and tiled_largest == 0
    for name, grad in whole.items():
        torch.testing.assert_close(tiled[name], grad, rtol=1e-5, atol=1e-7, msg=name)
