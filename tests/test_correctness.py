"""Training correctness (issue 13): every preset learns what the plain recipe learns, in numbers.

Each family of the issue, on CPU with tiny models (tests/conftest.py) and 2 gloo processes where
ranks matter. Tolerances, and why they are what they are:

| check | precision | tolerance | measured | a real bug measured |
| --- | --- | --- | --- | --- |
| a step's gradient vs its examples one by one | fp32 | atol 1e-6, rtol 1e-4 | 2e-7 | per micro-batch mean: 130% |
| 2 processes (DDP, ZeRO-2) vs 1, 32 steps | fp32 | rel 1e-5 | 2.4e-7 | own-rank token count: 4e-3 loss |
| ddp vs qlora-zero2 presets, 32 steps | fp32 | rel 1e-5 | 1.8e-7 | |
| engine vs plain HF Trainer + PEFT, 32 steps | fp32 | rel 1e-5 | 3.1e-7 | |
| ZeRO-2 vs 1 process in bf16, 8 steps | bf16 autocast | rel 1e-4 | 8e-8 | bf16 LoRA weights: 2.7e-3 |
| resumed vs uninterrupted steps | fp32 | rel 1e-6 | 0 | |
| logits' gradient at prompt positions | fp32 | exactly 0 | 0 | |
| packed pass vs its examples one by one | fp32 | atol 1e-5, rtol 1e-4 | 8e-7 | |

Curves compare loss and grad norm at every step. fp32 isolates the logic (normalisation, data
order, optimizer, schedule) from rounding, so a tolerance 30x the measured noise is still 100x
under a real mistake. In bf16, weights that differ in their last fp32 bit (a gradient norm summed
in another order) flip bf16 roundings some steps later, after which curves wander by ~2e-4: noise,
not drift. So the bf16 check runs the same one-example passes on both sides, for 8 steps.
"""

import json
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from engine import train
from engine.config import TrainConfig
from engine.events import read_events
from engine.launch import ACTIVE, run_status, start_run
from engine.model import add_adapter, load_model, pick_attention
from engine.packing import pack
from engine.presets import load_preset, make_config
from tests.conftest import set_up_recipe, write_jsonl

ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
WORDS = ("the of and to in is was for that with as on by at from model data token paris france capital river "
         "city history science language question answer").split()
STEPS = 32  # the "30+": two epochs of VARIED_EXAMPLES at 4 examples a step
VARIED_EXAMPLES = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Runs in this process train beside 2-process runs on CI's 2 cores: one thread each, as torchrun
    gives each rank. Two OpenMP threads spinning against busy cores made a run here 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(WORDS, k=words))


@pytest.fixture(scope="module")
def varied_data(tmp_path_factory) -> Path:
    """Prompts of 2-8 words, completions of 1-60: steps and ranks with very different label counts."""
    rng = random.Random(0)
    rows = [{"prompt": f"Q{i}: {_text(rng, rng.randint(2, 8))}\nA:",
             "completion": " " + _text(rng, rng.choice([1, 2, 3, 5, 8, 20, 40, 60]))}
            for i in range(VARIED_EXAMPLES)]
    return write_jsonl(tmp_path_factory.mktemp("varied") / "varied.jsonl", rows)


def _flags(**values) -> list[str]:
    return [str(x) for k, v in values.items() for x in (f"--{k}", v)]


def _curve(events_file: Path) -> list[tuple[float, float]]:
    """(loss, grad_norm) of each logged step of the last run written to events_file."""
    events, _ = read_events(events_file)
    start = max(i for i, e in enumerate(events) if e["event"] == "started")
    return [(e["loss"], e["grad_norm"]) for e in events[start:] if e["event"] == "log"]


def _assert_curves_close(got, want, rel: float, what: str) -> None:
    assert len(got) == len(want), what
    for step, ((loss, norm), (want_loss, want_norm)) in enumerate(zip(got, want, strict=True), start=1):
        assert loss == pytest.approx(want_loss, rel=rel), f"{what}: loss at step {step}"
        assert norm == pytest.approx(want_norm, rel=rel), f"{what}: grad norm at step {step}"


# ---------------------------------------------------------------- gradient accumulation


