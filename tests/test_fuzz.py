"""Bad input, fuzzed: check_jsonl and the pre-flight never crash, and every problem says where.

Property-based tests (hypothesis) feed them arbitrary bytes, arbitrary JSON lines, mutated valid
files and arbitrary configs; then each hostile file the hosting issue names is a plain test.
"""

import codecs
import copy
import json
import random

import pytest
from conftest import PEAK_MB, run_python
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import FIELDS, from_dict
from engine.data import MAX_LINE_BYTES, ROLES, DataCheck, check_jsonl, data_report
from engine.preflight import preflight

# Function-scoped tmp_path is fine here: every example writes the same file afresh.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

PC = {"prompt": "What is 2+2?", "completion": " Four."}
BOM = codecs.BOM_UTF8


def check_bytes(tmp_path, content: bytes) -> DataCheck:
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    return check_jsonl(path, max_problems=10**6)


def assert_answers(check: DataCheck, content: bytes) -> dict[int, list]:
    """Asserts the check answers: ok, or problems each naming a line that has text (or the whole
    file, when it has no examples), in one short line of words. Returns problems by line."""
    lines = content.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the last line's newline ends it; it starts no line
    used = {n for n, line in enumerate(lines, 1) if line.removeprefix(BOM).strip()}
    by_line = {}
    for problem in check.problems:
        assert problem.path == check.path
        assert problem.message.strip() and "\n" not in problem.message and len(problem.message) < 500
        assert problem.field is None or (isinstance(problem.field, str) and problem.field)
        by_line.setdefault(problem.line, []).append(problem)
    if None in by_line:  # a whole-file problem: the file has no examples, and it is the only one
        assert check.num_examples == 0 and len(check.problems) == 1 and "no examples" in check.problems[0].message
        assert not used
    assert set(by_line) - {None} <= used
    assert check.num_examples == len(used - set(by_line))  # every line with text: an example or a problem
    assert check.ok == (check.num_examples > 0 and not check.problems)
    assert check.ok or check.problems
    return by_line


# ---- arbitrary bytes and arbitrary JSON ----

LINE_ENDS = st.sampled_from([b"\n", b"\r\n"])
SAMPLE_LINES = [json.dumps(PC).encode(), b"", b"  ", BOM, b"\xff", b"{", b"[]", b"null", b'{"prompt": 1}']


@FUZZ
@given(content=st.binary(max_size=3000))
def test_arbitrary_bytes(tmp_path, content):
    assert_answers(check_bytes(tmp_path, content), content)


@FUZZ
@given(
    lines=st.lists(st.binary(max_size=60) | st.sampled_from(SAMPLE_LINES), max_size=12),
    end=LINE_ENDS,
    last_end=st.booleans(),
)
def test_arbitrary_byte_lines(tmp_path, lines, end, last_end):
    content = end.join(lines) + (end if last_end and lines else b"")
    assert_answers(check_bytes(tmp_path, content), content)


KEYS = st.sampled_from(["prompt", "completion", "messages", "role", "content"]) | st.text(max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(ROLES),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=10,
)
MESSAGES = st.lists(st.dictionaries(st.sampled_from(["role", "content"]), JSON_VALUES, max_size=2), max_size=4)
JSON_LINES = (
    JSON_VALUES
    | st.dictionaries(st.sampled_from(["prompt", "completion"]), JSON_VALUES, max_size=3)
    | st.builds(lambda m: {"messages": m}, MESSAGES)
)


