"""Zero-copy writes: chunks compressed where they lie in the caller's memory give the same
files as the copying path, and every ``release`` callback runs exactly once, after the last
read of that memory."""

from __future__ import annotations

import errno
import threading
import time

import h5py
import hdf5plugin  # noqa: F401 - registers the lz4 / zstd filters for plain h5py reads
import numpy as np
import pytest
import torch

from lightning_llm_inst.store import ActivationStore, StoreWriteError, StoreWriter
from lightning_llm_inst.store import shard as shard_mod

HOOK = "blocks.0.hook_resid_post"
FEATURE = (3, 16)  # F = 48
CHUNK = "1KiB"


class Releases:
    """One counter per add; ``release(poison=buf)`` also overwrites ``buf`` when called, as a
    caller reusing its memory would, so a read after the release shows up in the file."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self._lock = threading.Lock()

    def make(self, poison: np.ndarray | None = None):
        i = len(self.counts)
        self.counts.append(0)

        def release() -> None:
            with self._lock:
                self.counts[i] += 1
            if poison is not None:
                poison[...] = 0xA5

        return release

    def all_once(self) -> bool:
        return all(c == 1 for c in self.counts)


def _rows(seed: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *FEATURE, generator=g) * (1 + seed % 5)).to(dtype)


def _bits(x: torch.Tensor) -> np.ndarray:
    """Rows in their storage dtype, ``[n, *FEATURE]``."""
    return x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy()


def _grouped(x: torch.Tensor, group_rows: int) -> np.ndarray:
    """Byte planes per group of ``group_rows`` rows, one group after another (flat uint8)."""
    bits = np.ascontiguousarray(_bits(x))
    n, itemsize = bits.shape[0], bits.itemsize
    raw = bits.view(np.uint8).reshape(n, -1)  # [n, F * itemsize]
    groups = [raw[s : s + group_rows].reshape(-1, itemsize).T.reshape(-1) for s in range(0, n, group_rows)]
    return np.concatenate(groups) if groups else np.empty(0, np.uint8)


def _row_bytes(dtype: torch.dtype) -> int:
    return int(np.prod(FEATURE)) * torch.empty((), dtype=dtype).element_size()


def _plan(r: int) -> list[list[tuple[int, int]]]:
    """Batches as parts of (rows, group_rows): the first batch defines the schema (staged);
    then aligned parts, a partial last group, a misaligned start (copied until a chunk is
    full again), a different group size, and a shard boundary now and then."""
    return [
        [(3 * r, r)],
        [(2 * r, r)],
        [(r, r), (2 * r + 3, r)],
        [(2 * r, r)],  # starts 3 rows into a chunk: copied
        [(r - 3, r), (2 * r, r)],  # realigned by the first part, then zero-copy again
        [(2 * r, r - 1)],  # groups that are not chunks: copied
        [(5, r)],
        [(4 * r, r)],
    ] * 3


def _write(path, codec: str, dtype: torch.dtype, packed: bool, zero_copy: bool,
           releases: Releases | None = None) -> tuple[StoreWriter, np.ndarray]:
    r = 1024 // _row_bytes(dtype)
    w = StoreWriter(path, codec=codec, chunk_size=CHUNK, shard_size=15 * r * _row_bytes(dtype), num_workers=3)
    want = []
    seed = 0
    for batch in _plan(r):
        w.begin_batch(sum(n for n, _ in batch))
        for n, group_rows in batch:
            seed += 1
            x = _rows(seed, n, dtype)
            want.append(_bits(x).copy())  # x itself is overwritten on release
            release = None
            if packed:
                buf = _grouped(x, group_rows)  # a fresh buffer per part, overwritten on release
                if zero_copy:
                    release = releases.make(poison=buf)
                w.add_packed(HOOK, torch.from_numpy(buf), str(dtype).removeprefix("torch."), FEATURE,
                             group_rows=group_rows, release=release)
            else:
                if zero_copy:
                    release = releases.make(poison=x.view(torch.uint8).numpy())
                w.add(HOOK, x, release=release)
        w.end_batch()
        assert w.chunk_rows(HOOK) == r
    return w, np.concatenate(want)


def _chunks(path) -> dict:
    """Every stored chunk's filter mask and bytes, per shard and offset; and the row counts."""
    found = {}
    for shard in sorted(path.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            ds = f[f"activations/{HOOK}"]
            for i in range(ds.id.get_num_chunks()):
                off = ds.id.get_chunk_info(i).chunk_offset
                found[(shard.name, off)] = ds.id.read_direct_chunk(off)
            found[(shard.name, "rows")] = int(f.attrs["rows"])
    return found


def _plain_h5py(path) -> np.ndarray:
    """The hook's rows as plain h5py + hdf5plugin decode them (HDF5's own filter pipeline)."""
    parts = []
    for shard in sorted(path.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            parts.append(f[f"activations/{HOOK}"][()])
    return np.concatenate(parts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("codec, packed", [
    ("zstd:1", True), ("lz4", True), ("none+shuffle", True),  # byte planes given, stored as they lie
    ("zstd:1-noshuffle", False), ("lz4", False), ("none", False),  # row-major rows (lz4: shuffled by a worker)
])
def test_zero_copy_writes_the_same_chunks_as_copying(tmp_path, codec, packed, dtype):
    releases = Releases()
    fast, want = _write(tmp_path / "fast", codec, dtype, packed, zero_copy=True, releases=releases)
    fast.flush()
    stats = fast.stats()
    fast.close()
    copied, _ = _write(tmp_path / "copy", codec, dtype, packed, zero_copy=False)
    copied.close()
    assert releases.all_once() and len(releases.counts) == 3 * 10
    assert stats["zero_copy_chunks"] > 0 and stats["jobs"] > 0 and stats["copied_chunks"] > 0
    assert stats["buffered_bytes"] == 0  # what the jobs held is given back
    a, b = _chunks(tmp_path / "fast"), _chunks(tmp_path / "copy")
    assert len(a) > 40 and a == b
    store = ActivationStore(tmp_path / "fast")
    assert store.verify().ok and store.num_shards > 3
    assert np.array_equal(_plain_h5py(tmp_path / "fast"), want)
    got = store[HOOK][:]
    assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else got.numpy(),
                          want)


def test_aligned_adds_copy_nothing(tmp_path):
    r = 1024 // _row_bytes(torch.bfloat16)
    releases = Releases()
    with StoreWriter(tmp_path / "s", chunk_size=CHUNK, num_workers=2) as w:
        for i in range(-1, 3):  # the first batch defines the schema: through chunk buffers
            if i == 0:
                before = w.stats()
            w.begin_batch(4 * r)
            w.add_packed(HOOK, _grouped(_rows(i + 1, 4 * r, torch.bfloat16), r), "bfloat16", FEATURE, group_rows=r,
                         release=releases.make())
            w.end_batch()
        for i, planes in enumerate([lambda g: g.reshape(2, -1), lambda g: g]):  # one chunk as one group
            w.begin_batch(r)
            w.add_packed(HOOK, planes(_grouped(_rows(10 + i, r, torch.bfloat16), r)), "bfloat16", FEATURE,
                         release=releases.make())
            w.end_batch()
        after = w.stats()
    assert before["copied_chunks"] == 4 and before["zero_copy_chunks"] == 0
    assert after["copied_chunks"] == 4 and after["zero_copy_chunks"] == 14 and after["jobs"] == 5
    assert releases.all_once()
    store = ActivationStore(tmp_path / "s")
    assert store.rows == 18 * r
    want = torch.cat([_rows(i, 4 * r, torch.bfloat16) for i in range(4)] + [_rows(10, r, torch.bfloat16),
                                                                           _rows(11, r, torch.bfloat16)])
    assert torch.equal(store[HOOK][:].view(torch.int16), want.view(torch.int16))


def test_release_is_called_once_for_dropped_and_rejected_adds(tmp_path):
    r = 1024 // _row_bytes(torch.bfloat16)
    releases = Releases()
    w = StoreWriter(tmp_path / "s", chunk_size=CHUNK, on_full="drop", max_buffer_bytes="4MiB", num_workers=1)
    w.append({HOOK: _rows(0, r, torch.bfloat16)})
    assert not w.begin_batch(10**7)  # more than the writer may hold: dropped
    w.add_packed(HOOK, _grouped(_rows(1, r, torch.bfloat16), r), "bfloat16", FEATURE, group_rows=r,
                 release=releases.make())
    w.add(HOOK, _rows(2, r, torch.bfloat16), release=releases.make())
    assert releases.counts == [1, 1]  # at once, on this thread
    w.end_batch()
    w.begin_batch(r)
    x = _grouped(_rows(3, r, torch.bfloat16), r)
    with pytest.raises(ValueError, match="group_rows must be None or a positive integer, got 0"):
        w.add_packed(HOOK, x, "bfloat16", FEATURE, group_rows=0, release=releases.make())
    with pytest.raises(ValueError, match=r"hold 95 bytes, not a whole number of bfloat16 \(3, 16\) rows of 96 bytes"):
        w.add_packed(HOOK, x[:95], "bfloat16", FEATURE, group_rows=r, release=releases.make())
    with pytest.raises(ValueError, match="must be one C-contiguous buffer"):
        w.add_packed(HOOK, x.reshape(2, -1)[:, ::2], "bfloat16", FEATURE, group_rows=r, release=releases.make())
    with pytest.raises(ValueError, match=f"has {2 * r} rows; the batch has {r}"):
        w.add_packed(HOOK, np.concatenate([x, x]), "bfloat16", FEATURE, group_rows=r, release=releases.make())
    with pytest.raises(TypeError, match="release must be None or a zero-argument callable, got int"):
        w.add(HOOK, _rows(3, r, torch.bfloat16), release=3)
    assert releases.counts == [1] * 6
    w.add_packed(HOOK, x, "bfloat16", FEATURE, group_rows=r, release=releases.make())
    w.end_batch()
    w.close()
    assert releases.all_once()
    assert ActivationStore(tmp_path / "s").rows == 2 * r


def test_writer_failure_still_releases_every_add(tmp_path, monkeypatch):
    calls = [0]
    real = shard_mod.OpenShard.write_chunks

    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(shard_mod.OpenShard, "write_chunks", failing)
    r = 1024 // _row_bytes(torch.bfloat16)
    releases = Releases()
    w = StoreWriter(tmp_path / "s", chunk_size=CHUNK, num_workers=2)
    with pytest.raises(StoreWriteError, match="No space left on device"):
        for i in range(200):  # every other batch starts on a chunk boundary: a job and a copied tail
            n = 3 * r + r // 2
            w.begin_batch(n)
            w.add_packed(HOOK, _grouped(_rows(i, n, torch.bfloat16), r), "bfloat16", FEATURE, group_rows=r,
                         release=releases.make())
            w.end_batch()
            time.sleep(0.002)
    with pytest.raises(StoreWriteError):
        w.close()
    assert calls[0] > 2 and releases.all_once()
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_release_after_an_aborted_batch_with_jobs_in_flight(tmp_path, monkeypatch):
    real = shard_mod.OpenShard.write_chunks
    written = threading.Event()

    def slow(self, *args, **kwargs):
        time.sleep(0.01)
        real(self, *args, **kwargs)
        written.set()

    monkeypatch.setattr(shard_mod.OpenShard, "write_chunks", slow)
    r = 1024 // _row_bytes(torch.bfloat16)
    releases = Releases()
    good = [_rows(i, 2 * r + 5, torch.bfloat16) for i in range(4)]
    with StoreWriter(tmp_path / "s", chunk_size=CHUNK, num_workers=2) as w:
        w.append({HOOK: good[0]})
        w.begin_batch(3 * r + 5)  # starts 5 rows into a chunk: the first part realigns, the next is a job
        w.add(HOOK, _rows(99, r - 5, torch.bfloat16), release=releases.make())
        w.add(HOOK, _rows(98, 2 * r + 10, torch.bfloat16), release=releases.make())
        assert w.stats()["jobs"] == 1
        w.abort_batch()  # the job's chunks are written, then cut off
        for x in good[1:]:
            w.begin_batch(x.shape[0])
            w.add(HOOK, x, release=releases.make())
            w.end_batch()
    assert written.is_set() and releases.all_once()
    store = ActivationStore(tmp_path / "s")
    assert store.verify().ok
    assert torch.equal(store[HOOK][:].view(torch.int16), torch.cat(good).view(torch.int16))


def test_a_failing_release_becomes_the_writer_error(tmp_path, caplog):
    r = 1024 // _row_bytes(torch.bfloat16)

    def broken() -> None:
        raise RuntimeError("ring slot already free")

    w = StoreWriter(tmp_path / "s", chunk_size=CHUNK, num_workers=1)
    w.append({HOOK: _rows(0, r, torch.bfloat16)})
    w.begin_batch(2 * r)
    w.add_packed(HOOK, _grouped(_rows(1, 2 * r, torch.bfloat16), r), "bfloat16", FEATURE, group_rows=r,
                 release=broken)
    with pytest.raises(StoreWriteError, match="release callback given with hook point .* raised RuntimeError: ring "
                                              "slot already free"):
        w.end_batch()
        w.flush()
    with pytest.raises(StoreWriteError, match="ring slot already free"):
        w.close()
    assert "ring slot already free" in caplog.text