class _StepGradient(TrainerCallback):
    """The raw gradient of the first optimizer step, as the Trainer is about to apply it."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.requires_grad}


def _spread_lora_b(model) -> None:
    """LoRA's B starts at zero, which leaves A without a gradient to compare: give it some."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)


def _summed_token_losses(model, example: dict) -> torch.Tensor:
    """Summed cross-entropy of one example's label tokens, the example run alone."""
    logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
    return F.cross_entropy(logits[:-1], torch.tensor(example["labels"][1:]), ignore_index=-100, reduction="sum")


def _gradient(model, loss_of) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss_of().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads


@pytest.fixture(scope="module")
def accumulation_data(tmp_path_factory) -> Path:
    rng = random.Random(1)
    # 1 to ~80 completion tokens: a mean per micro-batch would weigh them wildly unequally.
    rows = [{"prompt": f"Question: {_text(rng, 5)}\nAnswer:", "completion": " " + _text(rng, n)}
            for n in (1, 5, 20, 60)]
    return write_jsonl(tmp_path_factory.mktemp("accumulation") / "four.jsonl", rows)


@pytest.mark.parametrize("packing,batch,accumulation", [("false", 1, 4), ("false", 4, 1), ("true", 1, 4)])
def test_a_steps_gradient_is_its_token_losses_over_the_label_tokens_of_the_whole_step(
        tiny_mistral, accumulation_data, tmp_path, packing, batch, accumulation):
    """Micro-batch 1 x accumulation 4 = one batch of 4 = the step's examples one by one, each token
    weighted 1 / (label tokens of the whole step). Through the Trainer's own loop: the padded path
    normalises with its num_items_in_batch, the packed one (engine/packing.py) runs passes of 64 tokens."""
    recipe = set_up_recipe(model_id=tiny_mistral, train_data=accumulation_data, output_dir=tmp_path, max_steps=1,
                           packing=packing, pack_tokens=64, per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulation, train_on_prompt="false", lora_dropout=0.0,
                           gradient_checkpointing="false", eval_size=0, eval_strategy="no", save_strategy="no")
    trainer, model = recipe.trainer, recipe.trainer.model
    _spread_lora_b(model)
    examples = list(recipe.datasets.train)
    counts = [sum(label != -100 for label in e["labels"][1:]) for e in examples]
    assert min(counts) <= 3 and max(counts) >= 60  # very different label counts

    want = _gradient(model, lambda: sum(_summed_token_losses(model, e) for e in examples) / sum(counts))
    # The trap: a mean per micro-batch, averaged over the step, weighs a short example's tokens more.
    naive = _gradient(model, lambda: sum(_summed_token_losses(model, e) / c
                                         for e, c in zip(examples, counts, strict=True)) / len(examples))
    capture = _StepGradient(model)
    trainer.add_callback(capture)
    trainer.args.max_grad_norm = 0  # the raw gradient: clipping to norm 1 would hide a wrong scale
    trainer.train()

    assert capture.grads.keys() == want.keys()
    for name, grad in capture.grads.items():
        torch.testing.assert_close(grad, want[name], atol=1e-6, rtol=1e-4, msg=name)
    gap = max(float((want[n] - naive[n]).norm() / want[n].norm()) for n in want)
    assert gap > 0.5  # 1.3-2x the gradient: the tolerance above tells the two apart by 6 orders of magnitude


# ---------------------------------------------------------------- across ranks, presets, plain HF


def _start(preset_name: str, model_dir: Path, data: Path, runs_dir: Path, **flags):
    preset = load_preset(preset_name)
    config = make_config(preset, model_id=str(model_dir), train_data=str(data), **flags)
    return start_run(preset, config, gpus=[], runs_dir=runs_dir, num_processes=2)


def _finish(info, runs_dir: Path, timeout: float = 600):
    deadline = time.time() + timeout
    while (info := run_status(info.run_id, runs_dir)).status in ACTIVE:
        assert time.time() < deadline, f"{info.run_id} still {info.status}"
        time.sleep(0.5)
    assert info.status == "succeeded", (info.run_dir / "stdout.log").read_text()[-3000:]
    return _curve(info.run_dir / "events.jsonl")