@FUZZ
@given(values=st.lists(JSON_LINES, min_size=1, max_size=5), ascii_only=st.booleans())
def test_arbitrary_json_lines(tmp_path, values, ascii_only):
    content = b"".join(json.dumps(v, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") + b"\n" for v in values)
    assert_answers(check_bytes(tmp_path, content), content)


# ---- valid files, mutated ----
# Each line gets at most one mutation, so the problem it must cause is known: OK (none), None (a
# problem with the whole line) or the field to name.

OK = "ok"
TEXT = st.text(max_size=30)
REPLY = st.text(max_size=30).filter(str.strip)  # a reply or completion must have text
NON_STRINGS = (
    st.none() | st.booleans() | st.integers() | st.floats()
    | st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)
)  # fmt: skip
MARK = "\x01mark\x01"  # stands for raw JSON text spliced in after json.dumps


@st.composite
def records(draw, chat: bool) -> dict:
    if not chat:
        return {"prompt": draw(TEXT), "completion": draw(REPLY)}
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [{"role": "user", "content": draw(TEXT)}, {"role": "assistant", "content": draw(REPLY)}]
    return {"messages": messages}


def field_name(path: tuple) -> str:
    return path[0] + "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path[1:])


def where(record: dict, path: tuple) -> tuple[dict | list, str | int]:
    """The container holding path's last step, and that step."""
    *steps, last = path
    for step in steps:
        record = record[step]
    return record, last


def object_text(obj: dict, repeat: str, ascii_only: bool) -> str:
    """obj as JSON text with the key `repeat` written twice."""
    pairs = [*obj.items(), (repeat, obj[repeat])]
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=ascii_only)}: {json.dumps(v, ensure_ascii=ascii_only)}"
                           for k, v in pairs) + "}"  # fmt: skip


@st.composite
def mutated_lines(draw, chat: bool) -> tuple[bytes, str | None]:
    """A record's JSON line after one mutation, and the problem it must cause."""
    record = draw(records(chat))
    if chat:
        messages = record["messages"]
        texts = [("messages", i, "content") for i in range(len(messages))]
        keyed = texts + [("messages", i, "role") for i in range(len(messages))]
    else:
        texts = keyed = [("prompt",), ("completion",)]
    ascii_only = draw(st.booleans())
    text = splice = None  # the line's JSON text when written by hand; raw JSON text for MARK
    kind = draw(st.sampled_from([
        "none", "drop", "wrong type", "huge", "unicode", "surrogate", "extra key", "deep",
        "duplicate", "bad utf-8", "nul byte", "truncate", "not a list", "not an object",
    ]))  # fmt: skip
    expected = OK
    if kind == "drop":
        path = draw(st.sampled_from(keyed))
        container, last = where(record, path)
        del container[last]
        expected = field_name(path)
    elif kind == "wrong type":
        path = draw(st.sampled_from(keyed))
        container, last = where(record, path)
        container[last] = draw(NON_STRINGS)
        expected = field_name(path)
    elif kind == "huge":  # long text is fine, as are unusual characters and NULs in strings
        container, last = where(record, draw(st.sampled_from(texts)))
        container[last] = draw(st.sampled_from(["x", "é", "😀", "\x00"])) * draw(st.integers(10**4, 10**5))
    elif kind == "unicode":
        container, last = where(record, draw(st.sampled_from(texts)))
        container[last] = draw(st.text(min_size=1).filter(str.strip)) + "\x00"
    elif kind == "surrogate":  # an escape of half a surrogate pair, as broken exporters write
        path = draw(st.sampled_from(texts))
        container, last = where(record, path)
        container[last] += draw(st.characters(categories=["Cs"]))
        ascii_only, expected = True, field_name(path)
    elif kind == "extra key":
        format_keys = ("prompt", "completion", "messages")
        record[draw(st.text(max_size=10).filter(lambda k: k not in format_keys))] = draw(JSON_VALUES)
    elif kind == "deep":
        depth = draw(st.sampled_from([10, 300, 100_000]))
        record["meta"] = MARK
        splice = "[" * depth + "]" * depth
        expected = OK if depth < 500 else None
    elif kind == "duplicate":
        path = draw(st.sampled_from(keyed))
        container, last = where(record, path)
        if len(path) == 1:
            text = object_text(record, last, ascii_only)
        else:
            splice = object_text(container, last, ascii_only)
            record["messages"][path[1]] = MARK
        expected = field_name(path)
    elif kind == "not a list" and chat:
        record["messages"] = draw(NON_STRINGS.filter(lambda v: not isinstance(v, list)))
        expected = "messages"
    elif kind == "not an object" and chat:
        i = draw(st.integers(0, len(record["messages"]) - 1))
        record["messages"][i] = draw(NON_STRINGS.filter(lambda v: not isinstance(v, dict)))
        expected = f"messages[{i}]"
    if text is None:
        text = json.dumps(record, ensure_ascii=ascii_only)
    if splice is not None:
        text = text.replace(json.dumps(MARK), splice)
    line = text.encode("utf-8", "surrogatepass")
    at = draw(st.integers(0, len(line)))
    if kind == "bad utf-8":  # bytes that begin no UTF-8 character, wherever they fall
        line = line[:at] + bytes([draw(st.sampled_from([0xC0, 0xC1, *range(0xF5, 0x100)]))]) + line[at:]
        expected = None
    elif kind == "nul byte":  # a raw NUL: no JSON outside a string, a control character inside
        line, expected = line[:at] + b"\x00" + line[at:], None
    elif kind == "truncate":  # a writer killed mid-line
        line, expected = line[: max(1, at - 1)], None
    return line, expected


