"""The Trainer's per-step bookkeeping, without walking every parameter of the model each step.

transformers' Trainer (5.17) visits every parameter of the model outside its forward and backward:
to clip gradients (accelerate lists all of them, then keeps those with a gradient) once a step, and
to count floating-point operations (`num_parameters`) once a micro-batch. A 7B QLoRA model has
about 1,200 parameters, 450 of them trained. On realistic lengths, where the GPU already waits on
the host, py-spy put 14% of the main thread's time there (benchmarks/RESULTS.md, run 37). The
numbers are the Trainer's own: the same clipping over the same gradients, the same count.
"""

import torch
from transformers import Trainer


class LeanTrainer(Trainer):
    _trained: list[torch.nn.Parameter] | None = None
    _counted: int | None = None

    def _clip_grad_norm(self, model):
        # DeepSpeed clips inside its own step, FSDP and tensor-parallel gradients need their
        # collectives: those keep the Trainer's path.
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self._has_mixed_mesh_grads(model):
            return super()._clip_grad_norm(model)
        if self._trained is None:  # which parameters train is settled before the first step
            self._trained = [p for p in model.parameters() if p.requires_grad]
        self.accelerator.unscale_gradients()  # fp16's scaled gradients, as accelerate's clip does first
        return torch.nn.utils.clip_grad_norm_(self._trained, self.args.max_grad_norm)

    def floating_point_ops(self, inputs: dict) -> int:
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs:
            return 0
        if self._counted is None:  # the Trainer's count for one token: 6 x the parameters
            self._counted = super().floating_point_ops({main: torch.ones(1)})
        return self._counted * inputs[main].numel()
