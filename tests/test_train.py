"""End-to-end training runs of the engine on CPU, with tiny models and the real Mistral tokenizer."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import train
from engine.events import read_events
from tests.conftest import write_jsonl

REPO = Path(__file__).parent.parent
EXAMPLES = REPO / "examples"
SEED_FLAGS = (Path(__file__).parent / "seed_flags.txt").read_text().split()

# A fast, learnable setting: 4 examples a step, a high LR for a tiny random model.
FAST_SETTINGS = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 0.003,
                 "lora_r": 8, "lora_alpha": 16, "eval_size": 0, "eval_strategy": "no",
                 "save_strategy": "no", "warmup_ratio": 0,
                 "packing": "false"}  # step counts below are of examples; tests/test_packing.py packs


def fast(**overrides) -> list[str]:
    """FAST_SETTINGS with overrides, as flags."""
    return [str(x) for k, v in {**FAST_SETTINGS, **overrides}.items() for x in (f"--{k}", v)]


FAST = fast()


def run_engine(model_dir, tmp_path, *flags, data=EXAMPLES / "capitals-chat.jsonl") -> tuple[int, list[dict]]:
    out = tmp_path / "output"
    code = train.main(["--model_id", str(model_dir), "--train_data", str(data),
                       "--output_dir", str(out), *flags])
    events, _ = read_events(out / "events.jsonl")
    return code, events


def of(events, name):
    return [e for e in events if e["event"] == name]


def logits_of(model, tokenizer, text="What is the capital of France?"):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


@pytest.mark.slow
def test_seed_command_runs_unchanged_and_leaves_a_loadable_adapter(tiny_mistral, tmp_path):
    """The seed README's command, `train.py` → `-m engine.train`, DeepSpeed and bf16 left out."""
    data = tmp_path / "data.jsonl"
    shutil.copy(EXAMPLES / "capitals-completion.jsonl", data)
    # The seed padded each micro-batch; without packing its step counts hold, as asserted below.
    flags = [f.replace("$MODEL_ID", str(tiny_mistral)) for f in SEED_FLAGS] + ["--packing", "false"]
    # Run from a folder of its own, as the seed's relative paths (./data.jsonl, ./model) expect.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "engine.train", *flags], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "model"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    events, _ = read_events(out / "events.jsonl")
    started = of(events, "started")[0]
    # 48 examples, eval_size 0.1 → 5 held out; 43 / (1 x 4) → 11 steps an epoch, 3 epochs.
    assert (started["num_train_examples"], started["num_eval_examples"]) == (43, 5)
    assert started["total_steps"] == 33
    assert started["load_peak_gib"] is None  # GPU memory: there is none on a CPU, and no number is made up
    assert started["config"]["lora_target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert started["config"]["use_qlora"] is True and started["config"]["attention"] == "sdpa"
    assert "attention: sdpa" in result.stdout  # use_flash_attention true on CPU: logged, no crash
    assert len(of(events, "log")) == 33  # logging_steps 1
    # save_steps / eval_steps 0.05 of 33 steps → every 2 steps.
    assert [e["step"] for e in of(events, "eval")][:3] == [2, 4, 6]
    assert [e["step"] for e in of(events, "checkpoint")][:3] == [2, 4, 6]
    assert of(events, "finished")[0]["adapter_path"] == "model"
    assert json.loads((out / "finetune_config.json").read_text())["lora_r"] == 32

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_mistral)
    tokenizer = AutoTokenizer.from_pretrained(out)
    before = logits_of(base, tokenizer)
    tuned = PeftModel.from_pretrained(base, out)
    assert not torch.allclose(before, logits_of(tuned, tokenizer))


@pytest.mark.slow
def test_loss_falls_below_half_and_the_adapter_changes_the_model(tiny_llama, tmp_path):
    code, events = run_engine(tiny_llama, tmp_path, *FAST, "--num_train_epochs", "8")
    assert code == 0
    losses = [e["loss"] for e in of(events, "log")]
    assert len(losses) == 8 * 12  # 48 examples / 4, 8 epochs; eval_strategy no keeps them all
    assert losses[-1] < losses[0] / 2, losses
    log = of(events, "log")[-1]
    assert log["tokens_per_second"] > 0 and log["learning_rate"] is not None
    finished = of(events, "finished")[0]
    assert finished["train_loss"] > 0 and finished["train_runtime_s"] > 0


