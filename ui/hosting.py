"""Hosting the app for several people: who may log in, what a demo visitor may start, which paths a
form may name.

`python app.py --auth alice:pw` (or a users file) gives each person a login and their own runs;
`--demo` adds the limits of demo.yaml, checked on the server for the UI and the API alike.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr
import yaml

from engine.config import TrainConfig
from engine.data import check_jsonl
from engine.launch import ACTIVE, list_runs
from engine.presets import Preset, list_presets

if TYPE_CHECKING:
    from ui.common import Context

REPO = Path(__file__).resolve().parent.parent
DEMO_LIMITS = REPO / "demo.yaml"
EXAMPLES_DIR = REPO / "examples"
_ON = {"1", "true", "yes", "on"}
_OFF = {"", "0", "false", "no", "off"}


# ---------------------------------------------------------------- logins


def _user(entry: str, where: str) -> tuple[str, str]:
    user, colon, password = entry.strip().partition(":")
    if not colon or not user.strip() or not password:
        # The entry itself is not echoed: it may hold most of a password.
        raise ValueError(f"{where}: expected user:password (a name, a colon, a password)")
    return user.strip(), password


def auth_users(entries: list[str], users_file: str | None = None) -> list[tuple[str, str]]:
    """The (user, password) pairs of `--auth` values (each `user:pw`, or several comma-separated)
    and of a users file (one `user:pw` a line, `#` comments, blank lines ignored).

    ValueError names the flag or the file and line of a bad entry, or a user given twice.
    """
    given = [entry for value in entries for entry in value.split(",") if entry.strip()]
    users = [_user(entry, f"--auth (or FINETUNE_STUDIO_AUTH) entry {n}") for n, entry in enumerate(given, 1)]
    if users_file:
        path = Path(users_file)
        if not path.is_file():
            raise ValueError(f"users file {users_file} not found; pass --auth_file an existing file")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                users.append(_user(line, f"{users_file}, line {number}"))
    names = [user for user, _ in users]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"user {twice[0]!r} is given more than once; keep one password per user")
    return users


# ---------------------------------------------------------------- demo limits


@dataclass(frozen=True)
class DemoLimits:
    """What one visitor of a demo may start; demo.yaml documents each limit."""

    max_upload_mb: float
    max_examples: int
    max_length: int
    max_epochs: float
    max_steps: int
    active_runs_per_user: int
    models: list[str]
    presets: list[str]

    def check_model(self, model: str) -> None:
        if model not in self.models:
            raise ValueError(f"this demo trains only these base models: {', '.join(self.models)}. Pick one of "
                             "them, or run Finetune Studio on your own machine to train any other")

    def check_run(self, preset: Preset, config: TrainConfig, active: list[str]) -> None:
        """ValueError with the limit a run breaks and what to do; `active` lists the person's live runs."""
        if preset.name not in self.presets:
            raise ValueError(f"this demo offers only the {', '.join(self.presets)} preset(s); pick one of them")
        name = Path(config.train_data).name
        megabytes = os.path.getsize(config.train_data) / 1e6
        if megabytes > self.max_upload_mb:
            raise ValueError(f"{name} is {megabytes:.3g} MB; this demo takes files up to {self.max_upload_mb:g} MB. "
                             "Use a smaller file")
        examples = check_jsonl(config.train_data).num_examples
        if config.max_num_samples:
            examples = min(examples, config.max_num_samples)
        if examples > self.max_examples:
            raise ValueError(f"{name} has {examples:,} examples; this demo trains on at most {self.max_examples:,}. "
                             f"Use a smaller file, or set Max num samples to {self.max_examples} or less")
        if config.max_length > self.max_length:
            raise ValueError(f"Max length is {config.max_length} tokens; this demo allows at most {self.max_length}. "
                             "Lower it in step 1")
        if config.num_train_epochs > self.max_epochs:
            raise ValueError(f"Num train epochs is {config.num_train_epochs:g}; this demo allows at most "
                             f"{self.max_epochs:g}. Lower it")
        if config.max_steps > self.max_steps:
            raise ValueError(f"Max steps is {config.max_steps}; this demo allows at most {self.max_steps}. Lower it, "
                             "or set -1 to train for the epochs")
        if len(active) >= self.active_runs_per_user:
            raise ValueError(f"you already have {len(active)} run(s) in progress ({', '.join(active)}); this demo "
                             f"runs {self.active_runs_per_user} per person at a time. Wait for it to end or stop it "
                             "in step 3, then start again")

    def markdown(self) -> str:
        return (f"**Demo mode.** Files up to {self.max_upload_mb:g} MB and {self.max_examples:,} examples, "
                f"max length {self.max_length:,} tokens, at most {self.max_epochs:g} epochs or {self.max_steps:,} "
                f"steps, {self.active_runs_per_user} run at a time per person; "
                f"models: {', '.join(self.models)}.")


