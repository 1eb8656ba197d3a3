"""Step 2: the model and the preset. A recommendation from this machine's hardware, a memory
estimate with a verdict, the basic knobs, every engine flag under "Advanced", and the exact command.

The Advanced form is generated from TrainConfig's fields: a field's name is its UI key, its label
is derived from the name and its help text is the field's own, so nothing is listed twice.
"""

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine.config import FIELDS, TrainConfig, coerce, format_value, padded_tokens
from engine.launch import build_command, command_text
from engine.memory import estimate_memory
from engine.presets import Preset, list_presets, load_preset, make_config, recommend_preset
from ui.common import CURATED, TINY_MODEL, Context

# Set elsewhere: the model box and the data step fill these; the launcher sets output and events
# per run (DESIGN.md's run folder).
NOT_IN_FORM = ("model_id", "train_data", "max_length", "output_dir", "events_file")
BASIC = ("num_train_epochs", "learning_rate", "lora_r", "per_device_train_batch_size")
ADVANCED = tuple(name for name in FIELDS if name not in NOT_IN_FORM + BASIC)
FORM = BASIC + ADVANCED  # the order of the flag components in every handler's inputs
GROUP_TITLES = {
    "data": "Data", "model": "Model and adapter", "training": "Optimisation", "hardware": "Hardware and precision",
    "output": "Logging, evaluation and checkpoints", "tracking": "TrueFoundry tracking",
}  # fmt: skip


@dataclass
class ModelStep:
    hardware: gr.Markdown
    model: gr.Dropdown
    preset: gr.Radio
    preset_info: gr.Markdown
    estimate: gr.Markdown
    flags: dict[str, gr.components.Component]  # FORM's names → components
    command: gr.Textbox
    problems: gr.Markdown


ACRONYMS = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA", "ddp": "DDP", "ia3": "IA3", "peft": "PEFT",
            "bf16": "bf16", "fp16": "fp16", "lr": "LR", "mlfoundry": "TrueFoundry"}


def label(name: str) -> str:
    """The flag's name in words: `use_qlora` → "Use QLoRA"."""
    words = [ACRONYMS.get(w, w) for w in name.split("_")]
    return " ".join([words[0][:1].upper() + words[0][1:], *words[1:]])


def _component(f: dataclasses.Field) -> gr.components.Component:
    """The input for one engine flag: its type decides the widget, its metadata the words."""
    common = dict(label=label(f.name), info=f"{f.metadata['help']} (--{f.name})", elem_id=f"flag-{f.name}")
    if f.type is bool:
        return gr.Checkbox(**common)
    if isinstance(f.type, type) and issubclass(f.type, enum.Enum):
        return gr.Dropdown(choices=[m.value for m in f.type], **common)
    if f.type is int:
        return gr.Number(precision=0, **common)
    if f.type is float:
        return gr.Number(**common)
    return gr.Textbox(placeholder="NA" if f.default is None else "", **common)  # str, paths, lists


def form_value(value: Any) -> Any:
    """A config value as its widget shows it: NA and auto become an empty box, enums their text."""
    if value is None:
        return ""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return format_value(value)
    return value


def preset_defaults(preset: Preset) -> TrainConfig:
    """TrainConfig's defaults with the preset's flags on top: what the form starts from."""
    return make_config(preset)


def model_choices(ctx: Context) -> list[tuple[str, str]]:
    """The curated models; in demo mode, the allowed ones only."""
    curated = {m.id: f"{m.id} · {m.size}" if m.id != TINY_MODEL else f"Tiny offline model · {m.size}" for m in CURATED}
    if ctx.demo is not None:
        return [(curated.get(model, model), model) for model in ctx.demo.models]
    return [(text, model) for model, text in curated.items()]


def hardware_markdown(ctx: Context) -> tuple[str, Preset]:
    hw = ctx.hardware
    preset, reason = recommend_preset(hw)
    if hw.gpus:
        gpus = "\n".join(
            f"- GPU {g.index}: **{g.name}**, {g.memory_gib:.0f} GiB ({g.used_gib:.1f} in use), "
            f"compute capability {g.compute_capability[0]}.{g.compute_capability[1]}"
            + ("" if g.bf16 else " (no bfloat16)")
            for g in hw.gpus
        )
    else:
        gpus = "- No NVIDIA GPU found."
    return (
        f"**This machine**\n{gpus}\n- {hw.cpu_count} CPU cores, {hw.ram_gib:.0f} GiB memory\n\n"
        f"**Recommended: {preset.title}.** {reason}"
    ), preset


