"""The guided app: five steps, each built by its module, with every listener registered here.

Handlers are thin: they turn component values into calls of the step modules and the engine's
launcher, and raise gr.Error with a sentence a person can act on.
"""

import dataclasses
import json

import gradio as gr

from engine import launch
from engine.config import from_dict
from engine.data import check_jsonl
from engine.events import read_events
from engine.presets import list_presets, load_preset, make_config
from ui import data as data_step
from ui import model as model_step
from ui import playground as playground_step
from ui import results as results_step
from ui import train as train_step
from ui.common import TINY_MODEL, Context, Session, owned_run, owner_of
from ui.hosting import allowed_data, check_start

THEME = gr.themes.Soft(primary_hue="blue", secondary_hue="slate")
CSS = """
.gradio-container { max-width: 1180px !important; margin: 0 auto; }
.fs-progress { height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; }
.fs-bar { height: 100%; background: var(--primary-500); transition: width 0.4s ease; }
.fs-progress-text { margin-top: 4px; font-size: 0.9em; color: var(--body-text-color-subdued); }
"""
MAX_UPLOAD = "2gb"


def launch_kwargs(ctx: Context) -> dict:
    """What `launch()` needs besides host, port and auth (theme and css moved there in Gradio 6).

    No allowed_paths: Gradio serves only its own copies of the files handlers return. The runs and
    the model cache are blocked besides, so no slip ever hands one of their files to a browser.
    """
    upload = int(ctx.demo.max_upload_mb * 1e6) if ctx.demo else MAX_UPLOAD  # bytes, as DemoLimits counts them
    return dict(theme=THEME, css=CSS, max_file_size=upload, enable_monitoring=False, ssr_mode=False,
                footer_links=["api"], run_history=False, blocked_paths=[str(ctx.runs_dir), str(ctx.cache_dir)])


def _histogram(frame) -> gr.BarPlot:
    return gr.BarPlot(value=frame, sort=list(frame["tokens"]))  # bins in length order, not alphabetical


