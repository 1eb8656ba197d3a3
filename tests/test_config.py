import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import PeftType, Strategy, TrainConfig, build_parser, from_dict, parse_args

# The seed README's command, flag for flag (train.py → -m engine.train; DeepSpeed/bf16 left out).
SEED_FLAGS = (Path(__file__).parent / "seed_flags.txt").read_text().replace("$MODEL_ID", "M").split()


def test_seed_command_parses_with_the_seeds_meaning():
    c = parse_args(SEED_FLAGS + ["--deepspeed", "./3_ds_z2_config.json", "--bf16", "true"])
    assert c.use_flash_attention is True and c.use_qlora is True and c.bf16 is True
    assert c.eval_data is None  # NA
    assert c.lora_target_modules is None  # auto, resolved from the model later
    assert c.eval_strategy == Strategy.steps and c.eval_steps == 0.05 and c.save_steps == 0.05
    assert c.learning_rate == 1e-5 and c.num_train_epochs == 3 and c.max_num_samples == 0
    assert c.resume_from_checkpoint is None and c.cleanup_output_dir_on_start is True
    assert c.mlfoundry_ml_repo == "my-ml-repo" and c.mlfoundry_log_checkpoints is False
    assert c.deepspeed == "./3_ds_z2_config.json"


def test_ddp_variant_and_values():
    c = parse_args(["--model_id", "m", "--train_data", "d", "--use_ddp", "true",
                    "--lora_target_modules", "q_proj,v_proj", "--resume_from_checkpoint", "true",
                    "--peft_type", "ia3"])
    assert c.use_ddp is True and c.lora_target_modules == ["q_proj", "v_proj"]
    assert c.resume_from_checkpoint == "true" and c.peft_type == PeftType.ia3
    assert parse_args(["--model_id", "m", "--train_data", "d", "--resume_from_checkpoint",
                       "out/checkpoint-5"]).resume_from_checkpoint == "out/checkpoint-5"


@pytest.mark.parametrize("flag,value", [("--bf16", "maybe"), ("--peft_type", "prefix"),
                                         ("--lora_r", "four"), ("--eval_strategy", "sometimes"), ("--optim", "adam")])
def test_bad_values_are_rejected_with_choices(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model_id", "m", "--train_data", "d", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err
    if flag == "--optim":
        assert f"argument --optim: '{value}' is not one of adamw_torch, adamw_torch_fused, adamw_bnb_8bit" in err


def test_argv_and_dict_round_trip():
    c = parse_args(SEED_FLAGS)
    assert parse_args(c.to_argv()) == c
    assert from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown config keys: bogus"):
        from_dict({**c.to_dict(), "bogus": 1})


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "engine.train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in out
    assert "--evaluation_strategy" in out and "TORCH_PER_PROCESS_MEMORY_LIMIT" in out
    for action in build_parser()._actions:
        assert action.help, action.dest
