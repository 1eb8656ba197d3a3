"""The chunked loss (engine/loss.py): the model's own loss and gradients, without the full logits."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

from engine import loss, train
from engine.config import PeftType, TrainConfig
from engine.model import add_adapter, load_model
from engine.packing import pack
from tests.test_correctness import ALL_LINEAR, _examples
from tests.test_train import fast, of, run_engine

VOCAB = 32000  # the tiny models'
SMALL_VOCAB = 1000  # for the loss alone


def assert_same_gradient(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within fp32 rounding: 1e-5 of the gradient's own scale (summation order differs)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _chunks_of(monkeypatch, tokens: int, vocab: int) -> None:
    """Chunks of a few tokens, so that a few dozen tokens cross several chunk boundaries."""
    monkeypatch.setattr(loss, "CHUNK_LOGITS", tokens * vocab)


@pytest.fixture
def small_chunks(monkeypatch):
    _chunks_of(monkeypatch, 8, VOCAB)


def _labels(n: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, SMALL_VOCAB, (2, n), generator=generator)
    labels[0, :7] = -100  # a masked prompt
    labels[1, n - 5:] = -100  # padding
    return labels


@pytest.mark.parametrize("num_items,head_trained", [(61, False), (None, True)])
def test_loss_and_gradients_equal_transformers_loss_on_the_full_logits(monkeypatch, num_items, head_trained):
    _chunks_of(monkeypatch, 8, SMALL_VOCAB)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 29, 64, generator=g, requires_grad=True)
    weight = (torch.randn(SMALL_VOCAB, 64, generator=g) * 0.3).requires_grad_(head_trained)
    labels = _labels(29, g)
    grad_out = torch.tensor(3.0)  # what a loss scale or the Trainer's x world_size would pass back

    logits = torch.nn.functional.linear(hidden, weight)
    want = ForCausalLMLoss(logits, labels, SMALL_VOCAB, num_items_in_batch=num_items)
    (want * grad_out).backward()
    want_grads = [hidden.grad.clone()] + ([weight.grad.clone()] if head_trained else [])
    hidden.grad = weight.grad = None
    got = loss.causal_lm_loss(hidden, weight, labels, num_items)
    (got * grad_out).backward()
    got_grads = [hidden.grad] + ([weight.grad] if head_trained else [])

    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert_same_gradient(a, b)
    assert not hidden.grad[1, -6:].any()  # positions without a label get no gradient


def test_under_bf16_autocast_it_keeps_the_output_layers_precision_and_dtypes(monkeypatch):
    _chunks_of(monkeypatch, 8, SMALL_VOCAB)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 29, 64, generator=g, requires_grad=True)  # fp32, as with upcast_layernorm
    weight = (torch.randn(SMALL_VOCAB, 64, generator=g) * 0.3).requires_grad_()
    labels = _labels(29, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ForCausalLMLoss(torch.nn.functional.linear(hidden, weight), labels, SMALL_VOCAB)
        got = loss.causal_lm_loss(hidden, weight, labels)
    (want_hidden, want_weight) = torch.autograd.grad(want, (hidden, weight))
    (got_hidden, got_weight) = torch.autograd.grad(got, (hidden, weight))
    assert got_hidden.dtype == got_weight.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # bf16 logits, fp32 loss: both
    assert_same_gradient(got_hidden, want_hidden)  # rounded to bf16 where the standard path rounds
    # The weight's: each chunk's bf16 product summed in fp32, where the standard path rounds the whole sum once.
    torch.testing.assert_close(got_weight, want_weight, rtol=0, atol=1e-2 * float(want_weight.abs().max()))


def test_in_fp16_gradients_divided_by_a_long_steps_tokens_survive_until_the_loss_scale(monkeypatch):
    _chunks_of(monkeypatch, 8, SMALL_VOCAB)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 29, 64, generator=g).half().requires_grad_()
    weight = (torch.randn(SMALL_VOCAB, 64, generator=g) * 0.3).half()
    labels, num_items, loss_scale = _labels(29, g), 500_000, 65536.0  # a 500k-token step, GradScaler's scale
    (got,) = torch.autograd.grad(loss.causal_lm_loss(hidden, weight, labels, num_items) * loss_scale, hidden)
    exact = hidden.detach().float().requires_grad_()
    want = ForCausalLMLoss(torch.nn.functional.linear(exact, weight.float()), labels, SMALL_VOCAB,
                           num_items_in_batch=num_items)
    (want,) = torch.autograd.grad(want * loss_scale, exact)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-3 * float(want.abs().max()))  # fp16's precision


def _model(tiny_mistral, peft_type: PeftType):
    config = TrainConfig(model_id=str(tiny_mistral), lora_dropout=0.0, peft_type=peft_type)
    model = load_model(config, "sdpa")
    assert loss.install(model) is None
    model = add_adapter(model, config, ALL_LINEAR)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would leave A without a gradient to compare
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("peft_type", [PeftType.lora, PeftType.none])
def test_a_patched_model_trains_on_the_same_loss_and_gradients_and_evaluates_with_logits(
    tiny_mistral, small_chunks, peft_type
):
    model = _model(tiny_mistral, peft_type)
    batch = {**pack(_examples()), "num_items_in_batch": torch.tensor(40)}  # 3 examples packed, part of a step
    trainable = [p for p in model.parameters() if p.requires_grad]

    def run(training: bool):
        model.train(training)  # eval mode runs the model's own forward, with grad still on
        out = model(**batch)
        grads = torch.autograd.grad(out.loss, trainable)
        return out, grads

    own, own_grads = run(False)
    chunked, chunked_grads = run(True)
    assert own.logits.shape == (1, 29, VOCAB) and chunked.logits is None
    torch.testing.assert_close(chunked.loss, own.loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(chunked_grads, own_grads, strict=True):
        assert_same_gradient(got, want)
    if peft_type == PeftType.none:  # the output layer itself was compared
        assert any(p is model.get_output_embeddings().weight for p in trainable)


class LargestTensor(TorchDispatchMode):
    """The most elements any operation's result held (views share their base's memory)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not func.is_view:
                self.numel = max(self.numel, t.numel())
        return out


