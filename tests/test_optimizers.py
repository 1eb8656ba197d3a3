"""`--optim` choices: each trains, keeps the state size the memory estimate counts, and resumes;
AnyPrecisionAdamW (engine/anyprecision.py) against torch's AdamW and an fp32 reference."""

import math

import pytest
import torch

from engine.anyprecision import AnyPrecisionAdamW, parse_options
from engine.config import Optim, coerce, parse_args
from engine.events import read_events
from engine.launch import start_run
from engine.memory import optimizer_state_bytes
from engine.preflight import preflight
from engine.presets import load_preset, make_config
from tests.test_launch import finish
from tests.test_train import EXAMPLES, fast, of, run_engine

SIZE = 4096  # bitsandbytes keeps smaller tensors' states in 32 bits (its min_8bit_size)


def _train(params, steps: int, grad, **options) -> None:
    """`steps` AdamW steps on `params` with gradients grad(step, param)."""
    opt = AnyPrecisionAdamW(params, **options)
    for step in range(steps):
        for p in params:
            p.grad = grad(step, p)
        opt.step()


def _state_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> float:
    return sum(t.nbytes for k, t in opt.state[p].items() if k != "step") / p.numel()


def test_states_are_bf16_4_bytes_a_parameter_and_6_with_kahan():
    for optim_args, want in [(None, 4), ("use_kahan_summation=true", 6),
                             ("momentum_dtype=float32, variance_dtype=float32", 8)]:
        p = torch.nn.Parameter(torch.randn(SIZE))
        opt = AnyPrecisionAdamW([p], **parse_options(optim_args))
        p.grad = torch.randn(SIZE)
        opt.step()
        assert _state_bytes(opt, p) == want == optimizer_state_bytes("adamw_anyprecision", optim_args)
        assert opt.state[p]["exp_avg"].dtype == (torch.float32 if want == 8 else torch.bfloat16)


def _noisy_quadratic(dtype):
    """Gradients of |w - target|^2 / 2 plus noise: a loss that pulls every weight somewhere."""
    torch.manual_seed(0)
    target = torch.randn(1024)
    noise = torch.randn(100, 1024)
    return lambda step, p: ((p.detach().float() - target) + 0.1 * noise[step]).to(dtype)


def test_matches_torch_adamw_on_fp32_weights():
    torch.manual_seed(1)
    start = torch.randn(1024)
    grad = _noisy_quadratic(torch.float32)
    reference = torch.nn.Parameter(start.clone())
    opt = torch.optim.AdamW([reference], lr=1e-3, weight_decay=0.01)
    for step in range(100):
        reference.grad = grad(step, reference)
        opt.step()
    moved = (reference.detach() - start).abs().mean()
    fp32_states, bf16_states = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    _train([fp32_states], 100, grad, lr=1e-3, weight_decay=0.01,
           momentum_dtype=torch.float32, variance_dtype=torch.float32)
    _train([bf16_states], 100, grad, lr=1e-3, weight_decay=0.01)
    # Over 100 steps weights move 0.092 on average. fp32 states: AdamW to float rounding (measured
    # 2.4e-7 at most); bf16 states: 1.2% of the movement on average, 0.0031 at most (measured).
    assert (fp32_states - reference).abs().max() < 2e-6
    assert (bf16_states - reference).abs().mean() < 0.03 * moved
    assert (bf16_states - reference).abs().max() < 0.01


