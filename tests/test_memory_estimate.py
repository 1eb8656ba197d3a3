"""The memory estimate (engine/memory.py) against peaks measured on an H200 (benchmarks/RESULTS.md)."""

import dataclasses

import pytest
import torch

from engine.config import Optim, PeftType, TrainConfig
from engine.memory import GROWN_PASS_TOKENS, TIGHT_ABOVE, ModelShape, estimate_memory, grown_pack_tokens

MISTRAL_7B = ModelShape.from_config(dict(
    hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=32000,
    num_attention_heads=32, num_key_value_heads=8,
))  # fmt: skip
LLAMA3_8B = dataclasses.replace(MISTRAL_7B, vocab_size=128256)  # a 128k vocabulary: its logits outgrow a layer
QLORA = TrainConfig(model_id="m", train_data="d", use_qlora=True, bf16=True)  # the qlora-zero2 preset's flags


def qlora(**flags) -> TrainConfig:
    return dataclasses.replace(QLORA, **flags)


def test_the_shape_counts_mistral_7b_parameters():
    assert MISTRAL_7B.num_params == pytest.approx(7.24e9, rel=0.01)


@pytest.mark.parametrize("pack_tokens, measured_gib", [(2048, 6.82), (4096, 8.84), (8192, 12.82)])
def test_packed_passes_match_the_batch_finders_measured_peaks(pack_tokens, measured_gib):
    """Run 14: the finder's probes of a 7B QLoRA, full logits, plus the optimizer states it adds."""
    config = qlora(per_device_train_batch_size=16, gradient_accumulation_steps=1, pack_tokens=pack_tokens,
                   chunked_loss=False)
    assert estimate_memory(MISTRAL_7B, config).peak_allocated_gib == pytest.approx(measured_gib, rel=0.05)


@pytest.mark.parametrize("tokens, measured_gib", [(8192, 6.63), (16384, 7.80), (32768, 10.13), (49152, 12.47),
                                                  (65536, 14.88)])
def test_long_sequences_match_the_measured_ladder(tokens, measured_gib, monkeypatch):
    """Runs 12 and 15: one example a step, Liger, tiled MLP, offloaded checkpoints, 8-bit AdamW."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # offloading needs CUDA
    config = qlora(max_length=tokens, optim=Optim.adamw_bnb_8bit, lora_dropout=0, use_liger_kernel=True,
                   tiled_mlp=True, offload_activations=True)
    assert estimate_memory(MISTRAL_7B, config).peak_allocated_gib == pytest.approx(measured_gib, rel=0.10)


def test_memory_grows_about_095_gib_per_1000_tokens_with_full_logits():
    """The seed recipe's measured slope (GPU.md): 0.95 GiB per 1,000 tokens; ours measured 0.98."""
    short = estimate_memory(MISTRAL_7B, qlora(max_length=2048, chunked_loss=False)).peak_allocated_gib
    long = estimate_memory(MISTRAL_7B, qlora(max_length=3048, chunked_loss=False)).peak_allocated_gib
    assert long - short == pytest.approx(0.95, abs=0.03)


