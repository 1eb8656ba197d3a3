"""Step 4: results. Every run in the runs folder (so history survives an app restart), its status,
config and final metrics; downloads of the adapter, the log and the merged model; resume."""

import datetime
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from engine.events import read_events
from engine.launch import ACTIVE, RunInfo, list_runs, resumable, run_status
from ui.common import Context

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "finetune_config.json", "README.md")


@dataclass
class ResultsStep:
    table: gr.Dataframe
    refresh: gr.Button
    run: gr.Dropdown
    details: gr.Markdown
    adapter: gr.DownloadButton
    log: gr.DownloadButton
    merged: gr.Button  # zipping a merged model takes a while: only on request
    merged_file: gr.DownloadButton
    resume: gr.Button
    watch: gr.Button


def build_results_step() -> ResultsStep:
    with gr.Row():
        run = gr.Dropdown(label="Run", choices=[], scale=4, info="Pick a run to see its details and downloads.")
        refresh = gr.Button("↻ Refresh", scale=1)
    table = gr.Dataframe(
        headers=["run", "status", "preset", "model", "started", "final loss"], interactive=False, wrap=True,
        label="All runs, newest first",
    )
    details = gr.Markdown(elem_id="run-details")
    with gr.Row():
        adapter = gr.DownloadButton("⬇ Adapter (.zip)", visible=False, elem_id="download-adapter")
        log = gr.DownloadButton("⬇ Training log", visible=False, elem_id="download-log")
        merged = gr.Button("Prepare the merged model (.zip)", visible=False)
        merged_file = gr.DownloadButton("⬇ Merged model (.zip)", visible=False, elem_id="download-merged")
        resume = gr.Button("↺ Resume from its last checkpoint", visible=False)
        watch = gr.Button("Watch it in step 3", visible=False)
    return ResultsStep(table, refresh, run, details, adapter, log, merged, merged_file, resume, watch)


def _summary(info: RunInfo) -> dict:
    """Model and final loss of a run, from its config.json and events."""
    config = json.loads((info.run_dir / "config.json").read_text())
    events, _ = read_events(info.run_dir / "events.jsonl")
    final = next((e for e in reversed(events) if e["event"] == "finished"), None)
    losses = [e["loss"] for e in events if e["event"] == "log" and e.get("loss") is not None]
    loss = final.get("train_loss") if final else (losses[-1] if losses else None)
    return {"config": config, "finished": final, "loss": loss}


def runs_table(ctx: Context, owner: str | None) -> tuple[pd.DataFrame, list[str]]:
    rows, ids = [], []
    for info in list_runs(ctx.runs_dir):
        if info.owner != owner:
            continue
        summary = _summary(info)
        loss = summary["loss"]
        rows.append([
            info.run_id, info.status, info.preset, Path(summary["config"]["model_id"]).name,
            datetime.datetime.fromtimestamp(info.created_at).strftime("%Y-%m-%d %H:%M"),
            f"{loss:.4f}" if loss is not None else "",
        ])  # fmt: skip
        ids.append(info.run_id)
    return pd.DataFrame(rows, columns=["run", "status", "preset", "model", "started", "final loss"]), ids


def details(ctx: Context, run_id: str | None) -> tuple:
    """Markdown and buttons for one run, in ResultsStep's order: details, adapter, log, merged,
    merged_file, resume, watch."""
    hidden = gr.update(visible=False, value=None)
    if not run_id:
        return "", hidden, hidden, gr.update(visible=False), hidden, gr.update(visible=False), gr.update(visible=False)
    info = run_status(run_id, ctx.runs_dir)
    summary = _summary(info)
    output = info.run_dir / "output"
    finished = summary["finished"]
    lines = [f"### Run `{info.run_id}`: {info.status}"]
    if info.reason:
        lines.append(f"**Why:** {info.reason}")
    if finished:
        lines.append(f"Final training loss **{finished.get('train_loss', float('nan')):.4f}**, took "
                     f"{finished.get('train_runtime_s', 0):.0f} s.")
    lines.append(f"**Command:**\n```\n{info.command}\n```")
    lines.append(f"<details><summary>Full configuration</summary>\n\n```json\n"
                 f"{json.dumps(summary['config'], indent=2)}\n```\n</details>")
    has_adapter = (output / "adapter_config.json").is_file()
    merged_dir = output / "merged"
    return (
        "\n\n".join(lines),
        gr.update(visible=has_adapter, value=None),
        gr.update(visible=(info.run_dir / "stdout.log").is_file(), value=None),
        gr.update(visible=merged_dir.is_dir()),
        hidden,
        gr.update(visible=resumable(info)),
        gr.update(visible=info.status in ACTIVE),
    )


def _export_dir(ctx: Context, run_id: str) -> Path:
    """Files for download are written outside the runs folder, so only they are ever served (as
    Gradio's copies: see Context.downloads_dir)."""
    folder = ctx.downloads_dir / run_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def adapter_zip(ctx: Context, run_id: str) -> str:
    """The final adapter and tokenizer files (no checkpoints) as <run_id>-adapter.zip."""
    output = run_status(run_id, ctx.runs_dir).run_dir / "output"
    target = _export_dir(ctx, run_id) / f"{run_id}-adapter.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(output.iterdir()):
            if path.is_file() and (path.name in ADAPTER_FILES or path.name.startswith(("tokenizer", "special_tokens",
                                                                                         "chat_template"))):
                z.write(path, path.name)
    return str(target)


def merged_zip(ctx: Context, run_id: str) -> str:
    merged = run_status(run_id, ctx.runs_dir).run_dir / "output" / "merged"
    target = _export_dir(ctx, run_id) / f"{run_id}-merged.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as z:  # weights do not compress; storing is fast
        for path in sorted(merged.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(merged))
    return str(target)


def log_file(ctx: Context, run_id: str) -> str:
    source = run_status(run_id, ctx.runs_dir).run_dir / "stdout.log"
    target = _export_dir(ctx, run_id) / f"{run_id}-log.txt"
    shutil.copyfile(source, target)
    return str(target)

