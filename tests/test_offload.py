"""Offloaded gradient checkpoints (engine/offload.py). The copies need CUDA streams: the GPU test
runs on the device machine (benchmarks/RESULTS.md), the rule for when it stands aside everywhere."""

import dataclasses

import pytest
import torch

from engine.config import TrainConfig
from engine.offload import OffloadCheckpoints, PinnedBuffers
from engine.preflight import preflight


def test_offload_without_checkpointing_stands_aside_instead_of_failing(tmp_path):
    """A preset's offload_activations with gradient checkpointing turned off: nothing to offload, no error."""
    from engine.train import Recipe

    config = TrainConfig(model_id="m", train_data="", output_dir=str(tmp_path), offload_activations=True,
                         gradient_checkpointing=False)
    assert not any("offload_activations" in p for p in preflight(config))
    for checkpointing in (False, True):
        recipe = Recipe(dataclasses.replace(config, gradient_checkpointing=checkpointing))
        recipe.compiled = False
        offloads = any(isinstance(c, OffloadCheckpoints) for c in recipe._model_callbacks())
        assert offloads == checkpointing


def _grads_and_peak(model, input_ids):
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    return [p.grad.clone() for p in model.parameters() if p.requires_grad], peak


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offloaded_checkpoints_give_the_same_gradients_with_less_gpu_memory():
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, tokens = 8, 1024, 8192
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=512)
    model = LlamaForCausalLM(config).cuda().train()
    # As under LoRA, little is trained: the gradients then do not outgrow the checkpoints.
    for name, param in model.named_parameters():
        param.requires_grad = name.endswith("q_proj.weight")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(0, 512, (1, tokens), device="cuda")

    kept, kept_peak = _grads_and_peak(model, input_ids)
    OffloadCheckpoints().on_train_begin(None, None, None, model=model)
    offloaded, offloaded_peak = _grads_and_peak(model, input_ids)

    for a, b in zip(kept, offloaded, strict=True):
        # The same recompute from the same (copied back) inputs, up to the GPU's own run-to-run
        # noise (its backward kernels accumulate in no fixed order).
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    checkpoints = (layers - 1) * tokens * hidden * 4  # fp32 inputs of every layer but the first
    assert kept_peak - offloaded_peak > 0.8 * checkpoints, (kept_peak, offloaded_peak)


def test_offload_beyond_the_free_cpu_memory_is_a_readable_error_not_a_killed_process(monkeypatch):
    import types

    import psutil

    from engine import train
    from engine.memory import HostMemoryError, ModelShape

    mistral_7b = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=32000,
                      num_attention_heads=32, num_key_value_heads=8)
    config = TrainConfig(model_id="m", train_data="d", use_qlora=True, bf16=True, offload_activations=True,
                         max_length=196608, pack_tokens=196608)
    recipe = types.SimpleNamespace(config=config, shape=ModelShape.from_config(mistral_7b))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=64 * 2**30))
    with pytest.raises(HostMemoryError) as raised:
        train.Recipe._check_host_memory(recipe)
    error, hint = train._explain(raised.value, config)
    # Every layer's fp32 input at 196,608 tokens: 32 x 4,096 x 4 bytes a token, 96 GiB.
    assert error == ("offload_activations needs about 96.0 GiB of CPU memory for passes of 196,608 tokens, "
                     "and this machine has 64.0 GiB free.")
    assert "Lower max_length" in hint and "offload_activations off" in hint
    recipe.config = dataclasses.replace(config, max_length=65536, pack_tokens=65536)  # 32 GiB: fits
    train.Recipe._check_host_memory(recipe)


def test_pinned_buffers_are_reused_by_size_class_instead_of_asked_for_each_checkpoint():
    buffers = PinnedBuffers(pin=False)  # pinning needs CUDA; the bookkeeping does not
    first = buffers.take(3 << 20)
    assert first.numel() == 4 << 20  # 3 MiB rounds up to the 4 MiB class
    assert buffers.take(3 << 20) is not first  # still held: a second buffer
    buffers.give(first)
    again = buffers.take((3 << 20) + 1)
    assert again is first  # the same class, given back: no new memory
    assert buffers.take(5 << 20).numel() == 8 << 20
    assert buffers.take(4 << 20).numel() == 4 << 20  # an exact power of two stays as it is
