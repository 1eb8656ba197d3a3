"""Hosted mode: logins, demo limits, one person's runs hidden from another, paths that try to
escape, and secrets that must never reach a run's files."""

import json
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import gradio as gr
import httpx
import psutil
import pytest
from gradio_client import Client, handle_file
from ui_helpers import REPO, running_app

from engine import launch
from engine.hardware import Hardware
from engine.launch import RunInfo
from engine.presets import load_preset, make_config
from ui import train as train_step
from ui.app import build_app
from ui.common import TINY_MODEL, Context, Session, owned_run
from ui.hosting import DEMO_LIMITS, DemoLimits, auth_users, check_start, demo_limits_file, load_demo_limits

COMPLETION = REPO / "examples" / "capitals-completion.jsonl"  # 48 examples, 3.7 kB
CHAT = REPO / "examples" / "capitals-chat.jsonl"  # 10.4 kB
USERS = [("alice", "alice-pw"), ("bob", "bob-pw")]
NASTY_IDS = ["../x", "..", ".", "", "/etc", "..%2f..%2fetc", "x/../../etc", "a\x00b", "a" * 300, "~"]
TINY_DEMO = DemoLimits(max_upload_mb=0.008, max_examples=20, max_length=512, max_epochs=2, max_steps=10,
                       active_runs_per_user=1, models=[TINY_MODEL], presets=["cpu-tiny"])


def not_found(run_id: str) -> str:
    return f"No run {run_id!r}: pick one of yours in Results"


# ---------------------------------------------------------------- helpers


@pytest.fixture
def sleeper():
    """A live process that stands in for a run's leader, so a fake run counts as running."""
    process = subprocess.Popen(["sleep", "300"])
    yield process
    process.kill()
    process.wait()


def fake_run(runs_dir: Path, owner: str | None, status: str = "succeeded", gpus: tuple = (), created_at: float = 0,
             leader: subprocess.Popen | None = None) -> RunInfo:
    """A run folder as the launcher leaves it, without training: state, config, log, an adapter."""
    run_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(6)
    run_dir = runs_dir / run_id
    (run_dir / "output").mkdir(parents=True)
    (run_dir / "output" / "adapter_config.json").write_text("{}")
    (run_dir / "output" / "checkpoint-1").mkdir()
    (run_dir / "stdout.log").write_text("training...\n")
    config = make_config(load_preset("cpu-tiny"), model_id="m", train_data=str(COMPLETION))
    (run_dir / "config.json").write_text(json.dumps({"preset": "cpu-tiny", **config.to_dict()}))
    info = RunInfo(run_id=run_id, status=status, preset="cpu-tiny", run_dir=run_dir,
                   created_at=created_at or time.time(), command="accelerate launch ...", gpus=list(gpus),
                   owner=owner, pid=leader.pid if leader else None,
                   pid_create_time=psutil.Process(leader.pid).create_time() if leader else None)
    (run_dir / "state.json").write_text(json.dumps(info.to_json()))
    return info


def ctx_for(tmp_path: Path, demo: DemoLimits | None = None, hosted: bool = True) -> Context:
    return Context(runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache", hardware=Hardware([], 2, 8.0),
                   demo=demo, hosted=hosted)


def handlers(ctx: Context) -> dict:
    """The app's event functions by name, to call as Gradio would, with any request."""
    return {f.name: f.fn for f in build_app(ctx).fns.values()}


def as_user(name: str) -> gr.Request:
    return gr.Request(username=name)


# ---------------------------------------------------------------- logins


