"""Step packing: bins, passes and end-to-end runs; its equivalence with examples one by one and with padded
steps is in tests/test_correctness.py."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.config import TrainConfig, token_budget
from engine.model import pick_attention
from engine.packing import StepCollator, pack, pack_lengths
from engine.trainer_args import training_arguments
from tests.test_train import fast, of, run_engine


def test_best_fit_decreasing_packs_every_example_once_within_the_budget():
    lengths = [700, 300, 1200, 50, 2048, 900, 100, 400, 1000, 16]
    bins = pack_lengths(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    assert len(bins) == 4  # 6,714 tokens need at least 4 bins of 2,048
    assert pack_lengths([3000, 10], 2048) == [[0], [1]]  # too long for the budget: a bin alone
    assert pack_lengths(np.array(lengths, dtype=np.uint32), 2048) == bins  # lengths as data.py reads them


def _rows(*lengths: int) -> list[dict]:
    return [{"input_ids": list(range(10 * i + 1, 10 * i + 1 + n)), "labels": list(range(10 * i + 1, 10 * i + 1 + n))}
            for i, n in enumerate(lengths)]


def test_a_steps_examples_become_passes_within_the_budget_each_example_once():
    examples = _rows(5, 9, 3, 12)  # 29 tokens, a 16-token budget: at least 2 passes
    batch = StepCollator(16)(examples)
    passes = batch["passes"]
    assert len(passes) == 2 and all(p["input_ids"].shape[1] <= 16 for p in passes)
    tokens = sorted(t for p in passes for t in p["input_ids"][0].tolist())
    assert tokens == sorted(t for e in examples for t in e["input_ids"])
    # The whole step, as one row: what the Trainer counts (and what eval runs).
    assert batch["input_ids"].tolist() == [sum((p["input_ids"][0].tolist() for p in passes), [])]
    assert int((batch["labels"][0, 1:] != -100).sum()) == 29 - 4  # each example's first token is no target


def test_a_pass_resets_positions_and_masks_each_examples_first_label():
    batch = pack([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]},
                  {"input_ids": [6, 7], "labels": [6, 7]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, 7]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 7] and batch["max_length_q"] == 3
    assert "attention_mask" not in batch  # a mask would turn transformers' packed-sequence detection off
    alone = pack([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    assert set(alone) == set(batch)  # the same arguments, so the same compiled graph, for one example
    assert alone["cu_seq_lens_q"].tolist() == [0, 3] and alone["position_ids"].tolist() == [[0, 1, 2]]


def test_token_budget_defaults_to_what_a_padded_micro_batch_could_hold():
    assert token_budget(TrainConfig(per_device_train_batch_size=2, max_length=1024)) == 2048
    assert token_budget(TrainConfig(pack_tokens=8192)) == 8192


@pytest.mark.slow
@pytest.mark.parametrize("streaming", ["false", "true"])
def test_packed_training_runs_end_to_end(tiny_mistral, tmp_path, streaming):
    code, events = run_engine(tiny_mistral, tmp_path, *fast(packing="true", pack_tokens=160,
                                                           per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                                           num_train_epochs=2, streaming=streaming))
    assert code == 0
    started = of(events, "started")[0]
    logs = of(events, "log")
    # 48 chats, 4 a step, as without packing: 12 steps an epoch.
    assert started["total_steps"] == 24 and len(logs) == 24
    assert all(e["loss"] > 0 and e["tokens_per_second"] > 0 for e in logs)
    assert logs[-1]["tokens_seen"] == 2 * started["train_tokens"]  # every token, no padding, twice
    assert of(events, "finished")[0]["train_loss"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallbacks")
def test_without_cuda_packing_uses_sdpa_and_liger_is_left_off():
    config = TrainConfig(packing=True, use_liger_kernel=True, bf16=True, output_dir="unused")
    assert pick_attention(config)[0] == "sdpa"  # block-diagonal mask from the position ids
    datasets_ = SimpleNamespace(eval=None, num_train_examples=1)
    assert training_arguments(config, datasets_).use_liger_kernel is False


def test_on_a_gpu_pack_tokens_0_grows_passes_to_what_the_estimate_fits(monkeypatch, tmp_path, caplog):
    """The wiring on a stand-in GPU: what engine.memory.grown_pack_tokens chooses is what training uses."""
    from engine import memory
    from engine.train import Recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(memory, "memory_limit", lambda device: (80 * 2**30, "the whole GPU"))
    mistral_7b = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=32000,
                      num_attention_heads=32, num_key_value_heads=8)
    config = TrainConfig(model_id="m", train_data="d", output_dir=str(tmp_path), use_qlora=True, bf16=True,
                         offload_activations=True)  # 1 x 4 examples of up to 2,048 tokens
    recipe = Recipe(config)
    recipe.model = SimpleNamespace(config=SimpleNamespace(to_dict=lambda: mistral_7b))
    with caplog.at_level("INFO"):
        grown = recipe._grow_passes(config)
    assert grown.pack_tokens == token_budget(grown) == 4096
    assert "passes of up to 4096 tokens, as many as the memory estimate fits in 80.0 GiB" in caplog.text
    assert recipe._grow_passes(TrainConfig(model_id="m", train_data="d", pack_tokens=1000)).pack_tokens == 1000
