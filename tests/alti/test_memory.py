"""lens_alti.alti.memory: available memory and the estimates."""

from __future__ import annotations

import sys

import pytest

from lens_alti.alti import memory
from lens_alti.errors import InsufficientMemoryError


def test_available_memory_is_read(monkeypatch):
    assert memory.available_bytes("cpu") > 0
    monkeypatch.setitem(sys.modules, "psutil", None)  # falls back to /proc/meminfo
    assert memory.available_bytes("cpu") > 0


def test_memory_estimate_grows_with_the_input():
    small = memory.attribute_bytes([memory.BlockShape(2, 1, 4, 10, 10, 64)], heads=False, max_chunk_bytes=0)
    big = memory.attribute_bytes([memory.BlockShape(2, 1, 4, 1000, 1000, 64)], heads=True, max_chunk_bytes=0)
    # results alone: layers + rollout [1, 2, 1000, 1001] and heads [1, 2, 4, 1000, 1001] in float32
    assert big > 4 * (2 * 2 * 1000 * 1001 + 2 * 4 * 1000 * 1001) > small > 0
    # the chunk term is the budget only when a block is large enough to fill it
    tiny = memory.BlockShape(1, 1, 2, 4, 4, 8)
    assert memory.block_working_bytes(tiny, heads=True, max_chunk_bytes=2**28) < 2**16


def test_check_fits(monkeypatch):
    with pytest.raises(InsufficientMemoryError, match="TiB|GiB"):  # the real machine's available memory
        memory.check_fits(2**50, "cpu", "work", "advice")
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1000)
    memory.check_fits(memory.MIN_CHECKED_BYTES - 1, "cpu", "work", "advice")  # small calls are never refused
    monkeypatch.setattr(memory, "MIN_CHECKED_BYTES", 0)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 2**30)
    memory.check_fits(2**29, "cpu", "work", "advice")
    with pytest.raises(
        InsufficientMemoryError, match=r"work needs about 2.00 GiB more memory, but only 1.00 GiB .* advice"
    ):
        memory.check_fits(2**31, "cpu", "work", "advice")
