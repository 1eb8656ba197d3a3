"""Step 5: try it. The same prompt answered by the base model and by the base model with a run's
adapter, side by side. The models load in a worker process (ui/chat_worker.py), never in the web
process, and not while a training run holds the GPU the playground would use."""

import functools
import json
import os
from dataclasses import dataclass

import gradio as gr

from engine.data import check_jsonl
from engine.launch import busy_gpus, list_runs, run_status
from ui import chat_worker
from ui.common import TINY_MODEL, Context

GPU_BUSY = ("A training run is using the GPU this model needs. Try again when it ends (or stop yours in step 3); "
            "answering now would slow it down or run it out of memory.")


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


def gpu_in_use(ctx: Context, gpus: list[int]) -> bool:
    """Whether a live run holds any of `gpus`."""
    return bool(busy_gpus(list_runs(ctx.runs_dir)) & set(gpus))


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
    if gpu_in_use(ctx, gpus):
        release_gpus(gpus)  # a run that started without the app's knowing (a terminal, the queue)
        # Not named: it may be another person's run, and run ids stay secret.
        raise ValueError(GPU_BUSY)
    train_data = config["train_data"]
    chat = _is_chat(train_data, os.path.getmtime(train_data)) if os.path.isfile(train_data) else True
    reply = chat_worker.ask(config["model_id"], str(info.run_dir / "output"), chat, config.get("chat_template"), gpus,
                            {"prompt": prompt, "max_new_tokens": int(max_new_tokens)})
    if "error" in reply:
        raise ValueError(f"The models could not answer: {reply['error']}")
    return reply


def release_gpus(gpus: list[int]) -> None:
    """Frees `gpus` for a training run: stops the playground's models if they sit on any of them.
    Call it wherever a run starts or resumes; on the CPU (no GPUs) the models stay loaded."""
    chat_worker.release(gpus)
