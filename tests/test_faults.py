"""Faults a run survives (issue 8): the app killed, out of memory, a half-written event, a full disk,
two app replicas. One rank dying is tested in tests/test_launch.py
(test_a_crashed_rank_fails_the_run_and_takes_the_other_rank_down).

Faults that need a GPU or a small filesystem to happen for real are simulated through
FINETUNE_STUDIO_FAULT (engine/faults.py); tests/README.md has the commands that cause them for real.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_launch import EXAMPLES, events_of, finish, wait_for
from ui_helpers import REPO, free_port

from engine import launch
from engine.events import EventWriter, read_events
from engine.launch import ACTIVE, resume_run, run_status, start_run
from engine.presets import load_preset, make_config

CPU_TINY = load_preset("cpu-tiny")


def tiny_config(model, **flags):
    return make_config(
        CPU_TINY, model_id=str(model), train_data=str(EXAMPLES / "capitals-chat.jsonl"), eval_strategy="no", **flags
    )


def fake_command(code: str):
    """A build_command stand-in whose run is `python -c code EVENTS_FILE`: the launcher's part of a
    run (spawn, queue, status) without the minute a real training run takes."""

    def build(preset, config, gpus, port=None, num_processes=None):
        return [sys.executable, "-c", code, config.events_file], {}

    return build


def assert_adapter_loads(run_dir: Path, model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), run_dir / "output")


# ---------------------------------------------------------------- the app killed and restarted


def start_app(runs_dir: Path, cache_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Starts `python app.py` in a session of its own; returns the process and its URL once it answers."""
    port = free_port()
    with open(log, "ab") as out:
        app = subprocess.Popen(
            [sys.executable, "app.py", "--runs_dir", str(runs_dir), "--cache_dir", str(cache_dir), "--port", str(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own, as a terminal or a service manager starts it
        )
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        assert app.poll() is None, log.read_text()[-3000:]
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    wait_for(up, timeout=180)
    return app, url


@pytest.mark.slow
def test_a_run_outlives_a_killed_app_and_the_restarted_app_reattaches(tiny_mistral, tmp_path):
    from gradio_client import Client

    runs_dir, cache_dir, log = tmp_path / "runs", tmp_path / "cache", tmp_path / "app.log"
    app, url = start_app(runs_dir, cache_dir, log)
    try:
        run = Client(url, verbose=False).predict(
            str(EXAMPLES / "capitals-chat.jsonl"),
            "cpu-tiny",
            str(tiny_mistral),
            {"max_steps": 30, "save_strategy": "no", "eval_strategy": "no", "logging_steps": 1},
            api_name="/start_run",
        )
        info = run_status(run["run_id"], runs_dir)
        wait_for(lambda: any(e["event"] == "log" for e in events_of(info)))
        os.killpg(app.pid, signal.SIGKILL)  # the app and every process of its group
        app.wait()

        # The run goes on without the app: its processes live and it keeps logging steps.
        seen = len(events_of(info))
        wait_for(lambda: len(events_of(info)) > seen, timeout=120, every=0.1)
        processes = launch.run_processes(info)
        assert processes and run_status(info.run_id, runs_dir).status == "running"
        # Frozen while the app restarts, so the restarted app surely finds it mid-run, however
        # slow this machine is; it carries on where it was after SIGCONT.
        for p in processes:
            p.suspend()
        app, url = start_app(runs_dir, cache_dir, log)
        client = Client(url, verbose=False)
        assert client.predict(info.run_id, 0, api_name="/run_status")["status"] == "running"
        for p in processes:
            p.resume()

        status = wait_for(
            lambda: (s := client.predict(info.run_id, 0, api_name="/run_status"))["status"] not in ACTIVE and s,
            timeout=300,
        )
        assert status["status"] == "succeeded", status["reason"]
        events = [json.loads(e) for e in status["events"]]
        assert [e["step"] for e in events if e["event"] == "log"] == list(range(1, 31))  # no step lost
        assert [r["run_id"] for r in client.predict(api_name="/list_runs")] == [info.run_id]
        assert_adapter_loads(info.run_dir, tiny_mistral)
    finally:
        app.kill()
        app.wait()
        for run in launch.list_runs(runs_dir):  # a failed test must not leave a run training behind it
            for process in launch.run_processes(run):
                process.kill()


# ---------------------------------------------------------------- out of memory


@pytest.mark.slow
def test_out_of_memory_is_said_in_words_with_what_to_change(tiny_mistral, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_STUDIO_FAULT", "oom@step3")  # the run inherits it
    info = finish(
        start_run(CPU_TINY, tiny_config(tiny_mistral, max_steps=6, save_strategy="no"), gpus=[], runs_dir=tmp_path),
        tmp_path,
    )
    assert info.status == "failed"
    events = events_of(info)
    assert [e["step"] for e in events if e["event"] == "log"] == [1, 2]
    failed = events[-1]
    assert failed["event"] == "failed" and failed["error"] == "The GPU ran out of memory."
    # What to change, from this run's own settings (cpu-tiny: batch 4, no QLoRA, no checkpointing).
    assert failed["hint"] == (
        "Try: lower per_device_train_batch_size (now 4); lower max_length (now 2048); "
        "enable QLoRA (use_qlora true); enable gradient_checkpointing."
    )
    assert "OutOfMemoryError" in failed["traceback_tail"]
    assert info.reason.startswith("The GPU ran out of memory.") and "lower per_device_train_batch_size" in info.reason


# ---------------------------------------------------------------- a half-written last event


def test_a_killed_run_with_a_half_written_event_reads_as_failed(tmp_path, monkeypatch):
    from ui import train as train_step
    from ui.common import Context, Session

    writes_then_hangs = (
        "import sys, time; from engine.events import EventWriter; w = EventWriter(sys.argv[1]); "
        "w.write('started', total_steps=10); w.write('log', step=1, loss=2.5); time.sleep(120)"
    )
    monkeypatch.setattr(launch, "build_command", fake_command(writes_then_hangs))
    info = start_run(CPU_TINY, tiny_config("m"), gpus=[], runs_dir=tmp_path)
    wait_for(lambda: len(events_of(info)) == 2)
    for process in launch.run_processes(info):
        process.kill()
    events_file = info.run_dir / "events.jsonl"
    with open(events_file, "ab") as f:  # what the writer left when it was killed mid-line
        f.write(b'{"time": 1, "event": "lo')

    events, offset = read_events(events_file)
    assert [e["event"] for e in events] == ["started", "log"]
    info = wait_for(lambda: (s := run_status(info.run_id, tmp_path)).status != "running" and s, timeout=30)
    assert info.status == "failed" and info.reason.startswith("The training processes ended without finishing.")
    session = Session()
    session.watch(info.run_id)
    shown = dict(
        zip(
            ["start", "stop", "status", "progress", "metrics", "loss", "eval_loss", "error", "log"],
            train_step.view(session, train_step.follow(Context(tmp_path, tmp_path, None), session)[0]),
            strict=True,
        )
    )
    assert "The run failed" in shown["status"] and "ended without finishing" in shown["error"]
    assert session.last_log["step"] == 1 and session.events_offset == offset

    # The reader goes on from where it stopped once the line is complete.
    with open(events_file, "ab") as f:
        f.write(b'g", "step": 2, "loss": 2.4}\n')
    events, offset = read_events(events_file, offset)
    assert [(e["event"], e["step"]) for e in events] == [("log", 2)] and offset == events_file.stat().st_size


def test_a_new_writer_ends_a_partial_line_so_its_first_event_is_kept(tmp_path):
    path = tmp_path / "events.jsonl"
    EventWriter(path).write("log", step=1)
    with open(path, "ab") as f:
        f.write(b'{"time": 1, "event": "lo')  # the last run was killed mid-line; never completed
    events, offset = read_events(path)
    EventWriter(path).write("started", start_step=1)  # the resumed run
    assert [e["event"] for e in read_events(path, offset)[0]] == ["started"]
    assert [e["event"] for e in read_events(path)[0]] == ["log", "started"]


# ---------------------------------------------------------------- a full disk while saving


@pytest.mark.slow
def test_a_full_disk_while_saving_keeps_the_earlier_checkpoint_and_resume_continues(
    tiny_mistral, tmp_path, monkeypatch
):
    monkeypatch.setenv("FINETUNE_STUDIO_FAULT", "enospc@save2")  # the save at step 4 fails
    config = tiny_config(tiny_mistral, max_steps=6, save_steps=2)
    info = finish(start_run(CPU_TINY, config, gpus=[], runs_dir=tmp_path), tmp_path)
    assert info.status == "failed"
    failed = events_of(info)[-1]
    assert failed["error"] == "The disk ran out of space while the run was writing to it."
    assert failed["hint"].startswith(f"Free space on the disk holding {info.run_dir / 'output'}")
    assert "then resume the run" in failed["hint"] and info.reason.startswith(failed["error"])
    output = info.run_dir / "output"
    # The earlier checkpoint is whole; the failed one left nothing: no checkpoint-4, no partial files.
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert (output / "checkpoint-2" / "optimizer.pt").is_file()
    assert not any((output / ".partial").iterdir())
    assert not (output / "adapter_config.json").exists()  # no final adapter either: it never got there

    monkeypatch.delenv("FINETUNE_STUDIO_FAULT")  # space freed
    info = finish(resume_run(info.run_id, tmp_path), tmp_path)
    assert info.status == "succeeded", info.reason
    events = events_of(info)
    assert [e["start_step"] for e in events if e["event"] == "started"] == [0, 2]
    assert [e["step"] for e in events if e["event"] == "log"] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # limit 2
    assert_adapter_loads(info.run_dir, tiny_mistral)


@pytest.mark.parametrize(
    "error",
    [  # what each saver raised on a full 6 MB tmpfs (tests/README.md), torch 2.13, transformers 5.17
        OSError(28, "No space left on device"),  # Python's own writes
        Exception("No space left on device (os error 28)"),  # tokenizers, writing tokenizer.json
        Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save
    ],
)
def test_a_full_disk_is_recognised_however_the_saver_says_it(error):
    from engine.train import _explain

    sentence, hint = _explain(error, tiny_config("m"))
    assert sentence == "The disk ran out of space while the run was writing to it." and "save_total_limit" in hint


# ---------------------------------------------------------------- two app replicas


RACER = """
import sys, time
from engine.launch import ACTIVE, list_runs, run_status
runs_dir, start_at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))  # both replicas begin at the same moment
deadline = time.time() + 120
while time.time() < deadline:
    runs = list_runs(runs_dir)
    if not any(r.status in ACTIVE for r in runs):
        break
    for r in runs:
        run_status(r.run_id, runs_dir)
"""


def test_two_replicas_never_start_the_same_queued_run_twice(tmp_path, monkeypatch):
    spawns = tmp_path / "spawns.txt"
    # GPUs 0-2 are made up (a CPU preset runs anyway); this run holds them until it is killed below.
    monkeypatch.setattr(launch, "build_command", fake_command("import time; time.sleep(120)"))
    busy = start_run(CPU_TINY, tiny_config("m"), gpus=[0, 1, 2], runs_dir=tmp_path)
    # A queued run, once started, appends its id to spawns.txt and finishes at once. Two runs wait
    # for each GPU: the second of each starts only after the first has ended.
    monkeypatch.setattr(
        launch,
        "build_command",
        fake_command(
            "import os, sys; from engine.events import EventWriter; "
            f"open({str(spawns)!r}, 'a').write(os.environ['FINETUNE_STUDIO_RUN'] + '\\n'); "
            "EventWriter(sys.argv[1]).write('finished')"
        ),
    )
    queued = [start_run(CPU_TINY, tiny_config("m"), gpus=[gpu], runs_dir=tmp_path) for gpu in (0, 1, 2, 0, 1, 2)]
    assert {q.status for q in queued} == {"queued"} and not spawns.exists()

    for process in launch.run_processes(busy):
        process.kill()
    start_at = str(time.time() + 2)
    replicas = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), start_at], cwd=REPO) for _ in range(2)]
    assert [r.wait(timeout=180) for r in replicas] == [0, 0]

    started = spawns.read_text().split()
    assert sorted(started) == sorted(q.run_id for q in queued)  # each exactly once
    assert {run_status(q.run_id, tmp_path).status for q in queued} == {"succeeded"}
    assert run_status(busy.run_id, tmp_path).status == "failed"
