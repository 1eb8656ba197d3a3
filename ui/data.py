"""Step 1: the training data. Upload a JSONL file or pick an example; see every problem with its
line number, a preview rendered as a chat, and how long the examples are in tokens."""

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from engine.data import DataReport, data_report
from ui.common import TINY_MODEL, Context

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
PREVIEW_EXAMPLES = 3
MEASURE_LIMIT = 5000  # examples tokenized for the histogram: enough for its shape, fast on a CPU
MAX_PROBLEMS_SHOWN = 50


@dataclass
class DataStep:
    upload: gr.File
    example: gr.Dropdown
    max_length: gr.Slider
    summary: gr.Markdown
    preview: gr.Chatbot
    histogram: gr.BarPlot
    views: gr.Row  # preview and histogram: shown for a file without problems


def example_files() -> dict[str, str]:
    return {p.name: str(p) for p in sorted(EXAMPLES_DIR.glob("*.jsonl"))}


def build_data_step() -> DataStep:
    gr.Markdown(
        "Your examples, one per line, in one of two shapes:\n"
        '`{"prompt": "...", "completion": "..."}` or '
        '`{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}`. '
        "The model learns to write the completion / the assistant's turns."
    )
    with gr.Row(equal_height=True):
        upload = gr.File(label="Upload a JSONL file", file_types=[".jsonl"], type="filepath", height=120,
                             elem_id="upload")
        with gr.Column():
            example = gr.Dropdown(elem_id="example",
                choices=list(example_files()), value=None, label="…or try a bundled example",
                info="Small datasets that ship with the app.",
            )
            max_length = gr.Slider(
                128, 8192, value=2048, step=128, label="Max length (tokens)",
                info="Longer examples are cut to this length. Longer allows more text but needs more memory.",
            )
    summary = gr.Markdown("Upload a file or pick an example to check it.", elem_id="data-summary")
    with gr.Row(visible=False) as views:
        preview = gr.Chatbot(label="Preview: the first examples as the model will see them", height=360)
        histogram = gr.BarPlot(
            x="tokens", y="examples", color="fits", label="Example lengths in tokens",
            color_map={"fits": "#3b82f6", "cut at max length": "#ef4444"}, height=360,
            x_title="tokens per example", y_title="examples", x_label_angle=-40,
        )
    return DataStep(upload, example, max_length, summary, preview, histogram, views)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def tokenizer_for(ctx: Context, model: str) -> tuple[object, str]:
    """The model's tokenizer, or Mistral's (shipped offline) when it cannot be loaded; and which."""
    try:
        return _tokenizer(ctx.model_path(model)), model
    except Exception:  # offline, gated or misspelt: lengths in Mistral's tokens are still a guide
        return _tokenizer(ctx.model_path(TINY_MODEL)), "Mistral's tokenizer (the chosen model's could not be loaded)"


def check_data(ctx: Context, path: str, model: str, max_length: int) -> tuple[DataReport, str]:
    tokenizer, counted_with = tokenizer_for(ctx, model)
    # A fresh copy: data_report sets the chat template on the tokenizer it is given.
    report = data_report(path, copy.deepcopy(tokenizer), int(max_length), limit=MEASURE_LIMIT)
    return report, counted_with


def summary_markdown(report: DataReport, counted_with: str) -> str:
    name = Path(report.path).name
    if report.problems:
        rows = "\n".join(
            f"| {p.line if p.line is not None else '–'} | {p.field or '–'} | {p.message} |"
            for p in report.problems[:MAX_PROBLEMS_SHOWN]
        )
        more = report.more_problems + max(0, len(report.problems) - MAX_PROBLEMS_SHOWN)
        tail = f"\n\n…and {more} more problems." if more else ""
        return (
            f"### ✗ {name}: fix these problems, then upload the file again\n\n"
            f"| line | field | what is wrong |\n|---|---|---|\n{rows}{tail}"
        )
    kind = {"chat": "chat messages", "prompt_completion": "prompt / completion"}[report.format]
    measured = "" if report.token_lengths is None or len(report.token_lengths) == report.num_examples else (
        f" (lengths measured on the first {len(report.token_lengths):,})"
    )
    cut = (
        f"**{report.num_truncated:,}** examples are longer than {report.max_length:,} tokens and will be cut: "
        "raise Max length or shorten them."
        if report.num_truncated
        else f"None is longer than the max length ({report.max_length:,} tokens)."
    )
    return (
        f"### ✓ {name}: {report.num_examples:,} examples, format: {kind}\n\n"
        f"Tokens per example{measured}: typical {report.token_length_p50:,}, 95% at most "
        f"{report.token_length_p95:,}, longest {report.token_length_max:,} (counted with {counted_with}). {cut}"
    )


def preview_messages(path: str, limit: int = PREVIEW_EXAMPLES) -> list[dict]:
    """The first examples as chat bubbles; system text is shown in the user's bubble, in italics."""
    messages: list[dict] = []
    shown = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            shown += 1
            example = json.loads(line)
            turns = example.get("messages") or [
                {"role": "user", "content": example["prompt"]},
                {"role": "assistant", "content": example["completion"]},
            ]
            prefix = f"**Example {shown} · line {number}**\n\n"
            for turn in turns:
                if turn["role"] == "system":
                    prefix += f"_System: {turn['content']}_\n\n"
                elif turn["role"] == "user":
                    messages.append({"role": "user", "content": prefix + turn["content"]})
                    prefix = ""
                else:
                    messages.append({"role": "assistant", "content": turn["content"]})
            if shown == limit:
                break
    return messages


def histogram_frame(report: DataReport, bins: int = 16) -> pd.DataFrame:
    """Counts per length bin, from 0 to the longest example; bins past max_length are coloured as cut."""
    lengths = report.token_lengths
    if lengths is None or len(lengths) == 0:
        return pd.DataFrame({"tokens": [], "examples": [], "fits": []})
    edges = np.unique(np.linspace(0, int(lengths.max()) + 1, bins + 1).astype(int))
    counts, edges = np.histogram(lengths, bins=edges)
    return pd.DataFrame({
        "tokens": [f"{lo}–{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)],
        "examples": counts,
        "fits": ["fits" if hi - 1 <= report.max_length else "cut at max length" for hi in edges[1:]],
    })  # fmt: skip
