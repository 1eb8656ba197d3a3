"""The UI's pieces without a browser: the form built from TrainConfig, data views, the estimate text."""

import dataclasses
import json

import pytest
from conftest import write_jsonl

from engine.config import FIELDS
from engine.data import check_jsonl
from engine.events import read_events
from engine.hardware import GPU, Hardware
from engine.launch import RunInfo
from engine.presets import list_presets, load_preset, make_config
from ui import data as data_step
from ui import model as model_step
from ui import train as train_step
from ui.common import TINY_MODEL, Context, Session


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Context:
    root = tmp_path_factory.mktemp("ui")
    return Context(runs_dir=root / "runs", cache_dir=root / "cache", hardware=Hardware([], 2, 8.0))


def test_the_form_has_every_engine_flag_once_with_its_help():
    set_per_run = set(model_step.NOT_IN_FORM)
    assert set(model_step.FORM) | set_per_run == set(FIELDS)
    assert len(model_step.FORM) == len(set(model_step.FORM))
    assert model_step.label("use_qlora") == "Use QLoRA"
    assert model_step.label("per_device_train_batch_size") == "Per device train batch size"


@pytest.mark.parametrize("preset", [p.name for p in list_presets()])
def test_a_presets_form_values_give_back_its_config(preset):
    values = model_step.preset_form_values(preset)
    config = model_step.form_config(preset, "m", "d.jsonl", 1024, values)
    expected = make_config(load_preset(preset), model_id="m", train_data="d.jsonl", max_length=1024)
    assert config == expected


def test_bad_form_values_are_all_named():
    values = model_step.preset_form_values("cpu-tiny")
    values[model_step.FORM.index("num_train_epochs")] = "many"
    values[model_step.FORM.index("eval_strategy")] = "sometimes"
    with pytest.raises(ValueError) as error:
        model_step.form_config("cpu-tiny", "m", "d.jsonl", 1024, values)
    assert "Num train epochs" in str(error.value) and "Eval strategy" in str(error.value)


def test_the_command_and_estimate_follow_the_form(ctx):
    values = model_step.preset_form_values("cpu-tiny")
    values[model_step.FORM.index("lora_r")] = 4
    estimate, command, problems = model_step.describe(ctx, "cpu-tiny", TINY_MODEL, "data.jsonl", 512, values)
    assert not problems
    assert "accelerate launch" in command and "--lora_r 4" in command and "--max_length 512" in command
    assert "GiB" in estimate and "fits" in estimate


def test_a_gpu_preset_on_a_machine_without_gpu_says_so(ctx):
    values = model_step.preset_form_values("qlora-zero2")
    estimate, _, _ = model_step.describe(ctx, "qlora-zero2", "mistralai/Mistral-7B-Instruct-v0.2", None, 2048, values)
    assert "needs an NVIDIA GPU" in estimate


def test_the_estimate_gives_a_verdict_against_the_gpu():
    t4 = Context(runs_dir=None, cache_dir=None, hardware=Hardware([GPU(0, "Tesla T4", 15.0, 0.1, (7, 5))], 8, 32))
    preset = load_preset("ddp")
    config = make_config(preset, model_id="m", train_data="d", max_length=4096, per_device_train_batch_size=4)
    text = model_step.estimate_markdown(t4, preset, config, "mistralai/Mistral-7B-Instruct-v0.2")
    assert "will not fit" in text and "QLoRA" in text
    text, recommended = model_step.hardware_markdown(t4)
    assert recommended.name == "fp16-v100-t4" and "Tesla T4" in text and "bfloat16" in text


def test_the_estimate_says_when_free_memory_grows_the_passes_and_what_the_least_is(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on the GPU machine the app runs on
    h100 = Context(runs_dir=None, cache_dir=None, hardware=Hardware([GPU(0, "H100", 79.0, 0.1, (9, 0))], 16, 128))
    preset = load_preset("qlora-zero2")
    config = make_config(preset, model_id="m", train_data="d", max_length=2048)  # 1 x 4 examples a step
    text = model_step.estimate_markdown(h100, preset, config, "mistralai/Mistral-7B-Instruct-v0.2")
    assert "Packed passes grow to 4,096 tokens" in text and "with Pack tokens 2,048 this run needs about" in text
    pinned = dataclasses.replace(config, pack_tokens=2048)
    assert "grow" not in model_step.estimate_markdown(h100, preset, pinned, "mistralai/Mistral-7B-Instruct-v0.2")


def test_the_optimizer_is_picked_from_a_list_and_its_state_is_in_the_estimate():
    assert model_step._component(FIELDS["optim"]).choices[2] == ("adamw_bnb_8bit", "adamw_bnb_8bit")
    t4 = Context(runs_dir=None, cache_dir=None, hardware=Hardware([GPU(0, "Tesla T4", 15.0, 0.1, (7, 5))], 8, 32))
    preset = load_preset("qlora-zero2")

    def state_line(**flags):
        config = make_config(preset, model_id="m", train_data="d", **flags)
        text = model_step.estimate_markdown(t4, preset, config, "mistralai/Mistral-7B-Instruct-v0.2")
        return next((line for line in text.splitlines() if "optimizer:" in line), text)

    # 84M LoRA weights: the fp32 weight (4 bytes) + AdamW's 8, or 8-bit's 2.03.
    assert state_line() == "- trainable weights and optimizer: 0.94 GiB"
    assert state_line(optim="adamw_bnb_8bit") == "- trainable weights and optimizer: 0.47 GiB"
    assert "not available: optim_args: unknown option 'kahan'" in state_line(
        optim="adamw_anyprecision", optim_args="kahan=true")


def test_problems_are_listed_by_line_and_field(ctx, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "{oops", {"prompt": "c"}])
    report, _ = data_step.check_data(ctx, str(path), TINY_MODEL, 2048)
    text = data_step.summary_markdown(report, "x")
    assert "| 2 | – |" in text and "| 3 | completion |" in text


