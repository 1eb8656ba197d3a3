"""The playground's one model worker: `python -m engine.chat` kept alive between questions.

Loading a model takes far longer than answering (tens of seconds for a 7B model), so the worker
stays up while people ask about the same run. Models are big, so there is only ever one: a
question about another run replaces it, and a training run starting on its GPU stops it. Its
weights never live in the web process.
"""

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time

from engine.launch import REPO, RUN_MARKER

ANSWER_TIMEOUT_S = 600  # loading a 7B model from disk and answering fits well within this


class Worker:
    """One engine.chat process serving one (model, adapter, chat, chat_template, GPUs) setting."""

    def __init__(self, key: tuple, argv: list[str], gpus: list[int]):
        self.key, self.gpus = key, gpus
        self.released = False  # stopped for a training run: its question's error says so
        # Not the run marker: engine.launch finds a run's processes by it, and this is no run.
        env = {k: v for k, v in os.environ.items() if k != RUN_MARKER}
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        # A file, not a pipe: a chatty library could fill a pipe nobody reads and stall the worker.
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, bufsize=0)
        self._pending = b""  # bytes read past the last full reply line

    def alive(self) -> bool:
        return self.process.poll() is None

    def ask(self, request: dict, timeout_s: float) -> dict:
        """The reply to one request; ValueError in words if the worker dies or takes over timeout_s."""
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            return json.loads(self._read_line(time.monotonic() + timeout_s))
        except TimeoutError:
            self.stop()
            raise ValueError(f"The models took more than {timeout_s:.0f} s to answer, so they were stopped; "
                             "try a shorter answer length.") from None
        except (BrokenPipeError, EOFError):
            self.stop()
            if self.released:
                raise ValueError("A training run started on the GPU these models used, so they were stopped. "
                                 "Try again when it ends.") from None
            code = self.process.returncode
            ended = f"was killed (signal {-code})" if code < 0 else f"exited with code {code}"
            raise ValueError(f"The models could not be loaded or run: their process {ended}. "
                             f"The last lines it wrote:\n{self.stderr_tail()}") from None

    def _read_line(self, deadline: float) -> bytes:
        out = self.process.stdout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(out.fileno(), 1 << 16)
            if not chunk:
                raise EOFError
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def stderr_tail(self, lines: int = 3) -> str:
        self.stderr.seek(max(0, self.stderr.seek(0, os.SEEK_END) - 8192))
        text = self.stderr.read().decode(errors="replace").strip()
        return "\n".join(text.splitlines()[-lines:]) or "(nothing)"

    def stop(self) -> None:
        """Ends the process (SIGKILL if SIGTERM is not enough) and reaps it."""
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()


# One worker for the whole app. _asking lets one question run at a time; _slot guards which worker
# is current, and is never held while a question runs, so release() acts at once, mid-answer too.
_asking = threading.Lock()
_slot = threading.Lock()
_current: Worker | None = None


def ask(model_id: str, adapter: str, chat: bool, chat_template: str | None, gpus: list[int], request: dict) -> dict:
    """The worker's reply to `request`, from the worker for these settings, started if need be."""
    global _current
    key = (model_id, adapter, chat, chat_template, tuple(gpus))
    with _asking:
        with _slot:
            if _current is None or _current.key != key or not _current.alive():
                if _current is not None:
                    _current.stop()
                argv = [sys.executable, "-m", "engine.chat", "--model_id", model_id, "--adapter", adapter,
                        "--chat", str(chat).lower()]
                if chat_template:
                    argv += ["--chat_template", chat_template]
                _current = Worker(key, argv, gpus)
            worker = _current
        return worker.ask(request, ANSWER_TIMEOUT_S)


def release(gpus: list[int] | None = None) -> None:
    """Stops the worker if it uses any of `gpus` (any worker with None): a training run needs them."""
    global _current
    with _slot:
        if _current is not None and (gpus is None or set(_current.gpus) & set(gpus)):
            _current.released = gpus is not None
            _current.stop()
            _current = None


def pid() -> int | None:
    """The live worker's process id, if one is up."""
    worker = _current
    return worker.process.pid if worker is not None and worker.alive() else None


atexit.register(release)  # the app's exit takes the worker with it
