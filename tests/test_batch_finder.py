"""--auto_find_batch_size (engine/batch_finder.py): the search, what it adds to a measured pass, the
probe on a real model, and whole runs that train with what it found, DeepSpeed's included.

A CPU has no memory counter: the probes' out-of-memory comes from FINETUNE_STUDIO_FAULT=oom@tokens<N>
(engine/faults.py), which fails any forward pass of more than N tokens, probe or training alike; the
counter is stood in by TokenMeter. benchmarks/bench.py has the GPU cases (tests/README.md).
"""

import types

import pytest
import torch
from test_launch import EXAMPLES, events_of, finish
from test_train import of, run_engine

from engine import faults
from engine.batch_finder import MARGIN, candidates, find_batch, largest_fitting, search, unprobed_bytes
from engine.config import TrainConfig
from engine.launch import start_run
from engine.memory import ModelShape, optimizer_state_bytes
from engine.presets import load_preset, make_config
from engine.zero import zero_settings

MIB, GIB = 2**20, 2**30
MISTRAL_7B = ModelShape(hidden_size=4096, num_layers=32, intermediate_size=14336, vocab_size=32000, num_heads=32,
                        num_kv_heads=8)


def config(**flags) -> TrainConfig:
    return TrainConfig(**{"model_id": "m", "train_data": "d", **flags})


# ---------------------------------------------------------------- the search


def test_sizes_tried_are_passes_up_to_a_step_or_divisors_of_a_step():
    assert candidates(config(max_length=64, per_device_train_batch_size=2, gradient_accumulation_steps=2)) == list(
        range(64, 257, 8))
    assert candidates(config(packing=False, per_device_train_batch_size=4, gradient_accumulation_steps=3)) == [
        1, 2, 3, 4, 6, 12]
    assert candidates(config(max_length=100, gradient_accumulation_steps=1)) == [100]


