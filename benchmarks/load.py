"""Load on localhost: browser-like clients follow one live run while another user validates uploads.

    python -m benchmarks.load                              # 20 clients for 60 s; JSON lines on stdout
    python -m benchmarks.load --clients 20 --seconds 15    # the CI size (tests/test_load.py)

Method:
- app.py starts as its own process on a free port with fresh runs and cache folders, as a user
  would start it (no GPU needed);
- one run trains the tiny offline model with the cpu-tiny preset and max_steps far beyond the test,
  so it stays live throughout; it trains on the same CPU as the app (on a GPU machine it would
  leave the CPU to the app, so this is the harder case);
- each follower is a gradio_client.Client in its own thread calling /run_status with its
  events_offset every second, as a browser tab's 1 s timer does (a call starts 1 s after the
  previous one started, or at once when that one took longer);
- one more client uploads a fresh JSONL file every few seconds (a different file each time, so no
  cache answers for it) and calls /validate_data;
- latency is measured in the client from the call to its answer: queue, upload and gradio_client's
  own work included; the clients run in this process, on the same CPU as the app;
- CPU: the app process, the run's processes, this process (the clients) and the whole machine,
  sampled every second by psutil (100% = one core busy), and the time the app's threads were ready
  to run but waited for a core (/proc schedstat; 100% = one thread waiting all the time): on a
  shared machine that, not the app's own work, is what slows its answers.

The bar (exit status 1 when missed): run_status p95 under 500 ms, validate_data p95 under 5 s,
no failed call, and the run still live at the end.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from gradio_client import Client, handle_file

from engine.launch import list_runs, run_processes, run_status
from ui.common import TINY_MODEL
from ui.train import POLL_S

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "capitals-completion.jsonl"
BAR = {"run_status_p95_ms": 500, "validate_data_p95_ms": 5000}
LIVE = ("queued", "running")


@dataclass
class Calls:
    """One endpoint's answers: latency of each call, and what went wrong."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, call, *args, **kwargs):
        start = time.perf_counter()
        try:
            result = call(*args, **kwargs)
        except Exception as e:  # a failed call is a result of the test, not the end of it
            self.fail(f"{type(e).__name__}: {e}")
            return None
        with self.lock:
            self.latencies_ms.append((time.perf_counter() - start) * 1000)
        return result

    def fail(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)

    def summary(self, endpoint: str, seconds: float) -> dict:
        ms = np.array(self.latencies_ms or [np.nan])
        return {"endpoint": endpoint, "calls": len(self.latencies_ms), "errors": len(self.errors),
                "first_error": self.errors[0] if self.errors else None,
                "per_s": round(len(self.latencies_ms) / seconds, 1),
                **{f"{name}_ms": round(float(value), 1) for name, value in
                   (("p50", np.percentile(ms, 50)), ("p95", np.percentile(ms, 95)), ("max", ms.max()))}}


