"""The capture pipeline's own mechanics: parallel copies, parts, drop policy."""

from __future__ import annotations

import threading

import torch

from lightning_llm_inst import InstrumentationConfig, InstrumentationFramework
from lightning_llm_inst.store import ActivationStore
from lightning_llm_inst.store import shard as shard_mod
from tests.capture.lightning_job import tiny_llama


def _capture(path, ids, mask, **cfg):
    model = tiny_llama()
    fw = InstrumentationFramework(InstrumentationConfig(granularity="all", **cfg))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(path):
        for _ in range(4):
            model(ids, attention_mask=mask)
    return ActivationStore(path), fw.stats()


def test_parallel_copies_and_split_parts_store_the_same_bytes(tmp_path):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (96, 64), generator=g)
    mask = (torch.rand(96, 64, generator=g) > 0.2).long()
    one, _ = _capture(tmp_path / "one", ids, mask, copy_threads=1)
    # a small host pool splits every hook point's rows into several parts, copied by 4 threads
    many, stats = _capture(tmp_path / "many", ids, mask, copy_threads=4, max_memory_gb=0.017, chunk_size="16KiB")
    assert stats["slices"] > stats["hook_calls"]  # hook points did come in several parts
    assert one.rows == many.rows == 4 * int(mask.sum())
    for hook in one.hooks:
        assert one[hook].numpy(slice(None)).tobytes() == many[hook].numpy(slice(None)).tobytes(), hook
    for name in one.token_fields:
        assert torch.equal(one.tokens[name][:], many.tokens[name][:])


def test_drop_policy_skips_whole_forwards_and_counts_them(tmp_path, monkeypatch):
    gate = threading.Event()
    real, real_many = shard_mod.OpenShard.write_chunk, shard_mod.OpenShard.write_chunks

    def stalled(self, *a, **k):
        gate.wait()
        return real(self, *a, **k)

    def stalled_many(self, *a, **k):
        gate.wait()
        return real_many(self, *a, **k)

    monkeypatch.setattr(shard_mod.OpenShard, "write_chunk", stalled)
    monkeypatch.setattr(shard_mod.OpenShard, "write_chunks", stalled_many)
    model = tiny_llama()
    ids = torch.randint(0, 256, (16, 64))
    fw = InstrumentationFramework(InstrumentationConfig(granularity="all", on_full="drop", max_memory_gb=0.03,
                                                        compression_algorithm=None, chunk_size="64KiB"))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(tmp_path / "s"):
        for _ in range(60):  # far more than the pool and the writer can hold while the disk stalls
            model(ids)
        stats = fw.stats()
        gate.set()
    store = ActivationStore(tmp_path / "s")
    assert stats["forwards_dropped"] > 0
    assert store.dropped["batches"] == stats["forwards_dropped"]
    assert store.rows == (60 - stats["forwards_dropped"]) * 16 * 64
    # the stored forwards are whole: every sequence id has all 64 positions
    assert torch.bincount(store.tokens["sequence_id"][:]).unique().tolist() in ([0, 64], [64])


def test_whole_chunks_go_to_the_writer_without_a_copy_and_read_back_the_same(tmp_path):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (16, 64), generator=g)
    mask = torch.ones(16, 64, dtype=torch.long)  # 1024 rows a forward
    # 256 rows of 64 float32 a chunk: every forward after the first fills 4 whole chunks
    aligned, fast = _capture(tmp_path / "aligned", ids, mask, copy_threads=1, chunk_size="64KiB")
    # 200 rows a chunk: forwards start inside a chunk, so every row is copied
    odd, slow = _capture(tmp_path / "odd", ids, mask, copy_threads=1, chunk_size=200 * 256)
    assert fast["writer_zero_copy_chunks"] > 0
    assert slow["writer_zero_copy_chunks"] == 0 and slow["writer_copied_chunks"] > 0
    assert aligned.rows == odd.rows == 4 * 1024
    for hook in aligned.hooks:
        assert aligned[hook].numpy(slice(None)).tobytes() == odd[hook].numpy(slice(None)).tobytes(), hook
    assert aligned.verify().ok and odd.verify().ok
