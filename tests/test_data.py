import copy
import json
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from conftest import write_jsonl

from engine import data
from engine.data import (
    DEFAULT_CHAT_TEMPLATE,
    DataError,
    Problem,
    build_datasets,
    check_jsonl,
    data_report,
    setup_chat_template,
    tokenize_example,
)

PC = {"prompt": "What is 2+2?", "completion": " Four."}
CHAT = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}


@pytest.fixture
def tok(tokenizer):
    """A copy of the session's tokenizer, free to get a chat template."""
    return copy.deepcopy(tokenizer)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))


def check(tmp_path, rows, **kwargs):
    return check_jsonl(write_jsonl(tmp_path / "data.jsonl", rows), **kwargs)


# ---- check_jsonl ----


def test_prompt_completion_file(tmp_path):
    result = check(tmp_path, [PC, "", "   ", {**PC, "id": 7, "source": "web"}])
    assert (result.format, result.num_examples, result.problems, result.ok) == (
        "prompt_completion", 2, [], True,
    )  # fmt: skip


def test_chat_file(tmp_path):
    result = check(tmp_path, [CHAT, {"messages": CHAT["messages"][1:3], "meta": {"x": 1}}])
    assert (result.format, result.num_examples, result.ok) == ("chat", 2, True)


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(PC).encode() + b"\n")
    assert check_jsonl(path).ok


def _msgs(*messages):
    return {"messages": [{"role": "user", "content": "Hi"}, *messages]}


REPLY = {"role": "assistant", "content": "Hello"}


@pytest.mark.parametrize(
    "first, bad, field, words",
    [
        (PC, '{"prompt": "a", "completion": }', None, ["not valid JSON", "column 31"]),
        (PC, '["a", "b"]', None, ["is a list, not a JSON object", '{"prompt"']),
        (PC, '"just text"', None, ["is a string, not a JSON object"]),
        (PC, {"text": "hi", "label": 1}, None, ["neither", '"text", "label"', '"messages"']),
        (PC, {"prompt": "a", "messages": []}, None, ["both", "one format"]),
        (PC, {"prompt": "a"}, "completion", ["missing", '"completion": "..."']),
        (PC, {"completion": "a"}, "prompt", ["missing", '"prompt": "..."']),
        (PC, {"prompt": "a", "completion": 42}, "completion", ["string", "number 42"]),
        (PC, {"prompt": None, "completion": "b"}, "prompt", ["string", "null"]),
        (PC, {"prompt": "a", "completion": " \n "}, "completion", ["empty", "remove the line"]),
        (CHAT, {"messages": "hi"}, "messages", ["list of messages", "a string"]),
        (CHAT, {"messages": []}, "messages", ["an empty list"]),
        (CHAT, _msgs("hello", REPLY), "messages[1]", ["object like", "a string"]),
        (CHAT, _msgs({"role": "bot", "content": "x"}, REPLY), "messages[1].role",
         ['"bot"', "system, user, assistant"]),
        (CHAT, _msgs({"content": "x"}, REPLY), "messages[1].role",
         ["missing", "system, user, assistant"]),
        (CHAT, _msgs({"role": "assistant", "content": ["x"]}), "messages[1].content",
         ["string", "a list"]),
        (CHAT, _msgs({"role": "assistant"}), "messages[1].content", ["missing"]),
        (CHAT, _msgs(REPLY, {"role": "assistant", "content": "  "}), "messages[2].content",
         ["empty reply"]),
        (CHAT, _msgs({"role": "user", "content": "More"}), "messages", ["no assistant reply"]),
        (CHAT, {"messages": [REPLY, {"role": "user", "content": "x"}, REPLY]},
         "messages[0].role", ["start with the message it answers"]),
    ],
)  # fmt: skip
def test_bad_line(tmp_path, first, bad, field, words):
    result = check(tmp_path, [first, bad, first])
    assert not result.ok and result.num_examples == 2
    [problem] = result.problems
    assert (problem.line, problem.field) == (2, field)
    for word in words:
        assert word in problem.message