def connect(url: str) -> Client:
    # Plain HTTP on localhost: with verification on, gradio_client loads the CA store for each call,
    # which costs more CPU than the app's answer and takes it from the app on the same cores.
    return Client(url, verbose=False, ssl_verify=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(root: Path) -> tuple[subprocess.Popen, str]:
    """`python app.py` on a free port; returns once its page answers."""
    port = free_port()
    log = open(root / "app.log", "wb")
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs_dir", str(root / "runs"),
                            "--cache_dir", str(root / "cache")], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + 180
    while time.time() < deadline:
        if app.poll() is not None:  # the log goes with the temporary folder: show its end now
            raise RuntimeError(f"app.py exited with {app.returncode}:\n{(root / 'app.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return app, url
        except OSError:
            time.sleep(0.5)
    app.kill()
    raise RuntimeError(f"app.py did not answer at {url} within 180 s")


def start_live_run(client: Client, max_steps: int) -> str:
    """A run that trains past the end of the test; returns its id once training has started."""
    checked = client.predict(handle_file(str(EXAMPLE)), api_name="/validate_data")
    run = client.predict(checked["train_data"], "cpu-tiny", TINY_MODEL, {"max_steps": max_steps},
                         api_name="/start_run")
    offset, deadline = 0, time.time() + 300
    while time.time() < deadline:
        status = client.predict(run["run_id"], offset, api_name="/run_status")
        offset = status["events_offset"]
        if any(json.loads(e)["event"] == "started" for e in status["events"]):
            return run["run_id"]
        if status["status"] not in LIVE:
            raise RuntimeError(f"the run ended before training: {status['status']}, {status['reason']}")
        time.sleep(1)
    raise RuntimeError("the run did not start training within 300 s")


def follow(client: Client, run_id: str, until: float, poll_s: float, calls: Calls, events: list[int]) -> None:
    """A browser tab's timer: run_status with the offset read so far, once every poll_s."""
    offset, received = 0, 0
    while (start := time.time()) < until:
        status = calls.timed(client.predict, run_id, offset, api_name="/run_status")
        if status is not None:
            offset, received = status["events_offset"], received + len(status["events"])
        time.sleep(max(0.0, start + poll_s - time.time()))
    events.append(received)


def upload_and_validate(client: Client, folder: Path, until: float, every_s: float, examples: int,
                        calls: Calls) -> None:
    """Another user: a new file of `examples` lines every `every_s`, each one checked by the app."""
    rows = EXAMPLE.read_text().splitlines()
    upload = 0
    while (start := time.time()) < until:
        upload += 1
        path = folder / f"upload-{upload}.jsonl"
        lines = [json.dumps({**json.loads(rows[i % len(rows)]), "id": f"{upload}-{i}"}) for i in range(examples)]
        path.write_text("\n".join(lines) + "\n")
        checked = calls.timed(client.predict, handle_file(str(path)), TINY_MODEL, 2048, api_name="/validate_data")
        if checked is not None and not (checked["ok"] and checked["num_examples"] == examples):
            calls.fail(f"{path.name}: {checked['num_examples']} examples, problems {checked['problems'][:3]}")
        time.sleep(max(0.0, start + every_s - time.time()))


def waited_s(pid: int) -> dict[int, float]:
    """Per thread, the seconds it spent ready to run but waiting for a free core (Linux schedstat)."""
    waits = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            waits[int(task.name)] = int((task / "schedstat").read_text().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):  # a thread that just ended
            continue
    return waits


def sample_cpu(app_pid: int, run: list[psutil.Process], stop: threading.Event, samples: dict[str, list]) -> None:
    """Once a second: CPU% of the app, of the run's processes, of these clients and of the machine
    (100% = one core), and how long the app's threads waited for a core (100% = one thread always)."""
    app, clients = psutil.Process(app_pid), psutil.Process()
    for p in [app, clients, *run]:
        p.cpu_percent()  # the first call only starts the count
    psutil.cpu_percent()
    waits, last = waited_s(app_pid), time.perf_counter()
    while not stop.wait(1.0):
        samples["app"].append(app.cpu_percent())
        samples["run"].append(sum(p.cpu_percent() for p in run if p.is_running()))
        samples["clients"].append(clients.cpu_percent())
        samples["machine"].append(psutil.cpu_percent() * psutil.cpu_count())
        now_waits, now = waited_s(app_pid), time.perf_counter()
        waited = sum(w - waits[tid] for tid, w in now_waits.items() if tid in waits)
        samples["app_waiting_for_cpu"].append(100 * waited / (now - last))
        waits, last = now_waits, now


def measure(url: str, runs_dir: Path, app_pid: int, args: argparse.Namespace) -> list[dict]:
    """Starts the run, runs the clients for args.seconds, and returns the report's lines."""
    run_id = start_live_run(connect(url), args.max_steps)
    run = run_processes(run_status(run_id, runs_dir))
    followers = [connect(url) for _ in range(args.clients)]  # connected before the clock starts
    uploader = connect(url)
    samples = {who: [] for who in ("app", "app_waiting_for_cpu", "run", "clients", "machine")}
    status_calls, validate_calls, events = Calls(), Calls(), []
    load_before, stop = os.getloadavg(), threading.Event()
    until = time.time() + args.seconds
    threads = [threading.Thread(target=follow, args=(c, run_id, until, args.poll_s, status_calls, events))
               for c in followers]
    threads.append(threading.Thread(target=upload_and_validate, args=(
        uploader, runs_dir.parent, until, args.validate_every_s, args.validate_examples, validate_calls)))
    sampler = threading.Thread(target=sample_cpu, args=(app_pid, run, stop, samples))
    for t in [sampler, *threads]:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sampler.join()
    final = run_status(run_id, runs_dir).status
    cpu = {f"{who}_{stat}_percent": round(float(fn(values)), 1) if values else None
           for who, values in samples.items() for stat, fn in (("mean", np.mean), ("max", np.max))}
    return [
        {"setup": {"clients": args.clients, "seconds": args.seconds, "poll_s": args.poll_s,
                   "validate_every_s": args.validate_every_s, "validate_examples": args.validate_examples,
                   "cpu_count": psutil.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}},
        {**status_calls.summary("run_status", args.seconds), "events_received_min": min(events, default=0)},
        validate_calls.summary("validate_data", args.seconds),
        {"cpu": cpu, "run_status_at_end": final},
    ]


def verdict(lines: list[dict], bar: dict) -> dict:
    status, validate, end = lines[1], lines[2], lines[3]["run_status_at_end"]
    missed = [f"{name} {value} >= {limit}" for name, value, limit in (
        ("run_status_p95_ms", status["p95_ms"], bar["run_status_p95_ms"]),
        ("validate_data_p95_ms", validate["p95_ms"], bar["validate_data_p95_ms"]),
    ) if not value < limit]  # a NaN (no answer at all) misses too
    missed += [f"{line['endpoint']}: {line['errors']} failed calls" for line in (status, validate) if line["errors"]]
    if end not in LIVE:
        missed.append(f"the run was {end} at the end, not live")
    return {"bar": bar, "passed": not missed, "missed": missed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20, help="browser tabs following the run")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--poll_s", type=float, default=POLL_S, help="a tab's timer period (the UI's)")
    parser.add_argument("--validate_every_s", type=float, default=5.0)
    parser.add_argument("--validate_examples", type=int, default=1000, help="lines in each uploaded file")
    parser.add_argument("--max_steps", type=int, default=100_000, help="the run's length: beyond the test's end")
    parser.add_argument("--status_p95_ms", type=float, default=BAR["run_status_p95_ms"],
                        help="the bar for run_status (CI's smoke test sets a looser one: its machine is shared)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="load-") as tmp:
        root = Path(tmp)
        app, url = start_app(root)
        try:
            lines = measure(url, (root / "runs").resolve(), app.pid, args)
        finally:
            run = [p for info in list_runs(root / "runs") for p in run_processes(info)]
            for p in run:  # the run must not outlive the test
                p.kill()
            psutil.wait_procs(run, timeout=30)
            app.terminate()
            app.wait(30)
    lines.append(verdict(lines, {**BAR, "run_status_p95_ms": args.status_p95_ms}))
    for line in lines:
        print(json.dumps(line), flush=True)
    return 0 if lines[-1]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
