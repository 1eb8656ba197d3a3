"""The app's named endpoints, driven by gradio_client as a script would."""

import json
import time

import pytest
from conftest import write_jsonl
from gradio_client import Client, handle_file
from ui_helpers import REPO, running_app

from ui.common import TINY_MODEL


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    with running_app(root / "runs", root / "cache") as url:
        yield Client(url, verbose=False)


def test_validate_data_lists_problems_by_line(client, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "{oops"])
    result = client.predict(handle_file(str(bad)), TINY_MODEL, 2048, api_name="/validate_data")
    assert not result["ok"]
    assert [(p["line"], p["field"]) for p in result["problems"]] == [(2, None)]


def test_start_run_refuses_a_file_the_app_does_not_hold(client):
    with pytest.raises(Exception, match="bundled example or the path validate_data returned"):
        client.predict("/etc/passwd", api_name="/start_run")


@pytest.mark.slow
def test_a_run_started_through_the_api_is_followed_to_its_end(client):
    checked = client.predict(handle_file(str(REPO / "examples" / "capitals-completion.jsonl")),
                             api_name="/validate_data")
    assert checked["ok"] and checked["num_examples"] == 48
    run = client.predict(checked["train_data"], "cpu-tiny", TINY_MODEL, {"num_train_epochs": 1},
                         api_name="/start_run")
    assert run["status"] in ("queued", "running") and "accelerate launch" in run["command"]
    offset, events, deadline = 0, [], time.time() + 300
    while time.time() < deadline:
        status = client.predict(run["run_id"], offset, api_name="/run_status")
        offset = status["events_offset"]
        events += [json.loads(e) for e in status["events"]]
        if status["status"] not in ("queued", "running", "stopping"):
            break
        time.sleep(1)
    assert status["status"] == "succeeded", status["reason"]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and "log" in kinds and kinds[-1] == "finished"
    listed = client.predict(api_name="/list_runs")
    assert listed[0]["run_id"] == run["run_id"] and listed[0]["status"] == "succeeded"
    # Stopping a finished run changes nothing.
    assert client.predict(run["run_id"], api_name="/stop_run")["status"] == "succeeded"
