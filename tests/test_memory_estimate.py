"""The memory estimate against the seed recipe's measurements on an H200 (../shared/notes/GPU.md)."""

import pytest

from engine.memory import ModelShape, estimate_memory

MISTRAL_7B = ModelShape.from_config(dict(
    hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=32000,
    num_attention_heads=32, num_key_value_heads=8,
))  # fmt: skip
SEED = dict(qlora=True, lora_r=32, batch_size=1, gradient_checkpointing=True)


def test_the_shape_counts_mistral_7b_parameters():
    assert MISTRAL_7B.num_params == pytest.approx(7.24e9, rel=0.01)


@pytest.mark.parametrize("tokens, measured_gib", [(2048, 7.75), (8192, 13.47), (16384, 21.28)])
def test_seed_recipe_peak_matches_the_measurements(tokens, measured_gib):
    estimate = estimate_memory(MISTRAL_7B, max_length=tokens, **SEED)
    assert estimate.peak_allocated_gib == pytest.approx(measured_gib, rel=0.03)


def test_memory_grows_about_095_gib_per_1000_tokens():
    short = estimate_memory(MISTRAL_7B, max_length=2048, **SEED).peak_allocated_gib
    long = estimate_memory(MISTRAL_7B, max_length=3048, **SEED).peak_allocated_gib
    assert long - short == pytest.approx(0.95, abs=0.03)


def test_verdicts_and_what_to_change():
    assert estimate_memory(MISTRAL_7B, max_length=2048, available_gib=80, **SEED).verdict == "fits"
    assert estimate_memory(MISTRAL_7B, max_length=8192, available_gib=16, **SEED).verdict == "tight"
    too_long = estimate_memory(MISTRAL_7B, max_length=16384, available_gib=16, **SEED)
    assert too_long.verdict == "will not fit"
    assert any("max_length to" in a for a in too_long.advice)
    sixteen_bit = estimate_memory(MISTRAL_7B, qlora=False, max_length=2048, batch_size=4, available_gib=16)
    assert sixteen_bit.verdict == "will not fit"
    assert any("QLoRA" in a for a in sixteen_bit.advice)
    assert estimate_memory(MISTRAL_7B, qlora=True, available_gib=None).verdict == "unknown"


def test_full_finetuning_is_sharded_by_zero2_and_not_by_ddp():
    ddp = estimate_memory(MISTRAL_7B, qlora=False, peft="none", num_gpus=8, zero2=False)
    zero2 = estimate_memory(MISTRAL_7B, qlora=False, peft="none", num_gpus=8, zero2=True)
    single = estimate_memory(MISTRAL_7B, qlora=False, peft="none")
    assert zero2.peak_allocated_gib < single.peak_allocated_gib < ddp.peak_allocated_gib
    # 7.24B params x (4 + 12/8) bytes of trainable state per GPU with ZeRO-2 over 8 GPUs
    assert zero2.parts["trainable weights, gradients and optimizer"] == pytest.approx(7.24e9 * 5.5 / 2**30, rel=0.02)


def test_gradient_checkpointing_saves_activation_memory():
    on = estimate_memory(MISTRAL_7B, max_length=2048, **SEED)
    off = estimate_memory(MISTRAL_7B, max_length=2048, **{**SEED, "gradient_checkpointing": False})
    assert off.parts["activations"] > 5 * on.parts["activations"]


def test_a_larger_pack_tokens_costs_its_activations_and_is_the_first_thing_to_lower():
    padded = estimate_memory(MISTRAL_7B, max_length=2048, **SEED)
    packed = estimate_memory(MISTRAL_7B, max_length=2048, pack_tokens=8192, **SEED)
    assert packed.peak_allocated_gib == pytest.approx(
        estimate_memory(MISTRAL_7B, max_length=8192, **SEED).peak_allocated_gib)
    assert packed.peak_allocated_gib > padded.peak_allocated_gib
    # A small budget still holds one whole example of max_length.
    assert estimate_memory(MISTRAL_7B, max_length=2048, pack_tokens=512, **SEED).peak_allocated_gib == pytest.approx(
        padded.peak_allocated_gib)
    tight = estimate_memory(MISTRAL_7B, max_length=2048, pack_tokens=16384, available_gib=16, **SEED)
    assert tight.verdict != "fits" and tight.advice[0].startswith("lower pack_tokens (now 16384) to 0")


@pytest.mark.parametrize("optim, optim_args, state_bytes", [
    ("adamw_torch", None, 8), ("adamw_torch_fused", None, 8), ("paged_adamw_32bit", None, 8),
    ("adamw_bnb_8bit", None, 2.03), ("paged_adamw_8bit", None, 2.03),  # uint8 moments + an fp32 scale per 256
    ("adamw_anyprecision", None, 4), ("adamw_anyprecision", "use_kahan_summation=true", 6),
    ("adamw_anyprecision", "momentum_dtype=float32", 6),
])  # fmt: skip
def test_optimizer_state_is_counted_per_choice(optim, optim_args, state_bytes):
    lora = MISTRAL_7B.trainable_params("lora", 32)
    assert lora == pytest.approx(84e6, rel=0.01)
    estimate = estimate_memory(MISTRAL_7B, max_length=2048, optim=optim, optim_args=optim_args, **SEED)
    seed = estimate_memory(MISTRAL_7B, max_length=2048, **SEED)
    # fp32 weight and gradient (8 bytes) plus the optimizer's state; nothing else changes.
    state = estimate.parts["trainable weights, gradients and optimizer"]
    assert state == pytest.approx(lora * (8 + state_bytes) / 2**30, abs=0.01)
    assert {k: v for k, v in estimate.parts.items() if k != "trainable weights, gradients and optimizer"} == {
        k: v for k, v in seed.parts.items() if k != "trainable weights, gradients and optimizer"}
    # ZeRO-2 shards the gradient and the optimizer state; the fp32 weight stays whole.
    zero2 = estimate_memory(MISTRAL_7B, qlora=False, peft="none", num_gpus=8, zero2=True, optim=optim,
                            optim_args=optim_args)
    assert zero2.parts["trainable weights, gradients and optimizer"] == pytest.approx(
        MISTRAL_7B.num_params * (4 + (4 + state_bytes) / 8) / 2**30, rel=0.01)


def test_optim_args_the_optimizer_cannot_read_are_an_error():
    with pytest.raises(ValueError, match="optim_args: unknown option 'kahan'"):
        estimate_memory(MISTRAL_7B, optim="adamw_anyprecision", optim_args="kahan=true", **SEED)
