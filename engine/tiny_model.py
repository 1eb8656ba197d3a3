"""Tiny models with random weights and Mistral's real tokenizer, built locally.

Used by the tests, the demo in README.md and the `cpu-tiny` preset: nothing here touches the
model hub, so it works on a machine with no network.
"""

import json
import shutil
from pathlib import Path


def mistral_spm() -> Path:
    """Mistral-7B's SentencePiece model, which ships inside the mistral_common wheel.

    Imported when needed, not with the app: a GPU server without mistral_common still serves.
    """
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def write_mistral_tokenizer(folder: str | Path) -> Path:
    """Writes Mistral-7B's tokenizer into `folder`; AutoTokenizer converts it to a fast one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(mistral_spm(), folder / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 32768,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def build_tiny_model(folder: str | Path, arch: str = "mistral", seed: int = 0) -> Path:
    """Saves a 2-layer model of the given architecture with random weights and Mistral's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    config_class = {"mistral": MistralConfig, "llama": LlamaConfig}[arch]
    config = config_class(
        vocab_size=32000,  # must match the tokenizer
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        initializer_range=0.2,  # wide enough that a LoRA (head and norms frozen) can move logits far
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    write_mistral_tokenizer(folder)
    return folder
