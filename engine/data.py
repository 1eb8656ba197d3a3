"""Training data: JSONL checks, chat templates, prompt masking, the eval split and streaming.

Two formats, one JSON object per line (extra keys are ignored, blank lines skipped):
    {"prompt": "...", "completion": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

Files are read line by line, never whole: checking or training on a file larger than RAM works.
"""

import codecs
import hashlib
import json
import os
import random
import sys
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import datasets
import jinja2
import numpy as np
import pyarrow.compute as pc

FORMATS = ("prompt_completion", "chat")
ROLES = ("system", "user", "assistant")
MAX_LINE_BYTES = 64 * 2**20  # a longer line is reported, not read: memory stays bounded
SHUFFLE_BUFFER = 1000  # examples held to shuffle a stream; each holds up to max_length tokens

_PROMPT_COMPLETION_EXAMPLE = '{"prompt": "...", "completion": "..."}'
_CHAT_EXAMPLE = '{"messages": [{"role": "user", "content": "..."}, ...]}'


@dataclass(frozen=True)
class Problem:
    path: str
    line: int | None  # 1-based; None for the whole file
    field: str | None  # e.g. "completion", "messages[2].role"
    message: str  # what is wrong and what to do

    def __str__(self) -> str:
        where = [self.path]
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return f"{', '.join(where)}: {self.message}"


class DataError(ValueError):
    """Bad data found while tokenizing or building datasets; `problem` says where."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


@dataclass
class DataCheck:
    path: str
    format: str | None  # one of FORMATS; None if no line showed one
    num_examples: int  # valid example lines
    problems: list[Problem]  # at most max_problems
    more_problems: int  # found beyond the cap

    @property
    def ok(self) -> bool:
        return self.num_examples > 0 and not self.problems and not self.more_problems


def check_jsonl(path: str | Path, max_problems: int = 50) -> DataCheck:
    """Checks every line of a JSONL file.

    The file's format is set by its first line with "prompt"/"completion" or "messages".
    """
    path = str(path)
    check = DataCheck(path, None, 0, [], 0)

    def report(problem: Problem) -> None:
        if len(check.problems) < max_problems:
            check.problems.append(problem)
        else:
            check.more_problems += 1

    try:
        with open(path, "rb") as f:
            for _, file_format, example, problems in _scan(f, path):
                check.format = file_format
                check.num_examples += example is not None
                for problem in problems:
                    report(problem)
    except FileNotFoundError:
        report(Problem(path, None, None, "file not found; check the path"))
    except IsADirectoryError:
        report(Problem(path, None, None, "is a folder; pass the path of a .jsonl file"))
    except OSError as e:
        report(Problem(path, None, None, f"can't be read ({e.strerror}); check its permissions"))
    except ValueError:  # from open(): the lines' own ValueErrors become problems in _parse_line
        message = "is not a usable path (it has a NUL byte or a character the file system can't store)"
        report(Problem(path, None, None, message))
    else:
        if check.num_examples == 0 and not check.problems and not check.more_problems:
            report(_no_examples(path))
    return check


def _no_examples(path: str) -> Problem:
    message = f"has no examples; add one JSON object per line, like {_PROMPT_COMPLETION_EXAMPLE}"
    return Problem(path, None, None, message)


def _scan(f: BinaryIO, path: str) -> Iterator[tuple[int, str | None, dict | None, list[Problem]]]:
    """Yields (line number, file format so far, example or None if bad, problems) per used line."""
    file_format, format_line = None, None
    for number, raw in _lines(f):
        if raw is not None and not raw.strip():
            continue
        example, line_format, found = _parse_line(raw)
        if line_format and file_format is None:
            file_format, format_line = line_format, number
        elif line_format and line_format != file_format:
            message = (
                f"is {_FORMAT_NAMES[line_format]} but line {format_line} made this a "
                f"{_FORMAT_NAMES[file_format]} file; use one format per file"
            )
            found = [(None, message)]
        problems = [Problem(path, number, field, message) for field, message in found]
        yield number, file_format, None if problems else example, problems


_FORMAT_NAMES = {"prompt_completion": "prompt/completion", "chat": 'chat (has "messages")'}


def _lines(f: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """Yields (line number, bytes) per line; None for a line over MAX_LINE_BYTES, skipped unread."""
    number = 0
    while line := f.readline(MAX_LINE_BYTES + 1):
        number += 1
        # Editors on Windows start a UTF-8 file with a byte order mark, and files joined with
        # `cat` keep theirs mid-file; neither is an error.
        line = line.removeprefix(codecs.BOM_UTF8)
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield number, line
            continue
        del line  # skip the rest in small reads, so at most one long read is held
        while (rest := f.readline(2**20)) and not rest.endswith(b"\n"):
            pass
        yield number, None


def _parse_line(raw: bytes | None) -> tuple[dict | None, str | None, list[tuple[str | None, str]]]:
    """Returns (object, its format, problems as (field, message))."""
    if raw is None:
        return _bad_line(f"is longer than {MAX_LINE_BYTES // 2**20} MiB; is this file JSONL?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _bad_line(
            f"byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line is not UTF-8; "
            "save the file as UTF-8"
        )
    try:
        obj, duplicates = _loads(text)
    except json.JSONDecodeError as e:
        return _bad_line(
            f"is not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
        )
    except RecursionError:  # the parser recurses once per level
        return _bad_line("nests lists or objects too deeply to read (about 1000 levels); flatten it")
    except ValueError:  # Python refuses to read longer integers, lest it stall on them
        return _bad_line(
            f"has a number of more than {sys.get_int_max_str_digits()} digits; write it as a string"
        )
    if not isinstance(obj, dict):
        return _bad_line(
            f"is {_json_type(obj)}, not a JSON object; each line must be an object like "
            f"{_PROMPT_COMPLETION_EXAMPLE} or {_CHAT_EXAMPLE}"
        )
    found = _duplicate_problems(obj, duplicates)
    is_chat = "messages" in obj
    is_prompt_completion = "prompt" in obj or "completion" in obj
    if is_chat and is_prompt_completion:
        return _bad_line('has both "messages" and "prompt"/"completion"; keep one format\'s keys')
    if is_chat:
        return obj, "chat", found + list(_chat_problems(obj["messages"]))
    if is_prompt_completion:
        return obj, "prompt_completion", found + list(_prompt_completion_problems(obj))
    keys = ", ".join(json.dumps(_cut(key)) for key in list(obj)[:5]) or "none"
    return _bad_line(
        f'has neither "prompt"/"completion" nor "messages" (its keys: {keys}); '
        f"use {_PROMPT_COMPLETION_EXAMPLE} or {_CHAT_EXAMPLE}"
    )


class _RepeatedKey(Exception):
    """An object has a key twice: json.loads would keep the last value without a word."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        raise _RepeatedKey
    return obj


