"""Step packing: bins, passes, equivalence with one-by-one examples and with the seed's padded steps."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import train
from engine.config import TrainConfig, parse_args
from engine.model import add_adapter, load_model, pick_attention
from engine.packing import StepCollator, pack, pack_lengths, token_budget
from engine.trainer_args import training_arguments
from tests.test_train import EXAMPLES, fast, of, run_engine

ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


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
    assert set(alone) == {"input_ids", "labels"}  # one example runs exactly as an unpacked micro-batch


def test_token_budget_defaults_to_what_a_padded_micro_batch_could_hold():
    assert token_budget(TrainConfig(per_device_train_batch_size=2, max_length=1024)) == 2048
    assert token_budget(TrainConfig(pack_tokens=8192)) == 8192


def _examples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n, prompt in [(9, 4), (14, 6), (6, 0)]:
        ids = torch.randint(3, 32000, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def _model(tiny_mistral, attention: str):
    config = TrainConfig(model_id=str(tiny_mistral), lora_dropout=0.0)
    model = add_adapter(load_model(config, attention), config, ALL_LINEAR)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A without a gradient to compare
            torch.nn.init.normal_(p, std=0.05)
    return model


def _token_losses(logits: torch.Tensor, labels: list[int]) -> torch.Tensor:
    target = torch.tensor(labels[1:])
    return F.cross_entropy(logits[:-1], target, ignore_index=-100, reduction="none")[target != -100]


@pytest.mark.parametrize("attention", ["sdpa", "eager", "varlen"])
def test_a_packed_batch_gives_the_losses_and_gradients_of_its_examples_one_by_one(tiny_mistral, attention):
    pick_attention(TrainConfig())  # registers the varlen backend (SDPA per example on a CPU)
    model = _model(tiny_mistral, attention)
    examples = _examples()
    batch = pack(examples)
    packed = model(**batch)
    ends = batch["cu_seq_lens_q"].tolist()
    targets = 0
    for i, example in enumerate(examples):
        alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
        inside = packed.logits[0, ends[i]:ends[i + 1]]
        torch.testing.assert_close(inside, alone, atol=1e-5, rtol=1e-4)  # no attention across examples
        torch.testing.assert_close(_token_losses(inside, example["labels"]),
                                   _token_losses(alone, example["labels"]), atol=1e-5, rtol=1e-4)
        targets += len(_token_losses(alone, example["labels"]))

    trainable = [p for p in model.parameters() if p.requires_grad]
    (packed.loss * targets).backward()  # the model's loss is a mean over the batch's targets
    packed_grads = [p.grad.clone() for p in trainable]
    model.zero_grad()
    for example in examples:
        ids, labels = torch.tensor([example["input_ids"]]), example["labels"]
        loss = model(input_ids=ids, labels=torch.tensor([labels])).loss
        (loss * len(_token_losses(model(input_ids=ids).logits[0], labels))).backward()
    for packed_grad, p in zip(packed_grads, trainable, strict=True):
        torch.testing.assert_close(packed_grad, p.grad, atol=1e-5, rtol=1e-4)


def test_a_steps_gradient_is_its_token_losses_over_the_label_tokens_of_the_whole_step(tiny_mistral, tmp_path):
    flags = ["--model_id", str(tiny_mistral), "--train_data", str(EXAMPLES / "capitals-chat.jsonl"),
             "--output_dir", str(tmp_path),
             *fast(packing="true", pack_tokens=100, per_device_train_batch_size=1, gradient_accumulation_steps=4,
                   lora_dropout=0.0)]
    recipe = train.Recipe(parse_args(flags))
    recipe.setup()
    trainer, model = recipe.trainer, recipe.trainer.model
    steps, num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1, trainer.args.device)
    passes = steps[0]["passes"]
    counts = [int((p["labels"][0, 1:] != -100).sum()) for p in passes]
    assert len(passes) >= 2 and int(num_items) == sum(counts)  # 4 chats of ~40 tokens, 100 a pass
    model.train()
    trainer.training_step(model, steps[0], num_items)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step_grads = [p.grad.clone() for p in trainable]

    def grads_of(scale_per_pass) -> list[torch.Tensor]:
        model.zero_grad()
        for one, count in zip(passes, counts, strict=True):
            logits = model(**{k: v for k, v in one.items() if k != "labels"}).logits[0]
            summed = F.cross_entropy(logits[:-1], one["labels"][0, 1:], ignore_index=-100, reduction="sum")
            (summed * scale_per_pass(count)).backward()
        return [p.grad.clone() for p in trainable]

    for got, want in zip(step_grads, grads_of(lambda count: 1 / sum(counts)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # The trap the test guards against: a mean per pass, averaged, weighs tokens unequally.
    naive = grads_of(lambda count: 1 / (count * len(counts)))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(step_grads, naive, strict=True))


@pytest.mark.slow
def test_packed_steps_learn_exactly_like_the_seeds_padded_micro_batches(tiny_mistral, tmp_path):
    """Same examples a step, same order, same normalisation: the same losses and adapter, step by step."""
    curves, adapters = {}, {}
    for packing in ("false", "true"):
        out = tmp_path / packing
        code, events = run_engine(tiny_mistral, out, *fast(packing=packing, pack_tokens=96,
                                                           per_device_train_batch_size=2, gradient_accumulation_steps=3,
                                                           lora_dropout=0.0, max_steps=5))
        assert code == 0
        curves[packing] = [(e["loss"], e["grad_norm"]) for e in of(events, "log")]
        from safetensors.torch import load_file

        adapters[packing] = load_file(out / "output" / "adapter_model.safetensors")
    assert len(curves["true"]) == 5
    for (packed_loss, packed_norm), (padded_loss, padded_norm) in zip(curves["true"], curves["false"], strict=True):
        assert packed_loss == pytest.approx(padded_loss, rel=1e-4)
        assert packed_norm == pytest.approx(padded_norm, rel=1e-3)
    for name, weight in adapters["true"].items():
        torch.testing.assert_close(weight, adapters["false"][name], atol=1e-5, rtol=1e-3)


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
