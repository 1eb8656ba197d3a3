"""The training loss alone, the model's own against engine/loss.py's chunked one: time and memory.

    python -m benchmarks.loss [--device cuda] [--dtype bf16]

For each shape (tokens, hidden size, vocabulary) and each loss, in a fresh process: forward and
backward from the last hidden states through the output layer, as a LoRA step runs it (hidden
states need a gradient, the output weight does not; `full` also trains the weight). Prints one
JSON line per case: best-of-3 seconds, the memory the loss adds above its inputs (peak RSS on a
CPU, peak allocated on a GPU) and the largest tensor (elements) any operation produced.
"""

import argparse
import json
import subprocess
import sys
import time

# (name, tokens, hidden, vocabulary): the tiny test model; a toy with Llama 3's vocabulary that a
# CPU runs in seconds; Mistral-7B's and Llama-3-8B's output layers (for a GPU).
SHAPES = [
    ("tiny", 2048, 64, 32000),
    ("toy-128k", 1024, 512, 128256),
    ("mistral-7b", 2048, 4096, 32000),
    ("llama-3-8b", 2048, 4096, 128256),
]
REPEATS = 3


def _rss_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one(shape: str, loss_name: str, device: str, dtype_name: str, full: bool) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers.loss.loss_utils import ForCausalLMLoss

    from engine.loss import causal_lm_loss

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and not func.is_view:  # a view holds no memory of its own
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    _, tokens, hidden_size, vocab = next(s for s in SHAPES if s[0] == shape)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    torch.manual_seed(0)
    hidden = torch.randn(1, tokens, hidden_size, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=device, dtype=dtype) * hidden_size**-0.5).requires_grad_(full)
    labels = torch.randint(0, vocab, (1, tokens), device=device)
    labels[:, : tokens // 4] = -100  # a masked prompt

    def step():
        if loss_name == "standard":
            loss = ForCausalLMLoss(torch.nn.functional.linear(hidden, weight), labels, vocab)
        else:
            loss = causal_lm_loss(hidden, weight, labels)
        loss.backward()
        hidden.grad = weight.grad = None
        return loss

    step()  # warm-up
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        open("/proc/self/clear_refs", "w").write("5")  # resets the peak RSS to the current one
        base = _rss_mib("VmRSS")
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_mib("VmHWM") - base
    with Largest():
        step()
    return {"shape": shape, "tokens": tokens, "hidden": hidden_size, "vocab": vocab, "loss": loss_name,
            "device": device, "dtype": dtype_name, "head_trained": full, "seconds": round(min(times), 4),
            "extra_mib": round(extra, 1), "largest_tensor_elements": Largest.numel,
            "value": round(float(loss), 6)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loss", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--shapes", nargs="*", default=[s[0] for s in SHAPES])
    parser.add_argument("--full", action="store_true", help="also train the output weight (full finetuning)")
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "LOSS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.device, args.dtype, args.full)), flush=True)
        return
    for shape in args.shapes:
        for loss_name in ("standard", "chunked"):
            argv = [sys.executable, "-m", "benchmarks.loss", "--one", shape, loss_name, "--device", args.device,
                    "--dtype", args.dtype] + (["--full"] if args.full else [])
            done = subprocess.run(argv, capture_output=True, text=True)
            print(done.stdout.strip() or json.dumps({"shape": shape, "loss": loss_name, "error": done.stderr[-800:]}),
                  flush=True)


if __name__ == "__main__":
    main()