def test_preflight_lists_every_problem_before_loading_a_model(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "completion": ""}, "{not json"])
    out = tmp_path / "output"
    code = train.main([
        "--model_id", str(tmp_path / "no-such-model"), "--train_data", str(bad),
        "--eval_size", "1.5", "--lora_r", "0", "--bf16", "true", "--fp16", "true",
        "--deepspeed", str(tmp_path / "ds.json"), "--use_ddp", "true", "--output_dir", str(out),
    ])
    assert code == train.EXIT_PREFLIGHT
    err = capsys.readouterr().err
    for expected in ["model_id: the folder", "eval_size", "lora_r: must be a positive whole number",
                     "bf16 and fp16 are both true", "deepspeed and use_ddp are both set",
                     "deepspeed: config file", "line 1, field 'completion'", "line 2"]:
        assert expected in err, expected
    failed = of(read_events(out / "events.jsonl")[0], "failed")[0]
    assert "problem" in failed["error"] and "line 1, field 'completion'" in failed["hint"]
    assert len(failed["problems"]) >= 8


def test_a_crash_becomes_a_failed_event_with_a_hint(tiny_mistral, tmp_path, monkeypatch):
    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.20 GiB")

    monkeypatch.setattr(train.Recipe, "train", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        run_engine(tiny_mistral, tmp_path, *FAST, "--max_steps", "1")
    failed = of(read_events(tmp_path / "output" / "events.jsonl")[0], "failed")[0]
    assert failed["error"] == "The GPU ran out of memory."
    assert "lower per_device_train_batch_size (now 4)" in failed["hint"]
    assert "OutOfMemoryError" in failed["traceback_tail"]


@pytest.mark.slow
@pytest.mark.parametrize("peft_type", ["ia3", "none"])
def test_ia3_and_full_finetuning(peft_type, tiny_mistral, tmp_path):
    code, events = run_engine(tiny_mistral, tmp_path, *FAST, "--peft_type", peft_type,
                              "--max_steps", "3", "--learning_rate", "0.01")
    assert code == 0 and of(events, "finished")
    out = tmp_path / "output"
    if peft_type == "ia3":
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "IA3"
    else:
        assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()


@pytest.mark.slow
def test_qlora_with_merge_writes_a_merged_model_equal_to_base_plus_adapter(tiny_mistral, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, events = run_engine(tiny_mistral, tmp_path, *FAST, "--use_qlora", "true",
                              "--merge_adapter", "true", "--max_steps", "3")
    assert code == 0
    out = tmp_path / "output"
    assert of(events, "finished")[0]["merged_path"] == str(out / "merged")
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    merged = logits_of(AutoModelForCausalLM.from_pretrained(out / "merged"), tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_mistral)
    plain = logits_of(base, tokenizer)
    with_adapter = logits_of(PeftModel.from_pretrained(base, out), tokenizer)
    assert torch.allclose(merged, with_adapter, atol=1e-4)
    assert not torch.allclose(merged, plain)


@pytest.mark.slow
def test_fractional_steps_and_tensorboard(tiny_mistral, tmp_path):
    code, events = run_engine(
        tiny_mistral, tmp_path, *fast(max_steps=8, save_strategy="steps", save_steps=0.25, eval_size=0.1,
                                      eval_strategy="steps", eval_steps=0.5, logging_steps=0.25,
                                      save_total_limit=0, report_to="tensorboard"))
    assert code == 0
    assert [e["step"] for e in of(events, "checkpoint")] == [2, 4, 6, 8]
    assert [e["step"] for e in of(events, "eval")] == [4, 8]
    assert [e["step"] for e in of(events, "log")] == [2, 4, 6, 8]
    assert list((tmp_path / "output").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_mlflow_reporting_to_a_local_store(tiny_mistral, tmp_path, monkeypatch):
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow 3 retired the plain-folder store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "finetune-studio-test")
    code, _ = run_engine(tiny_mistral, tmp_path, *FAST, "--max_steps", "3", "--report_to", "mlflow")
    assert code == 0
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["finetune-studio-test"], output_format="list")
    assert len(runs) == 1
    history = mlflow.MlflowClient(store).get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
