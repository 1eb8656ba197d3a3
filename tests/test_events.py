import json

from engine.events import EventWriter, read_events


def test_reader_gets_only_appended_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    writer.write("log", step=1, loss=float("nan"))
    events, offset = read_events(path)
    assert [e["event"] for e in events] == ["log"] and events[0]["loss"] is None
    with open(path, "ab") as f:  # a writer killed mid-line
        f.write(b'{"time": 1, "event": "lo')
    assert read_events(path, offset) == ([], offset)
    with open(path, "ab") as f:
        f.write(b'g", "step": 2}\nnot json\n')
    events, offset2 = read_events(path, offset)
    assert [e["step"] for e in events] == [2] and offset2 == path.stat().st_size


def test_disabled_writer_writes_nothing(tmp_path):
    EventWriter(tmp_path / "e.jsonl", enabled=False).write("started", world_size=2)
    assert not (tmp_path / "e.jsonl").exists()
    assert read_events(tmp_path / "e.jsonl") == ([], 0)


def test_values_are_plain_json(tmp_path):
    import torch

    path = tmp_path / "e.jsonl"
    EventWriter(path).write("eval", step=3, eval_loss=torch.tensor(1.5))
    assert json.loads(path.read_text())["eval_loss"] == 1.5
