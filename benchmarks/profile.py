"""Where a step's time goes: a bench variant run under torch.profiler for a few optimizer steps.

    python -m benchmarks.profile VARIANT [VARIANT ...] [--steps 4 6]   # on the GPU, .bench/ carried

Each variant runs in a fresh process as `benchmarks.bench` runs it (same model, data and flags),
with the profiler on from the start of the first named step to the end of the second. It prints
one JSON line per variant: wall time, the GPU's busy fraction (the union of its kernels' time
over the wall time, so 0.6 means the GPU waits on the host 40% of the time), kernel time by kind
(matmul, 4-bit dequantization, attention, fused Triton, other element-wise, copies) and the
kernels and host operations that take longest. A busy fraction well under 1 says the host is the
bottleneck (launches, syncs, Python); a high one says which kernels to make faster.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

KINDS = [  # first match wins; names as CUDA reports them (cuBLAS, cuTLASS, bitsandbytes, PyTorch)
    ("dequant", ("dequantize", "kdequant")),
    ("attention", ("flash", "fmha", "attention", "varlen")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "wgmma")),
    ("triton", ("triton",)),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy", ("memcpy", "memset", "copy")),
    ("reduce", ("reduce", "norm", "softmax", "cross_entropy", "nll")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(key in low for key in keys)), "other")


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time with at least one kernel running."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(trace: dict, wall_s: float) -> dict:
    """A Chrome trace (torch.profiler's export) → the summary line's fields."""
    kernels = [e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_kind[kind(e["name"])] += e["dur"]
        by_name[e["name"]][0] += e["dur"]
        by_name[e["name"]][1] += 1
    host: dict[str, float] = defaultdict(float)
    # CUDA runtime calls: launches cost a few us each; a synchronize or a blocking copy is the host
    # waiting for the GPU, after which the GPU waits for the host: their time says how much.
    runtime: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in trace["traceEvents"]:
        if not e.get("dur"):
            continue
        if e.get("cat") == "cpu_op":
            host[e["name"]] += e["dur"]
        elif e.get("cat") in ("cuda_runtime", "cuda_driver"):
            runtime[e["name"]][0] += e["dur"]
            runtime[e["name"]][1] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    busy = busy_us([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    return {
        "wall_s": round(wall_s, 3),
        "gpu_busy_s": round(busy / 1e6, 3),
        "gpu_busy_fraction": round(busy / 1e6 / wall_s, 3),
        "kernels": len(kernels),
        "kernel_s_by_kind": {k: round(v / 1e6, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:120], "s": round(s / 1e6, 4), "calls": c} for n, (s, c) in top],
        "top_runtime_calls": [{"name": n[:60], "s": round(t / 1e6, 3), "calls": c}
                              for n, (t, c) in sorted(runtime.items(), key=lambda kv: -kv[1][0])[:12]],
        # host ops overlap (a parent's time includes its children's): a list to read, not to add up
        "top_host_ops": [{"name": n[:80], "s": round(s / 1e6, 3)}
                         for n, s in sorted(host.items(), key=lambda kv: -kv[1])[:25]],
    }


def profile_one(variant: str, first: int, last: int) -> dict:
    """Runs one bench variant in this process with the profiler on over steps first..last."""
    import torch
    from transformers import TrainerCallback

    from benchmarks import bench

    def _sync():  # a CPU run (BENCH_MODEL at a tiny model) checks the plumbing
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    out = Path(os.environ.get("OUT", "/tmp")) / f"trace-{variant}.json"
    state = {}

    class Profile(TrainerCallback):
        def on_step_begin(self, args, st, control, **kwargs):
            if st.global_step == first - 1:  # global_step counts finished steps
                state["prof"] = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                _sync()
                state["prof"].__enter__()
                state["t0"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kwargs):
            if st.global_step == last and "prof" in state:
                _sync()
                state["wall_s"] = time.perf_counter() - state["t0"]
                state["prof"].__exit__(None, None, None)
                state["prof"].export_chrome_trace(str(out))

    data, flags = bench.VARIANTS[variant]
    run_dir = Path("/tmp/bench-runs") / variant
    bench.run_engine(data, {**flags, "eval_strategy": "no"}, run_dir, callbacks=(Profile(),))
    summary = summarize(json.loads(out.read_text()), state["wall_s"])
    out.unlink()  # tens of MB: the summary is what comes back
    return {"variant": variant, "steps": [first, last], **summary}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="engine variants of benchmarks/bench.py")
    parser.add_argument("--steps", nargs=2, type=int, default=[4, 6], metavar=("FIRST", "LAST"))
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # run in this process
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(profile_one(args.variants[0], *args.steps)), flush=True)
        return
    from benchmarks.bench import build_model

    build_model()
    for variant in args.variants:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.profile", variant, "--one",
                               "--steps", *map(str, args.steps)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        result = json.loads(line.removeprefix("RESULT ")) if line else {
            "variant": variant, "error": f"exit {proc.returncode}", "tail": (proc.stdout + proc.stderr)[-1500:]}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
