"""What is written reads back bit for bit: with our reader and with plain h5py + hdf5plugin."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lightning_llm_inst.store import ActivationStore, StoreWriter

CODECS = ["none", "lz4", "zstd", "zstd:1-noshuffle", "lz4-noshuffle"]

# Reads a store with nothing but h5py + hdf5plugin + numpy + json, and saves every dataset.
PLAIN_READER = r"""
import json, sys, h5py, hdf5plugin, numpy as np
root = sys.argv[1]
m = json.load(open(root + "/manifest.json"))
out = {}
for sh in m["shards"]:
    with h5py.File(root + "/" + sh["file"], "r") as f:
        for group in ("activations", "tokens"):
            for name, ds in f[group].items():
                a = ds[()]
                if ds.attrs.get("dtype") == "bfloat16":
                    assert a.dtype == np.uint16
                out.setdefault(group + "/" + name, []).append(a)
np.savez(sys.argv[2], **{k.replace("/", "|"): np.concatenate(v) for k, v in out.items()})
assert "lightning_llm_inst" not in sys.modules
"""


def _bits(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _special_values(dtype: torch.dtype, d: int) -> torch.Tensor:
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-8, -3.5, 65504.0], dtype=torch.float32)
    return x.repeat(d // 8 + 1)[:d].to(dtype)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_plain_h5py_reads_every_bit(tmp_path, codec, dtype, batch_factory):
    path = tmp_path / "store"
    batches = [batch_factory(i, rows, dtype=dtype) for i, rows in enumerate([300, 0, 1, 517, 64])]
    batches[2]["acts"]["blocks.0.hook_resid_post"][0] = _special_values(dtype, 48)
    with StoreWriter(path, codec=codec, shard_size="40KB", chunk_size="4KiB") as w:
        for b in batches:
            w.append(b["acts"], tokens=b["tokens"])
    out = tmp_path / "plain.npz"
    subprocess.run([sys.executable, "-c", PLAIN_READER, str(path), str(out)], check=True)
    got = np.load(out)
    manifest = json.loads((path / "manifest.json").read_text())
    assert len(manifest["shards"]) > 1
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"):
        want = np.concatenate([_bits(b["acts"][hook]) for b in batches])
        have = got[f"activations|{hook}"]
        assert have.shape == want.shape and have.tobytes() == want.tobytes()
    for name in ("input_ids", "sequence_id", "position"):
        want = np.concatenate([b["tokens"][name].numpy() for b in batches])
        assert np.array_equal(got[f"tokens|{name}"], want)
    # and through our reader, in the stored dtype
    store = ActivationStore(path)
    full = store["blocks.0.hook_resid_post"][:]
    assert full.dtype == dtype
    want = torch.cat([b["acts"]["blocks.0.hook_resid_post"] for b in batches])
    assert _bits(full).tobytes() == _bits(want).tobytes()


def test_reader_slices_gathers_and_iterates(tmp_path, batch_factory):
    path = tmp_path / "store"
    batches = [batch_factory(i, 97 + 13 * i) for i in range(12)]
    with StoreWriter(path, codec="zstd:1", shard_size="64KB", chunk_size="2KiB") as w:
        for b in batches:
            w.append(b["acts"], tokens=b["tokens"])
    hook = "blocks.1.hook_mlp_out"
    want = torch.cat([b["acts"][hook] for b in batches])
    store = ActivationStore(path)
    view = store[hook]
    assert store.num_shards > 2
    assert view.shape == tuple(want.shape) and view.dtype == torch.bfloat16 and len(view) == len(want)
    assert torch.equal(view[5], want[5]) and torch.equal(view[-1], want[-1])
    assert torch.equal(view[100:1000], want[100:1000])
    assert torch.equal(view[::7], want[::7])
    idx = torch.randint(0, len(want), (500,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(view[idx], want[idx])  # unsorted, with repeats
    assert torch.equal(view[[3, 2, 1]], want[[3, 2, 1]])
    assert torch.equal(torch.cat(list(view.iter_chunks(333))), want)
    assert torch.equal(torch.cat(list(view)), want)
    seq = torch.cat([b["tokens"]["sequence_id"] for b in batches])
    assert torch.equal(store.tokens["sequence_id"][:], seq)
    assert view[0:0].shape == (0, 3, 5)
    with pytest.raises(IndexError):
        view[len(want)]
    with pytest.raises(KeyError, match="hook point 'nope' is not in the store.*blocks.0.hook_resid_post"):
        store["nope"]


def test_batch_sampler_covers_every_row_once_per_epoch(tmp_path, batch_factory):
    path = tmp_path / "store"
    with StoreWriter(path, codec="lz4", shard_size="50KB", chunk_size="1KiB") as w:
        for i in range(10):
            b = batch_factory(i, 211)
            w.append(b["acts"], tokens=b["tokens"])
    store = ActivationStore(path)
    sampler = store.batch_sampler(64, buffer_chunks=3, seed=1)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == -(-2110 // 64)
    assert all(len(b) == 64 for b in epoch0[:-1])
    assert sorted(i for b in epoch0 for i in b) == list(range(2110))
    assert [i for b in epoch0 for i in b] != list(range(2110))  # shuffled
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    # per-rank halves are disjoint and cover everything
    halves = [sorted(i for b in store.batch_sampler(50, rank=r, world_size=2) for i in b) for r in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == list(range(2110))
    # reading a batch returns the right rows
    batch = epoch0[0]
    assert torch.equal(store["blocks.0.hook_resid_post"][batch], store["blocks.0.hook_resid_post"][:][batch])


def test_numpy_and_noncontiguous_and_bool_and_int_inputs(tmp_path):
    path = tmp_path / "store"
    base = torch.arange(40 * 12, dtype=torch.float32).reshape(40, 12)
    noncontig = base.t().contiguous().t()[:, ::2]  # strided view
    assert not noncontig.is_contiguous()
    with StoreWriter(path, codec="zstd") as w:
        w.append({"a": noncontig, "b": np.arange(40, dtype=np.int16)[:, None], "c": torch.rand(40, 2) > 0.5})
    store = ActivationStore(path)
    assert torch.equal(store["a"][:], noncontig)
    assert store["b"][:].dtype == torch.int16 and torch.equal(store["b"][:, 0], torch.arange(40, dtype=torch.int16))
    assert torch.equal(store["a"][3:9, 1:4], noncontig[3:9, 1:4]) and torch.equal(store["a"][2, 5], noncontig[2, 5])
    assert store["c"][:].dtype == torch.bool