def test_a_training_step_never_holds_the_full_logits(tiny_mistral, small_chunks):
    model = _model(tiny_mistral, PeftType.lora)
    g = torch.Generator().manual_seed(2)
    tokens = 128
    batch = {"input_ids": torch.randint(3, VOCAB, (1, tokens), generator=g)}
    batch["labels"] = batch["input_ids"].clone()
    largest = {}
    for training in (False, True):
        model.train(training)
        with LargestTensor() as mode:
            model(**batch).loss.backward()
        largest[training] = mode.numel
    assert largest[False] >= tokens * VOCAB  # the measure sees the model's own full logits
    assert largest[True] == 8 * VOCAB  # one chunk's logits at most


def test_models_whose_forward_changes_the_logits_keep_their_own_loss():
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    gemma2 = AutoModelForCausalLM.from_config(config)  # soft-caps its logits
    reason = loss.install(gemma2)
    assert "soft-capping" in reason and "forward" not in vars(gemma2)


def test_it_stands_aside_for_liger_on_cuda_and_when_off(tiny_mistral, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for flags, expected in [({"use_liger_kernel": True}, False), ({"chunked_loss": False}, False)]:
        recipe = SimpleNamespace(config=TrainConfig(**flags), model=SimpleNamespace())
        assert train.Recipe._chunked_loss(recipe) is expected


def test_training_with_it_learns_exactly_as_without(tiny_mistral, tmp_path):
    """LoRA, gradient checkpointing, packed passes normalised by the step's label tokens."""
    curves = {}
    for chunked in ("false", "true"):
        code, events = run_engine(tiny_mistral, tmp_path / chunked, *fast(
            chunked_loss=chunked, packing="true", pack_tokens=96, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, gradient_checkpointing="true", lora_dropout=0.0, max_steps=3))
        assert code == 0
        assert of(events, "started")[0]["config"]["chunked_loss"] is (chunked == "true")
        curves[chunked] = [(e["loss"], e["grad_norm"]) for e in of(events, "log")]
    assert len(curves["true"]) == 3
    for (loss_on, norm_on), (loss_off, norm_off) in zip(curves["true"], curves["false"], strict=True):
        assert loss_on == pytest.approx(loss_off, rel=1e-5)
        assert norm_on == pytest.approx(norm_off, rel=1e-4)


def test_evaluation_with_labels_gives_the_loss_without_the_full_logits(tiny_mistral, small_chunks):
    """The Trainer's eval (no gradients, labels, no metrics) peaks no higher than training; a
    forward without labels (generation, the playground) still gets every logit."""
    model = _model(tiny_mistral, PeftType.lora).eval()
    batch = pack(_examples())
    with torch.no_grad():
        with LargestTensor() as largest:
            chunked = model(**batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert chunked.logits is None and largest.numel == 8 * VOCAB  # one chunk's logits at most
    want = ForCausalLMLoss(logits, batch["labels"], VOCAB)
    torch.testing.assert_close(chunked.loss, want, rtol=1e-6, atol=1e-6)
