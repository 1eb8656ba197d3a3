"""Faults on purpose, so a test can check what a person is told when a run fails (tests/test_faults.py).

    FINETUNE_STUDIO_FAULT=oom@step3      torch.OutOfMemoryError as optimizer step 3 begins
    FINETUNE_STUDIO_FAULT=enospc@save2   the 2nd checkpoint save of the process fails with "No space
                                         left on device" after writing its files, before they are
                                         moved into place
    FINETUNE_STUDIO_FAULT=oom@tokens512  torch.OutOfMemoryError in any forward pass of more than 512
                                         tokens: a GPU too small, for --auto_find_batch_size's probes
                                         (engine/batch_finder.py) and for training's passes alike
    ...@rank1                            after any of these: only the process of that rank faults

A real out-of-memory needs a GPU and a real full disk a small filesystem: tests/README.md has the
commands. Unset, as it always is outside tests, no callback is added to the Trainer, no hook to the
model, and `inject` costs one environment lookup per checkpoint.
"""

import errno
import os
import re

import torch
from transformers import TrainerCallback

ENV = "FINETUNE_STUDIO_FAULT"
_PLAN = re.compile(r"(oom@step|enospc@save|oom@tokens)(\d+)(?:@rank(\d+))?")


def _plan() -> tuple[str, int] | None:
    text = os.environ.get(ENV)
    if not text:
        return None
    match = _PLAN.fullmatch(text)
    if match is None:
        raise ValueError(f"{ENV}={text!r}: expected oom@step<N>, enospc@save<N> or oom@tokens<N>, then @rank<R> or not")
    if match[3] is not None and int(match[3]) != int(os.environ.get("RANK", 0)):
        return None
    return match[1], int(match[2])


def inject(where: str, count: int) -> None:
    """Raises the planned fault when this is its place (`oom@step` or `enospc@save`) and count."""
    plan = _plan()
    if plan != (where, count):
        return
    if where == "oom@step":
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({ENV}={os.environ[ENV]})")
    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({ENV}={os.environ[ENV]})")


class _OutOfMemoryAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        inject("oom@step", state.global_step + 1)  # global_step counts the steps already done


def watch(model: torch.nn.Module) -> None:
    """Makes the model's forward raise the planned out-of-memory above N tokens a pass; nothing unless planned."""
    plan = _plan()
    if plan is None or plan[0] != "oom@tokens":
        return

    def too_many_tokens(module, args, kwargs):
        tokens = (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).numel()
        if tokens > plan[1]:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. A pass of {tokens} tokens, more than {plan[1]} ({ENV}={os.environ[ENV]})"
            )

    model.register_forward_pre_hook(too_many_tokens, with_kwargs=True)


def callbacks() -> list[TrainerCallback]:
    """The callback that raises a planned out-of-memory; none when no such fault is planned."""
    plan = _plan()
    return [_OutOfMemoryAtStep()] if plan and plan[0] == "oom@step" else []
