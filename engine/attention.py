"""`varlen` attention: packed micro-batches through PyTorch's own variable-length flash kernel.

flash-attn 2 has no wheel for recent torch / CUDA builds, but PyTorch (2.10+) ships the same
varlen flash kernel as `torch.nn.attention.varlen.varlen_attn`. transformers has no
attn_implementation for it, so we register one. Each example attends only to itself, and no
FLOP is spent on the blocks between examples (SDPA with a block-diagonal mask computes them all,
then masks them out: 10.7x slower on an 8k-token row of 21 examples, benchmarks/RESULTS.md).
Without CUDA, or on an older torch, the same function runs SDPA one example at a time: slower,
same numbers, so CPU tests cover the wiring.
"""

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.flash_attention import get_target_dtype
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

VARLEN = "varlen"

try:
    from torch.nn.attention.varlen import varlen_attn

    _PARAMS = inspect.signature(varlen_attn).parameters
    # torch 2.10 took is_causal; later releases take a (left, right) window, (-1, 0) being causal.
    _CAUSAL = {"window_size": (-1, 0)} if "window_size" in _PARAMS else {"is_causal": True}
    _NATIVE_GQA = "enable_gqa" in _PARAMS
except ImportError:  # torch < 2.10: the per-example path below serves
    varlen_attn = None


def varlen_available() -> bool:
    """Whether packed micro-batches get the varlen flash kernel here: it needs Ampere or newer, so
    a V100 or T4 (the fp16 preset) keeps SDPA with transformers' block-diagonal mask."""
    return varlen_attn is not None and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float):
    if _NATIVE_GQA:
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, enable_gqa=True, **_CAUSAL)
    group = q.shape[1] // k.shape[1]  # grouped-query attention: share each KV head with its group
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **_CAUSAL)


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One example, (tokens, heads, dim): SDPA, whose own flash kernel takes GQA natively on CUDA.

    4-D (1, heads, tokens, dim) inputs: with 3-D ones SDPA leaves its flash kernel for the math one.
    """
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1)


def _per_example(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float):
    bounds = zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)  # a host sync: the fallback only
    return torch.cat([_causal(q[a:b], k[a:b], v[a:b], scale) for a, b in bounds])


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: (1, heads, tokens, dim) in, (1, tokens, heads, dim) out."""
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError(
            "varlen attention takes one packed row per micro-batch (--packing true); "
            "use sdpa for padded batches"
        )
    if cu_seq_lens_q is None or len(cu_seq_lens_q) == 2:
        # One example alone in its pass (or a plain forward): exactly what attn_implementation="sdpa"
        # runs, flash kernel included (2.6x faster than varlen's on one 2,048-token row, H200).
        return sdpa_attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if q.is_cuda:
        # Norms kept in fp32 (QLoRA) hand the kernels fp32; flash takes bf16/fp16, as flash-attn does.
        dtype = get_target_dtype(q, module)
        if dtype is not None:
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if q.is_cuda and varlen_attn is not None:
        out = _flash(q, k, v, cu_seq_lens_q, max_length_q, scale)
    else:
        out = _per_example(q, k, v, cu_seq_lens_q, scale)
    return out.to(query.dtype)[None], None


# A packed micro-batch needs no mask: the boundaries travel as cu_seq_lens_*.
AttentionInterface.register(VARLEN, varlen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, flash_attention_mask)
