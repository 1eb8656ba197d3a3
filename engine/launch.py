"""Start, follow, stop and list training runs: `accelerate launch ... -m engine.train` in a run folder.

A run is a folder `runs/<run_id>/` (DESIGN.md): config.json, command.txt, state.json, stdout.log,
events.jsonl, output/. Its files are the truth: any process (the web app, a restarted web app,
the CLI, a second replica) can follow, stop or list runs from them alone.

    python -m engine.launch --preset qlora-zero2 --model_id ./model --train_data data.jsonl
"""

import dataclasses
import fcntl
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from engine.config import TrainConfig
from engine.events import FINAL_EVENTS, read_events
from engine.hardware import detect_gpus
from engine.presets import Preset

REPO = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 30.0  # SIGTERM lets ranks finish a step and checkpoint; then SIGKILL
RUN_NICENESS = 5  # runs yield the CPU to the app (5 nice steps below it): an answer costs ~20 ms, a step seconds
LIVE = ("running", "stopping")  # processes exist
ACTIVE = ("queued", *LIVE)  # not over yet
FINAL_STATUS = {"finished": "succeeded", "stopped": "stopped", "failed": "failed"}


@dataclass
class RunInfo:
    run_id: str
    status: str  # queued | running | stopping | stopped | succeeded | failed
    preset: str
    run_dir: Path
    created_at: float
    command: str
    gpus: list[int] = field(default_factory=list)
    num_processes: int = 1
    port: int | None = None
    owner: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    reason: str | None = None
    pid: int | None = None
    pid_create_time: float | None = None  # so a reused pid is never taken for the run
    stop_requested_at: float | None = None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "run_dir": str(self.run_dir)}


