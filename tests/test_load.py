"""The load benchmark at CI size: 20 clients follow a live run for 15 s while another user validates uploads.

The benchmark's bar (run_status p95 < 500 ms) is measured and recorded in benchmarks/RESULTS.md;
this smoke test holds a looser one (2 s, still a responsive page), because CI's two cores also
run the test process and the run, and a shared machine missed 500 ms by 64 ms once.
"""

import json
import subprocess
import sys

import pytest
from ui_helpers import REPO


@pytest.mark.slow
def test_twenty_followers_and_an_uploader_are_answered_within_the_bar():
    done = subprocess.run([sys.executable, "-m", "benchmarks.load", "--clients", "20", "--seconds", "15",
                           "--status_p95_ms", "2000"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 5, done.stdout + done.stderr[-3000:]
    _, status, validate, end, verdict = lines
    assert status["calls"] >= 20 * 15 / 2, status  # each follower got at least every other 1 s tick
    assert status["events_received_min"] > 0  # and each one saw the run's events arrive
    assert validate["calls"] >= 2, validate
    assert end["run_status_at_end"] == "running" and end["cpu"]["app_mean_percent"] > 0
    assert verdict["passed"], (verdict["missed"], lines)
    assert done.returncode == 0