def build_model_step(ctx: Context) -> ModelStep:
    presets = list_presets()
    text, recommended = hardware_markdown(ctx)
    defaults = preset_defaults(recommended)
    hardware = gr.Markdown(text, elem_id="hardware")
    choices = model_choices(ctx)
    default = TINY_MODEL if not ctx.hardware.gpus else "mistralai/Mistral-7B-Instruct-v0.2"
    if default not in [model for _, model in choices]:
        default = choices[0][1]
    with gr.Row():
        with gr.Column(scale=3):
            model = gr.Dropdown(
                choices=choices, value=default,
                allow_custom_value=ctx.demo is None, label="Base model",
                info="Pick one, or type any Hugging Face model id (org/name) or a folder on this machine."
                if ctx.demo is None else "This demo trains these models only.",
            )
            preset = gr.Radio(
                choices=[(p.title, p.name) for p in presets], value=recommended.name, label="Preset",
                info="How training uses your hardware. The recommended one suits this machine.",
            )
            preset_info = gr.Markdown(preset_markdown(recommended))
        with gr.Column(scale=2):
            estimate = gr.Markdown(elem_id="memory-estimate")
    flags: dict[str, gr.components.Component] = {}
    gr.Markdown("**Basic settings**")
    with gr.Row():
        for name in BASIC:
            flags[name] = _component(FIELDS[name])
    with gr.Accordion("Advanced: every engine flag", open=False):
        gr.Markdown("Each setting is a flag of `python -m engine.train`; the preset fills sensible values.")
        for group, title in GROUP_TITLES.items():
            names = [n for n in ADVANCED if FIELDS[n].metadata["group"] == group]
            with gr.Accordion(title, open=False):
                for start in range(0, len(names), 3):
                    with gr.Row():
                        for name in names[start:start + 3]:
                            flags[name] = _component(FIELDS[name])
    for name, component in flags.items():
        component.value = form_value(getattr(defaults, name))
    problems = gr.Markdown(elem_id="config-problems")
    command = gr.Textbox(label="The exact command (runs the same training from a terminal, from the app's folder)",
                         lines=3, max_lines=10, interactive=False, buttons=["copy"], elem_id="command")
    return ModelStep(hardware, model, preset, preset_info, estimate, flags, command, problems)


def preset_markdown(preset: Preset) -> str:
    return f"{preset.description}\n\n*Needs:* {preset.hardware}"


def form_config(preset_name: str, model_id: str, train_data: str, max_length: int, values: list) -> TrainConfig:
    """The preset's flags, then the form's values; ValueError lists every bad field."""
    preset = load_preset(preset_name)
    typed, problems = {}, []
    for name, value in zip(FORM, values, strict=True):
        if isinstance(value, str) and not value.strip():
            value = None if FIELDS[name].default is None else value  # an empty optional box means NA
        try:
            typed[name] = coerce(name, value)
        except ValueError as e:
            problems.append(f"{label(name)}: {e}")
    if problems:
        raise ValueError("; ".join(problems))
    return make_config(preset, **typed, model_id=model_id, train_data=train_data, max_length=int(max_length))


def gpus_for(ctx: Context, preset: Preset) -> list[int]:
    return [g.index for g in ctx.hardware.gpus] if preset.needs_gpu else []


def estimate_markdown(ctx: Context, preset: Preset, config: TrainConfig, model: str) -> str:
    gpus = gpus_for(ctx, preset)
    on_gpu = bool(gpus)
    available = min((g.memory_gib for g in ctx.hardware.gpus), default=None) if on_gpu else ctx.hardware.ram_gib
    try:
        estimate = estimate_memory(ctx.model_shape(model), config, num_gpus=max(1, len(gpus)),
                                   zero_stage=preset.zero_stage, available_gib=available or None)
    except ValueError as e:  # a model whose shape is unknown, or optim_args that do not parse
        return f"**Memory estimate:** not available: {e}."
    icon = {"fits": "✓", "tight": "⚠", "will not fit": "✗"}.get(estimate.verdict, "ℹ")
    where = "per GPU" if on_gpu else "of this computer's memory (training on the CPU)"
    if preset.needs_gpu and not ctx.hardware.gpus:
        return (f"✗ **This preset needs an NVIDIA GPU and none was found.** Pick the CPU preset, or run the app "
                f"on a GPU machine. (Estimate: about {estimate.gib_per_gpu:.1f} GiB per GPU.)")
    parts = "\n".join(f"- {name}: {gib:.2f} GiB" for name, gib in estimate.parts.items())
    verdict = {"fits": "fits", "tight": "is tight: it may run out of memory", "will not fit": "will not fit"}
    headline = (
        f"{icon} **Memory: about {estimate.gib_per_gpu:.1f} GiB {where}, of {estimate.available_gib:.0f} GiB: "
        f"{verdict.get(estimate.verdict, estimate.verdict)}.**"
        if estimate.available_gib else f"{icon} **Memory: about {estimate.gib_per_gpu:.1f} GiB {where}.**"
    )
    advice = ("\n\nTo fit: " + "; or ".join(estimate.advice) + ".") if estimate.advice else ""
    if estimate.grown_pack_tokens:
        advice += (f"\n\nPacked passes grow to {estimate.grown_pack_tokens:,} tokens to spend free memory on "
                   f"speed; with {label('pack_tokens')} {padded_tokens(config):,} this run needs about "
                   f"{estimate.least_gib_per_gpu:.1f} GiB.")
    return (
        f"{headline}{advice}\n\n<details><summary>How it adds up (worst case: every example "
        f"{config.max_length:,} tokens)</summary>\n\n{parts}\n\n</details>"
    )


def describe(ctx: Context, preset_name: str, model: str, train_data: str | None, max_length: int,
             values: list) -> tuple[str, str, str]:
    """The estimate, the exact command and any form problems, for the current choices."""
    preset = load_preset(preset_name)
    try:
        config = form_config(preset_name, model, train_data or "data.jsonl", max_length, values)
    except ValueError as e:
        return "", "", f"✗ {e}"
    estimate = estimate_markdown(ctx, preset, config, model)
    # The command as the run will get it; the launcher fills the run folder's name at start.
    shown = dataclasses.replace(
        config, model_id=model if model != TINY_MODEL else "<tiny model folder>",
        output_dir="runs/<run_id>/output", events_file="runs/<run_id>/events.jsonl",
    )
    return estimate, command_text(*build_command(preset, shown, gpus_for(ctx, preset), port=29500)), ""


def preset_form_values(preset_name: str) -> list:
    """The form's values after choosing a preset (its flags over the engine's defaults)."""
    defaults = preset_defaults(load_preset(preset_name))
    return [form_value(getattr(defaults, name)) for name in FORM]