def build_app(ctx: Context) -> gr.Blocks:
    with gr.Blocks(title="Finetune Studio") as demo:
        session = gr.State(Session())
        gr.Markdown("# Finetune Studio\nTeach a language model from your own examples: a JSONL file in, "
                    "a trained adapter out. Go through the steps in order.")
        if ctx.demo:
            gr.Markdown(ctx.demo.markdown(), elem_id="demo-limits")
        with gr.Tabs() as tabs:
            with gr.Tab("1 · Data", id="data"):
                data = data_step.build_data_step()
                to_model = gr.Button("Next: choose a model →")
            with gr.Tab("2 · Model and preset", id="model"):
                model = model_step.build_model_step(ctx)
                to_train = gr.Button("Next: train →")
            with gr.Tab("3 · Train", id="train"):
                train = train_step.build_train_step()
            with gr.Tab("4 · Results", id="results") as results_tab:
                results = results_step.build_results_step()
            with gr.Tab("5 · Try it", id="try") as try_tab:
                play = playground_step.build_playground_step()
        flags = [model.flags[name] for name in model_step.FORM]
        train_outputs = [train.start, train.stop, train.status, train.progress, train.metrics, train.loss,
                         train.eval_loss, train.error, train.log]

        # ---- step 1: data ----
        def choose_upload(path: str | None, s: Session) -> tuple[Session, None]:
            s.data_path = path
            return s, None

        def choose_example(name: str | None, s: Session) -> tuple[Session, None]:
            s.data_path = data_step.example_files().get(name) if name else None
            return s, None

        def check(s: Session, model_id: str, max_length: int) -> tuple:
            if not s.data_path:
                s.train_data = None
                return (s, "Upload a file or pick an example to check it.", gr.skip(), gr.skip(),
                        gr.Row(visible=False), gr.update(interactive=False))
            report, counted_with = data_step.check_data(ctx, s.data_path, model_id, max_length)
            ok = not report.problems
            s.train_data = s.data_path if ok else None
            return (
                s, data_step.summary_markdown(report, counted_with),
                data_step.preview_messages(s.data_path) if ok else [],
                _histogram(data_step.histogram_frame(report)), gr.Row(visible=ok),
                gr.update(interactive=ok and s.status not in launch.ACTIVE),
            )

        check_outputs = [session, data.summary, data.preview, data.histogram, data.views, train.start]
        check_inputs = [session, model.model, data.max_length]
        checked = [
            gr.on([data.upload.upload, data.upload.clear], choose_upload, [data.upload, session],
                  [session, data.example], api_visibility="private").then(
                check, check_inputs, check_outputs, api_visibility="private"),
            data.example.input(choose_example, [data.example, session], [session, data.upload],
                               api_visibility="private").then(
                check, check_inputs, check_outputs, api_visibility="private"),
            gr.on([data.max_length.release, model.model.input], check, check_inputs, check_outputs,
                  api_visibility="private"),
        ]
        to_model.click(lambda: gr.Tabs(selected="model"), None, tabs, api_visibility="private")

        # ---- step 2: model and preset ----
        def describe(s: Session, preset: str, model_id: str, max_length: int, *values) -> tuple:
            return model_step.describe(ctx, preset, model_id, s.train_data, max_length, list(values))

        describe_inputs = [session, model.preset, model.model, data.max_length, *flags]
        describe_outputs = [model.estimate, model.command, model.problems]
        model.preset.input(
            lambda name: [model_step.preset_markdown(load_preset(name)), *model_step.preset_form_values(name)],
            model.preset, [model.preset_info, *flags], api_visibility="private",
        ).then(describe, describe_inputs, describe_outputs, api_visibility="private")
        # After a data check (its path goes into the command), and on any change of a flag.
        for event in checked:
            event.then(describe, describe_inputs, describe_outputs, api_visibility="private", show_progress="hidden")
        gr.on([f.input for f in flags], describe, describe_inputs, describe_outputs,
              api_visibility="private", show_progress="hidden")
        to_train.click(lambda: gr.Tabs(selected="train"), None, tabs, api_visibility="private")

        # ---- step 3: train ----
        # The request comes first: Gradio passes it by position, which *values would swallow.
        def start(request: gr.Request, s: Session, preset_name: str, model_id: str, max_length: int,
                  *values) -> tuple:
            if s.train_data is None:
                raise gr.Error("Check your data in step 1 first: Start needs a file with no problems.")
            try:
                preset = load_preset(preset_name)
                config = model_step.form_config(preset_name, ctx.model_path(model_id), s.train_data, max_length,
                                                list(values))
                check_start(ctx, owner_of(request), preset, config)
                info = launch.start_run(preset, config, runs_dir=ctx.runs_dir, owner=owner_of(request))
            except ValueError as e:
                raise gr.Error(f"Could not start: {e}") from None
            playground_step.release_gpus(info.gpus)
            s.watch(info.run_id)
            info, _ = train_step.follow(ctx, s)
            return s, *train_step.view(s, info)

        def stop(s: Session, request: gr.Request) -> tuple:
            if s.run_id:
                launch.stop_run(owned_run(ctx, s.run_id, request).run_id, ctx.runs_dir)
            info, _ = train_step.follow(ctx, s)
            return s, *train_step.view(s, info)

        train.start.click(start, [session, model.preset, model.model, data.max_length, *flags],
                          [session, *train_outputs], api_visibility="private", concurrency_id="runs")
        train.stop.click(stop, session, [session, *train_outputs], api_visibility="private")
        train.timer.tick(lambda s: (s, *train_step.poll(ctx, s)), session, [session, *train_outputs],
                         api_visibility="private", concurrency_limit=None, show_progress="hidden")

        # ---- step 4: results ----
        def refresh(current: str | None, request: gr.Request) -> tuple:
            table, ids = results_step.runs_table(ctx, owner_of(request))
            return table, gr.update(choices=ids, value=current if current in ids else (ids[0] if ids else None))

        def show(run_id: str | None, request: gr.Request) -> tuple:
            if run_id:
                owned_run(ctx, run_id, request)
            shown = results_step.details(ctx, run_id)
            if run_id:  # small files: prepared now, so a click downloads at once
                adapter, log = shown[1], shown[2]
                if adapter["visible"]:
                    adapter["value"] = results_step.adapter_zip(ctx, run_id)
                if log["visible"]:
                    log["value"] = results_step.log_file(ctx, run_id)
            return shown

        def prepare_merged(run_id: str, request: gr.Request) -> dict:
            return gr.update(visible=True, value=results_step.merged_zip(ctx, owned_run(ctx, run_id, request).run_id))

        def watch(s: Session, run_id: str, request: gr.Request) -> tuple:
            s.watch(owned_run(ctx, run_id, request).run_id)
            info, _ = train_step.follow(ctx, s)
            return s, gr.Tabs(selected="train"), *train_step.view(s, info)

        def resume(s: Session, run_id: str, request: gr.Request) -> tuple:
            info = owned_run(ctx, run_id, request)
            try:
                config = json.loads((info.run_dir / "config.json").read_text())
                check_start(ctx, info.owner, load_preset(config.pop("preset")), from_dict(config))
                info = launch.resume_run(run_id, ctx.runs_dir)
            except ValueError as e:
                raise gr.Error(f"Could not resume: {e}") from None
            playground_step.release_gpus(info.gpus)
            return watch(s, info.run_id, request)

        results_outputs = [results.table, results.run]
        gr.on([results.refresh.click, results_tab.select], refresh, results.run, results_outputs,
              api_visibility="private")
        results.run.change(show, results.run, [results.details, results.adapter, results.log, results.merged,
                                               results.merged_file, results.resume, results.watch],
                           api_visibility="private")
        results.merged.click(prepare_merged, results.run, results.merged_file, api_visibility="private")
        results.watch.click(watch, [session, results.run], [session, tabs, *train_outputs],
                            api_visibility="private")
        results.resume.click(resume, [session, results.run], [session, tabs, *train_outputs],
                             api_visibility="private", concurrency_id="runs")

        # ---- step 5: try it ----
        def runs_to_try(current: str | None, request: gr.Request) -> gr.Dropdown:
            ids = playground_step.finished_runs(ctx, owner_of(request))
            return gr.update(choices=ids, value=current if current in ids else (ids[0] if ids else None))

        def pick_to_try(run_id: str | None, request: gr.Request) -> tuple:
            if run_id:
                owned_run(ctx, run_id, request)
            return [], [], playground_step.run_note(ctx, run_id)

        def ask(run_id: str, prompt: str, max_new_tokens: int, base: list, tuned: list, request: gr.Request) -> tuple:
            if run_id:
                owned_run(ctx, run_id, request)
            try:
                answers = playground_step.answer(ctx, run_id, prompt, max_new_tokens)
            except ValueError as e:
                return gr.skip(), base, tuned, f"⚠ {e}"
            question = {"role": "user", "content": prompt}
            return ("", base + [question, {"role": "assistant", "content": answers["base"] or "(nothing)"}],
                    tuned + [question, {"role": "assistant", "content": answers["tuned"] or "(nothing)"}],
                    playground_step.run_note(ctx, run_id))

        try_tab.select(runs_to_try, play.run, play.run, api_visibility="private")
        play.run.change(pick_to_try, play.run, [play.base, play.tuned, play.note], api_visibility="private")
        gr.on([play.send.click, play.prompt.submit], ask,
              [play.run, play.prompt, play.max_new_tokens, play.base, play.tuned],
              [play.prompt, play.base, play.tuned, play.note], api_visibility="private",
              concurrency_id="models", concurrency_limit=1)

        # ---- a page (re)load: reattach to a live run, fill the form's derived views ----
        def on_load(request: gr.Request, s: Session, preset: str, model_id: str, max_length: int, *values) -> tuple:
            live = train_step.newest_active_run(ctx, owner_of(request))
            shown = (gr.skip(),) * len(train_outputs)
            if live is not None:
                s.watch(live.run_id)
                info, _ = train_step.follow(ctx, s)
                shown = train_step.view(s, info)
            return s, *shown, *model_step.describe(ctx, preset, model_id, s.train_data, max_length, list(values))

        demo.load(on_load, describe_inputs, [session, *train_outputs, *describe_outputs], api_visibility="private")
        _register_api(ctx)
    return demo


