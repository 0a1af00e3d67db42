"""Shards written by a child process (``StoreWriter(shard_process=True)``): the same files, the
same errors."""

from __future__ import annotations

import errno

import h5py
import numpy as np
import pytest

from lightning_llm_inst.store import ActivationStore, StoreWriteError, StoreWriter


def _write(path, shard_process: bool, codec: str, batches) -> None:
    with StoreWriter(path, codec=codec, shard_size="40KB", chunk_size="4KiB", shard_process=shard_process) as w:
        for acts, tokens in batches:
            w.append(acts, tokens=tokens)


def _batches(n: int = 12, rows: int = 37):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        acts = {"blocks.0.hook_resid_post": rng.standard_normal((rows, 48)).astype(np.float32),
                "blocks.1.hook_mlp_out": rng.standard_normal((rows, 20)).astype(np.float16)}
        out.append((acts, {"input_ids": np.arange(i * rows, (i + 1) * rows)}))
    return out


def _chunks(path):
    """Every stored chunk's bytes and filter mask, per shard and dataset."""
    found = {}
    for shard in sorted(path.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            def visit(name, obj, shard=shard):
                if isinstance(obj, h5py.Dataset) and obj.chunks is not None:
                    for i in range(obj.id.get_num_chunks()):
                        info = obj.id.get_chunk_info(i)
                        found[(shard.name, name, info.chunk_offset)] = obj.id.read_direct_chunk(info.chunk_offset)
            f.visititems(visit)
            found[(shard.name, "rows")] = int(f.attrs["rows"])
    return found


@pytest.mark.parametrize("codec", ["zstd:1", "lz4", "none"])
def test_same_chunks_as_the_writer_thread(tmp_path, codec):
    batches = _batches()
    _write(tmp_path / "thread", False, codec, batches)
    _write(tmp_path / "process", True, codec, batches)
    a, b = _chunks(tmp_path / "thread"), _chunks(tmp_path / "process")
    assert len(a) > 10 and a == b
    store = ActivationStore(tmp_path / "process")
    assert store.verify().ok
    got = store["blocks.0.hook_resid_post"][:].numpy()
    assert np.array_equal(got, np.concatenate([x["blocks.0.hook_resid_post"] for x, _ in batches]))


def test_aborted_batches_roll_back(tmp_path):
    rng = np.random.default_rng(1)
    with StoreWriter(tmp_path / "s", codec="zstd", shard_size="40KB", chunk_size="2KiB", shard_process=True) as w:
        kept = []
        for i in range(10):
            x = rng.standard_normal((30, 32)).astype(np.float32)
            w.begin_batch(30, tokens={"input_ids": np.arange(30)})
            w.add("h", x)
            if i % 3 == 1:
                w.abort_batch()
            else:
                w.end_batch()
                kept.append(x)
    store = ActivationStore(tmp_path / "s")
    assert np.array_equal(store["h"][:].numpy(), np.concatenate(kept))
    assert store.verify().ok


def test_a_dead_shard_process_is_an_error_in_the_callers_thread(tmp_path):
    w = StoreWriter(tmp_path / "s", codec="zstd", shard_size="40KB", chunk_size="4KiB", shard_process=True)
    batches = _batches(30)
    w.append(*batches[0])
    w.flush()
    w._shard_process._proc.kill()  # the child dies (e.g. killed by the OOM killer)
    with pytest.raises(StoreWriteError) as err:
        for acts, tokens in batches[1:]:
            w.append(acts, tokens=tokens)
        w.close()
    assert err.value.errno in (errno.EPIPE, None) or isinstance(err.value.__cause__, OSError)
    try:
        w.close()
    except StoreWriteError:
        pass
    store = ActivationStore(tmp_path / "s")  # what was committed before stays readable
    assert store.verify().ok


def test_a_failing_hdf5_call_names_the_shard(tmp_path, monkeypatch):
    from lightning_llm_inst.store import shard_process as sp

    real = sp.ProcessShard.__init__

    def bad_dtype(self, directory, index, columns, codec, attrs, process):
        real(self, directory, index, columns, codec, attrs, process)
        process.send({"op": "chunk", "key": "no/such/dataset", "rows": 1, "offset": [0, 0]}, b"x")

    monkeypatch.setattr(sp.ProcessShard, "__init__", bad_dtype)
    w = StoreWriter(tmp_path / "s", codec="zstd", shard_size="40KB", chunk_size="4KiB", shard_process=True)
    with pytest.raises(StoreWriteError, match="shard-000000.h5.tmp"):
        for acts, tokens in _batches(30):
            w.append(acts, tokens=tokens)
        w.close()