def test_auth_users_from_flags_and_a_users_file(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("# the team\nalice:pw:with:colons\n\n  bob:b, c  \n# carol:old\r\ncarol:c\n")
    assert auth_users(["dan:1,erin:2", "frank:3"], str(users)) == [
        ("dan", "1"), ("erin", "2"), ("frank", "3"), ("alice", "pw:with:colons"), ("bob", "b, c"), ("carol", "c")]
    assert auth_users([""]) == []  # FINETUNE_STUDIO_AUTH unset: no login


@pytest.mark.parametrize("entries,text,message", [
    ([], "alice:a\nbob\n", "users.txt, line 2: expected user:password"),
    ([], "alice:a\n:nopassword-user\n", "users.txt, line 2: expected user:password"),
    ([], "alice:\n", "users.txt, line 1: expected user:password"),
    (["alice:a,bob"], "", "FINETUNE_STUDIO_AUTH\\) entry 2: expected user:password"),
    (["alice:a"], "alice:b\n", "user 'alice' is given more than once"),
])  # fmt: skip
def test_a_bad_login_entry_names_its_place(tmp_path, entries, text, message):
    users = tmp_path / "users.txt"
    users.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        auth_users(entries, str(users))
    assert "nopassword" not in str(error.value)  # the entry itself is never echoed
    with pytest.raises(ValueError, match="users file .*missing.txt not found"):
        auth_users([], str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("argv,env,message", [
    ([], {"FINETUNE_STUDIO_AUTH_FILE": "{users}"}, "{users}, line 2: expected user:password"),
    (["--auth_file", "{users}"], {}, "{users}, line 2: expected user:password"),
    ([], {"FINETUNE_STUDIO_AUTH": "carol:c,dan"}, "FINETUNE_STUDIO_AUTH\\) entry 2: expected user:password"),
    (["--auth", "carol"], {"FINETUNE_STUDIO_AUTH": "erin:e"}, "entry 1: expected"),  # the flag wins over the env
    ([], {"FINETUNE_STUDIO_DEMO": "{users}.yaml"}, "demo limits {users}.yaml: cannot read it"),
    (["--demo", "{users}.yaml"], {"FINETUNE_STUDIO_DEMO": "0"}, "demo limits {users}.yaml: cannot read it"),
])  # fmt: skip
def test_app_py_takes_hosting_settings_from_flags_and_environment(tmp_path, monkeypatch, capsys, argv, env, message):
    import app

    users = tmp_path / "users.txt"
    users.write_text("alice:a\nbob\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(users=users))
    monkeypatch.setattr(sys, "argv", ["app.py", *(a.format(users=users) for a in argv)])
    with pytest.raises(SystemExit) as exited:  # refused before anything starts
        app.main()
    assert exited.value.code == 2
    assert re.search(message.format(users=users), capsys.readouterr().err)


# ---------------------------------------------------------------- demo limits


def test_the_demo_setting_and_the_shipped_limits():
    assert [demo_limits_file(v) for v in (None, "", "0", "false")] == [None] * 4
    assert demo_limits_file("1") == demo_limits_file("true") == DEMO_LIMITS
    assert demo_limits_file("mine.yaml") == Path("mine.yaml")
    limits = load_demo_limits()
    assert TINY_MODEL in limits.models and "cpu-tiny" in limits.presets and limits.active_runs_per_user == 1


@pytest.mark.parametrize("change,message", [
    ({"colour": "red"}, "colour: unknown key"),
    ({"max_steps": None}, "max_steps: missing"),
    ({"max_steps": "many"}, "max_steps: expected int"),
    ({"max_epochs": "three"}, "max_epochs: expected float"),
    ({"models": []}, "models: expected a list of names"),
    ({"presets": ["cpu-tiny", "h100-x64"]}, "presets: no preset 'h100-x64'"),
])  # fmt: skip
def test_bad_demo_limits_name_their_file_and_key(tmp_path, change, message):
    import yaml

    data = {**yaml.safe_load(DEMO_LIMITS.read_text()), **change}
    data = {k: v for k, v in data.items() if v is not None}
    (tmp_path / "limits.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=f"{tmp_path / 'limits.yaml'}: {message}"):
        load_demo_limits(tmp_path / "limits.yaml")


@pytest.mark.parametrize("values,message", [
    (dict(preset="ddp"), "this demo offers only the cpu-tiny preset"),
    (dict(train_data=str(CHAT)), "capitals-chat.jsonl is 0.0105 MB; this demo takes files up to 0.008 MB"),
    (dict(), "capitals-completion.jsonl has 48 examples; this demo trains on at most 20. .*Max num samples to 20"),
    (dict(max_num_samples=20, max_length=2048), "Max length is 2048 tokens; this demo allows at most 512"),
    (dict(max_num_samples=20, num_train_epochs=3), "Num train epochs is 3; this demo allows at most 2. Lower it"),
    (dict(max_num_samples=20, max_steps=11), "Max steps is 11; this demo allows at most 10"),
])  # fmt: skip
def test_each_demo_limit_refuses_a_run_with_its_sentence(tmp_path, values, message):
    ctx = ctx_for(tmp_path, TINY_DEMO)
    preset = load_preset(values.pop("preset", "cpu-tiny"))
    config = make_config(preset, **{"model_id": "m", "train_data": str(COMPLETION), "max_length": 512,
                                    "num_train_epochs": 1, **values})
    with pytest.raises(ValueError, match=message):
        check_start(ctx, "alice", preset, config)
    with pytest.raises(ValueError, match="this demo trains only these base models: tiny"):
        ctx.model_path("/etc")  # model paths too: the tokenizer, the estimate and the run all ask here


def test_one_active_run_per_person_in_demo_mode(tmp_path, sleeper):
    ctx = ctx_for(tmp_path, TINY_DEMO)
    preset = load_preset("cpu-tiny")
    config = make_config(preset, model_id="m", train_data=str(COMPLETION), max_num_samples=20, max_length=512,
                         num_train_epochs=1)
    check_start(ctx, "alice", preset, config)  # within every limit
    live = fake_run(ctx.runs_dir, "alice", "running", leader=sleeper)
    with pytest.raises(ValueError, match=f"you already have 1 run\\(s\\) in progress \\({live.run_id}\\)"):
        check_start(ctx, "alice", preset, config)
    check_start(ctx, "bob", preset, config)  # another person's run is not yours


@pytest.mark.parametrize("values,message", [
    (dict(eval_data="/etc/passwd"), "/etc/passwd: use a bundled example or the path validate_data returned"),
    (dict(chat_template="/etc/hostname"), "Chat template: paste the Jinja template itself"),
    (dict(deepspeed="/tmp/other.json"), "Deepspeed: this app uses the preset's DeepSpeed file"),
    (dict(resume_from_checkpoint="/tmp/runs/x/output/checkpoint-4"), "Resume from checkpoint: resume a stopped"),
])  # fmt: skip
def test_a_hosted_run_names_no_file_of_the_server(tmp_path, values, message):
    preset = load_preset("cpu-tiny")
    config = make_config(preset, model_id="m", train_data=str(COMPLETION), **values)
    with pytest.raises(ValueError, match=message):
        check_start(ctx_for(tmp_path), "alice", preset, config)
    check_start(ctx_for(tmp_path, hosted=False), None, preset, config)  # one's own machine: any path


# ---------------------------------------------------------------- isolation and paths


def test_run_ids_that_try_to_escape_are_not_found(tmp_path):
    runs = tmp_path / "runs"
    mine = fake_run(runs, "alice")
    outside = fake_run(tmp_path / "elsewhere", "alice")
    (runs / "link").symlink_to(outside.run_dir)
    for run_id in [*NASTY_IDS, "link", str(outside.run_dir), f"../elsewhere/{outside.run_id}"]:
        with pytest.raises(KeyError):
            launch.run_status(run_id, runs)
        with pytest.raises(KeyError):
            launch.stop_run(run_id, runs)
    assert launch.run_status(mine.run_id, runs).owner == "alice"


def test_another_persons_run_is_not_found_in_every_handler(tmp_path):
    ctx = ctx_for(tmp_path)
    alices = fake_run(ctx.runs_dir, "alice", "stopped")
    fn = handlers(ctx)
    bob, alice = as_user("bob"), as_user("alice")
    missing = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(6)
    for run_id in (alices.run_id, missing, *(i for i in NASTY_IDS if i)):  # "" is no run: nothing to check
        calls = {
            "show": lambda r=run_id: fn["show"](r, bob),
            "prepare_merged": lambda r=run_id: fn["prepare_merged"](r, bob),
            "watch": lambda r=run_id: fn["watch"](Session(), r, bob),
            "resume": lambda r=run_id: fn["resume"](Session(), r, bob),
            "pick_to_try": lambda r=run_id: fn["pick_to_try"](r, bob),
            "ask": lambda r=run_id: fn["ask"](r, "hi", 8, [], [], bob),
            "stop": lambda r=run_id: fn["stop"](Session(run_id=r), bob),
            "run_status": lambda r=run_id: fn["run_status"](r, 0, bob),
            "stop_run": lambda r=run_id: fn["stop_run"](r, bob),
        }
        for name, call in calls.items():
            with pytest.raises(gr.Error) as error:
                call()
            assert error.value.message.startswith(not_found(run_id)), name  # the words of a missing run
    assert fn["list_runs"](bob) == [] and fn["refresh"](None, bob)[1]["choices"] == []
    assert fn["runs_to_try"](None, bob)["choices"] == []
    assert launch.run_status(alices.run_id, ctx.runs_dir).status == "stopped"  # untouched
    # Alice sees her own, and her adapter is prepared outside every folder Gradio serves.
    assert [r["run_id"] for r in fn["list_runs"](alice)] == [alices.run_id]
    shown = fn["show"](alices.run_id, alice)
    adapter = Path(shown[1]["value"])
    assert adapter.is_file() and adapter.parent.parent == ctx.downloads_dir
    assert not adapter.is_relative_to(ctx.cache_dir) and not adapter.is_relative_to(ctx.runs_dir)
    assert owned_run(ctx, alices.run_id, alice).run_id == alices.run_id


def test_the_queue_is_fair_and_each_waiting_run_knows_its_place(tmp_path, sleeper):
    runs = tmp_path / "runs"
    fake_run(runs, "carol", "running", gpus=(0, 1), leader=sleeper)  # holds both GPUs
    a1, a2, a3 = (fake_run(runs, "alice", "queued", gpus=(0,), created_at=t) for t in (1, 2, 3))
    b1 = fake_run(runs, "bob", "queued", gpus=(0,), created_at=4)
    other_gpu = fake_run(runs, "bob", "queued", gpus=(1,), created_at=5)
    done = fake_run(runs, "alice", "succeeded", created_at=6)
    launch.list_runs(runs)  # a schedule: the GPU is busy, nothing starts
    # Round-robin over owners: bob's first run goes before alice's second, though queued later.
    assert [launch.queue_position(r.run_id, runs) for r in (a1, b1, a2, a3)] == [1, 2, 3, 4]
    assert launch.queue_position(other_gpu.run_id, runs) == 1  # nothing waits for GPU 1 before it
    assert launch.queue_position(done.run_id, runs) is None
    with pytest.raises(KeyError):
        launch.queue_position("../x", runs)
    session = Session(run_id=b1.run_id)
    info, _ = train_step.follow(Context(runs_dir=runs, cache_dir=tmp_path, hardware=Hardware()), session)
    assert session.queue_position == 2
    assert "number 2 in the queue" in train_step.view(session, info)[2]


# ---------------------------------------------------------------- the app, over HTTP


def call_event(web: httpx.Client, api_name: str, data: list, session_hash: str) -> dict:
    """Runs one of the page's events as a browser tab does (through the queue): {"data": outputs}
    or {"error": message}."""
    fn_index = next(d["id"] for d in web.get("config").json()["dependencies"] if d["api_name"] == api_name)
    web.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session_hash})
    with web.stream("GET", "gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
        for line in stream.iter_lines():
            message = json.loads(line[5:]) if line.startswith("data:") else {}
            if message.get("msg") == "process_completed":
                return message["output"]
    raise AssertionError(f"{api_name} never completed")


def wait_until_over(client: Client, run_id: str, timeout_s: float = 240) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.predict(run_id, 0, api_name="/run_status")
        if status["status"] not in launch.ACTIVE:
            return status
        time.sleep(1)
    raise AssertionError(f"run {run_id} still {status['status']} after {timeout_s} s")


@pytest.mark.slow
def test_two_people_secrets_and_shell_words(tmp_path, monkeypatch):
    """Alice trains with secrets in the server's environment; Bob cannot reach her run; a model id
    with shell words stays one argv item; no secret lands in any file of the run."""
    secret = f"sekrit-{uuid.uuid4().hex}"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TFY_API_KEY", "WANDB_API_KEY", "MY_SERVICE_TOKEN"):
        monkeypatch.setenv(name, secret)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pwned = tmp_path / "pwned"
    with running_app(tmp_path / "runs", tmp_path / "cache", auth=USERS) as url:
        with pytest.raises(Exception, match="Could not login"):
            Client(url, auth=("alice", "wrong"), verbose=False)
        assert httpx.get(f"{url}gradio_api/info").status_code == 401  # nothing without a login
        alice = Client(url, auth=USERS[0], verbose=False)
        bob = Client(url, auth=USERS[1], verbose=False)
        checked = alice.predict(handle_file(str(COMPLETION)), api_name="/validate_data")
        run = alice.predict(checked["train_data"], "cpu-tiny", TINY_MODEL,
                            {"max_steps": 2, "eval_strategy": "no", "save_steps": 1}, api_name="/start_run")
        evil = alice.predict(checked["train_data"], "cpu-tiny", f"x; touch {pwned}", api_name="/start_run")

        assert bob.predict(api_name="/list_runs") == []
        for endpoint, args in (("/run_status", (run["run_id"], 0)), ("/stop_run", (run["run_id"],))):
            with pytest.raises(Exception, match="No run .*: pick one of yours"):
                bob.predict(*args, api_name=endpoint)
        assert wait_until_over(alice, run["run_id"])["status"] == "succeeded"
        assert wait_until_over(alice, evil["run_id"])["status"] == "failed"

        # Alice downloads her adapter as her browser would: the URL is Gradio's copy, in a folder
        # named by a secret hash, never the file the app prepared.
        web = {name: httpx.Client(base_url=url, timeout=60) for name in ("alice", "bob")}
        for name, password in USERS:
            assert web[name].post("login", data={"username": name, "password": password}).status_code == 200
        call_event(web["alice"], "refresh", [None], "tab-a")
        adapter = call_event(web["alice"], "show", [run["run_id"]], "tab-a")["data"][1]["value"]
        assert re.fullmatch(rf"[0-9a-f]{{64}}/{run['run_id']}-adapter.zip", "/".join(adapter["path"].split("/")[-2:]))
        assert web["alice"].get(adapter["url"]).content[:2] == b"PK"
        # Files: a login alone opens no run file, no prepared zip, nothing outside Gradio's own cache.
        run_dir = Path(run["run_dir"])
        prepared = list(Path(tempfile.gettempdir()).glob(f"finetune-studio-downloads-*/{run['run_id']}/*.zip"))
        for path in (run_dir / "stdout.log", run_dir / "output" / "adapter_config.json", *prepared, "/etc/passwd",
                     f"{tmp_path}/../../etc/passwd", Path(checked["train_data"]).parent.parent / "x"):
            for name in ("alice", "bob"):
                assert web[name].get(f"gradio_api/file={path}").status_code == 403, path
        assert prepared
        # A file the app did not receive cannot be passed as if uploaded.
        forged = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}
        refused = call_event(web["bob"], "validate_data", [forged, TINY_MODEL, 2048], "tab-b")
        assert "data" not in refused and "error" in refused  # Gradio keeps the reason to its own log
        # An upload's name cannot put it outside the upload folder.
        sent = web["bob"].post("gradio_api/upload", files={"files": ("../../../escaped.jsonl", b'{"a": 1}\n')})
        assert sent.status_code == 200
        landed = Path(sent.json()[0])
        assert landed.name == "escaped.jsonl" and landed.parent.parent == Path(checked["train_data"]).parent.parent

    # The shell never saw the model id: one argv item, quoted in command.txt, nothing touched.
    command = (Path(evil["run_dir"]) / "command.txt").read_text()
    assert shlex.quote(f"x; touch {pwned}") in command and f"x; touch {pwned}" in shlex.split(command)
    assert not pwned.exists()
    # No secret in any file of either run.
    files = [p for r in (run, evil) for p in Path(r["run_dir"]).rglob("*") if p.is_file()]
    assert {"command.txt", "config.json", "events.jsonl", "stdout.log", "adapter_model.safetensors"} <= {
        p.name for p in files}
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert leaks == []


def test_demo_limits_over_the_api(tmp_path, sleeper):
    with running_app(tmp_path / "runs", tmp_path / "cache", auth=[*USERS, ("carol", "c")], demo=TINY_DEMO) as url:
        alice = Client(url, auth=USERS[0], verbose=False)
        checked = alice.predict(handle_file(str(COMPLETION)), api_name="/validate_data")
        path = checked["train_data"]
        for args, message in [
            ((path, "cpu-tiny", "/etc"), "this demo trains only these base models: tiny"),
            ((path, "cpu-tiny", f"{TINY_MODEL}/../../etc"), "this demo trains only these base models"),
            ((path, "ddp", TINY_MODEL), "this demo offers only the cpu-tiny preset"),
            ((path, "../../etc/passwd", TINY_MODEL), "No preset '../../etc/passwd'"),
            ((str(CHAT), "cpu-tiny", TINY_MODEL, {"max_length": 512}), "takes files up to 0.008 MB"),
            ((path, "cpu-tiny", TINY_MODEL, {"max_length": 512}), "has 48 examples; this demo trains on at most 20"),
            ((path, "cpu-tiny", TINY_MODEL, {"max_length": 512, "max_num_samples": 10, "num_train_epochs": 5}),
             "Num train epochs is 5; this demo allows at most 2"),
            ((path, "cpu-tiny", TINY_MODEL, {"max_length": 512, "max_num_samples": 10, "num_train_epochs": 1,
                                             "eval_data": "/etc/passwd"}), "use a bundled example"),
        ]:  # fmt: skip
            with pytest.raises(Exception, match=message):
                alice.predict(*args, api_name="/start_run")
        carol = Client(url, auth=("carol", "c"), verbose=False)
        fake_run(tmp_path / "runs", "carol", "running", leader=sleeper)
        with pytest.raises(Exception, match="you already have 1 run"):
            carol.predict(path, "cpu-tiny", TINY_MODEL, {"max_length": 512, "max_num_samples": 10,
                                                         "num_train_epochs": 1}, api_name="/start_run")
        # An upload over the cap is refused at the door.
        web = httpx.Client(base_url=url, timeout=30)
        web.post("login", data={"username": "bob", "password": "bob-pw"})
        assert web.post("gradio_api/upload", files={"files": ("big.jsonl", CHAT.read_bytes())}).status_code == 413
        assert alice.predict(api_name="/list_runs") == []  # nothing was started
