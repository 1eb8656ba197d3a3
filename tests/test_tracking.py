"""TrueFoundry reporting (the seed's mlfoundry_* flags) against a recording stand-in client.

The real client needs a TrueFoundry server; the stand-in has its run API (create_run,
log_params, log_metrics, log_artifact, end), so the callback's calls are checked for real.
"""

import pytest

from engine import tracking, train
from engine.config import TrainConfig
from tests.test_train import EXAMPLES, fast, run_engine


class RecordingClient:
    def __init__(self):
        self.calls = []

    def get_client(self):
        return self

    def create_run(self, ml_repo, run_name):
        self.calls.append(("create_run", ml_repo, run_name))
        return self

    def log_params(self, params):
        self.calls.append(("log_params", params["lora_r"]))

    def log_metrics(self, metrics, step):
        self.calls.append(("log_metrics", step, sorted(metrics)))

    def log_artifact(self, name, artifact_paths, step):
        self.calls.append(("log_artifact", name, artifact_paths[0][0].rsplit("/", 1)[-1], step))

    def end(self):
        self.calls.append(("end",))


def test_enabled_without_client_or_config_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "find_client_module", lambda: None)
    code = train.main(["--model_id", "org/model", "--train_data", str(EXAMPLES / "capitals-chat.jsonl"),
                       "--output_dir", str(tmp_path), "--mlfoundry_enable_reporting", "true"])
    assert code == train.EXIT_PREFLIGHT
    err = capsys.readouterr().err
    assert "mlfoundry_ml_repo: set the TrueFoundry ML repo" in err
    assert "pip install -r requirements-truefoundry.txt" in err
    monkeypatch.setattr(tracking, "find_client_module", RecordingClient)
    monkeypatch.delenv("TFY_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    problems = tracking.tracking_problems(
        TrainConfig(mlfoundry_enable_reporting=True, mlfoundry_ml_repo="repo"))
    assert problems and "tfy login" in problems[0]


@pytest.mark.slow
def test_metrics_and_checkpoints_reach_the_run(tiny_mistral, tmp_path, monkeypatch):
    client = RecordingClient()
    monkeypatch.setattr(tracking, "find_client_module", lambda: client)
    monkeypatch.setenv("TFY_HOST", "https://example.invalid")
    monkeypatch.setenv("TFY_API_KEY", "secret")
    code, events = run_engine(
        tiny_mistral, tmp_path, *fast(max_steps=2, save_strategy="steps", save_steps=1),
        "--mlfoundry_enable_reporting", "true", "--mlfoundry_ml_repo", "my-ml-repo",
        "--mlfoundry_run_name", "test", "--mlfoundry_log_checkpoints", "true",
        "--mlfoundry_checkpoint_artifact_name", "chk-test")
    assert code == 0
    assert client.calls[0] == ("create_run", "my-ml-repo", "test")
    assert client.calls[1] == ("log_params", "8")
    assert ("log_artifact", "chk-test", "checkpoint-1", 1) in client.calls
    assert ("log_artifact", "chk-test", "checkpoint-2", 2) in client.calls
    assert any(c[0] == "log_metrics" and "loss" in c[2] for c in client.calls)
    assert client.calls[-1] == ("end",)
    assert "secret" not in (tmp_path / "output" / "events.jsonl").read_text()
