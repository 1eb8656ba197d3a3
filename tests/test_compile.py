"""torch_compile (engine/compile.py): compiled decoder layers train to the same losses, with one
graph shared by all the layers, and stand aside where they cannot run."""

import json
import random
import time
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModelForCausalLM

from engine.compile import compile_layers, why_not_compiled
from engine.events import read_events
from engine.launch import ACTIVE, run_status, start_run
from engine.packing import pack
from engine.presets import load_preset, make_config
from tests.conftest import mixed_lengths_jsonl, set_up_recipe, write_jsonl

LAYERS = 6


@pytest.fixture(scope="module")
def six_layers(tiny_mistral, tmp_path_factory) -> Path:
    """The tiny model with 6 layers: enough to tell a graph per layer from one shared graph."""
    folder = tmp_path_factory.mktemp("six-layers")
    config = AutoConfig.from_pretrained(tiny_mistral, num_hidden_layers=LAYERS)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (folder / name).write_bytes((Path(tiny_mistral) / name).read_bytes())
    return folder


def _losses(model_dir: Path, data: Path, out: Path, compile_: bool, peft_type: str, **more) -> tuple[list[float], bool]:
    flags = {"model_id": model_dir, "train_data": data, "output_dir": out, "torch_compile": str(compile_).lower(),
             "bf16": "false", "lora_dropout": 0.0, "max_steps": 4, "per_device_train_batch_size": 2,
             "gradient_accumulation_steps": 2, "eval_size": 4, "eval_strategy": "steps", "eval_steps": 2,
             "save_strategy": "no", "logging_steps": 1, "report_to": "none", "peft_type": peft_type,
             "learning_rate": 1e-3 if peft_type == "none" else 2e-2, **more}  # steps that move the losses
    recipe = set_up_recipe(**flags)
    recipe.trainer.train()
    history = recipe.trainer.state.log_history
    return [h.get("loss", h.get("eval_loss")) for h in history if "loss" in h or "eval_loss" in h], recipe.compiled


@pytest.mark.parametrize("peft_type,qlora", [("lora", False), ("lora", True), ("ia3", False), ("none", False)])
def test_compiled_layers_train_to_the_same_losses_with_one_graph_for_all_layers(six_layers, tmp_path, peft_type, qlora):
    """none: full finetuning; qlora: 4-bit weights, whose bitsandbytes calls the layer's graph makes."""
    # Mixed lengths: packed passes of changing sizes, so the shared graph must also take new shapes.
    data = mixed_lengths_jsonl(tmp_path / "data.jsonl", ["alpha", "beta", "gamma", "delta", "the", "of", "model"])

    more = {"use_qlora": str(qlora).lower()}
    eager, eager_compiled = _losses(six_layers, data, tmp_path / "eager", compile_=False, peft_type=peft_type, **more)
    torch._dynamo.reset()
    counters.clear()
    compiled, compiled_on = _losses(six_layers, data, tmp_path / "compiled", compile_=True, peft_type=peft_type, **more)

    assert (eager_compiled, compiled_on) == (False, True)
    assert len(compiled) == len(eager) == 6  # 4 training steps, 2 evaluations
    assert compiled == pytest.approx(eager, abs=2e-5)
    assert max(eager) - min(eager) > 0.01  # the adapter (or model) learned: the comparison is not of constants
    # Per layer call, the forward of training and of evaluation, and a recompile for new lengths
    # at most: far fewer graphs than layers, which is what compiling one layer's code buys.
    assert 1 <= counters["stats"]["unique_graphs"] < LAYERS


def test_compiled_layers_with_tiled_mlps_share_their_graphs(six_layers, tmp_path):
    """Each layer's feed-forward in slices of 8 tokens, over passes of changing lengths (so changing
    numbers of slices): the slices run outside the graph, so the layers still share a few graphs
    instead of one per layer and per slice count (past torch.compile's limit of 8, then uncompiled)."""
    data = mixed_lengths_jsonl(tmp_path / "data.jsonl", ["alpha", "beta", "the"])
    tiled = {"tiled_mlp": "true", "tiled_mlp_tokens": 8}
    eager, _ = _losses(six_layers, data, tmp_path / "eager", compile_=False, peft_type="lora", **tiled)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # no layer left uncompiled
        compiled, _ = _losses(six_layers, data, tmp_path / "compiled", compile_=True, peft_type="lora", **tiled)

    assert compiled == pytest.approx(eager, abs=2e-5)
    # The layer's forward and its resumption after the slices, for packed and one-example passes, in
    # training and evaluation: a handful of graphs, not one per layer and per number of slices.
    assert 1 <= counters["stats"]["unique_graphs"] < 2 * LAYERS


def test_compile_stands_aside_under_zero3_and_with_liger(tmp_path, monkeypatch):
    common = {"model_id": "m", "train_data": str(tmp_path / "d.jsonl")}
    zero3, zero2 = load_preset("qlora-zero3"), load_preset("qlora-zero2")  # the launcher passes their JSON
    assert "ZeRO-3" in why_not_compiled(make_config(zero3, **common, deepspeed=zero3.deepspeed))
    zero2 = make_config(zero2, **common, deepspeed=zero2.deepspeed, use_qlora=False)
    assert why_not_compiled(zero2) is None
    assert why_not_compiled(make_config(load_preset("qlora-zero2"), **common)) is None  # 4-bit weights, a CPU too
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # Liger runs on CUDA only
    liger = make_config(load_preset("qlora-zero2"), **common, use_liger_kernel=True)
    assert "use_liger_kernel" in why_not_compiled(liger)


