"""lens_alti.alti.memory: available memory and the estimates."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

from lens_alti.alti import memory
from lens_alti.errors import InsufficientMemoryError


def _meminfo_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (read here independently of lens_alti)."""
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return kib * 1024


def _within(read, reference, slack=64 * 2**20):
    """`read()` lies between two readings of `reference()` taken around it, give or take `slack` bytes
    (other processes allocate and free memory meanwhile)."""
    before = reference()
    got = read()
    after = reference()
    assert min(before, after) - slack <= got <= max(before, after) + slack, (got, before, after)


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="reads /proc/meminfo (Linux)")
def test_available_memory_is_what_the_system_reports(monkeypatch):
    try:
        import psutil
    except ImportError:  # psutil is optional (the `memory` extra)
        psutil = None
    if psutil is not None:
        _within(lambda: memory.available_bytes("cpu"), lambda: int(psutil.virtual_memory().available))
    _within(lambda: memory.available_bytes("cpu"), _meminfo_available)  # psutil reads MemAvailable too
    monkeypatch.setitem(sys.modules, "psutil", None)  # falls back to /proc/meminfo
    _within(lambda: memory.available_bytes("cpu"), _meminfo_available)
    _within(lambda: memory.available_bytes(None), _meminfo_available)  # no device: the CPU


def test_available_memory_sources_are_read_exactly(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "psutil", SimpleNamespace(virtual_memory=lambda: SimpleNamespace(available=12345)))
    assert memory.available_bytes("cpu") == 12345
    monkeypatch.setitem(sys.modules, "psutil", None)
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       8000000 kB\nMemFree:         100000 kB\nMemAvailable:    3000000 kB\n")

    def fake_open(path, *args, **kwargs):
        assert path == "/proc/meminfo", path
        return open(fake, *args, **kwargs)

    monkeypatch.setattr(memory, "open", fake_open, raising=False)
    assert memory.available_bytes("cpu") == 3000000 * 1024  # kB are KiB
    fake.write_text("MemTotal:       8000000 kB\n")  # an old kernel without MemAvailable: no check
    assert memory.available_bytes("cpu") is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (777, 1000))  # (free, total)
    assert memory.available_bytes("cuda:0") == 777
    assert memory.available_bytes("meta") is None  # neither CPU nor CUDA: unknown


def test_memory_estimate_grows_with_the_input():
    small = memory.attribute_bytes([memory.BlockShape(2, 1, 4, 10, 10, 64)], heads=False, max_chunk_bytes=0)
    big = memory.attribute_bytes([memory.BlockShape(2, 1, 4, 1000, 1000, 64)], heads=True, max_chunk_bytes=0)
    # results alone: layers + rollout [1, 2, 1000, 1001] and heads [1, 2, 4, 1000, 1001] in float32
    assert big > 4 * (2 * 2 * 1000 * 1001 + 2 * 4 * 1000 * 1001) > small > 0
    # the chunk term is the budget only when a block is large enough to fill it
    tiny = memory.BlockShape(1, 1, 2, 4, 4, 8)
    assert memory.block_working_bytes(tiny, heads=True, max_chunk_bytes=2**28) < 2**16


def test_memory_estimates_by_hand():
    """The estimates against the formulas of lens_alti/alti/memory.py worked out by hand."""
    s = memory.BlockShape(layers=2, batch=1, heads=4, queries=10, keys=10, d_model=64)
    # results per layer: layers + rollout, 2 x [batch 1, queries 10, keys + 1 = 11]; heads=True adds
    # heads [1, 4, 10, 11] and 3 per-receiver numbers [1, 10]; x 2 layers x 4 bytes
    assert memory.block_results_bytes(s, heads=False) == 2 * 220 * 4 == 1760
    assert memory.block_results_bytes(s, heads=True) == 2 * (220 + 440 + 30) * 4 == 5520
    # working set: 2 x pattern [1, 4, 10, 10] + values [1, 4, 10, 64] + 8 receiver vectors [1, 10, 64]
    # + output [1, 10, 11] x (1, or heads + 1 = 5), x 4 bytes; plus one kernel chunk
    # queries 10 x keys 10 x (heads + 2 = 6) x d_model 64 x 4 bytes = 153600, capped at max_chunk_bytes
    assert memory.block_working_bytes(s, heads=False, max_chunk_bytes=0) == (800 + 2560 + 5120 + 110) * 4 == 34360
    assert memory.block_working_bytes(s, heads=True, max_chunk_bytes=0) == (800 + 2560 + 5120 + 550) * 4 == 36120
    assert memory.block_working_bytes(s, heads=True, max_chunk_bytes=2**28) == 36120 + 153600
    assert memory.block_working_bytes(s, heads=True, max_chunk_bytes=1000) == 36120 + 1000
    assert memory.attribute_bytes([s], heads=False, max_chunk_bytes=0) == 1760 + 34360
    assert memory.attribute_bytes([s], heads=True, max_chunk_bytes=2**28) == 5520 + 36120 + 153600
    # several block kinds: every kind's results, the largest working set, plus extra results
    big = memory.BlockShape(layers=1, batch=2, heads=2, queries=3, keys=700, d_model=8)
    # results [2, 3, 701] x 2 = 8412; working 2 x 8400 + 22400 + 384 + 4206 = 43790 elements,
    # chunk 3 x min(700, 512) x 4 x 8 x 4 bytes = 196608
    assert memory.block_working_bytes(big, heads=False, max_chunk_bytes=2**28) == 43790 * 4 + 196608
    assert memory.attribute_bytes([s, big], heads=False, max_chunk_bytes=2**28, extra_results=5) == (
        1760 + 8412 * 4 + 43790 * 4 + 196608 + 5
    )
    assert memory.attribute_bytes([s], heads=False, max_chunk_bytes=0, element_size=2) == (1760 + 34360) // 2
    assert memory.attribute_bytes([], heads=True, max_chunk_bytes=0) == 0
    # forward pass: per layer 2 x heads 4 x pos² 25 + pos 5 x (12 x d_model 8 + 2 x d_mlp 16) = 840,
    # x 3 layers, plus logits pos 5 x d_vocab 10, x batch 2 x 4 bytes
    got = memory.forward_cache_bytes(2, 5, n_layers=3, n_heads=4, d_model=8, d_mlp=16, d_vocab=10)
    assert got == 2 * (3 * 840 + 50) * 4 == 20560


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
