"""Step 5: try it. The same prompt answered by the base model and by the base model with a run's
adapter, side by side. The models load in a subprocess (engine.chat), never in the web process,
and not while a training run holds the GPU the playground would use."""

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import gradio as gr

from engine.data import check_jsonl
from engine.launch import REPO, list_runs, run_status
from ui.common import TINY_MODEL, Context

ANSWER_TIMEOUT_S = 600  # loading a 7B model from disk and answering fits well within this


@dataclass
class PlaygroundStep:
    run: gr.Dropdown
    prompt: gr.Textbox
    max_new_tokens: gr.Slider
    send: gr.Button
    note: gr.Markdown
    base: gr.Chatbot
    tuned: gr.Chatbot


def build_playground_step() -> PlaygroundStep:
    with gr.Row():
        run = gr.Dropdown(label="Finished run", choices=[], scale=3,
                          info="The adapter to try; the base model is the one it was trained on.")
        max_new_tokens = gr.Slider(8, 512, value=64, step=8, label="Answer length (tokens)", scale=2,
                                   info="The most tokens each model may write.")
    with gr.Row():
        base = gr.Chatbot(label="Base model (before training)", height=320, elem_id="chat-base")
        tuned = gr.Chatbot(label="With your adapter (after training)", height=320, elem_id="chat-tuned")
    with gr.Row():
        prompt = gr.Textbox(show_label=False, placeholder="Ask something like your training examples…", scale=5,
                            elem_id="prompt")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
    note = gr.Markdown(elem_id="playground-note")
    return PlaygroundStep(run, prompt, max_new_tokens, send, note, base, tuned)


def run_note(ctx: Context, run_id: str | None) -> str:
    """What to expect from a run's model, said before anyone asks it something."""
    if not run_id:
        return "Finish a training run first; its adapter appears here."
    config = json.loads((run_status(run_id, ctx.runs_dir).run_dir / "config.json").read_text())
    if config["model_id"] == ctx.model_path(TINY_MODEL):
        return ("The tiny test model has random weights, so both answers are gibberish: it shows that the "
                "whole flow works, not what training teaches. Pick a real model in step 2 for real answers.")
    return ""


def finished_runs(ctx: Context, owner: str | None) -> list[str]:
    return [r.run_id for r in list_runs(ctx.runs_dir)
            if r.owner == owner and (r.run_dir / "output" / "adapter_config.json").is_file()]


def gpu_in_use(ctx: Context, gpus: list[int]) -> str | None:
    """The id of a live run holding any of `gpus`, or None."""
    for info in list_runs(ctx.runs_dir):
        if info.status in ("running", "stopping") and set(info.gpus) & set(gpus):
            return info.run_id
    return None


@functools.lru_cache(maxsize=32)
def _is_chat(train_data: str, mtime: float) -> bool:
    return check_jsonl(train_data).format == "chat"


def answer(ctx: Context, run_id: str, prompt: str, max_new_tokens: int) -> dict:
    """{"base": ..., "tuned": ...} for one prompt; ValueError says why it cannot answer now."""
    if not run_id:
        raise ValueError("Pick a finished run first.")
    if not prompt.strip():
        raise ValueError("Type a question first.")
    info = run_status(run_id, ctx.runs_dir)
    config = json.loads((info.run_dir / "config.json").read_text())
    gpus = info.gpus[:1]  # one GPU is enough to answer
    busy = gpu_in_use(ctx, gpus)
    if busy:
        # Not named: it may be another person's run, and run ids stay secret.
        raise ValueError("A training run is using the GPU this model needs. Try again when it ends (or stop "
                         "yours in step 3); answering now would slow it down or run it out of memory.")
    train_data = config["train_data"]
    chat = _is_chat(train_data, os.path.getmtime(train_data)) if os.path.isfile(train_data) else True
    argv = [sys.executable, "-m", "engine.chat", "--model_id", config["model_id"],
            "--adapter", str(info.run_dir / "output"), "--prompt", prompt, "--chat", str(chat).lower(),
            "--max_new_tokens", str(int(max_new_tokens))]
    if config.get("chat_template"):
        argv += ["--chat_template", config["chat_template"]]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    try:
        result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=ANSWER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ValueError(
            f"The models took more than {ANSWER_TIMEOUT_S} s to answer; try a shorter answer length."
        ) from None
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-3:])
        raise ValueError(f"The models could not be loaded or run: {tail}")
    return json.loads(result.stdout.strip().splitlines()[-1])