def _engine_one_process(preset_name: str, model_dir: Path, data: Path, out: Path, **flags):
    """The preset's flags in one process, no launcher (use_ddp and deepspeed off)."""
    config = make_config(load_preset(preset_name), model_id=str(model_dir), train_data=str(data),
                         output_dir=str(out), use_ddp=False, **flags)
    assert train.main(config.to_argv()) == 0
    return _curve(out / "events.jsonl")


# Shared by every run below: 4 examples a step (2 processes x 1 x 2, or 1 x 1 x 4), every token
# trained (so the plain script needs no masking of its own), a rate at which the tiny model learns.
COMMON = {"max_steps": STEPS, "learning_rate": 1e-3, "per_device_train_batch_size": 1, "lora_dropout": 0.0,
          "train_on_prompt": True, "eval_size": 0, "eval_strategy": "no", "save_strategy": "no",
          "gradient_checkpointing": False}  # the presets' memory lever: same numbers, 30% more compute
# fp32 (bf16 off, the presets' other flags as they are), packed in passes of 64 tokens, so each
# rank runs a different number of passes in some steps; DDP on the 4-bit base ZeRO-2 uses.
FP32 = {**COMMON, "bf16": False, "use_qlora": True, "pack_tokens": 64}


def _plain_hf_peft(model_dir: Path, data: Path, out: Path) -> list[tuple[float, float]]:
    """The plain recipe, written out: HF Trainer + PEFT QLoRA on padded micro-batches of one example,
    the tokenisation, seed and schedule the engine uses, no engine code."""
    import datasets
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    seed = TrainConfig.seed
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.unk_token

    def tokenize(row):
        text = tokenizer.bos_token + row["prompt"] + row["completion"] + tokenizer.eos_token
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "labels": list(ids)}

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    train_set = datasets.Dataset.from_list([tokenize(row) for row in rows])
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=32, lora_alpha=64, lora_dropout=0.0,
                                             target_modules=ALL_LINEAR))
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=1, gradient_accumulation_steps=4,
        learning_rate=COMMON["learning_rate"], lr_scheduler_type="cosine", warmup_steps=0.03, seed=seed,
        data_seed=seed, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.train()
    return [(log["loss"], log["grad_norm"]) for log in trainer.state.log_history if "loss" in log]


@pytest.fixture(scope="module")
def fp32_curves(tiny_mistral, varied_data, tmp_path_factory) -> dict[str, list[tuple[float, float]]]:
    """One 32-step run each: ddp and qlora-zero2 on 2 processes, the engine and the plain recipe on one.

    The 2-process runs go in the background while the one-process runs train here.
    """
    runs = tmp_path_factory.mktemp("fp32-runs")
    started = {name: _start(name, tiny_mistral, varied_data, runs, gradient_accumulation_steps=2, **FP32)
               for name in ("ddp", "qlora-zero2")}
    one = tmp_path_factory.mktemp("fp32-one")
    curves = {
        "one process": _engine_one_process("ddp", tiny_mistral, varied_data, one / "engine",
                                           gradient_accumulation_steps=4, **FP32),
        "plain HF + PEFT": _plain_hf_peft(tiny_mistral, varied_data, one / "plain"),
    }
    return curves | {name: _finish(info, runs) for name, info in started.items()}


@pytest.mark.slow
@pytest.mark.parametrize("preset_name", ["ddp", "qlora-zero2"])
def test_two_processes_give_one_process_loss_and_grad_norm_step_by_step(fp32_curves, preset_name):
    """The same global batch of 4 a step, split 2 x 2 over ranks holding 2 to ~160 label tokens each:
    each rank's loss is over the label tokens of both ranks (average_tokens_across_devices), so the
    averaged gradient is one process's. Dividing by a rank's own tokens instead moves the loss by 4e-3
    at step 1 and the grad norm by 5%."""
    _assert_curves_close(fp32_curves[preset_name], fp32_curves["one process"], 1e-5, preset_name)


