"""The events.jsonl schema: one writer (rank 0 of a run) and one reader (the UI, the CLI follower).

Each line is `{"time": unix_s, "event": NAME, ...}` with plain JSON values. Events:
  started     world_size, total_steps, num_train_examples, num_eval_examples, train_tokens, config,
              auto_batch (with --auto_find_batch_size: what it set, what it tried, and why)
              weights_gib (the model weights rank 0 holds: its shard under ZeRO-3)
              load_peak_gib (rank 0's peak allocated GPU memory before training began; null on a CPU)
  log         step, epoch, loss, learning_rate, grad_norm, tokens_per_second, gpu_memory_gib
  eval        step, eval_loss (and other eval metrics)
  checkpoint  step, path
  finished    adapter_path, train_runtime_s, train_loss
  stopped     step, checkpoint (a stop asked for by SIGTERM; the last checkpoint saved)
  failed      error (one sentence), hint (what to do), traceback_tail
A reader ignores unknown events and fields, so adding one never breaks an older UI.
"""

import json
import math
import os
import time
from pathlib import Path
from typing import Any

EVENTS = ("started", "log", "eval", "checkpoint", "finished", "stopped", "failed")
FINAL_EVENTS = ("finished", "stopped", "failed")


def _plain(value: Any) -> Any:
    """NaN/inf are not JSON; a tensor or numpy scalar becomes a Python number."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class EventWriter:
    """Appends events; a writer that is not rank 0 is disabled and writes nothing."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._end_partial_line()

    def _end_partial_line(self) -> None:
        """A writer killed mid-line (a run resumed after a SIGKILL) left a partial last line. Ending it
        makes it one bad line that readers skip; else our first event would be glued to it and lost."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")
        finally:
            os.close(fd)

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        assert event in EVENTS, event
        record = {"time": round(time.time(), 3), "event": event}
        record.update({k: _plain(v) for k, v in fields.items()})
        line = (json.dumps(record, default=str) + "\n").encode()
        # One write of a whole line with O_APPEND: a reader never sees two lines interleaved, and a
        # writer killed mid-line leaves at most one partial last line, which the reader skips.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Events appended since byte `offset`, and the offset to pass next time.

    Reads only the new bytes. A last line without its newline is not consumed (its writer may be
    mid-write); a corrupt complete line is skipped.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            events.append(record)
    return events, offset + end
