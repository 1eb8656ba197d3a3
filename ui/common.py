"""What every step shares: the server's settings, a browser tab's state, and the model list.

Session state is a small dataclass held in `gr.State`, one per browser tab. A run's files stay
the truth: a Session only remembers which run the tab watches and how far it has read.
"""

import functools
import json
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from engine import launch
from engine.hardware import Hardware
from engine.memory import ModelShape
from engine.tiny_model import build_tiny_model
from ui.hosting import DemoLimits

TINY_MODEL = "tiny (offline test model)"


@dataclass(frozen=True)
class Model:
    id: str  # what the model box holds and model_id gets (TINY_MODEL is built on demand)
    size: str  # in words, for the picker
    config: dict  # the config.json fields the memory estimate needs, so it works offline


# A short list for people who do not know where to start; any hub id or local folder also works.
# Shapes are copied from each model's config.json.
CURATED = [
    Model(TINY_MODEL, "a few MB, random weights: for trying the app on a CPU", {}),
    Model("Qwen/Qwen2.5-0.5B-Instruct", "0.5B", dict(
        hidden_size=896, num_hidden_layers=24, intermediate_size=4864, vocab_size=151936,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    Model("Qwen/Qwen2.5-1.5B-Instruct", "1.5B", dict(
        hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, vocab_size=151936,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)),
    Model("HuggingFaceTB/SmolLM2-1.7B-Instruct", "1.7B", dict(
        hidden_size=2048, num_hidden_layers=24, intermediate_size=8192, vocab_size=49152,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=True)),
    Model("mistralai/Mistral-7B-Instruct-v0.2", "7B, the seed recipe's model", dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=32000,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    Model("Qwen/Qwen2.5-7B-Instruct", "7.6B", dict(
        hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, vocab_size=152064,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)),
    Model("meta-llama/Llama-3.1-8B-Instruct", "8B, needs a Hugging Face login (gated)", dict(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=128256,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
]  # fmt: skip


@dataclass
class Context:
    """Server-wide settings, fixed when the app starts."""

    runs_dir: Path
    cache_dir: Path  # the tiny offline model
    hardware: Hardware
    demo: DemoLimits | None = None  # demo mode's limits (--demo)
    hosted: bool = False  # people share this app (--auth or --demo): a form may name none of the server's files
    _tiny_lock: threading.Lock = field(default_factory=threading.Lock)

    @functools.cached_property
    def downloads_dir(self) -> Path:
        """Zips and logs prepared for download. Gradio copies a file it is handed into its own cache,
        under a secret content hash, and serves only that copy: this folder is no allowed path, so no
        URL reaches what it holds, and another person cannot guess the copy's URL."""
        return Path(tempfile.mkdtemp(prefix="finetune-studio-downloads-"))

    def model_path(self, model: str) -> str:
        """The model_id to train or load: the tiny model is built on first use, offline.

        In demo mode only the allowed models: ValueError for any other name or path.
        """
        if self.demo is not None:
            self.demo.check_model(model)
        if model != TINY_MODEL:
            return model.strip()
        folder = self.cache_dir / "tiny-mistral"
        with self._tiny_lock:  # two tabs asking at once must not write the same files together
            if not (folder / "model.safetensors").is_file():
                build_tiny_model(folder)
        return str(folder)

    def model_shape(self, model: str) -> ModelShape:
        """The shape of a curated model, or read from a folder's or the hub's config.json.

        Raises ValueError saying what to do when the config cannot be read.
        """
        known = {m.id: m.config for m in CURATED if m.config}
        if model in known:
            return ModelShape.from_config(known[model])
        path = Path(self.model_path(model)) / "config.json"
        try:
            if not path.is_file():
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(model.strip(), "config.json"))
            return ModelShape.from_config(json.loads(path.read_text()))
        except KeyError as e:
            raise ValueError(f"{model}'s config.json has no {e}: the estimate knows Llama-style models only") from None
        except Exception as e:  # offline, gated, misspelt: all mean "no estimate", said plainly
            raise ValueError(
                f"could not read {model}'s config.json ({type(e).__name__}); check the name, your network, "
                "or log in with `huggingface-cli login` for a gated model"
            ) from None


@dataclass
class Session:
    """One browser tab: the checked data file and the run it watches, with its read offsets."""

    data_path: str | None = None  # the file chosen in step 1
    train_data: str | None = None  # the same file once checked and found without problems
    run_id: str | None = None
    events_offset: int = 0
    log_offset: int = 0
    status: str | None = None
    queue_position: int | None = None  # while queued: 1 starts next
    total_steps: int | None = None
    started_at: float | None = None
    auto_batch: str | None = None  # with auto_find_batch_size: what the finder chose and why
    compiled: bool = False  # torch_compile runs: the first step takes longer while it compiles
    points: list[dict] = field(default_factory=list)  # step, loss, split: the loss plot
    log_lines: list[str] = field(default_factory=list)  # the tail of stdout.log
    last_log: dict = field(default_factory=dict)  # the newest `log` event
    final: dict | None = None  # the finished / stopped / failed event

    def watch(self, run_id: str) -> None:
        """Follows another run from its first byte (the events replay its history)."""
        fresh = Session(data_path=self.data_path, train_data=self.train_data, run_id=run_id)
        self.__dict__.update(fresh.__dict__)


def owner_of(request: gr.Request | None) -> str | None:
    """Who is asking: the login name under `launch(auth=...)`, else None (a single-user app).

    The hook for multi-user isolation: runs are started with this owner and listed by it.
    """
    return getattr(request, "username", None) if request is not None else None


def owned_run(ctx: Context, run_id: str | None, request: gr.Request | None) -> launch.RunInfo:
    """The run if the person asking owns it. Another person's run is "not found", in the very words
    of a missing one, so a request tells nothing about runs that are not yours."""
    try:
        info = launch.run_status(str(run_id), ctx.runs_dir)
    except KeyError:
        info = None
    if info is None or info.owner != owner_of(request):
        raise gr.Error(f"No run {run_id!r}: pick one of yours in Results (or list_runs).")
    return info
