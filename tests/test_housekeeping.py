"""The app's housekeeping thread: runs move on while no browser is open."""

import json
import time

import pytest

from engine.hardware import Hardware
from engine.launch import list_runs, run_status, start_run
from engine.presets import load_preset, make_config
from tests.test_train import EXAMPLES
from ui import housekeeping, playground
from ui.common import Context


def _status(info) -> str:
    """Read straight from state.json: run_status would itself start the queued run."""
    return json.loads((info.run_dir / "state.json").read_text())["status"]


@pytest.mark.slow
def test_a_queued_run_starts_and_the_playground_leaves_its_gpu_with_no_one_watching(tiny_mistral, tmp_path,
                                                                                      monkeypatch):
    released = []
    monkeypatch.setattr(playground, "release_gpus", released.append)
    preset = load_preset("cpu-tiny")
    config = make_config(preset, model_id=str(tiny_mistral), train_data=str(EXAMPLES / "capitals-chat.jsonl"),
                         max_steps=2, eval_strategy="no", save_strategy="no")
    # Both on a pretend GPU 0 (cpu-tiny trains on the CPU all the same): the second waits its turn.
    first = start_run(preset, config, gpus=[0], runs_dir=tmp_path)
    second = start_run(preset, config, gpus=[0], runs_dir=tmp_path)
    assert (first.status, second.status) == ("running", "queued")
    ctx = Context(runs_dir=tmp_path, cache_dir=tmp_path / "cache", hardware=Hardware([], 2, 8.0))
    stop = housekeeping.keep_runs_moving(ctx, every_s=0.5)
    try:
        deadline = time.time() + 300
        while _status(second) == "queued":
            assert time.time() < deadline, "the queued run never started"
            time.sleep(0.5)
        assert _status(first) == "succeeded"  # reaped by the thread, not by a status call
        assert [0] in released  # while a run held GPU 0, the playground was told to leave it
        while _status(second) == "running":
            assert time.time() < deadline, "the second run never ended"
            time.sleep(0.5)
    finally:
        stop.set()
    assert [run_status(r.run_id, tmp_path).status for r in (first, second)] == ["succeeded", "succeeded"]
    assert len(list_runs(tmp_path)) == 2