def test_preview_and_histogram_of_a_chat_file(ctx):
    path = str(data_step.EXAMPLES_DIR / "capitals-chat.jsonl")
    report, counted_with = data_step.check_data(ctx, path, TINY_MODEL, 35)
    assert counted_with == TINY_MODEL
    messages = data_step.preview_messages(path)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert messages[0]["content"].startswith("**Example 1 · line 1**") and "System:" in messages[0]["content"]
    frame = data_step.histogram_frame(report)
    assert frame["examples"].sum() == check_jsonl(path).num_examples
    cut = frame[frame["fits"] != "fits"]["examples"].sum()
    assert cut >= report.num_truncated > 0
    assert "will be cut" in data_step.summary_markdown(report, counted_with)


def test_a_model_that_cannot_be_read_gives_no_estimate_but_a_reason(ctx, tmp_path):
    with pytest.raises(ValueError, match="could not read"):
        ctx.model_shape(str(tmp_path / "no-such-model"))
    shape = ctx.model_shape(TINY_MODEL)  # built on demand, offline
    assert dataclasses.asdict(shape)["hidden_size"] == 64


def test_a_failed_run_shows_its_sentence_and_hint_not_a_traceback(tmp_path):
    info = RunInfo(run_id="r1", status="failed", preset="cpu-tiny", run_dir=tmp_path, created_at=0.0, command="x")
    session = Session(run_id="r1", final={"event": "failed", "error": "The GPU ran out of memory.",
                                         "hint": "Try: lower max_length.", "traceback_tail": "Traceback ..."})
    shown = dict(zip(["start", "stop", "status", "progress", "metrics", "loss", "eval_loss", "error", "log"],
                     train_step.view(session, info), strict=True))
    assert "The GPU ran out of memory." in shown["error"] and "lower max_length" in shown["error"]
    assert "Traceback" not in shown["error"]
    assert "failed" in shown["status"]


def test_what_the_batch_finder_chose_is_shown_with_the_status(tmp_path):
    """engine/batch_finder.py's sentence, from the started event, under the status line."""
    (tmp_path / "events.jsonl").write_text(json.dumps({
        "time": 1.0, "event": "started", "total_steps": 3,
        "auto_batch": {"value": 9216, "why": "auto_find_batch_size: pack_tokens 9216 (was 32768); ..."}}) + "\n")
    info = RunInfo(run_id="r1", status="running", preset="cpu-tiny", run_dir=tmp_path, created_at=0.0, command="x")
    session = Session(run_id="r1")
    for event in read_events(tmp_path / "events.jsonl", 0)[0]:
        train_step.apply_event(session, event)
    status = train_step.view(session, info)[2]
    assert "Training" in status and "auto_find_batch_size: pack_tokens 9216 (was 32768)" in status


def test_a_compiled_run_says_why_its_first_step_is_slow_until_the_step_is_logged(tmp_path):
    info = RunInfo(run_id="r1", status="running", preset="qlora-zero2", run_dir=tmp_path, created_at=0.0, command="x")
    session = Session(run_id="r1")
    train_step.apply_event(session, {"time": 1.0, "event": "started", "total_steps": 3,
                                     "config": {"torch_compile": True}})
    assert train_step.COMPILING in train_step.view(session, info)[2]
    train_step.apply_event(session, {"time": 9.0, "event": "log", "step": 1, "loss": 2.5})
    assert train_step.COMPILING not in train_step.view(session, info)[2]
    uncompiled = Session(run_id="r1")
    train_step.apply_event(uncompiled, {"time": 1.0, "event": "started", "config": {"torch_compile": False}})
    assert train_step.COMPILING not in train_step.view(uncompiled, info)[2]