def test_non_utf8_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(PC).encode() + b'\n{"prompt": "caf\xe9", "completion": "x"}\n')
    [problem] = check_jsonl(path).problems
    assert (problem.line, problem.field) == (2, None)
    assert "0xe9 at byte 16" in problem.message and "UTF-8" in problem.message


def test_line_too_long_is_skipped_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 100)
    long = {"prompt": "x" * 300, "completion": "y"}
    result = check(tmp_path, [PC, long, PC, {"prompt": "a"}])
    assert result.num_examples == 2
    assert [(p.line, p.field) for p in result.problems] == [(2, None), (4, "completion")]
    assert "longer than" in result.problems[0].message


def test_mixed_formats_name_the_line_that_set_the_format(tmp_path):
    result = check(tmp_path, ["", PC, PC, CHAT, PC, CHAT])
    assert result.format == "prompt_completion" and result.num_examples == 3
    assert [p.line for p in result.problems] == [4, 6]
    assert "chat" in result.problems[0].message
    assert "line 2 made this a prompt/completion file" in result.problems[0].message


def test_every_bad_line_is_reported(tmp_path):
    rows = [PC, "nope", {"prompt": "a"}, PC, ["x"], {"prompt": "a", "completion": ""}]
    result = check(tmp_path, rows)
    lines = [(p.line, p.field) for p in result.problems]
    assert lines == [(2, None), (3, "completion"), (5, None), (6, "completion")]
    assert result.num_examples == 2 and result.more_problems == 0


def test_problems_are_capped_and_the_rest_counted(tmp_path):
    result = check(tmp_path, [PC] + ["nope"] * 10, max_problems=3)
    assert [p.line for p in result.problems] == [2, 3, 4]
    assert result.more_problems == 7 and not result.ok


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: d / "missing.jsonl", ["not found"]),
        (lambda d: d, ["folder"]),
        (lambda d: write_jsonl(d / "empty.jsonl", []), ["no examples"]),
        (lambda d: write_jsonl(d / "blank.jsonl", ["", "  "]), ["no examples"]),
    ],
)
def test_file_problems(tmp_path, make, words):
    path = make(tmp_path)
    result = check_jsonl(path)
    [problem] = result.problems
    assert (problem.path, problem.line, problem.field, result.ok) == (str(path), None, None, False)
    assert all(word in problem.message for word in words)


def test_problem_text_says_where():
    assert str(Problem("data.jsonl", 7, "completion", "is empty")) == (
        "data.jsonl, line 7, field 'completion': is empty"
    )
    assert str(Problem("data.jsonl", 3, None, "bad")) == "data.jsonl, line 3: bad"
    assert str(Problem("data.jsonl", None, None, "missing")) == "data.jsonl: missing"


# ---- chat templates ----


def test_default_template_renders_mistral_style(tok):
    assert setup_chat_template(tok, None) == "default"
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    messages = CHAT["messages"]
    assert tok.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True) == (
        "<s>[INST] Answer briefly.\n\nHi there [/INST] Hello! How can I help?</s>"
        "[INST] What is the capital of France? [/INST]"
    )
    lone_system = [messages[0], {"role": "assistant", "content": "Hi"}]
    assert tok.apply_chat_template(lone_system, tokenize=False) == (
        "<s>[INST] Answer briefly. [/INST] Hi</s>"
    )
    assert setup_chat_template(tok, None) == "default"  # set again, not taken for the tokenizer's


def test_default_template_without_bos(tok):
    tok.bos_token = None
    setup_chat_template(tok, None)
    text = tok.apply_chat_template(CHAT["messages"][1:3], tokenize=False)
    assert text == "[INST] Hi there [/INST] Hello! How can I help?</s>"


def test_tokenizer_template_is_kept(tok):
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert setup_chat_template(tok, None) == "tokenizer"
    assert tok.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_template_from_flag_text_or_file(tok, tmp_path):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok.chat_template = "{{ 'own' }}"
    assert setup_chat_template(tok, template) == "flag"
    assert tok.chat_template == template
    path = tmp_path / "template.jinja"
    path.write_text(template + "!")
    assert setup_chat_template(tok, str(path)) == "flag"
    assert tok.chat_template == template + "!"
    with pytest.raises(ValueError, match="neither a Jinja template .* nor a file"):
        setup_chat_template(tok, str(tmp_path / "nope.jinja"))


