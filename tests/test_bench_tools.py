"""The benchmark's own tools that run on a CPU: benchmarks/host_profile.py's summary of py-spy samples."""

from benchmarks.host_profile import summarize


def test_host_profile_keeps_the_training_loop_outside_compilation_and_shares_its_samples():
    loop = "main (train.py:1);Trainer._inner_training_loop (transformers/trainer.py:9)"
    lines = [
        f"{loop};Trainer._clip_grad_norm (transformers/trainer.py:20);clip_grad_norm_ (clip_grad.py:5) 3",
        f"{loop};Trainer._clip_grad_norm (transformers/trainer.py:21) 1",
        f"{loop};forward (model.py:7) 6",
        f"{loop};forward (model.py:7);compile_fx (torch/_inductor/compile_fx.py:1) 50",  # compiling
        "main (bench.py:3);build_model (bench.py:4) 90",  # not training
    ]
    summary = summarize(lines)
    assert summary["samples"] == 10
    inclusive = {row["function"]: row["share"] for row in summary["inclusive"]}
    own = {row["function"]: row["share"] for row in summary["self"]}
    assert inclusive["Trainer._clip_grad_norm (transformers/trainer.py)"] == 0.4  # line numbers merged
    assert own == {"forward (model.py)": 0.6, "clip_grad_norm_ (clip_grad.py)": 0.3,
                   "Trainer._clip_grad_norm (transformers/trainer.py)": 0.1}  # fmt: skip
