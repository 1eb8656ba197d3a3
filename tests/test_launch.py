"""Presets and the launcher: commands, run folders, and real multi-process runs on CPU."""

import dataclasses
import json
import os
import shlex
import signal
import time
from pathlib import Path

import pytest

from engine import launch
from engine.events import read_events
from engine.hardware import GPU, Hardware, parse_nvidia_smi
from engine.launch import build_command, command_text, list_runs, resume_run, run_status, start_run, stop_run
from engine.memory import ModelShape
from engine.presets import PresetError, list_presets, load_preset, make_config, recommend_preset
from engine.zero import resolve_deepspeed_config, stage3_settings, zero_settings, zero_stage

EXAMPLES = Path(__file__).parent.parent / "examples"
MISTRAL_7B = ModelShape(hidden_size=4096, num_layers=32, intermediate_size=14336, vocab_size=32000, num_heads=32,
                        num_kv_heads=8)


def test_every_preset_loads_and_builds_a_config():
    presets = {p.name: p for p in list_presets()}
    assert {"qlora-zero2", "qlora-zero3", "ddp", "fp16-v100-t4", "cpu-tiny"} <= set(presets)
    for name, stage in (("qlora-zero2", 2), ("qlora-zero3", 3)):
        preset = presets[name]
        assert preset.launcher == {"use_deepspeed": True} and preset.needs_gpu
        assert zero_stage(preset.deepspeed) == stage
        config = make_config(preset, model_id="m", train_data="d.jsonl", lora_r=16)
        assert (config.bf16, config.use_qlora, config.gradient_checkpointing) == (True, True, True)
        assert (config.lora_alpha, config.lora_r) == (64, 16)  # the user's lora_r over the preset's
        argv, _ = build_command(preset, config, gpus=[0, 1])
        engine_flags = argv[argv.index("engine.train"):]
        assert engine_flags[engine_flags.index("--deepspeed") + 1] == preset.deepspeed  # the engine reads it too
    assert make_config(presets["fp16-v100-t4"], model_id="m", train_data="d").fp16 is True
    assert make_config(presets["ddp"], model_id="m", train_data="d").use_ddp is True


@pytest.mark.parametrize("text,where", [
    ("name: bad\ntitle: t\ndescription: d\nhardware: h\nneeds_gpu: false\nlauncher: {}\ntrain: {}\ncolour: red\n",
     "colour: unknown key"),
    ("name: bad\ntitle: t\ndescription: d\nhardware: h\nneeds_gpu: false\nlauncher: {}\ntrain: {lora_r: four}\n",
     "train.lora_r"),
    ("name: bad\ntitle: t\ndescription: d\nhardware: h\nneeds_gpu: false\nlauncher: {use_deepspeed: maybe}\n"
     "train: {}\n", "launcher.use_deepspeed"),
    ("name: other\ntitle: t\ndescription: d\nhardware: h\nneeds_gpu: false\nlauncher: {}\ntrain: {}\n",
     "name: 'other' must match"),
    ("name: bad\ntitle: t\nhardware: h\nneeds_gpu: false\nlauncher: {}\ntrain: {}\n", "description: missing"),
])
def test_a_bad_preset_names_its_file_and_key(tmp_path, text, where):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(PresetError) as error:
        load_preset("bad", tmp_path)
    assert str(tmp_path / "bad.yaml") in str(error.value) and where in str(error.value)


def test_recommendation_follows_the_hardware():
    assert recommend_preset(Hardware())[0].name == "cpu-tiny"
    t4 = parse_nvidia_smi("0, Tesla T4, 15360, 0, 7.5\n")
    preset, why = recommend_preset(Hardware(gpus=t4))
    assert preset.name == "fp16-v100-t4" and "7.5" in why and "bfloat16" in why
    h100 = [GPU(i, "NVIDIA H100 80GB HBM3", 79.6, 0.5, (9, 0)) for i in range(2)]
    preset, why = recommend_preset(Hardware(gpus=h100))
    assert preset.name == "qlora-zero2" and "2 x NVIDIA H100" in why
    # ZeRO-3 only pays for a model too big to train on one GPU, which the hardware alone cannot tell:
    # it is named as the option with several GPUs, never with one.
    assert "QLoRA + ZeRO-3" in why
    preset, why = recommend_preset(Hardware(gpus=h100[:1]))
    assert preset.name == "qlora-zero2" and "ZeRO-3" not in why


