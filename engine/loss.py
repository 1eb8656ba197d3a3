"""The causal-LM training loss from the last hidden states, a chunk of tokens at a time.

A causal LM's standard forward turns every position's hidden state into a score for every word of
the vocabulary (the logits) and takes the cross-entropy of those. For one 8,192-token pass of a
32k-vocabulary model that is 8,192 x 32,000 scores: 0.5 GiB in bf16, 1 GiB in fp32 for the loss,
and as much again for the log-softmax the loss keeps and for its gradient, the largest buffers of
a QLoRA step (four times as much for a 128k vocabulary). Here the output layer and the loss run
together over chunks of label tokens: each chunk's logits are computed in fp32 (as transformers
upcasts them), give the chunk's summed loss and, in the same pass, its gradients with respect to
the hidden states and (when trained) the output weight. Backward then only scales those
gradients: nothing is recomputed and at most one chunk's logits exist at a time. This is the idea
of Liger's fused linear cross-entropy and of Apple's "cut cross-entropy", whose kernels are Triton
(CUDA only); this is plain torch, so it runs on CPUs, any GPU and fp16 cards alike. Only positions
that have a label are computed, so masked prompts cost nothing.

`install` patches one model instance: given labels, in training or without gradients (evaluation),
its forward runs the decoder and this loss and returns no logits; without labels (generation) it is
the model's own forward.
"""