@pytest.mark.slow
def test_ddp_and_zero2_presets_learn_the_same_curve(fp32_curves):
    ddp, zero2 = fp32_curves["ddp"], fp32_curves["qlora-zero2"]
    assert len(ddp) >= 30
    _assert_curves_close(zero2, ddp, 1e-5, "qlora-zero2 vs ddp")
    first, last = (sum(loss for loss, _ in part) / 4 for part in (ddp[:4], ddp[-4:]))
    assert last < first - 0.5  # a learning curve, not a flat line that any two runs would share


@pytest.mark.slow
def test_engine_learns_what_a_plain_hf_trainer_and_peft_script_learns(fp32_curves):
    """Packed passes and our loading, adapter and schedule against the plain recipe's padded micro-batches."""
    _assert_curves_close(fp32_curves["one process"], fp32_curves["plain HF + PEFT"], 1e-5, "engine vs plain")


@pytest.mark.slow
def test_zero2_in_bf16_learns_exactly_like_one_process(tiny_mistral, varied_data, tmp_path):
    """The seed recipe's known issue: "loss diverges after some time when compared to DDP". DeepSpeed's
    bf16 mode rounded the LoRA weights to bf16, so small updates vanished (a 7B run drifted by 0.15 in 10
    steps on a GPU, benchmarks/RESULTS.md); engine/trainer_args.py keeps them fp32 under bf16 autocast.
    Both sides run the same one-example passes (pack_tokens 1), uncompiled (a compiled layer rounds
    bf16 differently for the first, static shape than for later ones, and the two sides meet their
    examples in different orders), so only that could tell them apart."""
    bf16 = {**COMMON, "max_steps": 8, "learning_rate": 1e-4, "pack_tokens": 1, "torch_compile": False}
    info = _start("qlora-zero2", tiny_mistral, varied_data, tmp_path / "runs", gradient_accumulation_steps=2, **bf16)
    one = _engine_one_process("qlora-zero2", tiny_mistral, varied_data, tmp_path / "one",
                              gradient_accumulation_steps=4, **bf16)
    _assert_curves_close(_finish(info, tmp_path / "runs"), one, 1e-4, "qlora-zero2 bf16 vs one process")


# ---------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_continues_exactly_where_an_uninterrupted_run_goes(tiny_mistral, varied_data, tmp_path):
    """Stopped after step 5 of 8 (in the second epoch, mid-way) and resumed: steps 6-8 have the
    uninterrupted run's losses, so data order, optimizer, cosine schedule and dropout's RNG all resumed."""
    flags = _flags(model_id=tiny_mistral, train_data=varied_data, max_num_samples=16, max_steps=8,
                   per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=3e-3,
                   lr_scheduler_type="cosine", warmup_ratio=0.25, lora_dropout=0.1, gradient_checkpointing="false",
                   eval_size=0, eval_strategy="no", save_strategy="steps", save_steps=5)
    straight = tmp_path / "straight"
    assert train.main([*flags, "--output_dir", str(straight)]) == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-5", resumed / "checkpoint-5")  # where a stop at step 5 leaves it
    assert train.main([*flags, "--output_dir", str(resumed), "--resume_from_checkpoint", "true"]) == 0
    events, _ = read_events(resumed / "events.jsonl")
    assert [e["start_step"] for e in events if e["event"] == "started"] == [5]
    want, got = _curve(straight / "events.jsonl"), _curve(resumed / "events.jsonl")
    assert len(want) == 8 and len(got) == 3
    _assert_curves_close(got, want[5:], 1e-6, "resumed vs uninterrupted")


# ---------------------------------------------------------------- masking


CHAT = {"messages": [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]}
PROMPT_COMPLETION = {"prompt": "Q: What is the capital of Germany?\nA:", "completion": " Berlin, on the Spree."}


