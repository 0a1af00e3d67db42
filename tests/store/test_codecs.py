"""Codecs produce the exact chunk bytes of HDF5's shuffle / LZ4 (32004) / Zstd (32015) filters."""

from __future__ import annotations

import struct

import h5py
import hdf5plugin
import lz4.block
import numpy as np
import pytest
import zstandard

from lightning_llm_inst.store.codecs import Codec, _lz4_decode, make_codec, shuffle_bytes, unshuffle_bytes

DTYPES = ["<u2", "<f4", "<f2", "<i8", "|u1"]


def _data(dtype: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, size=n) * 30
    return x.astype(dtype) if np.dtype(dtype).kind == "f" else rng.integers(0, 200, size=n).astype(dtype)


def _h5_chunk(tmp_path, arr: np.ndarray, **filters) -> bytes:
    """Write ``arr`` as one chunk through HDF5's own pipeline; return the stored bytes."""
    with h5py.File(tmp_path / "ref.h5", "w") as f:
        f.create_dataset("x", data=arr, chunks=arr.shape, **filters)
    with h5py.File(tmp_path / "ref.h5", "r") as f:
        mask, data = f["x"].id.read_direct_chunk((0,))
    assert mask == 0
    return data


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 997, 4096])
def test_shuffle_equals_hdf5_shuffle_filter(tmp_path, dtype, n):
    arr = _data(dtype, n)
    assert shuffle_bytes(arr, arr.itemsize).tobytes() == _h5_chunk(tmp_path, arr, shuffle=True)
    assert unshuffle_bytes(shuffle_bytes(arr, arr.itemsize), arr.itemsize).tobytes() == arr.tobytes()


@pytest.mark.parametrize("dtype", ["<u2", "<f4"])
def test_lz4_chunks_from_hdf5plugin_decode_with_ours(tmp_path, dtype):
    arr = _data(dtype, 5003)
    stored = _h5_chunk(tmp_path, arr, shuffle=True, **hdf5plugin.LZ4(nbytes=4096))
    assert make_codec("lz4").decode(stored, arr.nbytes, arr.itemsize) == arr.tobytes()


@pytest.mark.parametrize("dtype", ["<u2", "<f4"])
def test_zstd_chunks_from_hdf5plugin_decode_with_ours(tmp_path, dtype):
    arr = _data(dtype, 5003)
    stored = _h5_chunk(tmp_path, arr, shuffle=True, **hdf5plugin.Zstd(clevel=5))
    assert make_codec("zstd:5").decode(stored, arr.nbytes, arr.itemsize) == arr.tobytes()


def test_lz4_byte_layout():
    raw = np.arange(3000, dtype="<u2")
    out = Codec("lz4", shuffle=False, block_size=1000).encode(raw, 2)
    orig, block = struct.unpack(">QI", out[:12])
    assert (orig, block) == (6000, 1000)
    pos, blocks = 12, []
    while pos < len(out):
        (size,) = struct.unpack(">I", out[pos : pos + 4])
        blocks.append(out[pos + 4 : pos + 4 + size])
        pos += 4 + size
    assert len(blocks) == 6 and pos == len(out)
    assert b"".join(lz4.block.decompress(b, uncompressed_size=1000) if len(b) < 1000 else b for b in blocks) == raw.tobytes()


def test_lz4_stores_incompressible_blocks_raw():
    raw = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8)
    out = Codec("lz4", shuffle=False).encode(raw, 1)
    assert struct.unpack(">I", out[12:16])[0] == raw.nbytes
    assert out[16:] == raw.tobytes()
    assert _lz4_decode(out) == raw.tobytes()


def test_zstd_frame_carries_content_size():
    raw = _data("<f4", 1000)
    out = make_codec("zstd:1").encode(raw, 4)
    assert zstandard.frame_content_size(out) == raw.nbytes
    assert zstandard.get_frame_parameters(out).content_size == raw.nbytes


@pytest.mark.parametrize("spec", ["none", "none+shuffle", "lz4", "lz4-noshuffle", "zstd", "zstd:1", "zstd:22"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip(spec, dtype):
    c = make_codec(spec)
    raw = _data(dtype, 1531)
    assert c.decode(c.encode(raw, raw.itemsize), raw.nbytes, raw.itemsize) == raw.tobytes()


def test_filters_declared_for_h5py():
    assert make_codec("zstd:7").filters() == [(2, ()), (32015, (7,))]
    assert make_codec("lz4").filters() == [(2, ()), (32004, (0,))]
    assert make_codec(None).filters() == []
    assert make_codec("zstd:2").spec == "zstd:2+shuffle"
    assert make_codec(make_codec("lz4").spec) == make_codec("lz4")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"spec": "gzip"}, "'gzip' is not supported; choose one of: none, lz4, zstd"),
        ({"spec": "zstd:0"}, "level 0 is not valid for zstd; use an integer from 1 to 22"),
        ({"spec": "zstd:23"}, "level 23 is not valid"),
        ({"spec": "zstd:fast"}, "must be an integer, got 'fast'"),
        ({"spec": "lz4", "level": 3}, "'lz4' takes no level"),
        ({"spec": 5}, "codec must be one of"),
    ],
)
def test_bad_codec_errors_name_the_value(kwargs, needle):
    with pytest.raises(ValueError) as err:
        make_codec(**kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize("spec", ["none", "none+shuffle", "lz4", "lz4-noshuffle", "zstd:1", "zstd:3-noshuffle"])
@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_encode_many_equals_encode_of_each(spec, shuffled, threads):
    codec = make_codec(spec)
    if spec == "lz4":
        codec = Codec("lz4", block_size=1000)  # several LZ4 blocks per chunk
    rng = np.random.default_rng(7)
    base = _data("<f4", 12_000)
    raws = [base[:1000], base[1000:4000], base[4000:4000], np.zeros(777, "<f4"), rng.integers(0, 255, 501).astype("u1")]
    raws.append(memoryview(base[5000:9000].view(np.uint8)))  # a buffer, not an array
    got = codec.encode_many(raws, 4, shuffled=shuffled, threads=threads)
    assert len(got) == len(raws)
    for raw, data in zip(raws, got, strict=True):
        want = codec.encode(raw, 4, shuffled=shuffled)
        assert bytes(memoryview(data).cast("B")) == bytes(memoryview(want).cast("B"))
    assert codec.encode_many([], 4, threads=threads) == []
    assert [bytes(d) for d in codec.encode_many([b"", b""], 4)] == [bytes(codec.encode(b"", 4))] * 2


def test_encode_many_without_compression_returns_the_input_memory():
    raw = np.arange(1000, dtype="<u2").view(np.uint8)
    out = Codec("none", shuffle=False).encode_many([raw[:600], raw[600:]], 2)
    assert np.shares_memory(out[0], raw) and np.shares_memory(out[1], raw)
    assert bytes(out[0]) + bytes(out[1]) == raw.tobytes()