def test_each_memory_flag_takes_off_what_it_holds(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    long = qlora(max_length=32768, chunked_loss=False)
    parts = {name: estimate_memory(LLAMA3_8B, config).parts for name, config in {
        "plain": long, "chunked": dataclasses.replace(long, chunked_loss=True),
        "offload": dataclasses.replace(long, offload_activations=True),
        "tiled": dataclasses.replace(long, tiled_mlp=True)}.items()}  # fmt: skip
    # Full logits of 128,256 words outgrow a layer's recomputation (and come before it); chunked, they don't.
    beyond_layer = 128256 * 14 - 2 * (14 * 4096 + 13 * 14336)  # bytes a token
    assert parts["plain"]["loss"] == pytest.approx(beyond_layer * 32768 / 2**30, rel=0.01)
    assert parts["chunked"]["loss"] == 0
    # Mistral's 32,000 words are smaller than the recomputed layer: the chunked loss saves no peak there.
    assert estimate_memory(MISTRAL_7B, long).parts["loss"] == 0
    # Offloaded: 30 of 32 layers' fp32 inputs (4,096 x 4 bytes a token each) leave the GPU.
    saved = parts["plain"]["activations"] - parts["offload"]["activations"]
    assert saved == pytest.approx(30 * 4096 * 4 * 32768 / 2**30, rel=0.01)
    # Tiled: the feed-forward working set of 32,768 tokens becomes one slice's (4,096 tokens).
    saved = parts["plain"]["activations"] - parts["tiled"]["activations"]
    assert saved == pytest.approx(2 * 13 * 14336 * (32768 - 4096) / 2**30, rel=0.01)
    # Slices of 512 at 2,048 tokens: the same working set, a quarter of the tokens.
    short = qlora(max_length=2048, tiled_mlp=True)
    saved = (estimate_memory(LLAMA3_8B, short).parts["activations"]
             - estimate_memory(LLAMA3_8B, dataclasses.replace(short, tiled_mlp_tokens=512)).parts["activations"])
    assert saved == pytest.approx(2 * 13 * 14336 * (2048 - 512) / 2**30, rel=0.01)


def test_verdicts_and_what_to_change():
    assert estimate_memory(MISTRAL_7B, qlora(max_length=2048), available_gib=80).verdict == "fits"
    assert estimate_memory(MISTRAL_7B, qlora(max_length=8192), available_gib=16).verdict == "tight"
    too_long = estimate_memory(LLAMA3_8B, qlora(max_length=32768, chunked_loss=False), available_gib=16)
    assert too_long.verdict == "will not fit"
    assert too_long.advice[0] == "turn on chunked_loss" and any("max_length to" in a for a in too_long.advice)
    # Only levers that lower the estimate are advised: Mistral's logits are not its peak.
    mistral = estimate_memory(MISTRAL_7B, qlora(max_length=32768, chunked_loss=False), available_gib=16)
    assert "turn on chunked_loss" not in mistral.advice
    sixteen_bit = estimate_memory(MISTRAL_7B, qlora(use_qlora=False, per_device_train_batch_size=4), available_gib=16)
    assert sixteen_bit.verdict == "will not fit"
    assert any("QLoRA" in a for a in sixteen_bit.advice)
    assert estimate_memory(MISTRAL_7B, QLORA).verdict == "unknown"


def test_full_finetuning_is_sharded_by_zero2_and_not_by_ddp():
    full = qlora(use_qlora=False, peft_type=PeftType.none)
    ddp = estimate_memory(MISTRAL_7B, full, num_gpus=8)
    zero2 = estimate_memory(MISTRAL_7B, full, num_gpus=8, zero_stage=2)
    single = estimate_memory(MISTRAL_7B, full)
    assert zero2.peak_allocated_gib < single.peak_allocated_gib < ddp.peak_allocated_gib
    # 7.24B params x (4 + 12/8) bytes of trainable state per GPU with ZeRO-2 over 8 GPUs
    assert zero2.parts["trainable weights and optimizer"] == pytest.approx(7.24e9 * 5.5 / 2**30, rel=0.02)


def test_zero3_splits_the_weights_across_gpus():
    one = estimate_memory(MISTRAL_7B, QLORA, num_gpus=2, zero_stage=2).parts["model weights"]
    assert estimate_memory(MISTRAL_7B, QLORA, num_gpus=2, zero_stage=3).parts["model weights"] == pytest.approx(
        one / 2, abs=0.01)


def test_gradient_checkpointing_saves_activation_memory():
    on = estimate_memory(MISTRAL_7B, QLORA)
    off = estimate_memory(MISTRAL_7B, qlora(gradient_checkpointing=False))
    assert off.parts["activations"] > 5 * on.parts["activations"]


def test_a_larger_pack_tokens_costs_its_activations_and_is_the_first_thing_to_lower():
    padded = estimate_memory(MISTRAL_7B, QLORA)
    packed = estimate_memory(MISTRAL_7B, qlora(pack_tokens=8192))
    one_long_example = estimate_memory(MISTRAL_7B, qlora(max_length=8192))
    assert packed.peak_allocated_gib == pytest.approx(one_long_example.peak_allocated_gib)
    assert packed.peak_allocated_gib > padded.peak_allocated_gib
    # A small budget still holds one whole example of max_length.
    assert estimate_memory(MISTRAL_7B, qlora(pack_tokens=512)).peak_allocated_gib == padded.peak_allocated_gib
    tight = estimate_memory(MISTRAL_7B, qlora(pack_tokens=32768), available_gib=16)
    assert tight.verdict != "fits" and tight.advice[0].startswith("lower pack_tokens (now 32768) to 2048")


def test_free_memory_grows_a_pass_to_4096_tokens_never_past_a_step_or_what_fits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # offloading needs CUDA
    offloaded = qlora(offload_activations=True)  # 1 x 4 examples of up to 2,048 tokens
    assert grown_pack_tokens(MISTRAL_7B, offloaded, 80) == GROWN_PASS_TOKENS == 4096
    # A step of 2 x 1,024 tokens is all one pass ever holds; a padded micro-batch is the least.
    assert grown_pack_tokens(MISTRAL_7B, qlora(max_length=1024, gradient_accumulation_steps=2), 80) == 2048
    assert grown_pack_tokens(MISTRAL_7B, qlora(per_device_train_batch_size=4), 80) == 4 * 2048
    assert grown_pack_tokens(MISTRAL_7B, offloaded, 6) == 2048
    # Where 4,096 tokens do not fit, the most that do, in steps of 128.
    tight = grown_pack_tokens(MISTRAL_7B, qlora(), 10)
    assert 2048 < tight < 4096 and tight % 128 == 0
    assert estimate_memory(MISTRAL_7B, qlora(pack_tokens=tight)).gib_per_gpu <= TIGHT_ABOVE * 10
    assert estimate_memory(MISTRAL_7B, qlora(pack_tokens=tight + 128)).gib_per_gpu > TIGHT_ABOVE * 10
    # The estimate shown for a GPU is the grown pass's; without a GPU's memory nothing grows.
    shown = estimate_memory(MISTRAL_7B, offloaded, available_gib=80)
    assert shown.parts == estimate_memory(MISTRAL_7B, qlora(offload_activations=True, pack_tokens=4096)).parts
    assert estimate_memory(MISTRAL_7B, offloaded).parts == estimate_memory(
        MISTRAL_7B, qlora(offload_activations=True, pack_tokens=2048)).parts


@pytest.mark.parametrize("optim, optim_args, state_bytes", [
    ("adamw_torch", None, 8), ("adamw_torch_fused", None, 8), ("paged_adamw_32bit", None, 8),
    ("adamw_bnb_8bit", None, 2.03), ("paged_adamw_8bit", None, 2.03),  # uint8 moments + an fp32 scale per 256
    ("adamw_anyprecision", None, 4), ("adamw_anyprecision", "use_kahan_summation=true", 6),
    ("adamw_anyprecision", "momentum_dtype=float32", 6),
])  # fmt: skip
def test_optimizer_state_is_counted_per_choice(optim, optim_args, state_bytes):
    lora = MISTRAL_7B.trainable_params("lora", 32)
    assert lora == pytest.approx(84e6, rel=0.01)
    estimate = estimate_memory(MISTRAL_7B, qlora(optim=Optim(optim), optim_args=optim_args))
    seed = estimate_memory(MISTRAL_7B, QLORA)
    # The fp32 LoRA weight (4 bytes) plus the optimizer's state; nothing else changes.
    state = estimate.parts["trainable weights and optimizer"]
    assert state == pytest.approx(lora * (4 + state_bytes) / 2**30, abs=0.01)
    assert {k: v for k, v in estimate.parts.items() if k != "trainable weights and optimizer"} == {
        k: v for k, v in seed.parts.items() if k != "trainable weights and optimizer"}
    # ZeRO-2 shards the gradient and the optimizer state; the fp32 weight stays whole.
    full = qlora(use_qlora=False, peft_type=PeftType.none, optim=Optim(optim), optim_args=optim_args)
    zero2 = estimate_memory(MISTRAL_7B, full, num_gpus=8, zero_stage=2)
    assert zero2.parts["trainable weights and optimizer"] == pytest.approx(
        MISTRAL_7B.num_params * (4 + (4 + state_bytes) / 8) / 2**30, rel=0.01)


def test_optim_args_the_optimizer_cannot_read_are_an_error():
    with pytest.raises(ValueError, match="optim_args: unknown option 'kahan'"):
        estimate_memory(MISTRAL_7B, qlora(optim=Optim.adamw_anyprecision, optim_args="kahan=true"))
