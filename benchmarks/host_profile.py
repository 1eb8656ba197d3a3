"""Where the host's time goes in training steps: a bench variant sampled by py-spy.

    python -m benchmarks.host_profile VARIANT [--rate 67]   # on the GPU, .bench/ and py-spy carried
    python -m benchmarks.host_profile --summarize FILE.gz   # here, from the raw samples

torch.profiler (benchmarks/profile.py) times operators and kernels; when the GPU waits on the host,
the question is which Python does: the Trainer's bookkeeping, PEFT's wrappers, bitsandbytes' ops,
inductor's launches. py-spy samples every thread's Python stack; the summary keeps the training
loop's main thread (forward, clipping, optimizer) outside compilation, and prints the functions
holding the largest share of its samples, with and without their callees. While the backward
runs, the main thread waits and is not sampled: the shares are of the forward side's time.
py-spy is one static binary (`pip download py-spy`, unpack, carry it as .site/bin/py-spy).
"""

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

PY_SPY = Path(".site/bin/py-spy")
COMPILING = ("convert_frame", "compile_fx", "_compile_inner", "async_compile", "codecache")


def summarize(lines: list[str], top: int = 40) -> dict:
    """py-spy's raw lines (`frame;frame;... count`) → shares of the training loop's samples."""
    inclusive: Counter = Counter()
    own: Counter = Counter()
    total = 0
    for line in lines:
        stack, count = line.rsplit(" ", 1)
        if "_inner_training_loop" not in stack or any(key in stack for key in COMPILING):
            continue
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        total += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
        own[frames[-1]] += int(count)

    def shares(counter: Counter) -> list[dict]:
        return [{"share": round(n / total, 3), "function": f[:160]} for f, n in counter.most_common(top)]

    return {"samples": total, "inclusive": shares(inclusive), "self": shares(own)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", nargs="?", help="a variant of benchmarks/bench.py")
    parser.add_argument("--rate", type=int, default=67, help="samples a second (200 fell behind on an H100 host)")
    parser.add_argument("--summarize", type=Path, help="a raw file this command wrote, gzipped")
    args = parser.parse_args()
    if args.summarize:
        print(json.dumps(summarize(gzip.open(args.summarize, "rt").read().splitlines()), indent=1))
        return
    raw = Path(os.environ.get("OUT", "/tmp")) / f"py-spy-{args.variant}.txt"
    subprocess.run([str(PY_SPY), "record", "--subprocesses", "--rate", str(args.rate), "--format", "raw",
                    "-o", str(raw), "--", sys.executable, "-m", "benchmarks.bench", "run", args.variant], check=True)
    text = raw.read_text()
    with gzip.open(f"{raw}.gz", "wt") as out:  # raw samples run to 100 MB; gzipped, about 1
        out.write(text)
    raw.unlink()
    print(json.dumps({"variant": args.variant, **summarize(text.splitlines())}))


if __name__ == "__main__":
    main()
