import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.tiny_model import build_tiny_model, write_mistral_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_mistral_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def set_up_recipe(**flags):
    """An engine Recipe set up from flag values, each read as the command line reads it."""
    from engine import train
    from engine.config import from_dict

    recipe = train.Recipe(from_dict(flags))
    recipe.setup()
    return recipe


def mixed_lengths_jsonl(path: Path, words: list[str], rows: int = 24) -> Path:
    """Prompts of 3 to 40 random words (seed 0): packed passes of changing lengths."""
    import random

    rng = random.Random(0)
    return write_jsonl(path, [{"prompt": " ".join(rng.choices(words, k=rng.randint(3, 40))), "completion": " done."}
                              for _ in range(rows)])  # fmt: skip


def write_jsonl(path: Path, rows: list) -> Path:
    """Writes rows (dicts, or raw strings written as-is) one per line."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return path


# Peak RSS from /proc's VmHWM: getrusage's ru_maxrss survives exec, so a child forked from a big
# pytest process would report the parent's peak.
PEAK_MB = """
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""


def run_python(code: str, *args: str, env: dict | None = None) -> dict:
    """Runs `code` in a fresh Python from the repo root; returns the JSON line it prints."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=Path(__file__).resolve().parent.parent,
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])