@st.composite
def mutated_files(draw) -> tuple[bytes, dict[int, str | None]]:
    """A file of mutated lines of one format, with blank lines, a BOM, CRLF or not, and each
    record line's number with the problem it must cause."""
    chat = draw(st.booleans())
    lines, expected = [], {}
    for line, problem in draw(st.lists(mutated_lines(chat), min_size=1, max_size=6)):
        lines += draw(st.lists(st.sampled_from([b"", b"  ", b"\t", b"\r"]), max_size=2))
        lines.append(line)
        expected[len(lines)] = problem
    end = draw(LINE_ENDS)
    content = (BOM if draw(st.booleans()) else b"") + end.join(lines) + (end if draw(st.booleans()) else b"")
    return content, expected


@settings(FUZZ, max_examples=300)
@given(case=mutated_files())
def test_mutated_files(tmp_path, case):
    content, expected = case
    check = check_bytes(tmp_path, content)
    by_line = assert_answers(check, content)
    for number, problem in expected.items():
        fields = [p.field for p in by_line.get(number, [])]
        if problem == OK:
            assert not fields, (number, by_line[number])
        else:
            assert problem in fields, (number, problem, by_line.get(number))
    assert check.num_examples == list(expected.values()).count(OK)


# ---- the pre-flight ----

PATHS = ["data.jsonl", "bad.jsonl", "model", "", ".", "/", "~", "~nosuchuser/model", "a\x00b", "\ud800", "NA"]
VALUES = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(PATHS + ["true", "false", "auto", "nan", "inf", "-inf", "-1", "0", "0.5", "1e-4", "lora", "none",
                               "steps", "epoch", "wandb", "{{ messages }}"])
    | st.lists(st.text(max_size=5) | st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)
)  # fmt: skip
CONFIGS = st.dictionaries(st.sampled_from(list(FIELDS)) | st.sampled_from(["lr", "epochs"]), VALUES, max_size=15)


@pytest.fixture
def preflight_folder(tmp_path, monkeypatch):
    """A working folder with the files PATHS names, so some values are real files and folders."""
    (tmp_path / "data.jsonl").write_text(json.dumps(PC) + "\n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "a", "prompt": "b"}\n\xff\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)


@FUZZ
@given(values=CONFIGS)
def test_arbitrary_configs(preflight_folder, values):
    try:
        config = from_dict(values)
    except ValueError as e:  # the documented error, naming the flag
        assert str(e).startswith((*FIELDS, "unknown config keys: "))
        return
    for problem in preflight(config):
        assert problem.split()[0].rstrip(":") in FIELDS, problem


# ---- hostile files, one by one ----


def test_binary_files(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256))
    [problem, *_] = check_bytes(tmp_path, png).problems
    assert (problem.line, problem.field) == (1, None)
    assert "byte 0x89 at byte 1 of the line is not UTF-8" in problem.message

    noise = random.Random(0).randbytes(100_000)
    check = check_bytes(tmp_path, noise)
    by_line = assert_answers(check, noise)
    assert check.num_examples == 0 and len(by_line) > 300 and {p.field for p in check.problems} == {None}


