"""AdamW with its moments in any dtype (bf16 by default) and optional Kahan-compensated updates.

Written here because nothing installable provides it: transformers (5.17) maps `--optim
adamw_anyprecision` to torchdistx's AnyPrecisionAdamW, and torchdistx is a C++ extension whose
last release (0.2.0) is built for torch 1.12 and Python <= 3.10, its repository untouched since
March 2023. The algorithm is torchdistx's
(src/python/torchdistx/optimizers/anyprecision_optimizer.py, BSD-3, Meta), with bf16 momentum by
default (torchdistx keeps it in fp32) so the states take 4 bytes a parameter instead of AdamW's 8.

Kahan summation is for 16-bit weights: an update smaller than half the spacing of bf16 numbers
near a weight rounds away entirely (near 1.0 that spacing is 2^-7), so long runs at small learning
rates stop learning. The compensation buffer keeps what rounding dropped and adds it back on the
next step. With fp32 weights (a LoRA's adapters) it only costs memory.
"""

import inspect
from collections.abc import Iterable
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Each state tensor kept per parameter, and the option that sets its dtype.
STATES = {"exp_avg": "momentum_dtype", "exp_avg_sq": "variance_dtype", "compensation": "compensation_buffer_dtype"}
# Read by the seed's and transformers' `--optim_args "use_kahan_summation=True, momentum_dtype=bfloat16"`.
OPTIONS = ("use_kahan_summation", *STATES.values())


class AnyPrecisionAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        use_kahan_summation: bool = False,
        momentum_dtype: torch.dtype = torch.bfloat16,
        variance_dtype: torch.dtype = torch.bfloat16,
        compensation_buffer_dtype: torch.dtype = torch.bfloat16,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        use_kahan_summation=use_kahan_summation, momentum_dtype=momentum_dtype,
                        variance_dtype=variance_dtype, compensation_buffer_dtype=compensation_buffer_dtype)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, kahan = group["lr"], group["eps"], group["use_kahan_summation"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=group["momentum_dtype"])
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=group["variance_dtype"])
                    if kahan:
                        state["compensation"] = torch.zeros_like(p, dtype=group["compensation_buffer_dtype"])
                state["step"] += 1
                step = state["step"].item()
                grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
                if kahan:
                    # The update joins what earlier roundings dropped; what this rounding drops stays.
                    compensation = state["compensation"]
                    compensation.addcdiv_(exp_avg, denom, value=-step_size)
                    before = p.detach().clone()
                    p.add_(compensation)
                    compensation.add_(before.sub_(p))
                else:
                    p.addcdiv_(exp_avg, denom, value=-step_size)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every floating-point state to its parameter's dtype on load (fp32 for a
        # LoRA): cast the moments back, or a resumed run would hold fp32 states (twice the memory).
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                for key, dtype_key in STATES.items():
                    if key in state:
                        state[key] = state[key].to(group[dtype_key])


def parse_options(text: str | None) -> dict[str, Any]:
    """`--optim_args` text ("use_kahan_summation=true, momentum_dtype=bfloat16") → keyword arguments.

    Raises ValueError naming the flag, the part that is wrong and what it may be.
    """
    options: dict[str, Any] = {}
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"optim_args: {part!r} has no value; write key=value pairs separated by commas")
        if key not in OPTIONS:
            raise ValueError(f"optim_args: unknown option {key!r}; adamw_anyprecision takes {', '.join(OPTIONS)}")
        if key == "use_kahan_summation":
            if value.lower() not in ("true", "false"):
                raise ValueError(f"optim_args: use_kahan_summation={value}; use true or false")
            options[key] = value.lower() == "true"
        elif value in DTYPES:
            options[key] = DTYPES[value]
        else:
            raise ValueError(f"optim_args: {key}={value}; use one of {', '.join(DTYPES)}")
    return options


def state_bytes_per_param(options: dict[str, Any]) -> int:
    """Bytes of optimizer state kept for each trained parameter with these options."""
    defaults = inspect.signature(AnyPrecisionAdamW).parameters
    chosen = {key: options.get(key, defaults[key].default) for key in OPTIONS}
    kept = [dtype for name, dtype in STATES.items() if name != "compensation" or chosen["use_kahan_summation"]]
    return sum(chosen[dtype].itemsize for dtype in kept)
