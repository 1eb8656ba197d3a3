"""Trainer callbacks: progress as events, and a graceful stop on SIGTERM."""

import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from engine.events import EventWriter
from engine.memory import peak_memory_gib
from engine.zero import weights_held_gib


class EventsCallback(TrainerCallback):
    """Turns the Trainer's logs, evals and saves into events (written by rank 0 only)."""

    def __init__(self, events: EventWriter, started_fields: dict):
        self.events = events
        self.started_fields = started_fields
        self._last_time = 0.0
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.time()
        self._last_tokens = state.num_input_tokens_seen
        self.events.write(
            "started", world_size=args.world_size, total_steps=state.max_steps,
            start_step=state.global_step, weights_gib=weights_held_gib(kwargs["model"]),
            # The peak so far is loading's (and the batch finder's): the log events' peak covers the whole
            # run, so this tells a peak set while loading from one set by training.
            load_peak_gib=peak_memory_gib(), **self.started_fields,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            now = time.time()
            tokens = state.num_input_tokens_seen
            rate = (tokens - self._last_tokens) / max(now - self._last_time, 1e-9)
            self._last_time, self._last_tokens = now, tokens
            self.events.write(
                "log",
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=logs.get("epoch", state.epoch),
                loss=logs["loss"],
                learning_rate=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                tokens_per_second=round(rate, 1),
                tokens_seen=tokens,
                gpu_memory_gib=peak_memory_gib(),
            )
        if "eval_loss" in logs:
            metrics = {k: v for k, v in logs.items() if k.startswith("eval_")}
            self.events.write("eval", step=state.global_step, **metrics)

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.events.write("checkpoint", step=state.global_step, path=str(path))


class StopOnSignal(TrainerCallback):
    """SIGTERM ends training at the next step boundary with a checkpoint, instead of mid-step.

    Every rank gets the signal (it is sent to the process group), but not necessarily before the
    same step; the flag is all-reduced so all ranks save and stop at the same step, or a
    collective save under DeepSpeed would hang.
    """

    def __init__(self):
        self.requested = False
        self.stopped = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def _agreed(self) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