# ---- tokenize_example ----


def _labelled_runs(result):
    """Runs of consecutive learned tokens, as lists of ids; checks labels copy input_ids."""
    runs, previous = [], False
    for token, label in zip(result["input_ids"], result["labels"], strict=True):
        assert label in (token, -100)
        if label != -100 and previous:
            runs[-1].append(token)
        elif label != -100:
            runs.append([token])
        previous = label != -100
    return runs


def _masked(result):
    return [
        t for t, label in zip(result["input_ids"], result["labels"], strict=True) if label == -100
    ]


def test_prompt_completion_masks_the_prompt(tok):
    result = tokenize_example(PC, tok, train_on_prompt=False, max_length=512)
    expected = tok("<s>What is 2+2? Four.</s>", add_special_tokens=False)["input_ids"]
    assert result["input_ids"] == expected and not result["truncated"]
    [run] = _labelled_runs(result)
    assert tok.decode(run) == "Four.</s>"
    assert tok.decode(_masked(result)) == "<s>What is 2+2?"
    assert result["input_ids"][0] == tok.bos_token_id and result["labels"][0] == -100


def test_token_straddling_prompt_and_completion_is_learned(tok):
    # "A: " + "Paris" tokenizes to "▁Paris": its space is the prompt's, its word the completion's.
    result = tokenize_example({"prompt": "Q: capital? A: ", "completion": "Paris"}, tok, False, 512)
    [run] = _labelled_runs(result)
    assert tok.decode(run) == "Paris</s>"
    assert tok.decode(_masked(result)) == "<s>Q: capital? A:"