import functools
import inspect
import logging
import re

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Logits in one chunk: 64 MiB in fp32, whatever the vocabulary (512 tokens of a 32k vocabulary).
# Enough work per matmul to keep a GPU busy, small next to any model's weights.
CHUNK_LOGITS = 2**24


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, targets) / divisor, chunk by chunk.

    hidden (N, H), weight (V, H) and targets (N,) in [0, V), every row a label (the caller drops
    ignored ones). The matmuls run as the model's own output layer would (its dtype, or autocast's);
    the softmax and the loss in fp32.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor):
        ctx.weight_dtype = weight.dtype
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # cast once, not in every chunk's matmul
            weight = weight.to(torch.get_autocast_dtype(device))
        # The gradients reach the matmuls as in the standard path: fp32, divided by the divisor, then
        # rounded to the matmul's dtype. Not in fp16: divided by a step's tokens before the loss scale
        # multiplies them (in backward) they would underflow, so there the division waits for backward.
        divisor = divisor.float()
        early = divisor if weight.dtype != torch.float16 else torch.ones_like(divisor)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        step = max(1, CHUNK_LOGITS // weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            rows = slice(start, start + step)
            total += _chunk(hidden[rows], weight, targets[rows], early, grad_hidden, grad_weight, rows)
        if want_weight and ctx.weight_dtype != torch.float16:  # fp16 may not hold a sum not yet divided
            grad_weight = grad_weight.to(ctx.weight_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, divisor / early)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, late = ctx.saved_tensors
        scale = grad_output.float() / late
        if grad_hidden is not None:
            grad_hidden = grad_hidden * scale
        if grad_weight is not None:
            grad_weight = (grad_weight * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def _chunk(
    h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, divisor: torch.Tensor,
    grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None, rows: slice,
) -> torch.Tensor:  # fmt: skip
    """One chunk's summed loss; its gradients (over divisor) written into grad_hidden[rows] and
    added to grad_weight. A function of its own so that the chunk's logits are freed before the
    next chunk's exist."""
    low = F.linear(h, weight)  # the output layer's own matmul and precision
    logits = low.float()
    target = logits.gather(1, t[:, None])
    # log-sum-exp and softmax in place: torch.logsumexp would allocate a second chunk of logits.
    top = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(top).exp_()
    sums = probs.sum(dim=-1, keepdim=True)
    loss = (top + sums.log() - target).sum()
    if grad_hidden is None and grad_weight is None:
        return loss
    # (softmax - one_hot) / divisor
    grad = probs.div_(sums * divisor).scatter_add_(1, t[:, None], (-1 / divisor).expand_as(sums))
    del logits, probs
    grad = grad.to(low.dtype)
    del low
    if grad_hidden is not None:
        grad_hidden[rows] = grad @ weight
    if grad_weight is not None:
        grad_weight += (grad.t() @ h).float()
    return loss


def causal_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss on lm_head(hidden_states), never holding the full logits.

    Position i predicts label i + 1 (or shift_labels[i]); -100 is ignored. The summed loss is
    divided by num_items_in_batch when the Trainer passes it (a whole step's label tokens, so
    gradient accumulation and packed passes add up to the step's mean), else by this batch's labels.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    rows = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    divisor = num_items_in_batch if num_items_in_batch is not None else len(rows)
    divisor = torch.as_tensor(divisor, device=hidden.device)
    # Only labelled positions: index_select keeps the graph to the full hidden states (zeros elsewhere).
    return LinearCrossEntropy.apply(hidden.index_select(0, rows), weight, targets[rows], divisor)


# The standard causal-LM forward: the output layer straight on the decoder's last hidden states,
# the result left alone (no soft-capping, scaling or auxiliary loss), and transformers' loss on it.
_PLAIN_HEAD = "logits = self.lm_head(hidden_states[:, slice_indices, :])"


def unsupported(model: PreTrainedModel) -> str | None:
    """Why the chunked loss cannot stand in for this model's own, or None if it can."""
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    if decoder is None or decoder is model or head is None:
        return f"{type(model).__name__} has no separate decoder and output layer"
    if model.loss_function is not ForCausalLMLoss:
        return f"{type(model).__name__} does not use the standard causal-LM loss"
    source = inspect.getsource(type(model).forward)
    if _PLAIN_HEAD not in source or len(re.findall(r"^\s*logits = ", source, re.M)) != 1 or "loss +=" in source:
        return (f"{type(model).__name__}'s forward changes the logits or the loss "
                "(soft-capping, scaling or an auxiliary loss)")
    return _head_problem(head)


def _head_problem(head: torch.nn.Module) -> str | None:
    """Why this output layer's weight alone does not give the logits, or None. Checked again at each
    call: an adapter on the output layer, or ZeRO-3, comes after `install`."""
    if type(head) is not torch.nn.Linear or head.bias is not None:
        kind = f"{type(head).__module__}.{type(head).__name__}" + (" with a bias" if head.bias is not None else "")
        return f"the output layer is a {kind}, not a plain linear layer without bias"
    if getattr(head.weight, "ds_numel", None) is not None:
        return "the output layer is sharded by DeepSpeed ZeRO-3, which gathers it only around the layer's own call"
    return None


def install(model: PreTrainedModel) -> str | None:
    """Makes this model instance train with the chunked loss; returns why not if it can't.

    Patched on the instance before PEFT wraps it, so a LoRA, DDP or DeepSpeed wrapper calls it as
    the model's forward; evaluation gets the loss alone, generation the model's own forward with logits.
    """
    reason = unsupported(model)
    if reason:
        return reason
    own_forward = model.forward

    @functools.wraps(own_forward)  # the Trainer reads the signature: **kwargs takes num_items_in_batch
    def forward(*args, labels: torch.Tensor | None = None, **kwargs):
        # Evaluation with labels wants only the loss (the Trainer asks for no logits without metrics),
        # so it runs chunked too and peaks no higher than training; eval mode with gradients on is
        # someone's own analysis, and gets the model's own forward.
        if args or labels is None or (torch.is_grad_enabled() and not model.training):
            return own_forward(*args, labels=labels, **kwargs)
        head = model.get_output_embeddings()
        problem = _head_problem(head)
        if problem:
            _warn_once(f"chunked_loss: {problem}; training with the model's own loss")
            return own_forward(*args, labels=labels, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        kwargs.pop("logits_to_keep", None)  # no logits are made at all
        outputs = model.get_decoder()(**kwargs)
        loss = causal_lm_loss(outputs.last_hidden_state, head.weight, labels, num_items, shift_labels)
        return CausalLMOutputWithPast(
            loss=loss, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )  # fmt: skip

    model.forward = forward
    return None


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)
