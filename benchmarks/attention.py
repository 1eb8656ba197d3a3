"""Attention alone, forward + backward, Mistral-7B's heads (32 query / 8 KV, dim 128), bf16.

    python -m benchmarks.attention    # on the GPU

Compares, on one 2,048-token example and on an 8,192-token packed row of realistic lengths:
SDPA (causal, no mask: its flash kernel), SDPA with the block-diagonal mask transformers builds
for packed rows, and engine.attention's varlen path. Prints one JSON line per case.
"""

import json

import numpy as np
import torch
import torch.nn.functional as F
from triton.testing import do_bench

from engine.attention import _NATIVE_GQA, varlen_attention

HEADS, KV_HEADS, DIM = 32, 8, 128


class _Module(torch.nn.Module):  # what transformers passes as `module`: a config and a Linear
    config = type("Config", (), {})()

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(1, 1, dtype=torch.bfloat16)


def _qkv(tokens: int) -> list[torch.Tensor]:
    shapes = [(1, HEADS, tokens, DIM), (1, KV_HEADS, tokens, DIM), (1, KV_HEADS, tokens, DIM)]
    return [torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True) for s in shapes]


def _time(fn, inputs) -> float:
    def step():
        out = fn(*inputs)
        out.sum().backward()

    return do_bench(step, warmup=50, rep=300, return_mode="median")


def _cases(lens: np.ndarray) -> dict:
    tokens = int(lens.sum())
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), device="cuda", dtype=torch.int32)
    doc = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))
    block = torch.ones(tokens, tokens, device="cuda", dtype=torch.bool).tril() & (doc[:, None] == doc[None, :])
    module = _Module()
    return {
        "sdpa causal (ignores boundaries)": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True),
        "sdpa block mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=block, enable_gqa=True),
        "varlen": lambda q, k, v: varlen_attention(
            module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=int(lens.max()))[0],
    }


def main() -> None:
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(np.log(350), 0.885, 64)), 16, 2048).astype(int)
    packed = lengths[np.cumsum(lengths) <= 8192]
    for name, lens in (("one 2048", np.array([2048])), (f"packed {len(packed)} examples", packed)):
        for case, fn in _cases(lens).items():
            ms = _time(fn, _qkv(int(lens.sum())))
            print(json.dumps({"row": name, "tokens": int(lens.sum()), "case": case, "fwd_bwd_ms": round(ms, 3),
                              "native_gqa": _NATIVE_GQA}), flush=True)


if __name__ == "__main__":
    main()