def _register_api(ctx: Context) -> None:
    """Named endpoints for scripts (gradio_client): plain JSON in and out."""

    def validate_data(train_data: gr.FileData, model: str = TINY_MODEL, max_length: int = 2048) -> dict:
        """Checks a JSONL file: format, example count, problems with line numbers, token lengths.
        Pass the returned `train_data` to start_run."""
        path = train_data["path"] if isinstance(train_data, dict) else train_data.path
        report, _ = data_step.check_data(ctx, path, model, max_length)
        fields = dataclasses.asdict(report)
        # No "path" keys: gradio_client takes any object holding one for a file to download.
        fields.pop("token_lengths")
        fields.pop("path")
        fields["problems"] = [{"line": p.line, "field": p.field, "message": p.message} for p in report.problems]
        return {**fields, "ok": not report.problems, "train_data": path}

    def start_run(train_data: str, preset: str = "cpu-tiny", model: str = TINY_MODEL, settings: dict | None = None,
                  request: gr.Request = None) -> dict:
        """Starts a run: train_data from validate_data (or a bundled example's path), a preset name,
        a model (hub id, folder, or the tiny offline model), and engine flags in `settings`."""
        try:
            path = allowed_data(train_data)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        if not check_jsonl(path).ok:
            raise gr.Error(f"{train_data} has problems; call validate_data to list them")
        names = [p.name for p in list_presets()]
        if preset not in names:  # a name, never the path of some YAML on the server
            raise gr.Error(f"No preset {preset!r}; the presets are {', '.join(names)}")
        try:
            chosen = load_preset(preset)
            config = make_config(chosen, **(settings or {}), model_id=ctx.model_path(model),
                                            train_data=path)
            check_start(ctx, owner_of(request), chosen, config)
            info = launch.start_run(chosen, config, runs_dir=ctx.runs_dir, owner=owner_of(request))
        except ValueError as e:
            raise gr.Error(f"Could not start: {e}") from None
        playground_step.release_gpus(info.gpus)
        return info.to_json()

    def run_status(run_id: str, events_offset: int = 0, request: gr.Request = None) -> dict:
        """A run's state, its place in the queue while it waits (1: next), and the events appended
        since byte `events_offset` (pass the returned `events_offset` next time), each as one JSON
        string, as in events.jsonl."""
        info = owned_run(ctx, run_id, request)
        events, offset = read_events(info.run_dir / "events.jsonl", events_offset)
        # Strings, not objects: gradio_client downloads any object with a "path" key (checkpoint events).
        return {**info.to_json(), "queue_position": launch.queue_position(info.run_id, ctx.runs_dir),
                "events": [json.dumps(e) for e in events], "events_offset": offset}

    def stop_run(run_id: str, request: gr.Request = None) -> dict:
        """Stops a run: every process of it, after a checkpoint when it can save one."""
        return launch.stop_run(owned_run(ctx, run_id, request).run_id, ctx.runs_dir).to_json()

    def list_runs(request: gr.Request = None) -> list[dict]:
        """Your runs, newest first."""
        return [r.to_json() for r in launch.list_runs(ctx.runs_dir) if r.owner == owner_of(request)]

    for fn in (validate_data, start_run, run_status, stop_run, list_runs):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=None if fn is not start_run else 1,
               concurrency_id="runs" if fn is start_run else None)
