"""Step 3: train. Start, then watch: progress with ETA, the loss plot, speed and memory, the log.

The run is a separate process started by engine.launch; this module only reads its folder. A
timer polls it, reading the bytes appended to events.jsonl and stdout.log since this tab's last
read (offsets in the tab's Session), so any number of tabs can watch one run, and a reloaded
page or a restarted app picks the run up again from its files.
"""

import html
import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from engine.events import read_events
from engine.launch import ACTIVE, RunInfo, list_runs, queue_position, run_status
from ui.common import Context, Session

POLL_S = 1.0
LOG_LINES = 200  # kept for the log view; the whole log is a download away (Results)
LOG_CHUNK = 256 * 1024  # at most this much new log is read per tick, so a chatty run never stalls the UI
OUTPUTS = 9  # what view() returns: start, stop, status, progress, metrics, loss, eval_loss, error, log


@dataclass
class TrainStep:
    start: gr.Button
    stop: gr.Button
    status: gr.Markdown
    progress: gr.HTML
    metrics: gr.Markdown
    loss: gr.LinePlot
    eval_loss: gr.LinePlot
    error: gr.Markdown
    log: gr.Textbox
    timer: gr.Timer


def build_train_step() -> TrainStep:
    with gr.Row():
        start = gr.Button("▶ Start training", variant="primary", interactive=False, elem_id="start")
        stop = gr.Button("■ Stop", variant="stop", interactive=False, elem_id="stop")
    status = gr.Markdown("Check your data in step 1 to enable Start.", elem_id="run-status")
    progress = gr.HTML(progress_html(None, None, None), elem_id="progress")
    metrics = gr.Markdown(elem_id="metrics")
    error = gr.Markdown(elem_id="run-error")
    # Two plots rather than one with a colour per split: Gradio 6.31's LinePlot draws only the
    # series present in the first frame it gets, and eval points come later than train points.
    with gr.Row():
        loss = gr.LinePlot(x="step", y="loss", label="Training loss (lower is better)",
                           elem_id="loss-plot")
        eval_loss = gr.LinePlot(x="step", y="loss", label="Evaluation loss, on held-out examples",
                                elem_id="eval-loss-plot")
    with gr.Accordion("Training log", open=False):
        log = gr.Textbox(show_label=False, lines=14, max_lines=14, autoscroll=True, elem_id="log")
    timer = gr.Timer(POLL_S)
    return TrainStep(start, stop, status, progress, metrics, loss, eval_loss, error, log, timer)


