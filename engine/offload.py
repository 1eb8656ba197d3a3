"""Gradient checkpoints held in CPU memory, copied on a side stream so that the GPU never waits.

With gradient checkpointing, what stays on the GPU from a layer's forward to its backward is the
layer's input: layers x tokens x hidden values (fp32 under upcast_layernorm). For a 7B model that
is 1 GiB at 2,048 tokens and 32 GiB at 65,536, the term that decides how long a sequence fits.
transformers can offload them (gradient_checkpointing_kwargs `offload`), through torch's
save_on_cpu, whose copies run on the compute stream: the GPU stops for each. Here they run on a
second stream: layer i's input goes to the host while layer i+1 computes, and in the backward
pass the input of the layer after the current one is fetched while the current one recomputes
(torchtune's OffloadActivations does this for every activation; checkpoints are all we need).
"""

from collections import defaultdict

import torch
from transformers import TrainerCallback

# Position embeddings and masks are saved beside the hidden states; copying them costs more than
# keeping them.
MIN_BYTES = 1 << 20


class PinnedBuffers:
    """Pinned host buffers kept from pass to pass, in power-of-two sizes.

    Asking torch for pinned memory at every checkpoint took 6% of the training loop's host time
    (py-spy, run 37: realistic lengths, where the GPU waits on the host). A buffer given
    back may be taken again at once: every copy into or out of one is queued on the one offload
    stream, so a new copy in starts only after the last copy out has finished.
    """

    def __init__(self, pin: bool = True):
        self.pin = pin
        self.free: dict[int, list[torch.Tensor]] = defaultdict(list)

    def take(self, nbytes: int) -> torch.Tensor:
        size = 1 << max(nbytes - 1, 0).bit_length()  # as torch's own pinned-memory cache rounds
        if self.free[size]:
            return self.free[size].pop()
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, buffer: torch.Tensor) -> None:
        self.free[buffer.numel()].append(buffer)


class CheckpointOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of at least MIN_BYTES on a CUDA device → pinned host memory, and back."""

    def __init__(self):
        self.stream = torch.cuda.Stream()
        self.buffers = PinnedBuffers()
        self.on_host: dict[int, tuple[torch.Tensor, torch.Tensor, torch.device]] = {}
        self.fetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.count = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type != "cuda" or nbytes < MIN_BYTES:
            return tensor
        buffer = self.buffers.take(nbytes)
        host = buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
        self.stream.wait_stream(torch.cuda.current_stream())  # the tensor is written by then
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
        # The allocator reuses this GPU memory only once the copy, queued on our stream, is done.
        tensor.record_stream(self.stream)
        self.count += 1
        self.on_host[self.count] = (buffer, host, tensor.device)
        return self.count

    def _fetch(self, key: int) -> None:
        buffer, host, device = self.on_host.pop(key)
        with torch.cuda.stream(self.stream):
            tensor = host.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self.buffers.give(buffer)
        self.fetched[key] = (tensor, done)

    def _unpack(self, key):
        if isinstance(key, torch.Tensor):
            return key
        if key not in self.fetched:
            self._fetch(key)
        # Backward runs the layers in reverse: the one saved before this is needed next.
        if key - 1 in self.on_host:
            self._fetch(key - 1)
        tensor, done = self.fetched.pop(key)
        torch.cuda.current_stream().wait_event(done)
        tensor.record_stream(torch.cuda.current_stream())  # made on our stream, used on this one
        return tensor


class OffloadCheckpoints(TrainerCallback):
    """Runs every checkpointed layer's forward under CheckpointOffload.

    The Trainer turns checkpointing on inside train(), just before on_train_begin; each layer's
    checkpoint function is wrapped then. On a machine without CUDA there is nothing to move.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not torch.cuda.is_available():
            return
        hooks = CheckpointOffload()
        for module in model.modules():
            checkpoint = getattr(module, "_gradient_checkpointing_func", None)
            if getattr(module, "gradient_checkpointing", False) and checkpoint is not None:
                module._gradient_checkpointing_func = _under(hooks, checkpoint)


def _under(hooks: CheckpointOffload, checkpoint):
    def offloaded(*args, **kwargs):
        with hooks:
            return checkpoint(*args, **kwargs)

    return offloaded