def test_command_is_an_argv_with_one_process_per_gpu_and_copyable_text():
    config = make_config(load_preset("qlora-zero2"), model_id="m", train_data="my data; rm -rf ~.jsonl")
    argv, env = build_command(load_preset("qlora-zero2"), config, gpus=[2, 3], port=29555)
    assert env == {"CUDA_VISIBLE_DEVICES": "2,3"}
    launcher = argv[: argv.index("engine.train")]
    assert launcher[argv.index("--num_processes") + 1] == "2" and "--use_deepspeed" in launcher
    assert "--main_process_port" in launcher and "29555" in launcher
    assert "my data; rm -rf ~.jsonl" in argv  # user text is one argv item, never shell syntax
    text = command_text(argv, env)
    assert text.startswith("CUDA_VISIBLE_DEVICES=2,3 accelerate launch ")
    assert shlex.split(text)[3:] == argv[3:]
    ddp_argv, _ = build_command(load_preset("ddp"), config, gpus=[0, 1])
    assert "--multi_gpu" in ddp_argv and "--use_deepspeed" not in ddp_argv
    # The launcher's precision is the engine's flags', never a second setting that could contradict them.
    assert ddp_argv[ddp_argv.index("--mixed_precision") + 1] == "bf16"
    fp32_argv, _ = build_command(load_preset("ddp"), dataclasses.replace(config, bf16=False), gpus=[0, 1])
    assert fp32_argv[fp32_argv.index("--mixed_precision") + 1] == "no"
    tiny_argv, tiny_env = build_command(load_preset("cpu-tiny"), config, gpus=[])
    assert "--cpu" in tiny_argv and tiny_env == {"CUDA_VISIBLE_DEVICES": ""}


def test_zero_settings_follow_the_documented_rule():
    trainable = MISTRAL_7B.trainable_params("lora", 32)
    assert 80e6 < trainable < 90e6  # r=32 on all 7 projections of Mistral-7B: 83.9M
    assert 7.0e9 < MISTRAL_7B.num_params < 7.5e9
    small = zero_settings(trainable, MISTRAL_7B.num_params, 2, 80.0)
    assert small["reduce_bucket_size"] == trainable // 4 and small["overlap_comm"] is True
    assert small["offload_optimizer"] == {"device": "none"}
    full = zero_settings(MISTRAL_7B.num_params, MISTRAL_7B.num_params, 2, 24.0)
    assert full["reduce_bucket_size"] == 500_000_000 and full["overlap_comm"] is False
    assert full["offload_optimizer"]["device"] == "cpu"  # 7.2B x (2 + 14/2) bytes >> 80% of 24 GB
    assert zero_settings(None, None, 1, None)["reduce_bucket_size"] == 500_000_000
    # ZeRO-3 splits the weights too: 16 / N bytes a parameter. 7.2B x 16 / 8 fits 80% of 24 GB; x 2 + 14 / 8 does not.
    assert zero_settings(MISTRAL_7B.num_params, MISTRAL_7B.num_params, 8, 24.0, stage=3)["offload_optimizer"] == {
        "device": "none"}
    assert zero_settings(MISTRAL_7B.num_params, MISTRAL_7B.num_params, 8, 24.0)["offload_optimizer"]["device"] == "cpu"