def test_search_doubles_then_bisects_and_keeps_the_margin_under_the_limit():
    sizes = candidates(config(max_length=1024, gradient_accumulation_steps=16))  # 1,024 to 16,384 tokens by 128

    def pass_of(tokens: int) -> int:  # 1 GiB held, 1 MiB a token, out of memory above 9,000 tokens
        if tokens > 9000:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return GIB + tokens * MIB

    # 10 GiB allowed less the 10% margin is 9 GiB; with 0.5 GiB added later, 7.5 GiB for tokens: 7,680.
    value, trials = search(sizes, pass_of, unprobed=GIB // 2, limit=10 * GIB)
    assert value == 7680
    assert [(t.size, t.outcome) for t in trials][:5] == [
        (1024, "fits"), (2048, "fits"), (4096, "fits"), (8192, "over the limit"), (6144, "fits")]
    assert len(trials) == 9 and {t.outcome for t in trials if t.size > 7680} == {"over the limit"}
    assert trials[0].need_gib == 2.5 and MARGIN == 0.1

    # Without a counter (a CPU) only running out of memory stops it: the largest under 9,000 tokens.
    value, trials = search(sizes, lambda tokens: pass_of(tokens) and None, unprobed=0, limit=None)
    assert value == 8960 and (16384, "out of memory") in [(t.size, t.outcome) for t in trials]


def test_largest_fitting_at_the_edges():
    tried = []

    def upto(n):
        return lambda size: tried.append(size) or size <= n

    assert largest_fitting([1, 2, 4, 8], upto(0)) is None and tried == [1]
    assert largest_fitting([1, 2, 4, 8], upto(100)) == 8
    assert largest_fitting([5], upto(5)) == 5
    tried.clear()
    assert largest_fitting(list(range(1, 1001)), upto(700)) == 700 and len(tried) < 25


# ---------------------------------------------------------------- what training adds to a pass


def test_unprobed_memory_is_the_optimizer_and_the_gradient_buffers_by_their_byte_counts():
    n = MISTRAL_7B.trainable_params("lora", 32)  # 83,886,080 fp32 LoRA weights
    lora = [(n, 4)]
    adamw, adamw_8bit = optimizer_state_bytes("adamw_torch"), optimizer_state_bytes("paged_adamw_8bit")
    assert unprobed_bytes(lora, adamw, None, 1) == {"optimizer states": 8 * n}  # two fp32 moments
    assert unprobed_bytes(lora, adamw, None, 2) == {  # DDP
        "optimizer states": 8 * n, "gradient all-reduce buckets": 4 * n}
    assert unprobed_bytes(lora, adamw_8bit, None, 1) == {"optimizer states": 2 * (n + 4 * n // 256)}

    # ZeRO-2 on 2 GPUs, with the buckets engine/zero.py sizes for this adapter (a quarter of it, two
    # of them with overlap_comm): each process holds half the fp32 weights, gradients and moments.
    zero = {"stage": 2, **zero_settings(n, MISTRAL_7B.num_params, 2, 80.0)}
    assert zero["reduce_bucket_size"] == n // 4 and zero["overlap_comm"] and zero["contiguous_gradients"]
    half = n // 2
    assert unprobed_bytes(lora, adamw, {"zero_optimization": zero}, 2) == {
        "optimizer states": 8 * half, "DeepSpeed fp32 weights, gradients and buffers": 8 * half + 2 * 4 * (n // 4)}
    offloaded = {**zero, "offload_optimizer": {"device": "cpu"}}
    assert unprobed_bytes(lora, adamw, {"zero_optimization": offloaded}, 2) == {
        "DeepSpeed gradient buffers": 2 * 4 * (n // 4)}


# ---------------------------------------------------------------- the probe, on a real model


class TokenMeter:
    """A made-up GPU: a pass holds 1 GiB and 25 MiB a token of its input, of a 4 GiB limit."""

    def __init__(self, model):
        self.tokens = 0
        model.register_forward_pre_hook(lambda m, args, kwargs: setattr(self, "tokens", kwargs["input_ids"].numel()),
                                        with_kwargs=True)

    def limit(self):
        return 4 * GIB, "a made-up GPU"

    def __call__(self, run):
        run()
        return GIB + self.tokens * 25 * MIB


def test_the_probe_trains_nothing_and_takes_the_largest_pass_within_the_margin(tiny_mistral):
    from engine import model as engine_model
    from engine.tiled_mlp import TileMLPs, _tiled
    from engine.trainer_args import training_arguments

    cfg = config(model_id=str(tiny_mistral), max_length=16, gradient_accumulation_steps=8, lora_r=8)
    model = engine_model.add_adapter(engine_model.load_model(cfg, "sdpa"), cfg, ["q_proj", "v_proj", "down_proj"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * 8 * ((64 + 64) + (64 + 32) + (128 + 64))  # 2 layers, r=8
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    args = training_arguments(cfg, types.SimpleNamespace(eval=None))

    found = find_batch(model, cfg, args, [TileMLPs()], meter=TokenMeter(model))  # tiled_mlp true

    # Passes of 16 to 128 tokens by 2. 90% of 4 GiB, less 1 GiB held and the AdamW moments, at 25 MiB
    # a token: 106 tokens fit, 108 do not.
    assert 106 * 25 * MIB <= (1 - MARGIN) * 4 * GIB - GIB - 8 * trainable < 108 * 25 * MIB
    assert found.config.pack_tokens == 106 and found.config.per_device_train_batch_size == 1
    assert [t["size"] for t in found.event["tried"]] == [16, 32, 64, 128, 96, 112, 104, 108, 106]
    assert found.why.startswith(
        "auto_find_batch_size: pack_tokens 106 (was 16); per_device_train_batch_size stays 1: a step still trains "
        "8 examples per process. 90% of 4.00 GiB (a made-up GPU) allows 3.60 GiB; a pass's measured peak is counted "
        "with what training adds later (optimizer states 0.00 GiB); 108 tokens over the limit. Tried (tokens): "
        "16 fits (1.39 GiB), 32 fits (1.78 GiB)")
    assert found.event["unprobed_gib"] == {"optimizer states": round(8 * trainable / GIB, 3)}
    # It measured and left nothing behind: no gradients, the same weights, the same random numbers next.
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), rng)
    # It ran the model as training will: checkpointing on, the callbacks' changes made (tiled MLPs).
    assert model.training and model.base_model.model.model.gradient_checkpointing
    assert all(layer.mlp.forward.__func__ is _tiled for layer in model.base_model.model.model.layers)


# ---------------------------------------------------------------- whole runs


def test_a_fault_armed_on_one_rank_only(monkeypatch):
    module = torch.nn.Module()
    module.forward = lambda input_ids: input_ids
    monkeypatch.setenv("FINETUNE_STUDIO_FAULT", "oom@tokens100@rank1")
    monkeypatch.setenv("RANK", "0")
    faults.watch(module)
    module(input_ids=torch.zeros(1, 101))  # rank 0: no fault
    monkeypatch.setenv("RANK", "1")
    faults.watch(module)
    module(input_ids=torch.zeros(1, 100))
    with pytest.raises(torch.OutOfMemoryError, match="A pass of 101 tokens, more than 100"):
        module(input_ids=torch.zeros(1, 101))


@pytest.mark.slow  # 16-30 s here, loaded
def test_without_packing_the_micro_batch_shrinks_and_accumulation_keeps_the_step(tiny_mistral, tmp_path, monkeypatch):
    # Batches of 4 examples of about 35 tokens would run out of memory above 100 tokens; 2 fit.
    monkeypatch.setenv("FINETUNE_STUDIO_FAULT", "oom@tokens100")
    code, events = run_engine(
        tiny_mistral, tmp_path, "--packing", "false", "--auto_find_batch_size", "true", "--max_length", "40",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps", "2",
        "--eval_strategy", "no", "--save_strategy", "no", "--bf16", "false",
    )
    assert code == 0
    started = of(events, "started")[0]
    found = started["auto_batch"]
    assert (found["value"], found["per_device_train_batch_size"], found["gradient_accumulation_steps"]) == (2, 2, 4)
    assert [(t["size"], t["outcome"]) for t in found["tried"]] == [(1, "ran"), (2, "ran"), (4, "out of memory")]
    assert found["why"].startswith(
        "auto_find_batch_size: per_device_train_batch_size 2 (was 4); gradient_accumulation_steps 4 (was 2), so a "
        "step still trains 8 examples per process (micro-batches divide it). No memory counter on this device")
    assert "4 examples out of memory" in found["why"]
    assert started["config"]["per_device_train_batch_size"] == 2 and started["total_steps"] == 2
    assert [e["step"] for e in of(events, "log")] == [1, 2]


@pytest.mark.slow
def test_deepspeed_ranks_agree_on_the_smallest_pass_and_train_with_it(tiny_mistral, tmp_path, monkeypatch):
    """qlora-zero2 on 2 CPU processes: rank 1 runs out of memory above 100 tokens a pass, rank 0 never."""
    monkeypatch.setenv("FINETUNE_STUDIO_FAULT", "oom@tokens100@rank1")  # the ranks inherit it
    preset = load_preset("qlora-zero2")
    cfg = make_config(preset, model_id=str(tiny_mistral), train_data=str(EXAMPLES / "capitals-chat.jsonl"),
                      auto_find_batch_size=True, max_length=40, per_device_train_batch_size=2,
                      gradient_accumulation_steps=2, max_steps=2, eval_strategy="no", save_strategy="no")
    info = finish(start_run(preset, cfg, gpus=[], runs_dir=tmp_path, num_processes=2), tmp_path)
    log = (info.run_dir / "stdout.log").read_text()
    assert info.status == "succeeded", log[-3000:]
    started = of(events_of(info), "started")[0]
    found = started["auto_batch"]
    # Passes of 40 to 160 tokens (a step: 4 examples of max_length 40); rank 0 fits them all.
    assert (found["value"], found["this_process"], found["processes"]) == (100, 160, 2)
    assert found["why"].startswith("auto_find_batch_size: pack_tokens 100 (was 80); per_device_train_batch_size "
                                   "stays 2: a step still trains 4 examples per process.")
    assert "this process alone could take 160; all 2 take the smallest, 100" in found["why"]
    assert started["config"]["pack_tokens"] == 100 and started["config"]["deepspeed_config"]
    rank1 = [line for line in log.splitlines() if line.startswith("20") and "[rank 1]" in line
             and "auto_find_batch_size: pack_tokens 100" in line]
    assert rank1 and "this process alone could take 100" in rank1[0]
    assert "Tried (tokens): 40 ran, 80 ran, 160 out of memory, 120 out of memory, 100 ran, 110 out of memory, " \
           "105 out of memory." in rank1[0]
    # Training's passes on rank 1 stayed within its 100 tokens, or the armed fault would have failed the run.
    assert [e["step"] for e in of(events_of(info), "log")] == [1, 2]