# One decoder for every line: json.loads with a hook builds a decoder per call, doubling its time.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _loads(text: str) -> tuple[object, list[tuple[dict, str, int]]]:
    """The line's JSON value, and (object, key, count) for each key an object has more than once."""
    try:
        return _DECODER.decode(text), []
    except _RepeatedKey:  # rare: read the line again, noting each repeat
        duplicates = []

        def note_repeats(pairs: list[tuple[str, object]]) -> dict:
            obj = dict(pairs)
            if len(obj) < len(pairs):
                counts = Counter(key for key, _ in pairs)
                duplicates.extend((obj, key, count) for key, count in counts.items() if count > 1)
            return obj

        return json.loads(text, object_pairs_hook=note_repeats), duplicates


def _duplicate_problems(root: dict, duplicates: list[tuple[dict, str, int]]) -> list[tuple[str, str]]:
    """The first duplicated key of a line, named by its field, and how many more there are."""
    if not duplicates:
        return []
    # Each container's parent and its key or index there; a loop, as nesting can be deep.
    parents, stack = {}, [root]
    while stack:
        value = stack.pop()
        for step, child in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(child, dict | list):
                parents[id(child)] = value, step
                stack.append(child)
    obj, key, count = duplicates[0]
    steps = [key]
    while id(obj) in parents:
        obj, step = parents[id(obj)]
        steps.append(step)
    steps.reverse()  # the root is an object, so the first step is a key
    field = steps[0] + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps[1:])
    message = f"{json.dumps(_cut(key))} is in this object {count} times; JSON keeps only the last, so keep one"
    if len(duplicates) > 1:
        message += f" ({len(duplicates) - 1} more keys of this line are repeated in their object)"
    return [(field, message)]