def test_zero3_settings_follow_the_documented_rule():
    qlora = make_config(load_preset("qlora-zero3"), model_id="m", train_data="d")
    layer_values = sum(i * o for i, o in MISTRAL_7B.projections().values())  # 218M
    adapter = MISTRAL_7B.trainable_params("lora", 32)
    layer = layer_values // 4 + adapter // 32 + 2 * 4096  # 4 nf4 values a bf16 element: 57M elements
    on_h100 = stage3_settings(MISTRAL_7B, qlora, 80.0, 256.0)
    assert on_h100["stage3_prefetch_bucket_size"] == layer == on_h100["stage3_max_reuse_distance"]
    assert on_h100["stage3_max_live_parameters"] == 2 * layer
    # Adapters whole on each GPU (84M x 4 bytes = 0.31 GiB <= 2% of 80 GiB): r x the widest layer, 32 x 14336,
    # below the smallest 4-bit weight (k_proj, 4096 x 1024 / 4 elements), which must still be split.
    assert on_h100["stage3_param_persistence_threshold"] == 32 * 14336 < 4096 * 1024 // 4
    assert on_h100["stage3_gather_16bit_weights_on_model_save"] is True
    on_12gb = stage3_settings(MISTRAL_7B, qlora, 12.0, 256.0)
    assert on_12gb["stage3_param_persistence_threshold"] == 10 * 4096  # 0.31 GiB > 2% of 12 GiB: norms only
    # Full finetuning in bf16: two 218M-element layers do not fit 10% of 4 GB, so all three shrink to fit.
    full = make_config(load_preset("qlora-zero3"), model_id="m", train_data="d", use_qlora=False, peft_type="none")
    small = stage3_settings(MISTRAL_7B, full, 4.0, 256.0)
    assert small["stage3_max_live_parameters"] == int(0.1 * 4 * 2**30 / 2) == 2 * small["stage3_prefetch_bucket_size"]
    # Its 14.4 GB of 16-bit weights are gathered on rank 0's CPU to save: more than half of 16 GB of RAM is not.
    assert stage3_settings(MISTRAL_7B, full, 80.0, 16.0)["stage3_gather_16bit_weights_on_model_save"] is False


def test_a_zero3_config_leaves_nothing_for_deepspeed_to_guess(tiny_mistral, tmp_path):
    """Every memory setting of ds_z3_config.json is filled from the model (the tiny one here), and
    from DeepSpeed's defaults when the model's config cannot be read; HF fills the rest."""
    config = make_config(load_preset("qlora-zero3"), model_id=str(tiny_mistral), train_data="d",
                         deepspeed=load_preset("qlora-zero3").deepspeed)
    zero = resolve_deepspeed_config(config.deepspeed, config, 2, None)["zero_optimization"]
    assert "auto" not in zero.values() and zero["stage"] == 3
    # The tiny model's smallest 4-bit weight, k_proj (64 x 32 / 4 = 512 elements), caps the threshold.
    assert zero["stage3_param_persistence_threshold"] == 511
    offline = dataclasses.replace(config, model_id=str(tmp_path / "no-config"))
    zero = resolve_deepspeed_config(config.deepspeed, offline, 2, None)["zero_optimization"]
    assert {k: v for k, v in zero.items() if v == "auto"}.keys() == {"stage3_prefetch_bucket_size",
                                                                     "stage3_param_persistence_threshold"}
    assert zero["stage3_max_live_parameters"] == 1_000_000_000


# ---------------------------------------------------------------- real runs (CPU, 2 processes)