def test_the_trainer_never_compiles_the_whole_model(six_layers, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a b c", "completion": " d"}] * 4)
    recipe = set_up_recipe(model_id=six_layers, train_data=data, output_dir=tmp_path / "o", torch_compile="true",
                           eval_size=0, max_steps=1)
    assert recipe.trainer.args.torch_compile is False
    assert json.loads(json.dumps(recipe.resolved))["torch_compile"] is True


def _curve(info, runs_dir: Path, compiled: bool, timeout: float = 600) -> list[tuple[float, float]]:
    deadline = time.time() + timeout
    while (info := run_status(info.run_id, runs_dir)).status in ACTIVE:
        assert time.time() < deadline, f"{info.run_id} still {info.status}"
        time.sleep(0.5)
    assert info.status == "succeeded", (info.run_dir / "stdout.log").read_text()[-3000:]
    events, _ = read_events(info.run_dir / "events.jsonl")
    started = next(e for e in events if e["event"] == "started")
    assert started["config"]["torch_compile"] is compiled
    return [(e["loss"], e["grad_norm"]) for e in events if e["event"] == "log"]


@pytest.mark.slow
def test_compiled_layers_under_ddp_and_zero2_follow_the_eager_curve(six_layers, tmp_path):
    """The presets' 2-process runs (gloo, fp32, LoRA on the 16-bit base, checkpointed layers) with
    and without torch_compile, started as the app starts them, in passes of at most 64 tokens:
    ranks run passes of one example, of several and idle ones at once. The same losses and
    gradient norms (ZeRO-2 sums gradients in hook order: when one-example passes took their own
    graph, its norms fell away from eager's; tests/test_correctness.py has that case)."""
    rng = random.Random(0)
    words = ["a", "b", "c", "hello", "world"]
    rows = [{"prompt": f"Q{i}: " + " ".join(rng.choices(words, k=rng.randint(2, 8))),
             "completion": " " + " ".join(rng.choices(words, k=rng.choice([1, 2, 3, 5, 8, 20, 40, 60])))}
            for i in range(64)]  # fmt: skip
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    flags = {"model_id": str(six_layers), "train_data": str(data), "bf16": False, "use_qlora": False,
             "max_steps": 12, "learning_rate": 1e-3, "lora_dropout": 0.0, "per_device_train_batch_size": 1,
             "gradient_accumulation_steps": 2, "pack_tokens": 64, "eval_size": 0, "eval_strategy": "no",
             "save_strategy": "no", "logging_steps": 1}  # fmt: skip
    runs = {}
    for name in ("ddp", "qlora-zero2"):
        preset = load_preset(name)
        for compiled in (False, True):
            config = make_config(preset, **flags, torch_compile=compiled)
            runs[name, compiled] = start_run(preset, config, gpus=[], runs_dir=tmp_path / "runs", num_processes=2)
    for name in ("ddp", "qlora-zero2"):
        eager = _curve(runs[name, False], tmp_path / "runs", compiled=False)
        compiled = _curve(runs[name, True], tmp_path / "runs", compiled=True)
        assert len(eager) == len(compiled) == 12
        for (loss, norm), (c_loss, c_norm) in zip(eager, compiled, strict=True):
            assert c_loss == pytest.approx(loss, abs=1e-4), name
            assert c_norm == pytest.approx(norm, rel=1e-4), name


def _kept_and_gradients(model_dir: Path, data: Path, out: Path, budget: float) -> tuple[int, list]:
    """One packed training pass through the compiled layers: the bytes the model keeps for the
    backward pass (each storage once; the layers' share is most of it) and the adapter's gradients."""
    recipe = set_up_recipe(model_id=model_dir, train_data=data, output_dir=out, bf16="false", use_qlora="false",
                           gradient_checkpointing="false", lora_dropout=0.1, eval_size=0, torch_compile="true",
                           activation_memory_budget=budget)
    model = recipe.trainer.model
    torch._dynamo.reset()  # the budget is read when a graph is first partitioned
    compile_layers(model, budget)
    model.train()
    batch = pack([{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (40, 90, 60)])
    kept = {}

    def pack_hook(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(0)  # the same dropout in each run
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    return sum(kept.values()), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_a_memory_budget_keeps_less_for_the_backward_with_the_same_gradients(six_layers, tmp_path):
    """activation_memory_budget below 1: the compiled layers keep less (their dropout included, whose
    random numbers the backward pass must then draw again, the same) and give the same gradients."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a b c", "completion": " d"}] * 4)
    whole, grads = _kept_and_gradients(six_layers, data, tmp_path / "whole", budget=1.0)
    budget, budget_grads = _kept_and_gradients(six_layers, data, tmp_path / "budget", budget=0.9)

    assert budget < 0.9 * whole
    assert len(grads) == len(budget_grads) > 0
    for g, b in zip(grads, budget_grads, strict=True):
        torch.testing.assert_close(b, g, rtol=1e-5, atol=1e-6)