# ---------------------------------------------------------------- the command


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def build_command(preset: Preset, config: TrainConfig, gpus: list[int], port: int | None = None,
                  num_processes: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv of `accelerate launch ... -m engine.train <flags>` and the env it needs.

    One process per GPU; on a CPU, `num_processes` (default 1) gloo processes. Never a shell
    string: user text stays one argv item.
    """
    launcher = preset.launcher
    if launcher.get("use_deepspeed") and not config.deepspeed:
        config = dataclasses.replace(config, deepspeed=preset.deepspeed)  # the engine reads it too
    processes = len(gpus) if gpus else (num_processes or 1)
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
            "--num_processes", str(processes), "--dynamo_backend", "no"]
    if launcher.get("use_deepspeed"):
        argv += ["--use_deepspeed", "--deepspeed_config_file", config.deepspeed]
    else:
        # From the engine's flags, never the preset's: a second source of precision once trained a
        # `bf16 false` run in bf16 (engine/trainer_args.py).
        argv += ["--mixed_precision", "bf16" if config.bf16 else "fp16" if config.fp16 else "no"]
        if processes > 1:
            argv.append("--multi_gpu")  # on CPU too: torch.distributed over gloo
    if processes == 1 and not launcher.get("use_deepspeed") and (launcher.get("cpu") or not gpus):
        argv.append("--cpu")  # accelerate takes --cpu alone; several CPU processes go as --multi_gpu
    if processes > 1 or launcher.get("use_deepspeed"):
        argv += ["--main_process_port", str(port or _free_port(set()))]
    argv += ["-m", "engine.train", *config.to_argv()]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if gpus else {"CUDA_VISIBLE_DEVICES": ""}
    return argv, env


def command_text(argv: list[str], env: dict[str, str]) -> str:
    """A copy-paste runnable shell command (from the repo root) for argv and env."""
    words = [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    words += ["accelerate", "launch"] if argv[1:3] == ["-m", "accelerate.commands.launch"] else argv[:3]
    return " ".join(words + [shlex.quote(a) for a in argv[3:]])


# ---------------------------------------------------------------- run folders


def _state_path(run_dir: Path) -> Path:
    return run_dir / "state.json"


def _save(info: RunInfo) -> None:
    tmp = _state_path(info.run_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(info.to_json(), indent=2))
    os.replace(tmp, _state_path(info.run_dir))  # atomic: a reader never sees half a state


def _read(run_dir: Path) -> RunInfo:
    data = json.loads(_state_path(run_dir).read_text())
    data["run_dir"] = Path(data["run_dir"])
    return RunInfo(**data)


@contextmanager
def _locked(runs_dir: Path) -> Iterator[None]:
    """One process at a time changes run states (two app replicas never start the same run twice)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run_dir(run_id: str, runs_dir: Path) -> Path:
    """The folder of a run; KeyError for anything else (`..`, absolute paths, links out, NUL bytes)."""
    try:
        run_dir = (runs_dir / run_id).resolve()
        if run_dir.parent == runs_dir.resolve() and _state_path(run_dir).is_file():
            return run_dir
    except (OSError, ValueError):  # a name too long, or with a NUL byte
        pass
    raise KeyError(f"no run {run_id!r} in {runs_dir}")


def _read_all(runs_dir: Path) -> list[RunInfo]:
    return [_read(p.parent) for p in runs_dir.glob("*/state.json")]


# ---------------------------------------------------------------- processes


_children: dict[int, subprocess.Popen] = {}  # runs this process started, reaped by _alive
RUN_MARKER = "FINETUNE_STUDIO_RUN"  # env var every process of a run inherits: how we find them all


def run_processes(info: RunInfo) -> list[psutil.Process]:
    """Every live process of the run, found by the marker in its environment.

    Not the process group: torch's elastic launcher starts each rank in a session of its own, and
    a rank outlives a killed launcher. Nor the pid alone: a pid is reused; the marker is not.
    """
    if info.pid is None:
        return []
    child = _children.get(info.pid)
    if child is not None and child.poll() is not None:  # reap our own child so it is no zombie
        info.exit_code = child.returncode
        _children.pop(info.pid)
    found = []
    for p in psutil.process_iter(["create_time", "status"]):
        try:
            if p.info["create_time"] < (info.pid_create_time or 0) or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            # The leader by pid and start time: between fork and exec its environment is still
            # the parent's, without the marker, and a status check then must not call it dead.
            if (p.pid == info.pid and p.info["create_time"] == info.pid_create_time
                    or p.environ().get(RUN_MARKER) == info.run_id):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _alive(info: RunInfo) -> bool:
    return bool(run_processes(info))


def _signal_group(info: RunInfo, sig: int) -> None:
    for p in run_processes(info):
        try:
            p.send_signal(sig)
        except psutil.Error:
            continue


def _spawn(info: RunInfo, argv: list[str], env: dict[str, str]) -> None:
    log = open(info.run_dir / "stdout.log", "ab")
    child = subprocess.Popen(
        argv, cwd=REPO, env={**os.environ, **env, "PYTHONUNBUFFERED": "1", RUN_MARKER: info.run_id},
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # detached from the web app's terminal and its Ctrl-C
    )
    log.close()
    _children[child.pid] = child
    leader = psutil.Process(child.pid)
    # Set before the launcher forks its ranks (seconds of imports away), so they inherit it: a
    # web request then gets a core at once, even while a run trains on the same CPUs.
    leader.nice(min(19, leader.nice() + RUN_NICENESS))  # relative: never above the app's priority
    info.pid = child.pid
    info.pid_create_time = leader.create_time()
    info.status, info.started_at = "running", time.time()


def busy_gpus(runs: list[RunInfo]) -> set[int]:
    """The GPUs that live runs among `runs` hold."""
    return {gpu for run in runs if run.status in LIVE for gpu in run.gpus}


def _final_event(run_dir: Path) -> dict | None:
    events, _ = read_events(run_dir / "events.jsonl")
    finals = [e for e in events if e["event"] in FINAL_EVENTS]
    return finals[-1] if finals else None


def _log_tail(run_dir: Path, lines: int = 15) -> str:
    try:
        with open(run_dir / "stdout.log", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _root_cause(log: str) -> str | None:
    """torch's launcher names the first rank that failed, and how; in words."""
    block = log.rpartition("Root Cause (first observed failure):")[2]
    fields = dict(re.findall(r"^\s+(rank|exitcode)\s+:\s+(.+?)\s*$", block, re.MULTILINE))
    if not block or "rank" not in fields:
        return None
    rank = fields["rank"].split()[0]
    return f"The first process to fail was rank {rank}, exit code {fields.get('exitcode', '?')}."


def _reconcile(info: RunInfo) -> bool:
    """Brings a live-looking state in line with its processes; True if it changed."""
    if info.status not in LIVE:
        return False
    if _alive(info):
        if info.status == "stopping" and time.time() - (info.stop_requested_at or 0) > STOP_GRACE_S:
            _signal_group(info, signal.SIGKILL)
        return False
    final = _final_event(info.run_dir)
    tail = _log_tail(info.run_dir, 40)
    if final is not None:
        info.status = FINAL_STATUS[final["event"]]
        if final["event"] == "failed":
            info.reason = " ".join(filter(None, [final.get("error"), _root_cause(tail), final.get("hint")]))
    elif info.status == "stopping":
        info.status, info.reason = "stopped", "stopped before it could save a checkpoint"
    else:
        info.status = "failed"
        info.reason = " ".join(filter(None, [
            "The training processes ended without finishing.", _root_cause(tail),
            "Last lines of the log:\n" + "\n".join(tail.splitlines()[-15:])]))
    info.ended_at = time.time()
    return True


def _queue(runs: list[RunInfo]) -> list[RunInfo]:
    """The queued runs in the order they start: round-robin over owners, each owner's oldest first,
    so one person's many runs never hold everyone else back."""
    queued = sorted((r for r in runs if r.status == "queued"), key=lambda r: r.created_at)
    turns: dict[str | None, int] = {}
    keys = []
    for info in queued:
        turns[info.owner] = turns.get(info.owner, 0) + 1
        keys.append((turns[info.owner], info.created_at))
    return [info for _, info in sorted(zip(keys, queued, strict=True), key=lambda pair: pair[0])]


def _schedule(runs_dir: Path) -> list[RunInfo]:
    """Reconciles every run and starts queued ones whose GPUs are free. Call under _locked."""
    runs = _read_all(runs_dir)
    for info in runs:
        if _reconcile(info):
            _save(info)
    busy = busy_gpus(runs)
    for info in _queue(runs):
        if busy.isdisjoint(info.gpus):
            argv, env = json.loads((info.run_dir / "argv.json").read_text())
            _spawn(info, argv, env)
            _save(info)
            busy |= set(info.gpus)
    return runs


# ---------------------------------------------------------------- the API


def start_run(preset: Preset, config: TrainConfig, gpus: list[int] | None = None, runs_dir: str | Path = "runs",
              owner: str | None = None, num_processes: int | None = None) -> RunInfo:
    """Creates runs/<run_id>/ and starts the run, or queues it while its GPUs are busy. Returns at once.

    gpus=None takes every GPU the preset can use; an explicit [] runs any preset on the CPU with
    num_processes gloo processes (how CI exercises the GPU presets' code paths).
    """
    runs_dir = Path(runs_dir).resolve()
    if gpus is None:
        gpus = [g.index for g in detect_gpus()] if preset.needs_gpu else []
        if preset.needs_gpu and not gpus:
            raise ValueError(f"preset {preset.name} needs a GPU and none was found; choose the cpu-tiny preset")
    run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(6)  # sortable, and unguessable
    run_dir = runs_dir / run_id
    (run_dir / "output").mkdir(parents=True)
    config = dataclasses.replace(config, output_dir=str(run_dir / "output"),
                                 events_file=str(run_dir / "events.jsonl"))
    with _locked(runs_dir):
        runs = _schedule(runs_dir)
        port = _free_port({r.port for r in runs if r.status in LIVE and r.port})
        argv, env = build_command(preset, config, gpus, port, num_processes)
        (run_dir / "config.json").write_text(json.dumps({"preset": preset.name, **config.to_dict()}, indent=2))
        (run_dir / "command.txt").write_text(command_text(argv, env) + "\n")
        (run_dir / "argv.json").write_text(json.dumps([argv, env]))
        info = RunInfo(run_id=run_id, status="queued", preset=preset.name, run_dir=run_dir,
                       created_at=time.time(), command=command_text(argv, env), gpus=gpus,
                       num_processes=len(gpus) or num_processes or 1, port=port, owner=owner)
        if busy_gpus(runs).isdisjoint(gpus):
            _spawn(info, argv, env)
        _save(info)
    return info


def resume_run(run_id: str, runs_dir: str | Path = "runs") -> RunInfo:
    """Starts a stopped or failed run again in its own folder, from its latest checkpoint."""
    runs_dir = Path(runs_dir).resolve()
    run_dir = _run_dir(run_id, runs_dir)
    with _locked(runs_dir):
        runs = _schedule(runs_dir)
        info = next(r for r in runs if r.run_id == run_id)
        if info.status not in ("stopped", "failed"):
            raise ValueError(f"run {run_id} is {info.status}; only a stopped or failed run can be resumed")
        if not resumable(info):
            raise ValueError(f"run {run_id} saved no checkpoint to resume from; start a new run instead")
        argv, env = json.loads((run_dir / "argv.json").read_text())
        argv = _with_flag(argv, "--resume_from_checkpoint", "true")
        argv = _with_flag(argv, "--cleanup_output_dir_on_start", "false")
        (run_dir / "argv.json").write_text(json.dumps([argv, env]))
        info.command = command_text(argv, env)
        (run_dir / "command.txt").write_text(info.command + "\n")
        info = dataclasses.replace(info, status="queued", reason=None, exit_code=None, ended_at=None,
                                   stop_requested_at=None)
        if busy_gpus(runs).isdisjoint(info.gpus):
            _spawn(info, argv, env)
        _save(info)
    return info


def resumable(info: RunInfo) -> bool:
    """A stopped or failed run with a checkpoint to continue from."""
    return info.status in ("stopped", "failed") and any((info.run_dir / "output").glob("checkpoint-*"))


def _with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        argv = argv.copy()
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]


def run_status(run_id: str, runs_dir: str | Path = "runs") -> RunInfo:
    """The run's state, reconciled with its processes (a dead run without a final event is failed)."""
    runs_dir = Path(runs_dir).resolve()
    run_dir = _run_dir(run_id, runs_dir)
    with _locked(runs_dir):
        _schedule(runs_dir)
        return _read(run_dir)


def queue_position(run_id: str, runs_dir: str | Path = "runs") -> int | None:
    """1 if the run starts next on its GPUs, 2 after one other run, ...; None if it is not queued.

    Read from the state files as the last schedule left them: cheap enough for every status tick.
    """
    runs_dir = Path(runs_dir).resolve()
    _run_dir(run_id, runs_dir)
    queue = _queue(_read_all(runs_dir))
    mine = next((r for r in queue if r.run_id == run_id), None)
    if mine is None:
        return None
    ahead = queue[: queue.index(mine)]
    return 1 + sum(1 for r in ahead if not set(r.gpus).isdisjoint(mine.gpus))


def list_runs(runs_dir: str | Path = "runs") -> list[RunInfo]:
    """Every run, newest first, reconciled; queued runs whose GPUs freed up are started."""
    runs_dir = Path(runs_dir).resolve()
    if not runs_dir.is_dir():
        return []
    with _locked(runs_dir):
        runs = _schedule(runs_dir)
    return sorted(runs, key=lambda r: r.created_at, reverse=True)


def stop_run(run_id: str, runs_dir: str | Path = "runs", wait: bool = False, grace_s: float = STOP_GRACE_S) -> RunInfo:
    """SIGTERM to every process of the run (ranks save a checkpoint), SIGKILL after grace_s.

    With wait=False it returns at once and a background thread enforces the deadline; a later
    status call enforces it too, should this process die first.
    """
    runs_dir = Path(runs_dir).resolve()
    run_dir = _run_dir(run_id, runs_dir)
    with _locked(runs_dir):
        info = _read(run_dir)
        if info.status == "queued":
            info.status, info.ended_at, info.reason = "stopped", time.time(), "stopped before it started"
        elif info.status == "running":
            info.status, info.stop_requested_at = "stopping", time.time()
            _signal_group(info, signal.SIGTERM)
        _save(info)
    if info.status != "stopping":
        return info

    def enforce() -> RunInfo:
        deadline = time.time() + grace_s
        while time.time() < deadline and _alive(info):
            time.sleep(0.2)
        if _alive(info):
            _signal_group(info, signal.SIGKILL)
            while _alive(info):
                time.sleep(0.1)
        return run_status(run_id, runs_dir)

    if wait:
        return enforce()
    threading.Thread(target=enforce, daemon=True).start()
    return info


# ---------------------------------------------------------------- the CLI


def follow(info: RunInfo, runs_dir: Path, out=None) -> RunInfo:
    """Prints a progress line per event until the run ends; returns its final state."""
    out = out or sys.stdout
    offset = 0
    while True:
        events, offset = read_events(info.run_dir / "events.jsonl", offset)
        for e in events:
            out.write(_describe(e) + "\n")
        out.flush()
        info = run_status(info.run_id, runs_dir)
        if info.status not in ACTIVE and not events:
            return info
        time.sleep(1.0)


def _bar(step: int, total: int, width: int = 24) -> str:
    done = int(width * step / max(total, 1))
    return "[" + "#" * done + "." * (width - done) + f"] {step}/{total}"


def _describe(e: dict) -> str:
    kind = e["event"]
    if kind == "started":
        return (f"started: {e.get('world_size')} process(es), {e.get('total_steps')} steps, "
                f"{e.get('num_train_examples')} train / {e.get('num_eval_examples')} eval examples")
    if kind == "log":
        return (f"{_bar(e.get('step', 0), e.get('total_steps') or 0)} loss {e.get('loss'):.4f} "
                f"{e.get('tokens_per_second') or 0:.0f} tok/s")
    if kind == "eval":
        return f"eval at step {e.get('step')}: eval_loss {e.get('eval_loss'):.4f}"
    if kind == "checkpoint":
        return f"checkpoint: {e.get('path')}"
    if kind == "finished":
        return f"finished: adapter in {e.get('adapter_path')}"
    if kind == "stopped":
        return f"stopped at step {e.get('step')}: resume with --resume_from_checkpoint true"
    if kind == "failed":
        return f"FAILED: {e.get('error')}\n  {e.get('hint')}"
    return kind


_PATH_FLAGS = ("train_data", "eval_data", "chat_template", "model_id")
_USAGE = """python -m engine.launch --preset NAME [engine flags]   start a run and follow it
python -m engine.launch follow RUN_ID | stop RUN_ID | list   [--runs_dir runs]"""


def _manage(command: str, rest: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m engine.launch {command}")
    if command != "list":
        parser.add_argument("run_id")
    parser.add_argument("--runs_dir", default="runs")
    args = parser.parse_args(rest)
    runs_dir = Path(args.runs_dir).resolve()
    if command == "list":
        for run in list_runs(runs_dir):
            print(f"{run.run_id}  {run.status:<9}  {run.preset:<13}  {time.ctime(run.created_at)}")
        return 0
    info = stop_run(args.run_id, runs_dir, wait=True) if command == "stop" else follow(
        run_status(args.run_id, runs_dir), runs_dir)
    print(f"run {info.run_id} {info.status}" + (f": {info.reason}" if info.reason else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    from engine.config import build_parser
    from engine.presets import load_preset, make_config

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("follow", "stop", "list"):
        return _manage(argv[0], argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m engine.launch", parents=[build_parser(only_given=True)], conflict_handler="resolve",
        usage=_USAGE, description="Start a training run from a preset and follow it; engine flags override "
        "the preset's.",
    )
    launch = parser.add_argument_group("launch")
    launch.add_argument("--preset", required=True, help="preset name (presets/*.yaml) or YAML path")
    launch.add_argument("--gpus", default=None, help="comma-separated GPU indices; default: all")
    launch.add_argument("--num_processes", type=int, default=None, help="CPU processes when there is no GPU")
    launch.add_argument("--runs_dir", default="runs", help="where run folders go")
    launch.add_argument("--detach", action="store_true", help="start the run and return")
    args = vars(parser.parse_args(argv))
    options = {k: args.pop(k) for k in ("preset", "gpus", "num_processes", "runs_dir", "detach")}
    for key in _PATH_FLAGS:  # the run starts from the repo root; keep the caller's relative paths
        if args.get(key) and Path(args[key]).exists():
            args[key] = str(Path(args[key]).resolve())
    preset = load_preset(options["preset"])
    gpus = None if options["gpus"] is None else [int(g) for g in options["gpus"].split(",") if g.strip()]
    runs_dir = Path(options["runs_dir"]).resolve()
    info = start_run(preset, make_config(preset, **args), gpus, runs_dir, num_processes=options["num_processes"])
    print(f"run {info.run_id} {info.status}: {info.run_dir}\n{info.command}")
    if options["detach"]:
        return 0
    try:
        info = follow(info, runs_dir)
    except KeyboardInterrupt:
        answer = input("\nStop the run (s) or detach and leave it running (d)? [s/d] ") if sys.stdin.isatty() else "d"
        if answer.strip().lower().startswith("s"):
            info = stop_run(info.run_id, runs_dir, wait=True)
            print(f"run {info.run_id} {info.status}")
        else:
            print(f"detached; follow it again with: python -m engine.launch follow {info.run_id}")
        return 0
    print(f"run {info.run_id} {info.status}" + (f": {info.reason}" if info.reason else ""))
    return 0 if info.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
