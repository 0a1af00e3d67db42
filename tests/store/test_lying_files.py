"""Files that disagree with the manifest are errors, not data: opening a shard checks its
datasets (dtype, shape, rows, chunks) against the manifest, a read checks each chunk's CRC-32
before it is decoded, a chunk HDF5 cannot decode is a StoreError, and ``verify`` finds all
of it."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from lightning_llm_inst.store import ActivationStore, StoreError, StoreWriter

ROWS = 3 * 64


def _store(path: Path, codec: str = "none") -> np.ndarray:
    x = np.arange(ROWS * 12, dtype=np.float32).reshape(ROWS, 12)
    with StoreWriter(path, codec=codec, shard_size="7KB", chunk_size="512B") as w:
        for i in range(3):
            w.append({"h": x[64 * i : 64 * (i + 1)]}, tokens={"seq": np.full(64, i, np.int64)})
    return x


def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _flip_chunk_byte(shard: Path, dataset: str, chunk: int, at: int | None = None) -> None:
    """Invert one byte of a stored chunk (default: its middle byte) in place."""
    with h5py.File(shard, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    pos = info.byte_offset + (info.size // 2 if at is None else at)
    with open(shard, "r+b") as fh:
        fh.seek(pos)
        b = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("edit, words", [
    (lambda m: m["hooks"]["h"].update(dtype="int32"), "/activations/h dtype is float32, the manifest says int32"),
    (lambda m: m["hooks"]["h"].update(shape=[6, 2]), "/activations/h shape is (128, 12), the manifest says (128, 6, 2)"),
    (lambda m: m["hooks"]["h"].update(chunk_rows=5), "/activations/h chunks are (10, 12), the manifest says (5, 12)"),
    (lambda m: (m["shards"][0].update(rows=120), m.update(rows=ROWS - 8)),
     "rows attribute is 128, the manifest says 120"),
    (lambda m: m["tokens"]["seq"].update(dtype="int32"), "/tokens/seq dtype is int64, the manifest says int32"),
], ids=["dtype", "shape", "chunks", "rows", "token-dtype"])
def test_a_shard_that_disagrees_with_the_manifest_is_an_error_on_read(tmp_path, edit, words):
    path = tmp_path / "s"
    _store(path)
    _edit_manifest(path, edit)
    store = ActivationStore(path)  # the manifest itself is well formed
    with pytest.raises(StoreError) as err:
        store["h"][:10]
    msg = str(err.value)
    assert msg.startswith("shard 'shard-000000.h5' does not match the manifest: ") and words in msg, msg
    assert "\n" not in msg
    report = store.verify()
    assert not report.ok and any(words in p for p in report.problems), report.problems


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
def test_a_damaged_chunk_is_an_error_on_read_not_garbage(tmp_path, codec):
    path = tmp_path / "s"
    x = _store(path, codec)
    shard = path / "shard-000000.h5"
    with h5py.File(shard, "r") as f:
        chunk_rows = f["activations/h"].chunks[0]
    _flip_chunk_byte(shard, "activations/h", 2)
    store = ActivationStore(path)
    damaged = slice(2 * chunk_rows, 3 * chunk_rows)
    for read in (lambda: store["h"][damaged], lambda: store["h"][[0, 2 * chunk_rows + 1]],
                 lambda: next(iter(store["h"].iter_chunks(ROWS)))):
        with pytest.raises(StoreError) as err:
            read()
        msg = str(err.value)
        assert f"shard 'shard-000000.h5': /activations/h chunk 2 (rows {2 * chunk_rows}..{3 * chunk_rows - 1}) " \
               f"fails its CRC-32 check" in msg, msg
    # the undamaged chunks and shards still read back exactly
    assert np.array_equal(store["h"].numpy(slice(0, 2 * chunk_rows)), x[: 2 * chunk_rows])
    assert np.array_equal(store["h"].numpy(slice(128, ROWS)), x[128:])
    assert np.array_equal(store.tokens["seq"].numpy(slice(None)), np.repeat(np.arange(3), 64))
    report = store.verify()
    assert report.problems == ["shard-000000.h5: /activations/h chunk 2 (rows 20..) fails its CRC32 check"]


def test_a_chunk_hdf5_cannot_decode_is_a_store_error(tmp_path):
    path = tmp_path / "s"
    _store(path, "zstd")
    _flip_chunk_byte(path / "shard-000000.h5", "activations/h", 1, at=0)  # the zstd frame's magic number
    store = ActivationStore(path, check_chunks=False)  # no checksum check: HDF5's filter meets the damage
    with pytest.raises(StoreError, match=r"shard 'shard-000000.h5': /activations/h rows 10..19 cannot be decoded: "):
        store["h"][10:20]
    with pytest.raises(StoreError, match=r"/activations/h rows 10..19 cannot be decoded"):
        store["h"][[12]]


def test_a_missing_dataset_is_named(tmp_path):
    path = tmp_path / "s"
    _store(path)
    with h5py.File(path / "shard-000001.h5", "r+") as f:
        del f["tokens/seq"]
    store = ActivationStore(path)
    assert store["h"][:10].shape == (10, 12)  # shard 0 is fine
    with pytest.raises(StoreError, match=r"shard 'shard-000001.h5' does not match the manifest: dataset /tokens/seq "
                                         r"is missing"):
        store["h"][-1]