def _bad_line(message: str) -> tuple[None, None, list[tuple[None, str]]]:
    return None, None, [(None, message)]


def _prompt_completion_problems(obj: dict) -> Iterator[tuple[str, str]]:
    for key in ("prompt", "completion"):
        if key not in obj:
            yield key, f'is missing; add "{key}": "..."'
        elif problem := _text_problem(obj[key]):
            yield key, problem
        elif key == "completion" and not obj[key].strip():
            yield key, "is empty; write the answer to learn, or remove the line"


def _chat_problems(messages: object) -> Iterator[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else _json_type(messages)
        yield "messages", f"must be a list of messages, got {got}; use {_CHAT_EXAMPLE}"
        return
    roles = ", ".join(ROLES)
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            example = '{"role": "user", "content": "..."}'
            yield field, f"must be an object like {example}, got {_json_type(message)}"
            continue
        role, content = message.get("role"), message.get("content")
        if "role" not in message:
            yield f"{field}.role", f"is missing; use one of: {roles}"
        elif role not in ROLES:
            shown = json.dumps(_cut(role)) if isinstance(role, str) else _json_type(role)
            yield f"{field}.role", f"is {shown}; use one of: {roles}"
        elif i == 0 and role == "assistant":
            # Masking renders the turns before each reply; an opening reply has none.
            yield f"{field}.role", 'is "assistant"; start with the message it answers'
        if "content" not in message:
            yield f"{field}.content", 'is missing; add "content": "..."'
        elif problem := _text_problem(content):
            yield f"{field}.content", problem
        elif role == "assistant" and not content.strip():
            yield f"{field}.content", "is an empty reply; write the reply to learn or remove it"
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        yield "messages", "has no assistant reply to learn; add the reply the model should give"


def _text_problem(value: object) -> str | None:
    """Why a prompt, completion or content value is not text a tokenizer takes; None if it is."""
    if not isinstance(value, str):
        return f"must be a string, got {_json_type(value)}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON can escape half a surrogate pair ("\\ud83d"), no character
        return (
            f"has \\u{ord(value[e.start]):04x} at character {e.start + 1}, half of an emoji or other "
            "character whose other half is missing; re-export the file as UTF-8"
        )
    return None


def _cut(text: str, limit: int = 40) -> str:
    """Text short enough to quote in a message."""
    return text if len(text) <= limit else text[:limit] + "..."


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return f"the number {_cut(str(value))}"
    names = {dict: "an object", list: "a list", str: "a string", type(None): "null"}
    return names[type(value)]


def _examples(path: str, limit: int = 0) -> Iterator[tuple[int, dict]]:
    """Yields (line number, example) for the first `limit` examples (0: all) of a checked file.

    Raises DataError at the first bad line or for a file with no examples: callers ran
    check_jsonl, but a file can change in between.
    """
    count = 0
    with open(path, "rb") as f:
        for number, _, example, problems in _scan(f, path):
            if problems:
                raise DataError(problems[0])
            yield number, example
            count += 1
            if count == limit:
                return
    if count == 0:
        raise DataError(_no_examples(path))


# Mistral-instruct style, for tokenizers that have no template. It renders every conversation
# check_jsonl accepts, using only bos_token and eos_token, so it works with any tokenizer:
#     <s>[INST] {system}\n\n{user} [/INST] {assistant}</s>[INST] {user} [/INST] {assistant}</s>
# System messages join the next user message, or get an [INST] block of their own when a reply
# follows them directly. The generation prompt adds nothing: a prompt ends with "[/INST]" and the
# model writes " {assistant}</s>". Earlier turns never change with what follows, which masking
# needs (see _render).
DEFAULT_CHAT_TEMPLATE = """\
{{- bos_token }}
{%- set ns = namespace(system='') %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- set ns.system = ns.system + message['content'] + '\\n\\n' %}
    {%- elif message['role'] == 'user' %}
        {{- '[INST] ' + ns.system + message['content'] + ' [/INST]' }}
        {%- set ns.system = '' %}
    {%- elif message['role'] == 'assistant' %}
        {%- if ns.system %}
            {{- '[INST] ' + ns.system | trim + ' [/INST]' }}
            {%- set ns.system = '' %}
        {%- endif %}
        {{- ' ' + message['content'] }}
        {{- eos_token }}
    {%- else %}
        {{- raise_exception('unknown role ' + message['role'] + '; use system, user, assistant') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt and ns.system %}
    {{- '[INST] ' + ns.system | trim + ' [/INST]' }}
{%- endif %}"""


def setup_chat_template(tokenizer, chat_template: str | None) -> str:
    """Sets tokenizer.chat_template; returns where it came from: "flag", "tokenizer" or "default".

    chat_template (the --chat_template flag) is a Jinja template, a path to a file holding one,
    or None: the tokenizer's own template, else DEFAULT_CHAT_TEMPLATE.
    """
    if chat_template is None:
        if tokenizer.chat_template and tokenizer.chat_template != DEFAULT_CHAT_TEMPLATE:
            return "tokenizer"
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        return "default"
    if "{{" not in chat_template and "{%" not in chat_template:  # not Jinja, so a path
        if not Path(chat_template).is_file():
            raise ValueError(
                f"--chat_template {chat_template!r} is neither a Jinja template (it has no "
                "'{{' or '{%') nor a file; pass the template or the path of a file holding it"
            )
        chat_template = Path(chat_template).read_text(encoding="utf-8")
    tokenizer.chat_template = chat_template
    return "flag"


def tokenize_example(example: dict, tokenizer, train_on_prompt: bool, max_length: int) -> dict:
    """Token ids of one example and its labels: -100 where the model does not learn.

    Without train_on_prompt it learns the completion, or the assistant replies, each with its eos.
    """
    input_ids, labels = _tokenize(example, tokenizer, train_on_prompt)
    return _truncate(input_ids, labels, max_length)


def _truncate(input_ids: list[int], labels: list[int], max_length: int) -> dict:
    return {
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "truncated": len(input_ids) > max_length,
    }


def _tokenize(example: dict, tokenizer, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    if not tokenizer.is_fast:
        raise TypeError(
            f"{type(tokenizer).__name__} is a slow tokenizer; masking needs a fast one "
            "(character offsets): load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    text, spans = _render(example, tokenizer, find_spans=not train_on_prompt)
    # One tokenization of the whole text, so tokens are exactly what the model sees; special
    # tokens are already in the text.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    if train_on_prompt:
        return input_ids, list(input_ids)
    # A token is learned when any of its characters is in a learned span: a token straddling
    # prompt and completion (" Paris" after "capital is") carries the completion's first word.
    labels, k = [], 0
    for token, (start, end) in zip(input_ids, encoding["offset_mapping"], strict=True):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        labels.append(token if k < len(spans) and spans[k][0] < end else -100)
    return input_ids, labels


def _render(example: dict, tokenizer, find_spans: bool) -> tuple[str, list[tuple[int, int]]]:
    """The example as one text, and the (start, end) character spans the model learns to write."""
    if "messages" not in example:
        head = (tokenizer.bos_token or "") + example["prompt"]
        text = head + example["completion"] + (tokenizer.eos_token or "")
        return text, [(len(head), len(text))]
    # A reply's span runs from the end of the conversation before it, rendered with the
    # generation prompt, to the end of the conversation up to it: this works with any template
    # whose renderings of the first turns begin the whole conversation's.
    messages = example["messages"]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not find_spans:  # any template will do
        return text, []
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = _prefix_length(tokenizer, messages[:i], True, text)
            spans.append((start, _prefix_length(tokenizer, messages[: i + 1], False, text)))
    return text, spans


def _prefix_length(tokenizer, messages: list, add_generation_prompt: bool, text: str) -> int:
    prefix = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not text.startswith(prefix):
        raise ValueError(
            f"the chat template is not prefix-consistent: its rendering of the first "
            f"{len(messages)} messages does not begin its rendering of the whole conversation, "
            "so the assistant replies can't be located to mask the rest; pass a template that "
            "renders earlier turns the same whatever follows, with --chat_template"
        )
    return len(prefix)


def _tokenize_at(path: str, line: int, example: dict, tokenizer, train_on_prompt: bool):
    """_tokenize, with a chat template's failure turned into a DataError naming the line."""
    try:
        return _tokenize(example, tokenizer, train_on_prompt)
    except jinja2.TemplateError as e:
        message = f"the chat template failed ({e}); fix the conversation or pass --chat_template"
        raise DataError(Problem(path, line, "messages", message)) from e
    except ValueError as e:
        raise DataError(Problem(path, line, "messages", str(e))) from e


@dataclass
class DataReport:
    path: str
    format: str | None
    num_examples: int
    token_length_mean: float  # lengths before truncation, so they show what max_length to pick
    token_length_p50: int  # half the examples are this long or shorter; p95: 95% of them
    token_length_p95: int
    token_length_max: int
    num_truncated: int  # examples longer than max_length
    max_length: int
    problems: list[Problem]
    more_problems: int
    token_lengths: np.ndarray | None = None  # each measured example's length, for a histogram


def data_report(
    path: str | Path, tokenizer, max_length: int, chat_template: str | None = None, limit: int = 0
) -> DataReport:
    """Checks a file and, if it is fine, measures its first `limit` examples (0: all) in tokens.

    num_examples counts the whole file; the token statistics cover the examples measured. For a
    chat file it sets the tokenizer's chat template, as setup_chat_template does.
    """
    path = str(path)
    check = check_jsonl(path)
    report = DataReport(
        path, check.format, check.num_examples, 0.0, 0, 0, 0, 0, max_length,
        check.problems, check.more_problems,
    )  # fmt: skip
    if not check.ok:
        return report
    if check.format == "chat":
        setup_chat_template(tokenizer, chat_template)
    lengths = array("I")  # 4 bytes an example, whatever the file's size
    try:
        for line, example in _examples(path, limit):
            lengths.append(len(_tokenize_at(path, line, example, tokenizer, False)[0]))
    except DataError as e:
        report.problems = [e.problem]
        return report
    values = np.frombuffer(lengths, dtype=np.uint32)
    p50, p95 = np.percentile(values, [50, 95], method="inverted_cdf")
    report.token_length_mean = float(values.mean())
    report.token_length_p50, report.token_length_p95 = int(p50), int(p95)
    report.token_length_max = int(values.max())
    report.num_truncated = int((values > max_length).sum())
    report.token_lengths = values
    return report


@dataclass
class Datasets:
    train: "datasets.Dataset | datasets.IterableDataset"  # columns: input_ids, labels
    eval: "datasets.Dataset | None"
    num_train_examples: int
    num_eval_examples: int
    # Tokens of the train examples after truncation. For a streamed train set it is counted by a
    # tokenizing pass over the file before training, the pass that counts its examples.
    train_tokens: int
    num_truncated: int  # over train and eval


_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "truncated": datasets.Value("bool"),
})  # fmt: skip


def build_datasets(config, tokenizer) -> Datasets:
    """Tokenized train and eval sets from config.train_data / eval_data (JSONL checked before).

    Eval is config.eval_data, else a seeded random split of config.eval_size examples from train
    (a fraction below 1, else a count; 0: no eval). With config.streaming, train is read lazily
    and shuffled through a buffer, for files larger than RAM; otherwise both are Arrow datasets
    in the datasets cache, built by rank 0 first and then read by the other ranks. For chat data
    it sets the tokenizer's chat template from config.chat_template (see setup_chat_template).
    """
    if any(_is_chat(path) for path in (config.train_data, config.eval_data) if path):
        setup_chat_template(tokenizer, config.chat_template)
    settings = {
        "tokenizer": tokenizer,
        "train_on_prompt": config.train_on_prompt,
        "max_length": config.max_length,
    }
    train_file = {"path": config.train_data, "limit": config.max_num_samples}

    if config.streaming:
        lengths, truncated = _count(**train_file, **settings)
    else:
        full = _arrow(**train_file, **settings)
        lengths, truncated = _lengths(full)
    num_truncated = int(truncated.sum())

    eval_indices = frozenset() if config.eval_data else _eval_indices(config, len(lengths))
    if config.eval_data:
        eval_set = _arrow(config.eval_data, **settings)
        num_truncated += int(_lengths(eval_set)[1].sum())
    elif not eval_indices:
        eval_set = None
    elif config.streaming:
        eval_set = _arrow(**train_file, only=eval_indices, **settings)
    else:
        # Indices in memory (8 bytes an example): every rank selects, none writes to the cache.
        eval_set = full.select(sorted(eval_indices), keep_in_memory=True)

    in_train = np.ones(len(lengths), dtype=bool)
    in_train[list(eval_indices)] = False
    if config.streaming:
        train = datasets.IterableDataset.from_generator(
            _rows, features=_FEATURES, gen_kwargs={**train_file, "skip": eval_indices, **settings}
        )
    else:
        train = full.select(np.flatnonzero(in_train), keep_in_memory=True) if eval_indices else full
    train = train.remove_columns("truncated")
    if config.streaming:
        train = train.shuffle(seed=config.seed, buffer_size=SHUFFLE_BUFFER)
    return Datasets(
        train=train,
        eval=eval_set.remove_columns("truncated") if eval_set is not None else None,
        num_train_examples=int(in_train.sum()),
        num_eval_examples=len(eval_set) if eval_set is not None else 0,
        train_tokens=int(lengths[in_train].sum()),
        num_truncated=num_truncated,
    )


def _is_chat(path: str) -> bool:
    examples = _examples(path)
    try:
        return "messages" in next(examples)[1]
    finally:
        examples.close()


def _eval_indices(config, n: int) -> frozenset[int]:
    """Which of the n train examples go to eval: the same ones for the same seed."""
    size = config.eval_size
    if size < 0:
        raise ValueError(f"eval_size is {size}; use a fraction below 1, a count, or 0 for no eval")
    k = round(size * n) if size < 1 else int(size)
    if size > 0 and k == 0:
        raise ValueError(
            f"eval_size {size} of {n} examples is 0 examples; raise it, or set 0 for no eval"
        )
    if k >= n:
        raise ValueError(
            f"eval_size {size} takes {k} of the {n} examples in {config.train_data}, leaving "
            "none to train on; lower it or pass --eval_data"
        )
    return frozenset(random.Random(config.seed).sample(range(n), k))


def _rows(
    path: str,
    tokenizer,
    train_on_prompt: bool,
    max_length: int,
    limit: int = 0,
    only: frozenset[int] | None = None,
    skip: frozenset[int] = frozenset(),
) -> Iterator[dict]:
    """Tokenized examples: of the first `limit` (0: all), by index those in `only`, minus `skip`."""
    for index, (line, example) in enumerate(_examples(path, limit)):
        if index in skip or (only is not None and index not in only):
            continue
        input_ids, labels = _tokenize_at(path, line, example, tokenizer, train_on_prompt)
        yield _truncate(input_ids, labels, max_length)


def _arrow(path: str, **settings) -> datasets.Dataset:
    """_rows(path, **settings) as an Arrow dataset in the datasets cache."""
    from accelerate import PartialState  # imports torch: only this function needs it

    with PartialState().main_process_first():
        try:
            return datasets.Dataset.from_generator(
                _rows,
                features=_FEATURES,
                gen_kwargs={"path": path, **settings},
                fingerprint=_fingerprint(path, **settings),
            )
        except datasets.exceptions.DatasetGenerationError as e:
            if isinstance(e.__cause__, DataError):
                raise e.__cause__ from None
            raise


def _fingerprint(path: str, tokenizer, only: frozenset[int] | None = None, **settings) -> str:
    """The cache key of a tokenized file.

    datasets would hash only the generator and its arguments, so a changed file would be served
    from a stale cache: the key has the file's size and modification time, the tokenizer, its
    chat template, the settings, and this module's code.
    """
    stat = os.stat(path)
    key = (
        os.path.abspath(path), stat.st_size, stat.st_mtime_ns,
        tokenizer.name_or_path, len(tokenizer), tokenizer.bos_token, tokenizer.eos_token,
        tokenizer.chat_template, sorted(settings.items()), sorted(only) if only else None,
        Path(__file__).read_bytes(),
    )  # fmt: skip
    return hashlib.sha256(repr(key).encode()).hexdigest()


def _lengths(dataset: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Each row's token count and truncated flag, read from Arrow without loading the rows."""
    lengths = pc.list_value_length(dataset.data.column("input_ids")).to_numpy()
    return lengths, dataset.data.column("truncated").to_numpy()


def _count(**rows_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Each row's token count and truncated flag, from one pass of _rows: 5 bytes an example."""
    lengths, truncated = array("I"), array("B")
    for row in _rows(**rows_kwargs):
        lengths.append(len(row["input_ids"]))
        truncated.append(row["truncated"])
    return np.frombuffer(lengths, dtype=np.uint32), np.frombuffer(truncated, dtype=bool)
