"""offload_embeddings (engine/embeddings.py): the same training with the input embedding table out
of the model's parameters, the estimate lighter by the table, and where it stands aside."""

import dataclasses

import pytest
import torch

from engine import train
from engine.config import PeftType, TrainConfig
from engine.embeddings import CpuEmbedding, why_not_offloaded
from engine.memory import ModelShape, estimate_memory
from tests.conftest import set_up_recipe, write_jsonl


def _train(model_dir, data, out, **flags) -> tuple[list[float], train.Recipe]:
    flags = {"model_id": model_dir, "train_data": data, "output_dir": out, "bf16": "false", "max_steps": 3,
             "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "eval_size": 0,
             "save_strategy": "no", "logging_steps": 1, "report_to": "none", "learning_rate": 2e-2,
             "lora_dropout": 0.0, **flags}
    recipe = set_up_recipe(**flags)
    recipe.trainer.train()
    return [h["loss"] for h in recipe.trainer.state.log_history if "loss" in h], recipe


@pytest.mark.parametrize("use_qlora", ["false", "true"])  # QLoRA: the fp32 cast of the embedding's output too
def test_offloaded_embeddings_train_to_the_same_losses_and_leave_the_parameters(tiny_mistral, tmp_path, use_qlora):
    rows = [{"prompt": "one two three " * (i % 5 + 1), "completion": f" answer {i}"} for i in range(16)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    plain, _ = _train(tiny_mistral, data, tmp_path / "plain", use_qlora=use_qlora)
    offloaded, recipe = _train(tiny_mistral, data, tmp_path / "off", use_qlora=use_qlora, offload_embeddings="true")

    assert offloaded == plain  # the same rows, looked up elsewhere: bitwise the same steps
    assert max(plain) - min(plain) > 0.01  # the adapter learned
    embedding = recipe.model.get_input_embeddings()
    assert isinstance(embedding, CpuEmbedding)
    table = embedding.weight
    assert table.device.type == "cpu" and not table.requires_grad
    assert all(p is not table for p in recipe.model.parameters())  # no optimizer, DDP or .to() sees it
    assert recipe.resolved["offload_embeddings"] is True


def test_the_estimate_leaves_out_the_table_and_offload_stands_aside_where_it_cannot_run():
    shape = ModelShape.from_config(dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                        vocab_size=32000, num_attention_heads=32, num_key_value_heads=8))
    qlora = TrainConfig(model_id="m", train_data="d", use_qlora=True, bf16=True)
    saved = (estimate_memory(shape, qlora).parts["model weights"]
             - estimate_memory(shape, dataclasses.replace(qlora, offload_embeddings=True)).parts["model weights"])
    assert saved == pytest.approx(32000 * 4096 * 2 / 2**30, abs=0.01)  # 0.24 GiB of 16-bit table
    assert "turn on offload_embeddings" in estimate_memory(shape, qlora, available_gib=4.0).advice  # a short GPU

    assert why_not_offloaded(qlora, tied_embeddings=False, zero_stage=2) is None
    assert "shares the table" in why_not_offloaded(qlora, tied_embeddings=True, zero_stage=0)
    assert "ZeRO-3" in why_not_offloaded(qlora, tied_embeddings=False, zero_stage=3)
    full = dataclasses.replace(qlora, use_qlora=False, peft_type=PeftType.none)
    assert "full finetuning" in why_not_offloaded(full, tied_embeddings=False, zero_stage=0)
    assert estimate_memory(shape, dataclasses.replace(full, offload_embeddings=True)).parts == \
        estimate_memory(shape, full).parts


def test_the_lookup_gives_the_tables_rows_on_the_tables_device():
    embedding = torch.nn.Embedding(10, 4)
    offloaded = CpuEmbedding(embedding)
    ids = torch.tensor([[1, 7, 7, 0]])
    assert torch.equal(offloaded(ids), embedding.weight[ids])
    assert offloaded(ids).device == ids.device