LONG_LINE = PEAK_MB + """
import json, sys, time
from engine.data import check_jsonl

before, start = peak_mb(), time.monotonic()
check = check_jsonl(sys.argv[1])
print(json.dumps({
    "seconds": time.monotonic() - start, "growth_mb": peak_mb() - before,
    "num_examples": check.num_examples, "problems": [[p.line, p.field, p.message] for p in check.problems],
}))
"""


def test_a_100mb_line_is_reported_unread(tmp_path):
    path = tmp_path / "long.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"prompt": "')
        for _ in range(100):
            f.write(b"x" * 2**20)
        f.write(b'", "completion": "y"}\n' + json.dumps(PC).encode() + b"\n")
    result = run_python(LONG_LINE, str(path))
    print(f"100 MB line: {result['seconds']:.1f} s, peak RSS growth {result['growth_mb']:.0f} MB")
    assert result["num_examples"] == 1
    [[line, field, message]] = result["problems"]
    assert (line, field) == (1, None) and "longer than 64 MiB" in message
    # At most one read of MAX_LINE_BYTES is held, twice over as readline joins its chunks;
    # skipping the rest costs 1 MiB reads, whatever the line's length.
    assert result["growth_mb"] < 2 * MAX_LINE_BYTES / 2**20 + 16
    assert result["seconds"] < 10


