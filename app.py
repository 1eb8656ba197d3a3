"""Finetune Studio: `python app.py` starts the guided web app (http://127.0.0.1:7860 by default).

Runs live in the runs folder (one folder each, see ../shared/DESIGN.md): restart the app and it
finds them again, running or finished. With no GPU, choose the tiny offline model and the CPU
preset to try every step in a few minutes.
"""

import argparse
import os
import sys
from pathlib import Path

from engine.hardware import detect_hardware
from ui.app import build_app, launch_kwargs
from ui.common import Context
from ui.hosting import auth_users, demo_limits_file, load_demo_limits
from ui.housekeeping import keep_runs_moving


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on; 0.0.0.0 for every interface (a server or a container)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--runs_dir", default=os.environ.get("FINETUNE_STUDIO_RUNS", "runs"),
                        help="where every run's folder goes (and is found again after a restart)")
    parser.add_argument("--cache_dir", default=os.environ.get(
        "FINETUNE_STUDIO_CACHE", str(Path.home() / ".cache" / "finetune-studio")),
                        help="the tiny offline model and files prepared for download")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    hosting = parser.add_argument_group("hosting", "several people on one app: each logs in and sees only their runs")
    hosting.add_argument("--auth", action="append", metavar="USER:PASSWORD",
                         help="require a login; repeat it or comma-separate users (env FINETUNE_STUDIO_AUTH). "
                         "A flag shows in the process list: prefer --auth_file on a shared machine")
    hosting.add_argument("--auth_file", default=os.environ.get("FINETUNE_STUDIO_AUTH_FILE"), metavar="FILE",
                         help="a users file: one user:password a line, # comments (env FINETUNE_STUDIO_AUTH_FILE)")
    hosting.add_argument("--demo", nargs="?", const="1", default=os.environ.get("FINETUNE_STUDIO_DEMO"),
                         metavar="LIMITS_YAML", help="demo mode: the limits of demo.yaml, or of the file given "
                         "(env FINETUNE_STUDIO_DEMO=1 or a file)")
    args = parser.parse_args()

    try:
        users = auth_users(args.auth or [os.environ.get("FINETUNE_STUDIO_AUTH", "")], args.auth_file)
        limits_file = demo_limits_file(args.demo)
        limits = load_demo_limits(limits_file) if limits_file else None
    except ValueError as e:
        parser.error(str(e))
    if limits and not users:
        print("Demo mode without --auth: every visitor is the same person, sees every run and gets one run "
              "at a time between them all. Add --auth_file to give each their own.", file=sys.stderr)
    ctx = Context(runs_dir=Path(args.runs_dir).resolve(), cache_dir=Path(args.cache_dir).resolve(),
                  hardware=detect_hardware(), demo=limits, hosted=bool(users or limits))
    ctx.runs_dir.mkdir(parents=True, exist_ok=True)
    keep_runs_moving(ctx)
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=users or None, **launch_kwargs(ctx),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