def progress_html(step: int | None, total: int | None, eta_s: float | None) -> str:
    if not total:
        return '<div class="fs-progress"><div class="fs-bar" style="width:0%"></div></div>'
    done = min(1.0, (step or 0) / total)
    eta = f" · about {_duration(eta_s)} left" if eta_s is not None and done < 1 else ""
    return (
        f'<div class="fs-progress" role="progressbar" aria-valuenow="{step or 0}" aria-valuemax="{total}">'
        f'<div class="fs-bar" style="width:{done * 100:.1f}%"></div></div>'
        f'<div class="fs-progress-text">step {step or 0} of {total}{eta}</div>'
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def follow(ctx: Context, session: Session) -> tuple[RunInfo, bool]:
    """Reads what the watched run appended since the last call into `session`; True if anything changed."""
    info = run_status(session.run_id, ctx.runs_dir)
    position = queue_position(info.run_id, ctx.runs_dir) if info.status == "queued" else None
    changed = info.status != session.status or position != session.queue_position
    session.status, session.queue_position = info.status, position
    events, session.events_offset = read_events(info.run_dir / "events.jsonl", session.events_offset)
    for event in events:
        apply_event(session, event)
    changed |= bool(events)
    changed |= _read_log(info, session)
    return info, changed


# Shown until the first step is logged: without it a first step 10-60 s slower looks like a hang.
COMPILING = "Compiling the model's layers for faster steps: the first step takes up to a minute longer."


def apply_event(session: Session, event: dict) -> None:
    """One event of the run's events.jsonl into what the tab shows."""
    kind = event["event"]
    if kind == "started":
        session.total_steps, session.started_at = event.get("total_steps"), event["time"]
        session.auto_batch = (event.get("auto_batch") or {}).get("why")
        session.compiled = bool((event.get("config") or {}).get("torch_compile"))
    elif kind == "log" and event.get("loss") is not None:
        session.last_log = event
        session.points.append({"step": event["step"], "loss": event["loss"], "split": "train"})
    elif kind == "eval" and event.get("eval_loss") is not None:
        session.points.append({"step": event["step"], "loss": event["eval_loss"], "split": "eval"})
    elif kind in ("finished", "stopped", "failed"):
        session.final = event


def _read_log(info: RunInfo, session: Session) -> bool:
    try:
        with open(info.run_dir / "stdout.log", "rb") as f:
            f.seek(session.log_offset)
            data = f.read(LOG_CHUNK)
    except FileNotFoundError:
        return False
    end = data.rfind(b"\n") + 1  # a partial last line waits for the next tick
    if not end:
        return False
    session.log_offset += end
    # Progress bars redraw with carriage returns: keep what the last one says.
    lines = [line.rsplit("\r", 1)[-1] for line in data[:end].decode(errors="replace").splitlines()]
    session.log_lines = (session.log_lines + lines)[-LOG_LINES:]
    return True


def view(session: Session, info: RunInfo | None) -> tuple:
    """The Train step's outputs for the watched run, in OUTPUTS' order."""
    if info is None:
        return (gr.skip(),) * 2 + ("No run yet.", progress_html(None, None, None), "", None, None, "", "")
    step = session.last_log.get("step", 0)
    total = session.total_steps
    eta = None
    if session.started_at and step and total and info.status == "running":
        eta = (time.time() - session.started_at) / step * (total - step)
    if info.status == "succeeded":
        step = total or step
    metrics = []
    last = session.last_log
    if last.get("tokens_per_second"):
        metrics.append(f"**{last['tokens_per_second']:,.0f}** tokens/s")
    if last.get("gpu_memory_gib"):
        metrics.append(f"GPU memory **{last['gpu_memory_gib']:.1f} GiB**")
    if last.get("loss") is not None:
        metrics.append(f"loss **{last['loss']:.3f}**")
    if session.final and session.final["event"] == "finished" and session.final.get("train_runtime_s"):
        metrics.append(f"took {_duration(session.final['train_runtime_s'])}")
    error = ""
    if info.status == "failed":
        final = session.final or {}
        sentence = final.get("error") or info.reason or "The run failed."
        hint = final.get("hint") or "Open the training log below for details."
        error = f"### ✗ {html.escape(sentence)}\n\n**What to do:** {html.escape(hint)}"
    live = info.status in ACTIVE
    notes = f"  \n{html.escape(session.auto_batch)}" if session.auto_batch else ""
    if session.compiled and not session.last_log and info.status == "running":
        notes += f"  \n{COMPILING}"
    return (
        gr.update(interactive=not live and session.train_data is not None),
        gr.update(interactive=info.status in ("queued", "running")),
        status_line(info, session.queue_position) + notes,
        progress_html(step, total, eta),
        " · ".join(metrics),
        _frame(session.points, "train"),
        _frame(session.points, "eval"),
        error,
        "\n".join(session.log_lines),
    )


def status_line(info: RunInfo, queue_position: int | None = None) -> str:
    words = {
        "queued": f"… Waiting for the GPU: number {queue_position or 1} in the queue. It starts when the runs "
        "ahead of it end; you can close this page meanwhile.",
        "running": "Training…",
        "stopping": "■ Stopping: saving a checkpoint, then ending every process of the run…",
        "stopped": "■ Stopped. You can resume it from the Results step.",
        "succeeded": "✓ Finished. Download the adapter in Results, or try it in step 5.",
        "failed": "✗ The run failed.",
    }
    return f"{words.get(info.status, info.status)}  \nRun `{info.run_id}`"


def _frame(points: list[dict], split: str) -> pd.DataFrame | None:
    """One split's points; None while there are none (an empty first frame leaves the plot blank for good)."""
    rows = [p for p in points if p["split"] == split]
    return pd.DataFrame(rows, columns=["step", "loss"]) if rows else None


def poll(ctx: Context, session: Session) -> tuple:
    """A timer tick: new bytes only; nothing is sent when nothing changed."""
    if session.run_id is None:
        return (gr.skip(),) * OUTPUTS
    try:
        info, changed = follow(ctx, session)
    except KeyError:  # its folder was deleted
        session.run_id = None
        return view(session, None)
    return view(session, info) if changed else (gr.skip(),) * OUTPUTS


def newest_active_run(ctx: Context, owner: str | None) -> RunInfo | None:
    for info in list_runs(ctx.runs_dir):
        if info.owner == owner and info.status in ACTIVE:
            return info
    return None