def wait_for(predicate, timeout=300, every=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def events_of(info):
    return read_events(info.run_dir / "events.jsonl")[0]


def finish(info, runs_dir, timeout=600):
    return wait_for(lambda: (s := run_status(info.run_id, runs_dir)).status not in ("queued", "running",
                                                                                   "stopping") and s, timeout)


@pytest.mark.slow
@pytest.mark.parametrize("preset_name", ["ddp", "qlora-zero2"])
def test_two_process_run_through_start_run_leaves_an_adapter(preset_name, tiny_mistral, tmp_path):
    preset = load_preset(preset_name)
    config = make_config(preset, model_id=str(tiny_mistral), train_data=str(EXAMPLES / "capitals-chat.jsonl"),
                         max_steps=4, save_steps=2, eval_steps=2)
    info = start_run(preset, config, gpus=[], runs_dir=tmp_path, num_processes=2)
    assert info.status == "running" and (info.run_dir / "command.txt").read_text().startswith("CUDA_VISIBLE")
    info = finish(info, tmp_path)
    assert info.status == "succeeded", (info.run_dir / "stdout.log").read_text()[-3000:]
    events = events_of(info)
    # Events come from rank 0 only: one started, one log per step; both ranks wrote to stdout.log.
    assert [e["event"] for e in events].count("started") == 1
    assert [e["step"] for e in events if e["event"] == "log"] == [1, 2, 3, 4]
    started = events[0]
    assert started["world_size"] == 2
    log = (info.run_dir / "stdout.log").read_text()
    assert "[rank 0]" in log and "[rank 1]" in log
    if preset_name == "qlora-zero2":
        zero = started["config"]["deepspeed_config"]["zero_optimization"]
        assert zero["stage"] == 2 and zero["reduce_bucket_size"] == 5_000_000 and zero["overlap_comm"] is True
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_mistral), info.run_dir / "output")
    assert not launch.run_processes(info)


@pytest.mark.slow
def test_stop_leaves_no_process_and_resume_continues(tiny_mistral, tmp_path):
    preset = load_preset("ddp")
    config = make_config(preset, model_id=str(tiny_mistral), train_data=str(EXAMPLES / "capitals-chat.jsonl"),
                         max_steps=400, save_steps=1000, eval_strategy="no", lr_scheduler_type="constant")
    info = start_run(preset, config, gpus=[], runs_dir=tmp_path, num_processes=2)
    wait_for(lambda: any(e["event"] == "log" and e["step"] >= 3 for e in events_of(info)))
    processes = launch.run_processes(info)
    assert len(processes) >= 3  # the launcher and two ranks
    # Each yields the CPU to the web app (benchmarks/RESULTS.md, load): ranks inherit it.
    assert all(p.nice() == min(19, os.nice(0) + launch.RUN_NICENESS) for p in processes)
    info = stop_run(info.run_id, tmp_path, wait=True)
    assert info.status == "stopped"
    assert not launch.run_processes(info)
    stopped = [e for e in events_of(info) if e["event"] == "stopped"][0]
    assert Path(stopped["checkpoint"]).is_dir()  # saved at the step boundary after SIGTERM
    stopped_step = stopped["step"]

    info = resume_run(info.run_id, tmp_path)
    assert "--resume_from_checkpoint true" in (info.run_dir / "command.txt").read_text()
    wait_for(lambda: [e for e in events_of(info) if e["event"] == "started"][1:])
    restarted = [e for e in events_of(info) if e["event"] == "started"][1]
    assert restarted["start_step"] == stopped_step
    info = stop_run(info.run_id, tmp_path, wait=True)
    assert info.status == "stopped" and not launch.run_processes(info)
    assert [r.run_id for r in list_runs(tmp_path)] == [info.run_id]


@pytest.mark.slow
def test_a_crashed_rank_fails_the_run_and_takes_the_other_rank_down(tiny_mistral, tmp_path):
    preset = load_preset("ddp")
    config = make_config(preset, model_id=str(tiny_mistral), train_data=str(EXAMPLES / "capitals-chat.jsonl"),
                         max_steps=400, save_strategy="no", eval_strategy="no")
    info = start_run(preset, config, gpus=[], runs_dir=tmp_path, num_processes=2)
    wait_for(lambda: any(e["event"] == "log" for e in events_of(info)))
    rank1 = wait_for(lambda: [p for p in launch.run_processes(info) if p.environ().get("RANK") == "1"])[0]
    rank1.send_signal(signal.SIGKILL)
    info = finish(info, tmp_path, timeout=120)
    assert info.status == "failed"
    # Rank 0 may report the lost peer itself, or die before it can: either way the reason says who failed.
    assert "The first process to fail was rank 1, exit code -9" in info.reason and "SIGKILL" in info.reason
    assert not launch.run_processes(info)


