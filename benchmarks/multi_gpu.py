"""The presets on real GPUs, started through engine.launch.start_run exactly as the UI starts them.

    python -m benchmarks.bench prepare                       # here (CPU): tokenizer and data into .bench/
    python -m benchmarks.multi_gpu run z2-1 z2-2 ...         # on the GPU machine, .bench/ and .site/ carried

Each case is one run of a preset on some GPUs, a few optimizer steps on the realistic-length data
of benchmarks/bench.py, with a Mistral-7B-shaped model of random bf16 weights built on the GPU. It
prints one JSON line per case: trained tokens/s (rank 0's events, after WARMUP_STEPS), peak
allocated GiB on rank 0, the weights rank 0 holds once training starts (its share under ZeRO-3),
and per GPU the peak memory used and mean utilisation sampled from nvidia-smi every half second.
`stop` stops a 2-GPU run mid-way, checks that no process and no GPU memory is left, resumes it and
checks the step count goes on. `oom-*` cases run under a small TORCH_PER_PROCESS_MEMORY_LIMIT
(LIMITS) and must end "failed" with the readable out-of-memory event (`failed` in their line), not
hang. `ui` starts `python app.py` and does what a script (or the browser's buttons) does through
its API: upload and check the data, start a run of the ddp preset on every GPU, follow it, stop it;
Gradio must be importable (GPU.md: carry its wheels, `.whl-ui/`, and install them on the machine).
"""

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.bench import BENCH, MODEL, build_model
from engine.events import read_events
from engine.launch import ACTIVE, resume_run, run_processes, run_status, start_run, stop_run
from engine.presets import load_preset, make_config

RUNS = Path("/tmp/runs")
WARMUP_STEPS = 2
UI_PRESET = "ddp"  # every GPU of the machine
STEPS = 10
# name: (preset, GPUs, engine flags over the preset's)
CASES = {
    "z2-1": ("qlora-zero2", [0], {}),
    "z2-2": ("qlora-zero2", [0, 1], {}),
    # DDP with the same 4-bit base as ZeRO-2: the fair comparison of memory and of loss curves.
    "ddpq-1": ("ddp", [0], {"use_qlora": True}),
    "ddpq-2": ("ddp", [0, 1], {"use_qlora": True}),
    "ddp-2": ("ddp", [0, 1], {}),
    "z2-4": ("qlora-zero2", [0, 1, 2, 3], {}),
    "ddpq-4": ("ddp", [0, 1, 2, 3], {"use_qlora": True}),
    "fp16-1": ("fp16-v100-t4", [0], {}),
    # --auto_find_batch_size under DeepSpeed, steps of 16 examples: the ranks agree on one pack_tokens.
    "z2-2-auto": ("qlora-zero2", [0, 1], {"auto_find_batch_size": True, "per_device_train_batch_size": 16,
                                          "gradient_accumulation_steps": 1}),
    # Too little memory (LIMITS): each must fail with the readable out-of-memory event, and never hang.
    "oom-mib-1": ("qlora-zero2", [0], {}),
    "oom-fraction-2": ("qlora-zero2", [0, 1], {}),
    "oom-auto-1": ("qlora-zero2", [0], {"auto_find_batch_size": True}),
    # ZeRO-3 splits the 4-bit weights (stored in bf16) across the GPUs; on 1 GPU it splits nothing.
    "z3-1": ("qlora-zero3", [0], {}),
    "z3-2": ("qlora-zero3", [0, 1], {}),
    "z3-4": ("qlora-zero3", [0, 1, 2, 3], {}),
}
# TORCH_PER_PROCESS_MEMORY_LIMIT per case, in MiB or as a fraction of the GPU ("6000/" is 6,000 MiB
# of this GPU as a fraction). 6,000 MiB holds the 4-bit 7B model (about 4.4 GiB) but not a pass of
# 2,048 tokens (about 7.7 GiB), so training fails at its first step; 16,000 is the 16 GiB.
LIMITS = {"z2-2-auto": "16000", "oom-mib-1": "6000", "oom-fraction-2": "6000/", "oom-auto-1": "6000"}
HANG_S = 300  # an oom- case still running after this is stopped and reported "stopped": it hung


def _config(preset, **flags):
    return make_config(preset, **{
        "model_id": str(MODEL), "train_data": str(BENCH / "realistic-train.jsonl"), "train_on_prompt": True,
        "max_steps": STEPS, "save_strategy": "no", "eval_strategy": "no", "logging_steps": 1, "seed": 0,
        "learning_rate": 1e-5, **flags,
    })


