"""Presets: a YAML each in presets/ (launcher options + engine flags + who it is for).

A preset is data, validated when loaded: an unknown key or a bad value is an error naming the
file and the key.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.config import TrainConfig, coerce, from_dict
from engine.hardware import Hardware

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

# accelerate launch options a preset may set, with the values each accepts.
LAUNCHER_OPTIONS = {
    "use_deepspeed": (True, False),
    "cpu": (True, False),
}
REQUIRED = ("name", "title", "description", "hardware", "needs_gpu", "launcher", "train")
OPTIONAL = ("deepspeed", "min_compute_capability")


class PresetError(ValueError):
    pass


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    description: str  # for a person who is not an engineer
    hardware: str  # what it needs, in words
    needs_gpu: bool
    launcher: dict[str, Any]
    train: dict[str, Any]  # engine flags, typed
    deepspeed: str | None = None  # path of the DeepSpeed JSON
    min_compute_capability: float | None = None
    path: Path = field(default=PRESETS_DIR, compare=False)

    @property
    def zero_stage(self) -> int:
        """The DeepSpeed ZeRO stage it trains with; 0 without DeepSpeed."""
        from engine.zero import zero_stage

        return zero_stage(self.deepspeed)


def _load(path: Path) -> Preset:
    def fail(key: str, message: str) -> PresetError:
        return PresetError(f"{path}: {key}: {message}")

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PresetError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PresetError(f"{path}: expected a mapping of keys (name, title, ...)")
    unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise fail(unknown[0], f"unknown key; allowed: {', '.join(REQUIRED + OPTIONAL)}")
    for key in REQUIRED:
        if key not in data:
            raise fail(key, "missing")
    if data["name"] != path.stem:
        raise fail("name", f"{data['name']!r} must match the file name {path.stem!r}")
    for key, value in (data["launcher"] or {}).items():
        if key not in LAUNCHER_OPTIONS:
            raise fail(f"launcher.{key}", f"unknown option; allowed: {', '.join(LAUNCHER_OPTIONS)}")
        if value not in LAUNCHER_OPTIONS[key]:
            raise fail(f"launcher.{key}", f"{value!r} is not one of {LAUNCHER_OPTIONS[key]}")
    train = {}
    for key, value in (data["train"] or {}).items():
        try:
            train[key] = coerce(key, value)
        except ValueError as e:
            raise fail(f"train.{key}", str(e)) from None
    deepspeed = data.get("deepspeed")
    if deepspeed is not None:
        deepspeed = str(path.parent / deepspeed)
        if not Path(deepspeed).is_file():
            raise fail("deepspeed", f"file {deepspeed} not found")
    if data["launcher"].get("use_deepspeed") and not deepspeed:
        raise fail("deepspeed", "launcher.use_deepspeed is true but no DeepSpeed config file is named")
    return Preset(
        name=data["name"], title=data["title"], description=data["description"],
        hardware=data["hardware"], needs_gpu=bool(data["needs_gpu"]), launcher=data["launcher"] or {},
        train=train, deepspeed=deepspeed, min_compute_capability=data.get("min_compute_capability"),
        path=path,
    )


def list_presets(folder: Path = PRESETS_DIR) -> list[Preset]:
    return [_load(path) for path in sorted(folder.glob("*.yaml"))]


def load_preset(name: str, folder: Path = PRESETS_DIR) -> Preset:
    """A preset by name, or by the path of its YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(folder.glob("*.yaml")))
        raise PresetError(f"no preset {name!r}; known presets: {known}")
    return _load(path)


def make_config(preset: Preset, **values: Any) -> TrainConfig:
    """The preset's engine flags, then the user's values on top."""
    return from_dict({**preset.train, **values})


def recommend_preset(hardware: Hardware, folder: Path = PRESETS_DIR) -> tuple[Preset, str]:
    """The preset that suits this machine, and why, in words."""
    if not hardware.gpus:
        return load_preset("cpu-tiny", folder), (
            "No NVIDIA GPU was found, so training runs on the CPU: practical for tiny models only."
        )
    gpu = hardware.gpus[0]
    count = f"{len(hardware.gpus)} x {gpu.name}" if len(hardware.gpus) > 1 else gpu.name
    if not gpu.bf16:
        major, minor = gpu.compute_capability
        return load_preset("fp16-v100-t4", folder), (
            f"{count} (compute capability {major}.{minor}) has no bfloat16, so the fp16 preset is the "
            "one that runs."
        )
    why = (
        f"{count} ({gpu.memory_gib:.0f} GB) supports bfloat16; 4-bit QLoRA with ZeRO-2 uses the least "
        "memory, so larger batches and longer examples fit."
    )
    if len(hardware.gpus) > 1:  # ZeRO-3 splits the model across GPUs: no help with one
        why += " For a model too big to train on one of these GPUs, QLoRA + ZeRO-3 splits it across them."
    return load_preset("qlora-zero2", folder), why
