import os

import pytest

from engine.config import TrainConfig
from engine.memory import is_out_of_memory, out_of_memory_hint, parse_memory_limit


def test_memory_limit_is_a_fraction_or_mib():
    assert parse_memory_limit("0.95", 81920) == 0.95
    assert parse_memory_limit("40960", 81920) == 0.5
    with pytest.raises(ValueError, match="more than this GPU"):
        parse_memory_limit("100000", 81920)
    with pytest.raises(ValueError, match="positive"):
        parse_memory_limit("-1", 81920)


def test_out_of_memory_is_explained_with_what_to_change():
    import torch

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_out_of_memory(ValueError("bad"))
    hint = out_of_memory_hint(TrainConfig(per_device_train_batch_size=4, max_length=4096))
    assert "per_device_train_batch_size (now 4)" in hint and "max_length (now 4096)" in hint
    assert "use_qlora" in hint
    assert "use_qlora" not in out_of_memory_hint(TrainConfig(use_qlora=True))
    # A pass grown past a padded micro-batch (by hand, or from pack_tokens 0 on a GPU) is the first thing to lower.
    grown = out_of_memory_hint(TrainConfig(max_length=2048, pack_tokens=4096))
    assert grown.startswith("Try: lower pack_tokens (now 4096) to 2048")
    assert "pack_tokens" not in out_of_memory_hint(TrainConfig(max_length=2048, pack_tokens=4096, packing=False))


def test_the_allocator_grows_segments_unless_the_user_set_it(monkeypatch):
    from engine.memory import configure_allocator

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    configure_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    configure_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