class GpuSampler(threading.Thread):
    """nvidia-smi every half second: memory used (GiB) and utilisation (%) per GPU."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[list[tuple[float, float]]] = []
        self.running = True

    @staticmethod
    def sample() -> list[tuple[float, float]]:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
        return [(float(m) / 1024, float(u)) for m, u in (line.split(",") for line in out.strip().splitlines())]

    def run(self):
        while self.running:
            self.samples.append(self.sample())
            time.sleep(0.5)

    def summary(self, gpus: list[int]) -> dict:
        return {f"gpu{g}": {"peak_used_gib": round(max(s[g][0] for s in self.samples), 2),
                            "mean_util_pct": round(sum(s[g][1] for s in self.samples) / len(self.samples), 1)}
                for g in gpus}


def _wait(run_id: str, until=lambda info: info.status not in ACTIVE, timeout: float | None = None):
    deadline = time.time() + timeout if timeout else None
    while not until(info := run_status(run_id, RUNS)):
        if deadline and time.time() > deadline:
            return stop_run(run_id, RUNS, wait=True)  # "stopped", not "failed": it hung
        time.sleep(1)
    return info


def _events(info, name):
    return [e for e in read_events(info.run_dir / "events.jsonl")[0] if e["event"] == name]


def _limit(case: str) -> str | None:
    text = LIMITS.get(case)
    if text and text.endswith("/"):
        import torch

        return f"{float(text[:-1]) / (torch.cuda.get_device_properties(0).total_memory / 2**20):.4f}"
    return text


def _predicted(preset, config, num_gpus: int) -> float:
    """The estimate the UI would show for this run (a worst case: every pass full)."""
    from engine.memory import ModelShape, estimate_memory

    shape = ModelShape.from_config(json.loads((MODEL / "config.json").read_text()))
    return estimate_memory(shape, config, num_gpus=num_gpus, zero_stage=preset.zero_stage).peak_allocated_gib


def measure(case: str) -> dict:
    preset_name, gpus, flags = CASES[case]
    preset = load_preset(preset_name)
    limit = _limit(case)
    if limit:
        os.environ["TORCH_PER_PROCESS_MEMORY_LIMIT"] = limit  # the run's processes inherit it
    sampler = GpuSampler()
    sampler.start()
    started = time.time()
    try:
        config = _config(preset, **flags)
        info = _wait(start_run(preset, config, gpus=gpus, runs_dir=RUNS).run_id,
                     timeout=HANG_S if case.startswith("oom-") else None)
    finally:
        os.environ.pop("TORCH_PER_PROCESS_MEMORY_LIMIT", None)
    sampler.running = False
    logs = _events(info, "log")
    result = {"case": case, "preset": preset_name, "gpus": len(gpus), "limit": limit, "status": info.status,
              "reason": info.reason, "wall_s": round(time.time() - started, 1),
              "processes_left": len(run_processes(info)), "logged_steps": [e["step"] for e in logs]}
    found = (_events(info, "started") or [{}])[0].get("auto_batch")
    if found:
        result["auto_batch"] = {k: found[k] for k in ("value", "this_process", "processes", "seconds", "why")}
    failed = _events(info, "failed")
    if failed:
        result["failed"] = {"error": failed[0]["error"], "hint": failed[0]["hint"],
                            "last_line": failed[0].get("traceback_tail", "").strip().splitlines()[-1:]}
    if info.status == "succeeded":
        after = [e for e in logs if e["step"] > WARMUP_STEPS]
        tokens = after[-1]["tokens_seen"] - logs[WARMUP_STEPS - 1]["tokens_seen"]
        seconds = after[-1]["time"] - logs[WARMUP_STEPS - 1]["time"]
        result |= {
            "tokens_per_s": round(tokens / seconds), "step_s": round(seconds / len(after), 3),
            "rank0_peak_allocated_gib": max(e["gpu_memory_gib"] for e in logs),
            # engine/memory.py's estimate per GPU, for the pass size the run chose (pack_tokens 0 grows on a GPU)
            "predicted_gib": _predicted(preset, dataclasses.replace(
                config, pack_tokens=_events(info, "started")[0]["config"]["pack_tokens"]), len(gpus)),
            "rank0_weights_gib": _events(info, "started")[0].get("weights_gib"),  # its ZeRO-3 share
            "rank0_load_peak_gib": _events(info, "started")[0].get("load_peak_gib"),  # loading's, before training
            "losses": [round(e["loss"], 4) for e in logs], "grad_norms": [round(e["grad_norm"], 4) for e in logs],
            "command": info.command,
        }
    return result | sampler.summary(gpus)


def stop_and_resume() -> dict:
    preset = load_preset("qlora-zero2")
    config = _config(preset, max_steps=200, save_strategy="steps", save_steps=1000)
    info = start_run(preset, config, gpus=[0, 1], runs_dir=RUNS)
    _wait(info.run_id, until=lambda i: any(e["step"] >= 4 for e in _events(i, "log")) or i.status == "failed")
    info = stop_run(info.run_id, RUNS, wait=True)
    time.sleep(2)
    stopped = _events(info, "stopped")
    result = {"case": "stop", "status": info.status, "processes_left": len(run_processes(info)),
              "gpu_used_gib_after_stop": [round(m, 2) for m, _ in GpuSampler.sample()],
              "stopped_step": stopped[0]["step"] if stopped else None}
    info = resume_run(info.run_id, RUNS)
    _wait(info.run_id, until=lambda i: len(_events(i, "started")) > 1 and _events(i, "log")[-1]["step"]
          > result["stopped_step"] or i.status == "failed")
    result["resumed_start_step"] = _events(info, "started")[-1]["start_step"]
    result["resumed_log_steps"] = [e["step"] for e in _events(info, "log")][-3:]
    info = stop_run(info.run_id, RUNS, wait=True)
    result["processes_left_after_second_stop"] = len(run_processes(info))
    return result


def through_the_app() -> dict:
    """A run started, followed and stopped through the web app's API, on every GPU."""
    import socket

    from gradio_client import Client, handle_file

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    runs = RUNS / "app"
    RUNS.mkdir(parents=True, exist_ok=True)
    log = open(RUNS / "app.log", "w")  # noqa: SIM115 - open for the app's lifetime
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs_dir", str(runs),
                            "--cache_dir", "/tmp/app-cache"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception as e:  # noqa: BLE001 - not listening yet
                if time.time() > deadline or app.poll() is not None:
                    tail = (RUNS / "app.log").read_text()[-3000:]
                    raise RuntimeError(f"the app did not answer (exit {app.poll()}): {tail}") from e
                time.sleep(2)
        checked = client.predict(handle_file(str(BENCH / "realistic-train.jsonl")), str(MODEL), 2048,
                                 api_name="/validate_data")
        gpus = len(GpuSampler.sample())
        run = client.predict(checked["train_data"], UI_PRESET, str(MODEL),
                             {"use_qlora": True, "max_steps": 200, "train_on_prompt": True, "seed": 0},
                             api_name="/start_run")
        sampler = GpuSampler()
        sampler.start()
        offset, steps = 0, []
        while len(steps) < 4:
            status = client.predict(run["run_id"], offset, api_name="/run_status")
            offset = status["events_offset"]
            steps += [e["step"] for e in map(json.loads, status["events"]) if e["event"] == "log"]
            if status["status"] not in ACTIVE:
                break
            time.sleep(1)
        stopped = client.predict(run["run_id"], api_name="/stop_run")
        while (status := client.predict(run["run_id"], offset, api_name="/run_status"))["status"] in ACTIVE:
            time.sleep(1)
        sampler.running = False
        time.sleep(2)
        return {"case": "ui", "gpus": gpus, "validated": checked["ok"], "examples": checked["num_examples"],
                "logged_steps_before_stop": steps, "stop_answer": stopped["status"], "final_status": status["status"],
                "processes_left": len(run_processes(run_status(run["run_id"], runs))),
                "gpu_used_gib_after_stop": [round(m, 2) for m, _ in GpuSampler.sample()],
                "command": run["command"]} | sampler.summary(list(range(gpus)))
    finally:
        app.terminate()
        app.wait(30)


def main() -> None:
    names = sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "run" else list(CASES)
    if not (MODEL / "config.json").exists():
        build_model()
    for name in names:
        try:
            special = {"stop": stop_and_resume, "ui": through_the_app}
            print(json.dumps(special[name]() if name in special else measure(name)), flush=True)
        except Exception as e:  # noqa: BLE001 - one failed case must not hide the others' numbers
            print(json.dumps({"case": name, "error": repr(e)}), flush=True)


if __name__ == "__main__":
    main()
