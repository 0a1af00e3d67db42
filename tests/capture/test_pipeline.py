"""The capture pipeline's own mechanics: parallel copies, parts, drop policy."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
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


EXIT_SCRIPT = """
import sys
import torch
from lightning_llm_inst import InstrumentationConfig, InstrumentationFramework
from tests.capture.lightning_job import tiny_llama

model = tiny_llama()
fw = InstrumentationFramework(InstrumentationConfig(granularity="all"))
fw.instrument_model(model)
fw.capture_activations(sys.argv[1]).__enter__()  # never left
ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    for _ in range(3):
        model(ids)
    def boom(*_):
        raise RuntimeError("stopped inside layer 1")
    model.model.layers[1].register_forward_pre_hook(boom)
    try:
        model(ids)  # a forward cut short after layer 0 packed its rows: not committed
    except RuntimeError:
        pass
print("forwards done", flush=True)
"""


def test_a_capture_never_closed_commits_complete_forwards_at_exit_and_exits_with_status_0(tmp_path):
    script = tmp_path / "never_closed.py"
    script.write_text(EXIT_SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True,
                          env=env, timeout=180, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "forwards done" in proc.stdout
    store = ActivationStore(tmp_path / "s")
    assert store.verify().ok
    assert store.rows == 3 * 4 * 16
    assert len(store.hooks) == 6
    assert torch.bincount(store.tokens["sequence_id"][:]).tolist() == [16] * 12


@pytest.mark.parametrize("seq", [
    torch.tensor([2**63, 1], dtype=torch.uint64),
    np.array([1, 2**64 - 1], dtype=np.uint64),
    [2**63, 0],
    torch.tensor([0.0, 1.0]),
])
def test_sequence_ids_int64_cannot_hold_are_refused_not_stored_wrapped(tmp_path, seq):
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    fw = InstrumentationFramework(InstrumentationConfig(hooks=["blocks.0.hook_resid_post"]))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(tmp_path / "s"):
        fw.set_batch_context(ids, sequence_ids=torch.tensor([5, 6]))
        model(ids)
        fw.set_batch_context(ids, sequence_ids=seq)
        with pytest.raises(ValueError, match=r"^sequence_id") as err:
            model(ids)
        assert "\n" not in str(err.value)
    store = ActivationStore(tmp_path / "s")
    assert store.tokens["sequence_id"][:].tolist() == [5] * 8 + [6] * 8
