"""Step 5's model worker (ui/chat_worker.py), and the merged model download, on two finished tiny runs."""

import concurrent.futures
import io
import json
import os
import signal
import time
import zipfile
from types import SimpleNamespace

import psutil
import pytest
import torch
from ui_helpers import REPO

from engine import chat
from engine.hardware import Hardware
from engine.launch import RUN_MARKER, list_runs, run_processes, run_status, start_run
from engine.presets import load_preset, make_config
from ui import chat_worker, playground, results
from ui.common import Context

QUESTION = "What is the capital of France?"
TOKENS = 16


def workers() -> list[psutil.Process]:
    """This process's live engine.chat children (other tests may have left unreaped zombies, whose
    command line cannot be read)."""
    found = []
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "engine.chat" in child.cmdline():
                found.append(child)
        except psutil.Error:  # gone, or a zombie now
            continue
    return found


def wait_for_worker() -> int:
    deadline = time.time() + 30
    while chat_worker.pid() is None:
        assert time.time() < deadline, "no worker started"
        time.sleep(0.05)
    return chat_worker.pid()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_mistral) -> SimpleNamespace:
    """Two finished cpu-tiny runs, trained side by side: `plain` on no GPU, and `merged` (merge_adapter
    true) as if on GPU 0. cpu-tiny trains on the CPU all the same, and the worker finds no GPU 0 here."""
    root = tmp_path_factory.mktemp("playground")
    ctx = Context(runs_dir=root / "runs", cache_dir=root / "cache", hardware=Hardware([], 2, 8.0))
    preset = load_preset("cpu-tiny")
    settings = dict(model_id=str(tiny_mistral), train_data=str(REPO / "examples" / "capitals-chat.jsonl"),
                    max_steps=2, eval_strategy="no", save_strategy="no")
    started = [start_run(preset, make_config(preset, **settings), gpus=[], runs_dir=ctx.runs_dir),
               start_run(preset, make_config(preset, **settings, merge_adapter=True), gpus=[0], runs_dir=ctx.runs_dir)]
    deadline = time.time() + 300
    while any(run_status(r.run_id, ctx.runs_dir).status in ("queued", "running") for r in started):
        assert time.time() < deadline, "the tiny runs did not finish"
        time.sleep(0.5)
    plain, merged = (run_status(r.run_id, ctx.runs_dir) for r in started)
    assert (plain.status, merged.status) == ("succeeded", "succeeded"), (plain.reason, merged.reason)
    yield SimpleNamespace(ctx=ctx, plain=plain, merged=merged)
    chat_worker.release()
    assert chat_worker.pid() is None and not workers()


def timed_answer(ctx: Context, run) -> tuple[dict, float]:
    start = time.perf_counter()
    answers = playground.answer(ctx, run.run_id, QUESTION, TOKENS)
    return answers, time.perf_counter() - start


@pytest.mark.slow
def test_one_worker_answers_a_run_again_and_another_run_replaces_it(runs, tiny_mistral, capsys):
    ctx = runs.ctx
    chat_worker.release()
    first, first_s = timed_answer(ctx, runs.plain)
    pid = chat_worker.pid()
    again, again_s = timed_answer(ctx, runs.plain)
    assert chat_worker.pid() == pid and [p.pid for p in workers()] == [pid]
    assert again == first and first["tuned"]  # greedy: the same words each time
    assert again_s < first_s / 3, (first_s, again_s)  # loaded once: here about 11 s, then 0.5 s
    # No training run: not among any run's processes, and without the marker that finds them.
    assert RUN_MARKER not in psutil.Process(pid).environ()
    assert pid not in {p.pid for run in list_runs(ctx.runs_dir) for p in run_processes(run)}

    # The shell's one-shot command and the worker's loop share their code, so they say the same;
    # a bad request line gets an error line, and the next request its answer.
    adapter = str(runs.plain.run_dir / "output")
    assert chat.main(["--model_id", str(tiny_mistral), "--adapter", adapter, "--prompt", QUESTION,
                      "--max_new_tokens", str(TOKENS)]) == 0
    assert json.loads(capsys.readouterr().out) == first
    replies = io.StringIO()
    chat.serve(chat.Chat(str(tiny_mistral), adapter), ["{oops", "", json.dumps({"prompt": QUESTION})], replies, TOKENS)
    bad, good = map(json.loads, replies.getvalue().splitlines())
    assert "JSONDecodeError" in bad["error"] and good == first

    timed_answer(ctx, runs.merged)
    assert chat_worker.pid() not in (None, pid) and not psutil.pid_exists(pid)
    assert len(workers()) == 1


@pytest.mark.slow
def test_a_training_run_on_its_gpu_stops_the_worker(runs, monkeypatch):
    ctx = runs.ctx
    playground.answer(ctx, runs.merged.run_id, QUESTION, TOKENS)  # the worker of the run on GPU 0
    pid = chat_worker.pid()
    playground.release_gpus([1])  # another GPU
    playground.release_gpus([])  # a CPU run
    assert chat_worker.pid() == pid
    playground.release_gpus([0])
    assert chat_worker.pid() is None and not psutil.pid_exists(pid)

    # A run found on its GPU while it loads (started from a terminal, or out of the queue): the
    # question waiting on it and the next one are both told why.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(playground.answer, ctx, runs.merged.run_id, QUESTION, TOKENS)
        wait_for_worker()
        monkeypatch.setattr(playground, "gpu_in_use", lambda ctx, gpus: "someone's run" if 0 in gpus else None)
        with pytest.raises(ValueError, match="A training run is using the GPU"):
            playground.answer(ctx, runs.merged.run_id, QUESTION, TOKENS)
        with pytest.raises(ValueError, match="A training run started on the GPU these models used"):
            waiting.result(timeout=30)
    assert chat_worker.pid() is None and not workers()


@pytest.mark.slow
def test_a_dead_or_stuck_worker_is_said_in_words_and_the_next_question_starts_afresh(runs, monkeypatch):
    ctx = runs.ctx
    chat_worker.release()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(playground.answer, ctx, runs.plain.run_id, QUESTION, TOKENS)
        killed = wait_for_worker()
        os.kill(killed, signal.SIGKILL)
        with pytest.raises(ValueError, match=r"could not be loaded or run: their process was killed \(signal 9\)"):
            waiting.result(timeout=30)

    monkeypatch.setattr(chat_worker, "ANSWER_TIMEOUT_S", 1)  # less than loading takes
    with pytest.raises(ValueError, match="took more than 1 s to answer, so they were stopped"):
        playground.answer(ctx, runs.plain.run_id, QUESTION, TOKENS)
    assert not workers()
    monkeypatch.undo()

    assert playground.answer(ctx, runs.plain.run_id, QUESTION, TOKENS)["tuned"]
    assert chat_worker.pid() != killed and len(workers()) == 1


@pytest.mark.slow
def test_the_merged_download_loads_and_equals_base_plus_adapter(runs, tiny_mistral, tmp_path):
    ctx = runs.ctx
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with zipfile.ZipFile(results.merged_zip(ctx, runs.merged.run_id)) as z:
        z.extractall(tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    inputs = tokenizer(QUESTION, return_tensors="pt")
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(**inputs).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_mistral)
        plain = base(**inputs).logits
        with_adapter = PeftModel.from_pretrained(base, runs.merged.run_dir / "output")(**inputs).logits
    assert torch.allclose(merged, with_adapter, atol=1e-4)
    assert not torch.allclose(merged, plain, atol=1e-4)  # the adapter is in it