def test_deeply_nested_json(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    rows = [deep, '{"prompt": "a", "completion": "b", "meta": ' + deep + "}", json.dumps(PC)]
    check = check_bytes(tmp_path, "\n".join(rows).encode())
    assert check.num_examples == 1
    assert [(p.line, p.field) for p in check.problems] == [(1, None), (2, None)]
    assert all("too deeply" in p.message for p in check.problems)


def test_huge_integers(tmp_path):
    # Python refuses to read integers of over 4300 digits; json.loads raised ValueError.
    check = check_bytes(tmp_path, b'{"prompt": "a", "completion": "b", "id": ' + b"9" * 5000 + b"}\n")
    [problem] = check.problems
    assert (problem.line, problem.field) == (1, None) and "more than 4300 digits" in problem.message


@pytest.mark.parametrize("content", [b"", b"\n\n\n", b"  \n\t\r\n\r\n", BOM, BOM + b"\r\n  \n"])
def test_files_without_examples(tmp_path, content):
    check = check_bytes(tmp_path, content)
    [problem] = check.problems
    assert (problem.line, problem.field, check.ok) == (None, None, False)
    assert "has no examples" in problem.message


@pytest.mark.parametrize("bom", [b"", BOM])
@pytest.mark.parametrize("end", [b"\n", b"\r\n"])
def test_bom_and_crlf_are_accepted(tmp_path, bom, end):
    rows = [json.dumps(PC).encode(), b"", b"nope", json.dumps(PC).encode()]
    check = check_bytes(tmp_path, bom + end.join(rows) + end)
    assert check.num_examples == 2
    [problem] = check.problems  # problems still name the right line
    assert (problem.line, problem.field) == (3, None)


def test_bom_on_its_own_first_line_is_blank(tmp_path):
    check = check_bytes(tmp_path, BOM + b"\r\n" + json.dumps(PC).encode() + b"\r\n")
    assert check.ok and check.num_examples == 1


def test_bom_mid_file_is_accepted(tmp_path):
    # Two files joined with cat: the second one's BOM starts line 2.
    check = check_bytes(tmp_path, BOM + json.dumps(PC).encode() + b"\n" + BOM + json.dumps(PC).encode() + b"\n")
    assert check.ok and check.num_examples == 2


def test_duplicate_keys_are_named(tmp_path):
    rows = [
        '{"prompt": "a", "completion": "b", "prompt": "c"}',
        '{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "yo", "content": "hey", "content": "!"}]}',
        '{"prompt": "a", "completion": "b", "meta": {"tags": [{"k": 1, "k": 2}], "id": 1, "id": 2}}',
    ]
    check = check_bytes(tmp_path, "\n".join(rows).encode())
    assert check.num_examples == 0
    assert [(p.line, p.field) for p in check.problems] == [(1, "prompt"), (2, None), (3, "meta.tags[0].k")]
    assert '"prompt" is in this object 2 times; JSON keeps only the last' in check.problems[0].message
    assert "1 more keys of this line are repeated" in check.problems[2].message
    chat = check_bytes(tmp_path, rows[1].encode())
    [problem] = chat.problems
    assert (problem.line, problem.field) == (1, "messages[1].content") and "3 times" in problem.message


def test_unpaired_surrogate_is_a_problem_not_a_tokenizer_crash(tmp_path, tokenizer):
    # json.loads accepts "\ud83d" alone; a fast tokenizer then raised TypeError on the text.
    rows = [
        json.dumps(PC),
        '{"prompt": "smile \\ud83d", "completion": "b"}',
        '{"prompt": "\\ud83d\\ude00", "completion": "b"}',  # a whole pair: an emoji
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(rows) + "\n")
    report = data_report(path, copy.deepcopy(tokenizer), max_length=64)
    [problem] = report.problems
    assert (problem.line, problem.field) == (2, "prompt")
    assert "\\ud83d at character 7" in problem.message and report.num_examples == 2


@pytest.mark.parametrize("last", [json.dumps(PC), '{"prompt": "a"}'])
def test_no_trailing_newline(tmp_path, last):
    check = check_bytes(tmp_path, (json.dumps(PC) + "\n" + last).encode())
    if last == json.dumps(PC):
        assert check.ok and check.num_examples == 2
    else:
        [problem] = check.problems
        assert (problem.line, problem.field, check.num_examples) == (2, "completion", 1)


@pytest.mark.parametrize("path", ["a\x00b.jsonl", "\ud800.jsonl"])
def test_unusable_paths(path):
    [problem] = check_jsonl(path).problems
    assert (problem.line, problem.field) == (None, None) and "not a usable path" in problem.message


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"model_id": "~nosuchuser/model"}, "model_id: ~nosuchuser/model starts with an unknown user's home"),
        ({"learning_rate": "nan"}, "learning_rate: must be a number greater than 0, got nan"),
        ({"num_train_epochs": "inf"}, "num_train_epochs: must be a number greater than 0, got inf"),
        ({"weight_decay": -0.1}, "weight_decay: must be 0 or more, got -0.1"),
        ({"tiled_mlp_tokens": -512}, "tiled_mlp_tokens: must be 0 (the default) or more, got -512"),
        ({"pack_tokens": -1}, "pack_tokens: must be 0 (the default) or more, got -1"),
        ({"activation_memory_budget": "nan"}, "activation_memory_budget: must be in [0, 1], got nan"),
        ({"train_data": ""}, "train_data: give the path of a JSONL file of examples"),
        ({"train_data": "a\x00b"}, "train_data: a\x00b: is not a usable path"),
    ],
)
def test_preflight_names_the_field(preflight_folder, values, expected):
    problems = preflight(from_dict({"model_id": "model", "train_data": "data.jsonl", **values}))
    assert [p for p in problems if p.startswith(expected)], problems


def test_a_list_of_numbers_for_a_number_flag_is_a_value_error():
    # format_value joined the list and raised TypeError.
    with pytest.raises(ValueError, match=r"^lora_r: \[1, 2\] is not valid"):
        from_dict({"lora_r": [1, 2]})
    assert from_dict({"lora_target_modules": [1, "q_proj"]}).lora_target_modules == ["1", "q_proj"]