def demo_limits_file(setting: str | None) -> Path | None:
    """The limits file a `--demo` / FINETUNE_STUDIO_DEMO setting names: off, on (demo.yaml) or a path."""
    value = (setting or "").strip()
    if value.lower() in _OFF:
        return None
    return DEMO_LIMITS if value.lower() in _ON else Path(value)


def load_demo_limits(path: Path = DEMO_LIMITS) -> DemoLimits:
    """demo.yaml into DemoLimits; ValueError names the file and the key that is wrong."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"demo limits {path}: cannot read it ({e})") from None
    fields = {f.name: f for f in dataclasses.fields(DemoLimits)}
    if not isinstance(data, dict):
        raise ValueError(f"demo limits {path}: expected the keys {', '.join(fields)}")
    wrong = sorted(set(data) ^ set(fields))
    if wrong:
        raise ValueError(f"demo limits {path}: {wrong[0]}: {'unknown key' if wrong[0] in data else 'missing'}; "
                         f"the keys are {', '.join(fields)}")
    for key, f in fields.items():  # f.type is the annotation's text (annotations are postponed here)
        want = {"float": (int, float), "int": int, "list[str]": list}[f.type]
        if not isinstance(data[key], want) or isinstance(data[key], bool) or (want is list and not data[key]):
            raise ValueError(f"demo limits {path}: {key}: expected {f.type.replace('list[str]', 'a list of names')}, "
                             f"got {data[key]!r}")
    known = {p.name for p in list_presets()}
    for name in data["presets"]:
        if name not in known:
            raise ValueError(f"demo limits {path}: presets: no preset {name!r}; known: {', '.join(sorted(known))}")
    return DemoLimits(**{**data, "models": [str(m) for m in data["models"]]})


# ---------------------------------------------------------------- what a run may name


def allowed_data(path: str) -> str:
    """A data path a form or API caller may use: a bundled example or a file uploaded to this app."""
    resolved = Path(path).resolve()
    roots = [EXAMPLES_DIR, Path(gr.utils.get_upload_folder()).resolve()]
    if not any(resolved.is_relative_to(root) for root in roots) or not resolved.is_file():
        raise ValueError(f"{path}: use a bundled example or the path validate_data returned for an uploaded file")
    return str(resolved)


def _check_paths(preset: Preset, config: TrainConfig) -> None:
    """On a shared server a form names no file of the server's own: every path flag of a run points
    into the app's uploads, the examples or the preset, so none can read another's files."""
    allowed_data(config.train_data)
    if config.eval_data:
        allowed_data(config.eval_data)
    if config.chat_template and "{{" not in config.chat_template and "{%" not in config.chat_template:
        raise ValueError("Chat template: paste the Jinja template itself; this app reads no file path here")
    if config.deepspeed not in (None, preset.deepspeed):
        raise ValueError("Deepspeed: this app uses the preset's DeepSpeed file; leave it NA")
    if config.resume_from_checkpoint not in (None, "true"):
        raise ValueError("Resume from checkpoint: resume a stopped run from the Results step instead")


def check_start(ctx: Context, owner: str | None, preset: Preset, config: TrainConfig) -> None:
    """Refuses a run this app must not start, saying why and what to do (ValueError).

    The one check behind Start in the UI, the start_run endpoint and Resume.
    """
    if ctx.hosted:
        _check_paths(preset, config)
    if ctx.demo is not None:
        active = [r.run_id for r in list_runs(ctx.runs_dir) if r.owner == owner and r.status in ACTIVE]
        ctx.demo.check_run(preset, config, active)