def test_chat_learns_only_assistant_replies(tok):
    setup_chat_template(tok, None)
    result = tokenize_example(CHAT, tok, train_on_prompt=False, max_length=512)
    text = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert result["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    runs = _labelled_runs(result)
    assert [tok.decode(run) for run in runs] == ["Hello! How can I help?</s>", "Paris.</s>"]
    masked = tok.decode(_masked(result))
    assert masked == (
        "<s>[INST] Answer briefly.\n\nHi there [/INST][INST] What is the capital of France? [/INST]"
    )


def test_chat_with_the_tokenizers_own_template(tok):
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    result = tokenize_example(CHAT, tok, False, 512)
    runs = [tok.decode(run) for run in _labelled_runs(result)]
    assert runs == ["Hello! How can I help?</s>\n", "Paris.</s>\n"]


def test_train_on_prompt_learns_every_token(tok):
    setup_chat_template(tok, None)
    for example in (PC, CHAT):
        result = tokenize_example(example, tok, train_on_prompt=True, max_length=512)
        assert result["labels"] == result["input_ids"]


def test_truncation(tok):
    full = tokenize_example(PC, tok, False, 512)
    short = tokenize_example(PC, tok, False, 5)
    assert short == {
        "input_ids": full["input_ids"][:5], "labels": full["labels"][:5], "truncated": True,
    }  # fmt: skip
    exact = tokenize_example(PC, tok, False, len(full["input_ids"]))
    assert not exact["truncated"] and exact["input_ids"] == full["input_ids"]


def test_template_that_is_not_prefix_consistent(tok):
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<end>{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="not prefix-consistent.*--chat_template"):
        tokenize_example(CHAT, tok, False, 512)
    everything = tokenize_example(CHAT, tok, train_on_prompt=True, max_length=512)
    assert everything["labels"] == everything["input_ids"]  # masking nothing needs no spans


# ---- data_report ----


def test_data_report_numbers(tok, tmp_path):
    rows = [{"prompt": "Say " + "very " * i, "completion": " ok"} for i in range(1, 21)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    lengths = [len(tokenize_example(r, tok, False, 10**6)["input_ids"]) for r in rows]
    report = data_report(path, tok, max_length=lengths[9])
    assert (report.format, report.num_examples, report.problems) == ("prompt_completion", 20, [])
    assert report.token_length_mean == pytest.approx(np.mean(lengths))
    ordered = sorted(lengths)
    assert (report.token_length_p50, report.token_length_p95) == (ordered[9], ordered[18])
    assert report.token_length_max == max(lengths)
    assert report.num_truncated == 10 and report.max_length == lengths[9]
    first = data_report(path, tok, max_length=lengths[9], limit=4)
    assert first.num_examples == 20 and first.token_length_max == lengths[3]
    assert first.num_truncated == 0


def test_data_report_of_a_bad_file(tok, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [PC, {"prompt": "x"}])
    report = data_report(path, tok, max_length=512)
    assert [(p.line, p.field) for p in report.problems] == [(2, "completion")]
    assert (report.num_examples, report.token_length_max, report.token_length_mean) == (1, 0, 0.0)


def test_data_report_names_the_line_a_chat_template_fails_on(tok, tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('system messages are not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    path = write_jsonl(tmp_path / "data.jsonl", [_msgs(REPLY), CHAT])
    [problem] = data_report(path, tok, max_length=512, chat_template=template).problems
    assert (problem.line, problem.field) == (2, "messages")
    assert "system messages are not supported" in problem.message
    assert "--chat_template" in problem.message


# ---- build_datasets ----


def _config(train, **overrides):
    defaults = dict(
        train_data=str(train), eval_data=None, eval_size=0.0, max_num_samples=0, max_length=512,
        train_on_prompt=False, seed=0, streaming=False, chat_template=None, packing=False,
    )  # fmt: skip
    return SimpleNamespace(**(defaults | overrides))


def _numbered(path, n, start=0):
    return write_jsonl(
        path, [{"prompt": f"Count {i}:", "completion": f" {i}"} for i in range(start, start + n)]
    )


def _ids(dataset):
    return [tuple(row["input_ids"]) for row in dataset]


def _expected_ids(tok, path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [tuple(tokenize_example(r, tok, False, 512)["input_ids"]) for r in rows]


@pytest.mark.parametrize("eval_size, num_eval", [(0.25, 5), (0.33, 7), (3, 3), (3.0, 3)])
def test_eval_split_from_train(tok, tmp_path, eval_size, num_eval):
    path = _numbered(tmp_path / "train.jsonl", 20)
    result = build_datasets(_config(path, eval_size=eval_size), tok)
    assert (result.num_train_examples, result.num_eval_examples) == (20 - num_eval, num_eval)
    assert (len(result.train), len(result.eval)) == (20 - num_eval, num_eval)
    train, evaluation = _ids(result.train), _ids(result.eval)
    assert set(train).isdisjoint(evaluation)
    assert sorted(train + evaluation) == sorted(_expected_ids(tok, path))
    assert result.train.column_names == ["input_ids", "labels"] == result.eval.column_names
    assert result.train_tokens == sum(map(len, train))


def test_eval_split_depends_on_the_seed_only(tok, tmp_path):
    path = _numbered(tmp_path / "train.jsonl", 30)
    eval_ids = {
        seed: set(_ids(build_datasets(_config(path, eval_size=0.2, seed=seed), tok).eval))
        for seed in (0, 1)
    }
    again = set(_ids(build_datasets(_config(path, eval_size=0.2, seed=0), tok).eval))
    assert again == eval_ids[0] != eval_ids[1]


def test_no_eval(tok, tmp_path):
    path = _numbered(tmp_path / "train.jsonl", 10)
    result = build_datasets(_config(path, eval_size=0), tok)
    assert result.eval is None and result.num_eval_examples == 0
    assert _ids(result.train) == _expected_ids(tok, path)


@pytest.mark.parametrize(
    "eval_size, words", [(0.01, "is 0 examples"), (10, "leaving none"), (-1, "fraction")]
)
def test_eval_size_that_cannot_work(tok, tmp_path, eval_size, words):
    path = _numbered(tmp_path / "train.jsonl", 10)
    with pytest.raises(ValueError, match=words):
        build_datasets(_config(path, eval_size=eval_size), tok)


def test_eval_file(tok, tmp_path):
    train = _numbered(tmp_path / "train.jsonl", 10)
    evaluation = _numbered(tmp_path / "eval.jsonl", 4, start=100)
    result = build_datasets(_config(train, eval_data=str(evaluation), eval_size=0.5), tok)
    assert _ids(result.train) == _expected_ids(tok, train)
    assert _ids(result.eval) == _expected_ids(tok, evaluation)
    assert (result.num_train_examples, result.num_eval_examples) == (10, 4)


def test_max_num_samples_takes_the_first(tok, tmp_path):
    path = _numbered(tmp_path / "train.jsonl", 20)
    result = build_datasets(_config(path, max_num_samples=8, eval_size=2), tok)
    assert sorted(_ids(result.train) + _ids(result.eval)) == sorted(_expected_ids(tok, path)[:8])
    assert result.num_train_examples == 6


def test_truncation_is_counted(tok, tmp_path):
    path = _numbered(tmp_path / "train.jsonl", 10)
    lengths = [len(ids) for ids in _expected_ids(tok, path)]
    max_length = sorted(lengths)[5]
    result = build_datasets(_config(path, max_length=max_length, eval_size=3), tok)
    assert result.num_truncated == sum(n > max_length for n in lengths)
    assert result.train_tokens == sum(map(len, _ids(result.train)))
    assert max(map(len, _ids(result.train) + _ids(result.eval))) == max_length


def _say(i):
    return {
        "messages": [
            {"role": "user", "content": f"Say {i}"},
            {"role": "assistant", "content": f"{i}"},
        ]
    }


@pytest.mark.parametrize("case", ["split", "chat", "eval file"])
def test_streaming_gives_the_same_examples(tok, tmp_path, case):
    path = _numbered(tmp_path / "train.jsonl", 25)
    settings = dict(eval_size=0.3, max_length=12, max_num_samples=20)
    if case == "chat":
        write_jsonl(path, [_say(i) for i in range(12)] + [CHAT])
    elif case == "eval file":
        settings["eval_data"] = str(_numbered(tmp_path / "eval.jsonl", 4, start=100))
    stored = build_datasets(_config(path, **settings), tok)
    streamed = build_datasets(_config(path, streaming=True, **settings), tok)
    assert isinstance(streamed.train, datasets.IterableDataset)

    def rows_of(dataset):
        return sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in dataset)

    assert rows_of(streamed.train) == rows_of(stored.train)
    assert rows_of(streamed.eval) == rows_of(stored.eval)
    for name in ("num_train_examples", "num_eval_examples", "train_tokens", "num_truncated"):
        assert getattr(streamed, name) == getattr(stored, name), name
    assert list(next(iter(streamed.train))) == ["input_ids", "labels"]


def test_streaming_shuffles_by_seed(tok, tmp_path):
    path = _numbered(tmp_path / "train.jsonl", 50)
    orders = [
        _ids(build_datasets(_config(path, streaming=True, seed=s), tok).train) for s in (0, 0, 1)
    ]
    assert orders[0] == orders[1] != orders[2]


def test_a_changed_file_or_setting_is_not_served_from_cache(tok, tmp_path):
    path = _numbered(tmp_path / "train.jsonl", 10)
    first = build_datasets(_config(path), tok).train
    assert build_datasets(_config(path), tok).train.cache_files == first.cache_files  # reused
    _numbered(path, 10, start=1000)
    assert _ids(build_datasets(_config(path), tok).train) == _expected_ids(tok, path)
    shorter = build_datasets(_config(path, max_length=3), tok).train
    assert {len(ids) for ids in _ids(shorter)} == {3}


def test_bad_data_raises_naming_the_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [PC, PC, {"prompt": "x", "completion": ""}])
    for streaming in (False, True):
        with pytest.raises(DataError, match="line 3, field 'completion': is empty") as error:
            build_datasets(_config(path, streaming=streaming), tok)
        assert error.value.problem.line == 3


def test_chat_data_gets_a_template(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT])
    result = build_datasets(_config(path), tok)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert _ids(result.train) == [tuple(tokenize_example(CHAT, tok, False, 512)["input_ids"])]
