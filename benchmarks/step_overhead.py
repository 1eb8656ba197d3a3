"""Host time of the Trainer's per-step bookkeeping on a 7B QLoRA model's parameter list, on a CPU.

    python -m benchmarks.step_overhead

A Mistral-shaped model with 32 layers but tiny widths (the walk costs per parameter, not per
value), loaded in 4 bits with the presets' LoRA (r=32 on all 7 projections): the same ~740
parameters, 448 trained, that a 7B QLoRA run walks. Prints milliseconds per call of what
transformers' Trainer does each step (accelerate's clip over model.parameters(), num_parameters)
beside what engine/lean_trainer.py does instead.
"""

import json
import tempfile
import time
from pathlib import Path

import torch


def _ms(call, repeat: int = 50) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeat):
        call()
    return round((time.perf_counter() - start) / repeat * 1e3, 2)


def main() -> None:
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from engine.tiny_model import build_tiny_model

    folder = Path(tempfile.mkdtemp())
    config = AutoConfig.from_pretrained(build_tiny_model(folder / "tiny"), num_hidden_layers=32)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "deep")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(folder / "deep", quantization_config=quantization,
                                                 device_map={"": "cpu"})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=targets))
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.grad = torch.zeros_like(p)
    accelerator = Accelerator()
    print(json.dumps({
        "parameters": len(list(model.parameters())), "trained": len(trained),
        "trainer_clip_ms": _ms(lambda: accelerator.clip_grad_norm_(model.parameters(), 1.0)),
        "lean_clip_ms": _ms(lambda: torch.nn.utils.clip_grad_norm_(trained, 1.0)),
        "trainer_count_ms_per_micro_batch": _ms(lambda: model.num_parameters(exclude_embeddings=True)),
    }))


if __name__ == "__main__":
    main()
