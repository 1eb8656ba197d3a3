"""TrueFoundry reporting for the seed's `mlfoundry_*` flags.

`mlfoundry` is deprecated; its maintained successor is the ML client inside the `truefoundry`
package (`from truefoundry.ml import get_client`), which has the same run API. We use
`truefoundry` and fall back to `mlfoundry` when only that is installed.
Install with `pip install -r requirements-truefoundry.txt`; configure with `tfy login` or the
TFY_HOST and TFY_API_KEY environment variables.
"""

import importlib
import os
from pathlib import Path

from transformers import TrainerCallback

CLIENT_MODULES = ("truefoundry.ml", "mlfoundry")


def find_client_module():
    """The installed TrueFoundry client module, or None."""
    for name in CLIENT_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def tracking_problems(config) -> list[str]:
    """Why reporting cannot work, found before the model loads (empty when it can)."""
    if not config.mlfoundry_enable_reporting:
        return []
    problems = []
    if not config.mlfoundry_ml_repo:
        problems.append("mlfoundry_ml_repo: set the TrueFoundry ML repo to report to")
    if find_client_module() is None:
        problems.append(
            "mlfoundry_enable_reporting is true but the TrueFoundry client is not installed: "
            "run `pip install -r requirements-truefoundry.txt`, or set mlfoundry_enable_reporting false"
        )
    elif not (os.environ.get("TFY_API_KEY") and os.environ.get("TFY_HOST")) and not (
        Path.home() / ".truefoundry" / "credentials.json"
    ).exists():
        problems.append(
            "mlfoundry_enable_reporting is true but TrueFoundry is not configured: run `tfy login` "
            "or set TFY_HOST and TFY_API_KEY"
        )
    return problems


class TrueFoundryCallback(TrainerCallback):
    """Creates a run on rank 0, logs params and metrics, and uploads checkpoints when asked."""

    def __init__(self, config, client_module=None):
        self.config = config
        self.client_module = client_module or find_client_module()
        self.run = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        client = self.client_module.get_client()
        self.run = client.create_run(
            ml_repo=self.config.mlfoundry_ml_repo, run_name=self.config.mlfoundry_run_name
        )
        self.run.log_params({k: str(v) for k, v in self.config.to_dict().items()})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.run is None or not logs:
            return
        numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
        self.run.log_metrics(numbers, step=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.run is None or not self.config.mlfoundry_log_checkpoints:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.run.log_artifact(
            name=self.config.mlfoundry_checkpoint_artifact_name or "checkpoint",
            artifact_paths=[(str(folder), None)],
            step=state.global_step,
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self.run is not None:
            self.run.end()
            self.run = None
