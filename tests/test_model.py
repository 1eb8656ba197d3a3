import pytest
import torch

from engine.config import PeftType, TrainConfig
from engine.model import add_adapter, load_model, pick_attention, resolve_target_modules

ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize("arch", ["tiny_mistral", "tiny_llama"])
def test_auto_targets_every_linear_but_the_head(arch, request):
    model = load_model(TrainConfig(model_id=str(request.getfixturevalue(arch))), "sdpa")
    assert resolve_target_modules(model) == ALL_LINEAR


def test_qlora_loads_4bit_nf4_and_targets_4bit_layers(tiny_mistral):
    import bitsandbytes as bnb

    config = TrainConfig(model_id=str(tiny_mistral), use_qlora=True, bf16=True)
    model = load_model(config, "sdpa")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested  # double quant
    assert resolve_target_modules(model) == ALL_LINEAR
    peft_model = add_adapter(model, config, ALL_LINEAR)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_ia3_scales_feedforward_inputs(tiny_mistral):
    config = TrainConfig(model_id=str(tiny_mistral), peft_type=PeftType.ia3)
    model = add_adapter(load_model(config, "sdpa"), config, ALL_LINEAR)
    assert model.peft_config["default"].feedforward_modules == {"down_proj"}
    assert all("ia3_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_full_finetuning_trains_every_weight(tiny_mistral):
    config = TrainConfig(model_id=str(tiny_mistral), peft_type=PeftType.none)
    model = add_adapter(load_model(config, "sdpa"), config, ALL_LINEAR)
    assert all(p.requires_grad for p in model.parameters())


def test_flash_attention_on_cpu_falls_back_to_sdpa_with_a_reason():
    impl, why = pick_attention(TrainConfig(use_flash_attention=True, bf16=True))
    if not torch.cuda.is_available():
        assert impl == "sdpa" and "GPU" in why
    assert pick_attention(TrainConfig())[0] == "sdpa"


def test_qlora_keeps_embeddings_16bit_with_the_fp32_upcasts_numbers(tiny_mistral):
    """prepare_model_for_kbit_training stores the embedding and head in fp32; we store them in bf16
    and cast the embedding's output instead: under autocast the loss and LoRA gradients are equal."""

    config = TrainConfig(model_id=str(tiny_mistral), use_qlora=True, bf16=True)
    ids = torch.randint(3, 1000, (2, 24))

    def loss_and_grads(model):
        torch.manual_seed(1)  # the same LoRA dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    torch.manual_seed(0)
    ours = add_adapter(load_model(config, "sdpa"), config, ALL_LINEAR)
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:  # the seed's way: everything 16-bit upcast to fp32
        patch.setattr("engine.model._store_embeddings_in", lambda model, dtype: None)
        seed = add_adapter(load_model(config, "sdpa"), config, ALL_LINEAR)

    assert ours.get_input_embeddings().weight.dtype == ours.get_output_embeddings().weight.dtype == torch.bfloat16
    assert seed.get_input_embeddings().weight.dtype == torch.float32
    assert ours.base_model.model.model.norm.weight.dtype == torch.float32  # norms stay fp32
    ours_loss, ours_grads = loss_and_grads(ours)
    seed_loss, seed_grads = loss_and_grads(seed)
    assert ours_loss == seed_loss
    assert ours_grads.keys() == seed_grads.keys()
    for name, grad in ours_grads.items():
        assert torch.equal(grad, seed_grads[name]), name


def test_under_zero3_4bit_weights_are_stored_in_the_compute_dtype_with_the_same_codes(tiny_mistral):
    """ZeRO-3 splits each weight as a flat tensor of one dtype: the nf4 codes are packed into bf16
    elements (4 an element) instead of uint8 (2), byte for byte the same, and stay so in eval mode on
    a CPU (bitsandbytes' in-place CPU repacking is off: engine/model.py says why)."""
    from engine.presets import load_preset

    def load(name, train):
        config = TrainConfig(model_id=str(tiny_mistral), use_qlora=True, bf16=True,
                             deepspeed=load_preset(name).deepspeed)
        model = load_model(config, "sdpa").train(train)  # train mode: bitsandbytes never repacks
        with torch.no_grad():
            logits = model(torch.tensor([[1, 415, 5565, 302, 4843]])).logits
        return model.model.layers[0].self_attn.q_proj.weight, logits

    zero2, zero2_logits = load("qlora-zero2", train=True)
    zero3, zero3_logits = load("qlora-zero3", train=False)
    assert zero2.dtype == torch.uint8 and zero3.dtype == torch.bfloat16 and zero3.numel() == 64 * 64 // 4
    assert torch.equal(zero3.view(torch.uint8), zero2.view(-1, 2))
    assert not getattr(zero3.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(zero3_logits, zero2_logits)


def test_qlora_on_a_cpu_trains_the_same_steps_with_an_evaluation_between(tiny_mistral, tmp_path):
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel at the first evaluation, and
    that kernel has no backward: the steps after it would lose their gradients without an error."""
    from tests.conftest import mixed_lengths_jsonl, set_up_recipe

    data = mixed_lengths_jsonl(tmp_path / "d.jsonl", ["alpha", "beta", "the", "of"])

    def losses(evaluate: bool) -> list[float]:
        flags = {"model_id": tiny_mistral, "train_data": data, "output_dir": tmp_path / str(evaluate),
                 "use_qlora": "true", "bf16": "false", "lora_dropout": 0.0, "max_steps": 4,
                 "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "eval_size": 4,
                 "eval_strategy": "steps" if evaluate else "no", "eval_steps": 2, "save_strategy": "no",
                 "logging_steps": 1, "learning_rate": 2e-2}  # fmt: skip
        recipe = set_up_recipe(**flags)
        recipe.trainer.train()
        return [h["loss"] for h in recipe.trainer.state.log_history if "loss" in h]

    with_evaluation, without = losses(True), losses(False)
    assert len(with_evaluation) == 4
    assert with_evaluation == pytest.approx(without, abs=1e-5)
    assert without[0] - without[-1] > 1  # steps that learn, so a lost gradient would show
