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
    args = parser.parse_args()

    ctx = Context(runs_dir=Path(args.runs_dir).resolve(), cache_dir=Path(args.cache_dir).resolve(),
                  hardware=detect_hardware())
    ctx.runs_dir.mkdir(parents=True, exist_ok=True)
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, share=args.share,
        allowed_paths=[str(ctx.cache_dir / "downloads")], **launch_kwargs(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
