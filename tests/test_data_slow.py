"""Memory stays bounded whatever the data file's size: each check runs in a fresh Python process
and reports its own peak RSS."""

import json
import time
from pathlib import Path

import pytest
from conftest import PEAK_MB, run_python

pytestmark = pytest.mark.slow

CHECK = PEAK_MB + """
import json, sys
from engine.data import check_jsonl

check = check_jsonl(sys.argv[1])
print(json.dumps({
    "num_examples": check.num_examples,
    "problems": [str(p) for p in check.problems],
    "peak_rss_mb": peak_mb(),
}))
"""

STREAM = PEAK_MB + """
import json, sys
from types import SimpleNamespace
from transformers import AutoTokenizer
from engine.data import build_datasets

tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
before = peak_mb()
config = SimpleNamespace(
    train_data=sys.argv[1], eval_data=None, eval_size=10, max_num_samples=0, max_length=256,
    train_on_prompt=False, seed=0, streaming=True, chat_template=None, packing=False,
)
result = build_datasets(config, tokenizer)
seen = sum(1 for _ in result.train)
print(json.dumps({
    "num_train_examples": result.num_train_examples, "seen": seen,
    "before_mb": before, "growth_mb": peak_mb() - before,
}))
"""


def _write_jsonl(path: Path, size: int, chars_per_line: int) -> int:
    """Writes about `size` bytes of examples, 1000 lines over and over; returns their count."""
    rows = [
        {"prompt": f"Question {i}: " + "lorem ipsum dolor sit amet " * (chars_per_line // 54),
         "completion": f" Answer {i}: " + "consectetur adipiscing " * (chars_per_line // 46)}
        for i in range(1000)
    ]  # fmt: skip
    chunk = "".join(json.dumps(row) + "\n" for row in rows).encode()
    repeats = max(1, size // len(chunk))
    with open(path, "wb") as f:
        for _ in range(repeats):
            f.write(chunk)
    return repeats * len(rows)


def test_check_jsonl_of_a_1gb_file_stays_small(tmp_path):
    path = tmp_path / "big.jsonl"
    count = _write_jsonl(path, 2**30, chars_per_line=1000)
    with open(path, "ab") as f:  # one bad line at the end: the line count must be exact
        f.write(b'{"prompt": "last", "completion": ""}\n')
    start = time.monotonic()
    result = run_python(CHECK, str(path))
    print(f"check_jsonl, {path.stat().st_size / 2**30:.2f} GiB: {time.monotonic() - start:.1f} s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB")  # fmt: skip
    assert result["num_examples"] == count
    [problem] = result["problems"]
    assert problem.startswith(f"{path}, line {count + 1}, field 'completion': is empty")
    assert result["peak_rss_mb"] < 300


def test_streamed_training_data_stays_small(tmp_path, tokenizer_dir):
    # 64 MB of 8 kB examples: held as text or tokens it would take hundreds of MB.
    path = tmp_path / "stream.jsonl"
    count = _write_jsonl(path, 64 * 2**20, chars_per_line=4000)
    start = time.monotonic()
    result = run_python(STREAM, str(path), str(tokenizer_dir), env={"HF_DATASETS_CACHE": str(tmp_path)})
    print(f"streamed build + one pass over {count} examples: {time.monotonic() - start:.1f} s, "
          f"RSS growth {result['growth_mb']:.0f} MB over {result['before_mb']:.0f} MB")  # fmt: skip
    assert result["num_train_examples"] == result["seen"] == count - 10
    assert result["growth_mb"] < 40