def test_kahan_summation_keeps_bf16_weights_on_the_fp32_track():
    torch.manual_seed(2)
    start = (1 + torch.rand(1024)).bfloat16()  # in [1, 2), where bf16 numbers are 2^-7 apart
    pull = torch.randn(300, 1024) + 0.5  # a steady pull, so the updates add up

    def run(dtype, **options):
        p = torch.nn.Parameter(start.to(dtype))
        _train([p], 300, lambda step, p: pull[step].to(dtype), lr=2e-4, **options)
        return p.detach().float()

    fp32 = run(torch.float32)
    moved = (fp32 - start.float()).abs().mean()
    plain_error = (run(torch.bfloat16) - fp32).abs().mean()
    kahan_error = (run(torch.bfloat16, use_kahan_summation=True) - fp32).abs().mean()
    # A step of 2e-4 is below half the spacing: without Kahan every update rounds away (measured:
    # error 0.026, all of the movement); with it only the last rounding is left (measured 0.0020,
    # 13x smaller: 2^-7 / 4, the mean distance to the nearest bf16 number).
    assert plain_error > 0.9 * moved
    assert kahan_error < plain_error / 8


def test_a_loaded_state_stays_bf16_and_continues_exactly():
    grad = _noisy_quadratic(torch.float32)
    options = dict(lr=1e-3, use_kahan_summation=True)
    straight = torch.nn.Parameter(torch.zeros(1024))
    _train([straight], 10, grad, **options)
    p = torch.nn.Parameter(torch.zeros(1024))
    opt = AnyPrecisionAdamW([p], **options)
    for step in range(5):
        p.grad = grad(step, p)
        opt.step()
    saved = opt.state_dict()
    resumed = torch.nn.Parameter(p.detach().clone())
    opt = AnyPrecisionAdamW([resumed], **options)
    opt.load_state_dict(saved)  # torch casts states to the parameter's dtype (fp32) on load
    assert {k: t.dtype for k, t in opt.state[resumed].items() if k != "step"} == {
        "exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16, "compensation": torch.bfloat16}
    for step in range(5, 10):
        resumed.grad = grad(step, resumed)
        opt.step()
    assert torch.equal(resumed, straight)


def test_optim_choices_and_options_are_checked_before_training():
    with pytest.raises(ValueError, match="optim: 'adam' is not valid .*not one of adamw_torch, adamw_torch_fused, "
                                         "adamw_bnb_8bit, paged_adamw_8bit, paged_adamw_32bit, adamw_anyprecision"):
        coerce("optim", "adam")
    # The seed README's spelling, word for word.
    seed = parse_args(["--model_id", "m", "--train_data", "d", "--optim", "adamw_anyprecision", "--optim-args",
                       "use_kahan_summation=True, momentum_dtype=bfloat16, variance_dtype=bfloat16"])
    assert parse_options(seed.optim_args) == {"use_kahan_summation": True, "momentum_dtype": torch.bfloat16,
                                              "variance_dtype": torch.bfloat16}
    data = str(EXAMPLES / "capitals-chat.jsonl")
    for optim, args, problem in [
        ("adamw_anyprecision", "use_kahan_summation", "optim_args: 'use_kahan_summation' has no value"),
        ("adamw_anyprecision", "kahan=true", "optim_args: unknown option 'kahan'; adamw_anyprecision takes"),
        ("adamw_anyprecision", "variance_dtype=int8", "optim_args: variance_dtype=int8; use one of bfloat16"),
        ("adamw_bnb_8bit", "use_kahan_summation=true", "optim_args: only adamw_anyprecision takes options"),
    ]:
        config = parse_args(["--model_id", "m", "--train_data", data, "--optim", optim, "--optim_args", args])
        assert any(p.startswith(problem) for p in preflight(config)), (optim, args, preflight(config))


def _checkpoint_state_bytes(checkpoint) -> float:
    """Optimizer state bytes per parameter in checkpoint/optimizer.pt, over tensors bitsandbytes
    quantizes (its per-tensor quantization maps are shared on the GPU, so left out)."""
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"].values()
    sizes = []
    for state in saved:
        state = state.get("__bnb_optimizer_quant_state__", state)  # bitsandbytes nests its states
        tensors = {k: t for k, t in state.items() if torch.is_tensor(t) and k != "step" and not k.startswith("qmap")}
        numel = next(t.numel() for k, t in tensors.items() if k in ("exp_avg", "state1"))
        if numel >= SIZE:
            sizes.append(sum(t.nbytes for t in tensors.values()) / numel)
    assert sizes and max(sizes) == pytest.approx(min(sizes), rel=0.01)
    return sizes[0]


@pytest.mark.slow
def test_every_optimizer_trains_like_adamw_with_the_state_the_estimate_counts(tiny_mistral, tmp_path):
    # r=64 makes most adapter tensors 4,096 values or more, so bitsandbytes keeps them in 8 bits.
    flags = fast(max_steps=4, lora_r=64, lora_alpha=128, save_strategy="steps", save_steps=4)
    curves = {}
    for optim in Optim:
        code, events = run_engine(tiny_mistral, tmp_path / optim.value, *flags, "--optim", optim.value)
        assert code == 0, optim
        curves[optim] = [e["loss"] for e in of(events, "log")]
        assert curves[optim][-1] < 0.8 * curves[optim][0], (optim, curves[optim])
        # Paged states fall back to ordinary ones on a CPU (bitsandbytes warns): same bytes.
        stored = _checkpoint_state_bytes(tmp_path / optim.value / "output" / "checkpoint-4")
        assert stored == pytest.approx(optimizer_state_bytes(optim.value), rel=0.01), optim
    for optim, curve in curves.items():  # 8-bit and bf16 states: AdamW's steps, a little rounded
        assert curve == pytest.approx(curves[Optim.adamw_torch], rel=2e-3), optim


@pytest.mark.slow
def test_resume_restores_anyprecision_state_exactly(tiny_mistral, tmp_path):
    flags = fast(max_steps=4, lr_scheduler_type="constant", save_strategy="steps", save_steps=2,
                 optim="adamw_anyprecision", optim_args="use_kahan_summation=true")
    code, straight = run_engine(tiny_mistral, tmp_path / "straight", *flags)
    assert code == 0
    checkpoint = tmp_path / "straight" / "output" / "checkpoint-2"
    code, resumed = run_engine(tiny_mistral, tmp_path / "resumed", *flags, "--resume_from_checkpoint", str(checkpoint))
    assert code == 0
    assert [e["step"] for e in of(resumed, "log")] == [3, 4]
    assert [e["loss"] for e in of(resumed, "log")] == [e["loss"] for e in of(straight, "log")][2:]
    state = torch.load(tmp_path / "resumed" / "output" / "checkpoint-4" / "optimizer.pt", weights_only=False)
    for saved in state["state"].values():  # moments and Kahan compensation, still bf16 after the reload
        assert {k: t.dtype for k, t in saved.items() if k != "step"} == {
            "exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16, "compensation": torch.bfloat16}


@pytest.mark.slow
def test_anyprecision_is_deepspeed_zero2s_client_optimizer(tiny_mistral, tmp_path):
    """Two CPU processes; ZeRO-2 hands the optimizer one flat fp32 slice of the adapters per rank."""
    preset = load_preset("qlora-zero2")
    config = make_config(preset, model_id=str(tiny_mistral), train_data=str(EXAMPLES / "capitals-chat.jsonl"),
                         max_steps=2, save_steps=2, eval_strategy="no", optim="adamw_anyprecision")
    info = finish(start_run(preset, config, gpus=[], runs_dir=tmp_path, num_processes=2), tmp_path)
    assert info.status == "succeeded", (info.run_dir / "stdout.log").read_text()[-3000:]
    shards = sorted((info.run_dir / "output" / "checkpoint-2").glob("global_step2/*optim_states.pt"))
    assert len(shards) == 2
    for shard in shards:
        saved = torch.load(shard, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
        (state,) = saved["state"].values()
        assert (state["exp_avg"].dtype, state["exp_avg_sq"].dtype) == (torch.bfloat16, torch.bfloat16)
    events, _ = read_events(info.run_dir / "events.jsonl")
    assert of(events, "started")[0]["config"]["optim"] == "adamw_anyprecision"
    assert [e["step"] for e in of(events, "log")] == [1, 2] and all(math.isfinite(e["loss"]) for e in of(events, "log"))
