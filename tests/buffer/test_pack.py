"""The pack step and the rings: bytes, order, alignment, waiting."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lightning_llm_inst.buffer.pack import pack_rows_torch
from lightning_llm_inst.buffer.ring_buffer import ALIGN, ByteRing
from lightning_llm_inst.store.codecs import shuffle_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _reference(x: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype, shuffle: bool) -> bytes:
    rows = x.reshape(x.shape[0], -1)
    if index is not None:
        rows = rows[index]
    raw = rows.to(dtype).contiguous().view(torch.uint8).numpy()
    return shuffle_bytes(raw, rows.to(dtype).element_size()).tobytes() if shuffle else raw.tobytes()


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("shuffle", [False, True])
def test_pack_torch_bytes(in_dtype, out_dtype, shuffle):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 37, 45, generator=g) * 100).to(in_dtype).reshape(111, 45)
    index = torch.tensor([0, 5, 6, 7, 50, 110])
    itemsize = torch.empty((), dtype=out_dtype).element_size()
    out = torch.empty(6 * 45 * itemsize, dtype=torch.uint8)
    view = pack_rows_torch(x, index, out_dtype, out, shuffle)
    assert out.numpy().tobytes() == _reference(x, index, out_dtype, shuffle)
    assert view.shape == ((itemsize, 6 * 45) if shuffle else (6 * 45 * itemsize,))


def _grouped_reference(x: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype, group: int) -> bytes:
    """Each group of ``group`` rows shuffled on its own, the groups one after another."""
    rows = x.reshape(x.shape[0], -1)
    if index is not None:
        rows = rows[index]
    rows = rows.to(dtype).contiguous()
    return b"".join(_reference(rows[a : a + group], None, dtype, True) for a in range(0, rows.shape[0], group))


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 5, 6, 111, 500])
def test_pack_torch_groups_are_chunks_shuffled_one_by_one(out_dtype, group):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(111, 12, generator=g) * 10).to(torch.bfloat16)
    index = torch.nonzero(torch.rand(111, generator=g) > 0.4).squeeze(1)  # 60-odd rows: a partial last group
    for idx in (index, None):
        n = (idx.numel() if idx is not None else 111) * 12 * out_dtype.itemsize
        out = torch.full((n,), 0xAB, dtype=torch.uint8)
        pack_rows_torch(x, idx, out_dtype, out, True, group_rows=group)
        assert out.numpy().tobytes() == _grouped_reference(x, idx, out_dtype, group)
    with pytest.raises(ValueError, match="group_rows must be None or a positive integer, got 0"):
        pack_rows_torch(x, None, out_dtype, torch.empty(111 * 12 * out_dtype.itemsize, dtype=torch.uint8), True,
                        group_rows=0)


def test_pack_torch_noncontiguous_all_rows_and_empty():
    x = torch.randn(64, 40).t()  # [40, 64], strided
    out = torch.empty(40 * 64 * 2, dtype=torch.uint8)
    pack_rows_torch(x, None, torch.bfloat16, out, True)
    assert out.numpy().tobytes() == _reference(x.contiguous(), None, torch.bfloat16, True)
    empty = torch.empty(0, dtype=torch.uint8)
    pack_rows_torch(x, torch.empty(0, dtype=torch.long), torch.float16, empty, True)
    with pytest.raises(ValueError, match="out must be uint8 with 10 bytes"):
        pack_rows_torch(x[:1, :5], None, torch.float16, torch.empty(3, dtype=torch.uint8), False)


def test_ring_is_fifo_aligned_and_wraps():
    ring = ByteRing(torch.empty(4096, dtype=torch.uint8), "test ring")
    a = ring.alloc(1000)
    b = ring.alloc(1000)
    c = ring.alloc(1500)
    assert [s.offset % ALIGN for s in (a, b, c)] == [0, 0, 0]
    assert ring.alloc(1000, block=False) is None  # 1024 + 1024 + 1536 used, 512 left
    ring.free(a)
    d = ring.alloc(1000)  # wraps to the start
    assert d.offset == 0
    ring.free(c)  # out of order: kept until b is free
    assert ring.alloc(1500, block=False) is None
    assert ring.used == 1024 + 1536 + 512 + 1024  # b, c, the end d skipped, d: the whole ring
    ring.free(b)
    assert ring.used == 1024  # only d: the end it skipped is free again, as the tail is at d
    e = ring.alloc(3072)  # the rest of the ring, the skipped end included
    assert e.offset == 1024 and ring.used == ring.capacity == 4096 and ring.peak <= ring.capacity
    with pytest.raises(RuntimeError, match="not live"):
        ring.free(c)
    ring.free(d)
    ring.free(e)
    assert ring.used == 0
    with pytest.raises(ValueError, match="5000 bytes asked of a ring of 4096"):
        ring.alloc(5000)


def test_ring_accounting_equals_the_bytes_it_cannot_give_out():
    """Under random allocations and out-of-order frees, ``used`` is exactly the part of the ring
    that is not free for the next allocation (a naive reference from the live slices' positions),
    so it never exceeds the capacity."""
    import random

    rng = random.Random(0)
    cap = 64 * ALIGN
    ring = ByteRing(torch.empty(cap, dtype=torch.uint8), "test ring")
    live: list = []
    for _ in range(5000):
        if live and (rng.random() < 0.45 or len(live) > 12):
            ring.free(live.pop(rng.randrange(len(live))))
        else:
            s = ring.alloc(rng.randint(1, 20 * ALIGN), block=False)
            if s is not None:
                live.append(s)
        held = [x for x in ring._live]  # FIFO: oldest first, freed-early ones included
        if not held:
            expected = 0
        else:
            tail, head = held[0].offset, ring._head
            expected = head - tail if head > tail else cap - tail + head
        assert ring.used == expected <= cap
        assert ring.peak <= cap


def test_ring_waits_for_room_and_counts_the_wait():
    ring = ByteRing(torch.empty(1024, dtype=torch.uint8), "test ring")
    first = ring.alloc(1024)
    got = []
    t = threading.Thread(target=lambda: got.append(ring.alloc(512)))
    t.start()
    time.sleep(0.1)
    assert not got and ring.waited_s > 0.05  # a wait in progress counts
    ring.free(first)
    t.join(timeout=5)
    assert got and got[0].offset == 0


def test_ring_wakes_waiters_with_the_consumers_error():
    ring = ByteRing(torch.empty(256, dtype=torch.uint8), "test ring")
    ring.alloc(256)
    errors = []

    def wait():
        try:
            ring.alloc(256)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.05)
    ring.fail(RuntimeError("disk full"))
    t.join(timeout=5)
    assert [str(e) for e in errors] == ["disk full"]
