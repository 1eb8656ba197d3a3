"""LeanTrainer (engine/lean_trainer.py): the Trainer's clipping and operation count, the same
numbers, without visiting every parameter of the model each step."""

import pytest
from transformers import PreTrainedModel, Trainer

from engine.lean_trainer import LeanTrainer
from tests.conftest import mixed_lengths_jsonl, set_up_recipe


def _history(model_dir, data, out) -> tuple[list[tuple], float]:
    flags = {"model_id": model_dir, "train_data": data, "output_dir": out, "bf16": "false", "lora_dropout": 0.0,
             "max_steps": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "eval_size": 0,
             "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1, "learning_rate": 2e-2}  # fmt: skip
    recipe = set_up_recipe(**flags)
    recipe.trainer.args.max_grad_norm = 0.05  # not an engine flag; small enough that every step clips
    recipe.trainer.train()
    logs = [(h["loss"], h["grad_norm"]) for h in recipe.trainer.state.log_history if "loss" in h]
    return logs, recipe.trainer.state.total_flos


def test_lean_steps_clip_and_count_as_the_trainer_does_walking_the_parameters_once(tiny_mistral, tmp_path,
                                                                                    monkeypatch):
    data = mixed_lengths_jsonl(tmp_path / "d.jsonl", ["alpha", "beta", "the", "of"])
    counts = []
    count_parameters = PreTrainedModel.num_parameters
    monkeypatch.setattr(PreTrainedModel, "num_parameters",
                        lambda self, *a, **k: counts.append(1) or count_parameters(self, *a, **k))
    lean, lean_flos = _history(tiny_mistral, data, tmp_path / "lean")
    assert len(counts) == 1  # once, not once a micro-batch

    monkeypatch.setattr(LeanTrainer, "_clip_grad_norm", Trainer._clip_grad_norm)
    monkeypatch.setattr(LeanTrainer, "floating_point_ops", Trainer.floating_point_ops)
    trainers, trainers_flos = _history(tiny_mistral, data, tmp_path / "trainer")

    assert len(lean) == 4 and all(norm > 0.05 for _, norm in lean)  # the norms before clipping: all clipped
    assert lean == pytest.approx(trainers, rel=1e-6)
    assert lean_flos == trainers_flos > 0
