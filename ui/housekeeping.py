"""Runs move on with no browser open: a thread of the app process, every few seconds.

The launcher starts queued runs and reaps finished ones whenever someone asks for a status
(engine.launch._schedule); with nobody watching, a queued run would wait for the next visitor.
The same tick frees a GPU a run now uses from the playground's models, whoever started the run
(the app, the CLI, or the queue).
"""

import logging
import threading

from engine import launch
from ui import playground
from ui.common import Context

log = logging.getLogger(__name__)
EVERY_S = 5.0


def keep_runs_moving(ctx: Context, every_s: float = EVERY_S) -> threading.Event:
    """Starts the thread; set the returned event to stop it."""
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every_s):
            try:
                runs = launch.list_runs(ctx.runs_dir)
                playground.release_gpus(sorted(launch.busy_gpus(runs)))
            except Exception:  # noqa: BLE001 - one bad tick (a run folder mid-write) must not end the thread
                log.exception("housekeeping tick failed; trying again in %.0f s", every_s)

    threading.Thread(target=tick, name="finetune-studio-housekeeping", daemon=True).start()
    return stop
