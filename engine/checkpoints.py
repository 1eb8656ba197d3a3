"""Checkpoints and the final adapter appear whole or not at all.

transformers' Trainer (5.17) writes checkpoint-N in place: a save cut short by a full disk or a
kill leaves a half folder, which `resume_from_checkpoint true` then takes as the latest. Here each
save is written into output_dir/.partial/ first and renamed into place once complete; a rename
within one filesystem is atomic, so a folder named checkpoint-N is always whole, and older
checkpoints are rotated away only after the new one is in place. A failed save deletes its partial
files, giving back the space it took.
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from engine import faults
from engine.lean_trainer import LeanTrainer

PARTIAL = ".partial"  # inside output_dir: the same filesystem, and no `checkpoint-*` glob matches it
# Written last when the final model is moved into place: a folder holding one of these holds the
# complete model beside it (the UI offers a download when adapter_config.json is there).
MARKERS = ("adapter_config.json", "config.json")


class AtomicCheckpointTrainer(LeanTrainer):
    """Trainer whose checkpoints go through output_dir/.partial/ (see the module docstring)."""

    _staging: str | None = None
    _saves = 0  # checkpoints this process has saved, counted for faults.inject

    def _get_output_dir(self, trial) -> str:
        # The folder _save_checkpoint writes checkpoint-N into: the staging one while we save.
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = os.path.join(run_dir, PARTIAL)
        self._saves += 1
        try:
            super()._save_checkpoint(model, trial)  # every rank writes its part (DeepSpeed's shards)
            faults.inject("enospc@save", self._saves)
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(os.path.join(self._staging, name), ignore_errors=True)
            raise
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # no rank still writing into the folder we rename
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            shutil.rmtree(final, ignore_errors=True)  # a step saved again (a resume from an older one)
            os.replace(os.path.join(run_dir, PARTIAL, name), final)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)


@contextmanager
def staged(output_dir: Path, name: str) -> Iterator[Path]:
    """A folder output_dir/.partial/<name> to write into; deleted if the body raises."""
    folder = output_dir / PARTIAL / name
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def publish_files(staging: Path, output_dir: Path) -> None:
    """Moves every file of `staging` into output_dir, each atomically, the MARKERS last."""
    for path in sorted(staging.iterdir(), key=lambda p: p.name in MARKERS):
        os.replace(path, output_dir / path.name)
    staging.rmdir()


def publish_folder(staging: Path, final: Path) -> None:
    """Renames `staging` onto `final`, replacing what was there."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