@pytest.mark.slow
def test_busy_gpus_queue_a_run_and_command_txt_reruns_it(tiny_mistral, tmp_path, monkeypatch):
    import subprocess

    preset = load_preset("cpu-tiny")
    config = make_config(preset, model_id=str(tiny_mistral), train_data=str(EXAMPLES / "capitals-chat.jsonl"),
                         max_steps=3, eval_strategy="no", save_strategy="no")
    # Pretend GPU 0 exists; a CPU preset with gpus=[0] still runs on the CPU (CUDA_VISIBLE_DEVICES=0 here
    # has no GPU behind it), which is enough to exercise the queue.
    first = start_run(preset, config, gpus=[0], runs_dir=tmp_path)
    second = start_run(preset, config, gpus=[0], runs_dir=tmp_path)
    assert (first.status, second.status) == ("running", "queued")
    first = finish(first, tmp_path)
    second = wait_for(lambda: (s := run_status(second.run_id, tmp_path)).status != "queued" and s)
    assert first.status == "succeeded" and second.started_at >= first.ended_at
    second = finish(second, tmp_path)
    assert second.status == "succeeded" and second.port != first.port or second.port is None

    # command.txt, run by hand from the repo root, trains the same way.
    command = (first.run_dir / "command.txt").read_text()
    rerun = subprocess.run(command.replace(str(first.run_dir), str(tmp_path / "by-hand")), shell=True,
                           cwd=launch.REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    by_hand = read_events(tmp_path / "by-hand" / "events.jsonl")[0]
    ui = events_of(first)
    assert [e["loss"] for e in by_hand if e["event"] == "log"] == pytest.approx(
        [e["loss"] for e in ui if e["event"] == "log"], rel=1e-5)
    assert json.loads((first.run_dir / "config.json").read_text())["preset"] == "cpu-tiny"


@pytest.mark.slow
def test_cli_starts_follows_and_lists_a_run(tiny_mistral, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are the caller's, not the repo's
    (tmp_path / "data.jsonl").write_text((EXAMPLES / "capitals-completion.jsonl").read_text())
    code = launch.main(["--preset", "cpu-tiny", "--model_id", str(tiny_mistral), "--train_data", "data.jsonl",
                        "--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no", "--runs_dir", "runs"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "started: 1 process(es), 3 steps" in out and "[########################] 3/3 loss" in out
    assert "finished: adapter in" in out and "succeeded" in out
    run = list_runs(tmp_path / "runs")[0]
    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["train_data"] == str(tmp_path / "data.jsonl") and config["lora_r"] == 8  # the preset's
    assert launch.main(["list", "--runs_dir", "runs"]) == 0
    assert run.run_id in capsys.readouterr().out


def run_two_processes(name: str, runs_dir: Path, model: Path, **extra):
    """A 2-process run of 5 steps to compare presets on: fixed learning rate, no dropout."""
    preset = load_preset(name)
    config = make_config(preset, **{
        "model_id": str(model), "train_data": str(EXAMPLES / "capitals-chat.jsonl"), "max_steps": 5,
        "learning_rate": 1e-4, "lr_scheduler_type": "constant", "warmup_ratio": 0, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "pack_tokens": 64,
        "lora_dropout": 0.0,  # dropout draws differ between packed and padded shapes
        # ZeRO-3 splits the output layer, so engine/loss.py stands aside there: both run the same loss.
        "chunked_loss": False,
        "save_strategy": "no", "eval_strategy": "no", **extra})
    info = finish(start_run(preset, config, gpus=[], runs_dir=runs_dir, num_processes=2), runs_dir)
    assert info.status == "succeeded", info.reason
    return info


def curve(info) -> list[tuple[float, float]]:
    return [(e["loss"], e["grad_norm"]) for e in events_of(info) if e["event"] == "log"]


@pytest.fixture(scope="module")
def zero2_run(tiny_mistral, tmp_path_factory):
    """The ZeRO-2 run ZeRO-3 must match (tests/test_correctness.py holds ZeRO-2 to DDP and one process)."""
    return run_two_processes("qlora-zero2", tmp_path_factory.mktemp("zero2-run"), tiny_mistral)


@pytest.mark.slow
def test_qlora_zero3_splits_the_4bit_model_learns_like_zero2_and_resumes(zero2_run, tiny_mistral, tmp_path):
    """QLoRA under ZeRO-3: the 4-bit weights, stored in bf16, are split across the 2 processes.

    Steps 1-3, then a resume from checkpoint-3 (its ZeRO-3 shards) to step 5 that also merges: the
    5 steps must be ZeRO-2's (losses within 1e-4, gradient norms 1e-3, relative), and the adapter
    gathered from the shards whole, ZeRO-2's, and the model ZeRO-2 trained once PEFT loads it.
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    first = run_two_processes("qlora-zero3", tmp_path, tiny_mistral, max_steps=3, save_strategy="steps", save_steps=3)
    checkpoint = first.run_dir / "output" / "checkpoint-3"
    assert {p.name for p in (checkpoint / "global_step3").iterdir()} == {  # each rank's shard of the state
        f"zero_pp_rank_{rank}_mp_rank_00_{part}_states.pt" for rank in (0, 1) for part in ("model", "optim")}
    resumed = run_two_processes("qlora-zero3", tmp_path, tiny_mistral, resume_from_checkpoint=str(checkpoint),
                           merge_adapter=True)
    started = [e for e in events_of(resumed) if e["event"] == "started"][0]
    assert started["start_step"] == 3 and started["config"]["deepspeed_config"]["zero_optimization"]["stage"] == 3
    zero2 = zero2_run
    for (loss, norm), (want_loss, want_norm) in zip(curve(first) + curve(resumed), curve(zero2), strict=True):
        assert loss == pytest.approx(want_loss, rel=1e-4) and norm == pytest.approx(want_norm, rel=1e-3)
    # Rank 0 holds its half of the weights (the 16-bit embeddings and head dominate the tiny model); ZeRO-2 all.
    assert 0.45 < events_of(first)[0]["weights_gib"] / events_of(zero2)[0]["weights_gib"] < 0.55

    adapter, want = (load_file(run.run_dir / "output" / "adapter_model.safetensors") for run in (resumed, zero2))
    assert adapter.keys() == want.keys() and len(adapter) == 2 * 7 * 2  # lora_A and _B of 7 projections, 2 layers
    for key, tensor in adapter.items():
        assert tensor.shape == want[key].shape and tensor.shape.numel() > 0, key
        assert (tensor - want[key]).norm() <= 1e-3 * want[key].norm(), key
    assert all(adapter[k].abs().max() > 1e-4 for k in adapter if "lora_B" in k)  # trained away from zero

    # The adapter gives the model ZeRO-2 trained, on the fp32 base; the merged model is base + this adapter.
    ids = torch.tensor([[1, 415, 5565, 302, 4843, 28747]])
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_mistral)(ids).logits
        tuned, want = (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_mistral),
                                                 run.run_dir / "output")(ids).logits for run in (resumed, zero2))
        base16 = AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.bfloat16)
        merged_here = PeftModel.from_pretrained(base16, resumed.run_dir / "output").merge_and_unload()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(resumed.run_dir / "output" / "merged")(ids).logits
    assert (tuned - base_logits).abs().max() > 0.05 and (tuned - want).abs().max() < 1e-3
    assert torch.equal(merged, merged_here)


def test_a_just_started_leader_counts_as_alive_before_its_environment_is_set(tmp_path):
    """Right after fork, before exec, the child's environment is the parent's (no marker): a status
    check in that window once marked a healthy run failed."""
    import subprocess

    import psutil

    child = subprocess.Popen(["sleep", "30"])  # no marker in its environment, like a child before exec
    try:
        info = launch.RunInfo(run_id="r", status="running", preset="cpu-tiny", run_dir=tmp_path, created_at=0,
                              command="", pid=child.pid, pid_create_time=psutil.Process(child.pid).create_time())
        assert [p.pid for p in launch.run_processes(info)] == [child.pid]
        info.pid_create_time -= 100  # a reused pid: another process's start time
        assert launch.run_processes(info) == []
    finally:
        child.kill()
        child.wait()
