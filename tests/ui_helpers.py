"""Starting the app in a test: a fresh runs folder, the tiny model cache shared by the session."""

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.hardware import Hardware
from engine.launch import list_runs, run_processes
from ui import chat_worker
from ui.app import build_app, launch_kwargs
from ui.common import Context
from ui.hosting import DemoLimits

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"  # screenshots, gitignored


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(runs_dir: Path, cache_dir: Path, auth: list[tuple[str, str]] | None = None,
                demo: DemoLimits | None = None) -> Iterator[str]:
    """The app on a free port, as `python app.py` starts it, on a machine with no GPU."""
    ctx = Context(runs_dir=runs_dir, cache_dir=cache_dir, hardware=Hardware(gpus=[], cpu_count=2, ram_gib=8.0),
                  demo=demo, hosted=bool(auth or demo))
    app = build_app(ctx)
    app.queue(default_concurrency_limit=4).launch(
        server_port=free_port(), prevent_thread_lock=True, quiet=True, auth=auth, **launch_kwargs(ctx),
    )  # fmt: skip
    try:
        yield app.local_url
    finally:
        app.close()
        chat_worker.release()  # the playground's models, as the app's exit would
        for info in list_runs(runs_dir):  # a failed test must not leave a run training behind it
            for process in run_processes(info):
                process.kill()