@pytest.mark.parametrize("chunked_loss", ["true", "false"])
@pytest.mark.parametrize("example,trained", [
    (PROMPT_COMPLETION, ["Berlin, on the Spree.</s>"]),
    (CHAT, ["The capital of France is Paris.</s>", "Rome.</s>"]),
], ids=["prompt-completion", "chat"])
def test_with_train_on_prompt_false_no_gradient_comes_from_prompt_tokens(tiny_mistral, tokenizer, tmp_path,
                                                                        example, trained, chunked_loss):
    """Gradient, not labels: the loss's gradient w.r.t. the last hidden state at each position that
    predicts a prompt, system or user token is exactly zero (the output layer reads each position on
    its own, so changing such a token as a target changes nothing); the tokens whose positions get a
    gradient, read back as text, are the completion or each assistant reply, with its eos. Both with
    the full logits and with engine/loss.py's chunked loss, which never makes them."""
    data = write_jsonl(tmp_path / "one.jsonl", [example])
    recipe = set_up_recipe(model_id=tiny_mistral, train_data=data, output_dir=tmp_path / "out", train_on_prompt="false",
                           packing="false", per_device_train_batch_size=1, gradient_accumulation_steps=1,
                           lora_dropout=0.0, eval_size=0, chunked_loss=chunked_loss)
    trainer, model = recipe.trainer, recipe.trainer.model
    (batch,), num_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1, trainer.args.device)
    hidden = []

    def keep_hidden(module, args, out):
        out.retain_grad()
        hidden.append(out)

    hook = model.get_decoder().norm.register_forward_hook(keep_hidden)
    try:
        trainer.training_step(model, batch, num_items)
    finally:
        hook.remove()
    assert recipe.resolved["chunked_loss"] is (chunked_loss == "true")
    grad = hidden[0].grad[0]  # (tokens, hidden): row t predicts token t + 1
    ids = batch["input_ids"][0].tolist()
    learned = [t + 1 for t in range(len(ids) - 1) if grad[t].abs().sum() > 0]
    assert not grad[-1].any()
    runs, run = [], []
    for i in learned:  # contiguous stretches of learned tokens, one per reply
        if run and i != run[-1] + 1:
            runs.append(run)
            run = []
        run.append(i)
    runs.append(run)
    assert [tokenizer.decode([ids[i] for i in r]).strip() for r in runs] == trained


# ---------------------------------------------------------------- packing


def _examples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n, prompt in [(9, 4), (14, 6), (6, 0)]:
        ids = torch.randint(3, 32000, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def _token_losses(logits: torch.Tensor, labels: list[int]) -> torch.Tensor:
    target = torch.tensor(labels[1:])
    return F.cross_entropy(logits[:-1], target, ignore_index=-100, reduction="none")[target != -100]


@pytest.mark.parametrize("attention", ["sdpa", "eager", "varlen"])
def test_a_packed_batch_gives_the_losses_and_gradients_of_its_examples_one_by_one(tiny_mistral, attention):
    pick_attention(TrainConfig())  # registers the varlen backend (SDPA per example on a CPU)
    config = TrainConfig(model_id=str(tiny_mistral), lora_dropout=0.0)
    torch.manual_seed(0)  # LoRA's A, whatever ran before
    model = add_adapter(load_model(config, attention), config, ALL_LINEAR)
    _spread_lora_b(model)
    examples = _examples()
    batch = pack(examples)
    packed = model(**batch)
    ends = batch["cu_seq_lens_q"].tolist()
    targets = 0
    for i, example in enumerate(examples):
        alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
        inside = packed.logits[0, ends[i]:ends[i + 1]]
        torch.testing.assert_close(inside, alone, atol=1e-5, rtol=1e-4)  # no attention across examples
        torch.testing.assert_close(_token_losses(inside, example["labels"]),
                                   _token_losses(alone, example["labels"]), atol=1e-5, rtol=1e-4)
        targets += len(_token_losses(alone, example["labels"]))

    # Gradients of the mean over the batch's targets, as a step sees them (a sum over ~25 targets
    # would be ~25x larger, and its fp32 rounding with it).
    trainable = [p for p in model.parameters() if p.requires_grad]
    packed.loss.backward()
    packed_grads = [p.grad.clone() for p in trainable]
    model.zero_grad()
    for example in examples:
        ids, labels = torch.tensor([example["input_ids"]]), example["labels"]
        loss = model(input_ids=ids, labels=torch.tensor([labels])).loss
        (loss * len(_token_losses(model(input_ids=ids).logits[0], labels)) / targets).backward()
    for packed_grad, p in zip(packed_grads, trainable, strict=True):
        torch.testing.assert_close(packed_grad, p.grad, atol=1e-5, rtol=1e-4)
