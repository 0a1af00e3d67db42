"""Input the store cannot hold is refused when it is given, with a one-line error naming it:
names HDF5 cannot hold, token values past int64, a buffer too small for one row of every
column; and writers that would share a store (a rank writer beside a writer without a rank)
exclude each other in either order."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lightning_llm_inst.store import ActivationStore, StoreError, StoreWriteError, StoreWriter
from tests.store.stalled import GatedCommits

BAD_NAMES = [("nul", "a\x00b", "contains a NUL character"), ("slash", "a/b", "contains '/'"), ("empty", "", "is empty"),
             ("dot", ".", "is a path component"), ("dotdot", "..", "is a path component"),
             ("surrogate", "x\udc80", "cannot be encoded as UTF-8"), ("not-str", 3, "is a int, not a string")]


@pytest.mark.parametrize("name, problem", [(n, p) for _, n, p in BAD_NAMES], ids=[i for i, _, _ in BAD_NAMES])
def test_names_hdf5_cannot_hold_are_refused_when_given(tmp_path, name, problem):
    x = np.ones((4, 3), np.float32)
    rule = "use a non-empty string without '/' or NUL characters, not '.' or '..', encodable as UTF-8"
    with StoreWriter(tmp_path / "s") as w:
        for call, what in ((lambda: w.append({name: x}), "hook point"),
                           (lambda: w.append({"h": x}, tokens={name: np.arange(4)}), "token field"),
                           (lambda: w.begin_batch(4, tokens={name: np.arange(4)}), "token field")):
            with pytest.raises(ValueError) as err:
                call()
            msg = str(err.value)
            assert msg == f"{what} name {name!r} is not valid: it {problem}; {rule}", msg
        w.append({"h": x}, tokens={"t": np.arange(4)})
        w.begin_batch(4, tokens={"t": np.arange(4)})
        with pytest.raises(ValueError, match=re.escape(f"hook point name {name!r} is not valid")):
            w.add(name, x)
        with pytest.raises(ValueError, match=re.escape(f"hook point name {name!r} is not valid")):
            w.add_packed(name, np.zeros((4, 12), np.uint8), "float32", (3,))
        w.add("h", x)
        w.end_batch()
    assert ActivationStore(tmp_path / "s").rows == 8  # nothing bad reached the file: it closed cleanly


def test_names_are_checked_in_a_dropped_batch_too(tmp_path):
    w = GatedCommits(tmp_path / "s", on_full="drop", shard_size="48B", max_pending_commits=0)
    try:
        assert w.append({"h": np.ones((4, 3), np.float32)})  # ends a shard, whose commit stalls
        assert not w.begin_batch(4)  # it would end another shard: dropped
        with pytest.raises(ValueError, match=r"hook point name 'a\\x00' is not valid"):
            w.add("a\x00", np.ones((4, 3), np.float32))
        w.add("h", np.ones((4, 3), np.float32))
        w.end_batch()
    finally:
        w.gate.set()
        w.close()
    store = ActivationStore(tmp_path / "s")
    assert store.rows == 4 and store.dropped == {"batches": 1, "rows": 4}


@pytest.mark.parametrize("value", [2**63, 2**64 - 1])
def test_token_values_past_int64_are_refused(tmp_path, value):
    ids = np.array([1, 2, value], dtype=np.uint64)
    with StoreWriter(tmp_path / "s") as w:
        with pytest.raises(ValueError) as err:
            w.append({"h": np.ones((3, 2), np.float32)}, tokens={"sequence_id": ids})
        assert str(err.value) == (f"token field 'sequence_id' holds {value}, which does not fit int64; token values "
                                  f"must lie in -2**63 .. 2**63-1")
        with pytest.raises(ValueError, match="token field 'sequence_id' holds"):
            w.begin_batch(3, tokens={"sequence_id": ids})
        fits = np.array([0, 5, 2**63 - 1], dtype=np.uint64)
        w.append({"h": np.ones((3, 2), np.float32)}, tokens={"sequence_id": fits})
    store = ActivationStore(tmp_path / "s")
    assert store.tokens["sequence_id"].numpy(slice(None)).tolist() == [0, 5, 2**63 - 1]


def test_buffer_too_small_for_one_row_of_each_column_fails_at_the_add(tmp_path):
    w = StoreWriter(tmp_path / "s", max_buffer_bytes="1MiB", chunk_size="16KiB", num_workers=2)
    w.begin_batch(4, tokens={"seq": np.arange(4)})
    w.add("small", np.zeros((4, 8), np.float32))
    with pytest.raises(ValueError) as err:  # before the batch is staged, not at end_batch
        w.add("big", np.zeros((4, 65536), np.float32))
    assert str(err.value) == ("max_buffer_bytes=1048576 is too small to hold one row of each of 3 columns (rows of up "
                              "to 262144 bytes) with 2 workers; it needs at least 2496512 bytes")
    w.abort_batch()
    w.append({"small": np.zeros((4, 8), np.float32)}, tokens={"seq": np.arange(4)})
    w.close()
    assert ActivationStore(tmp_path / "s").rows == 4


# ---------------------------------------------------------------------------- writers side by side
def test_rank_writer_and_writer_without_rank_exclude_each_other(tmp_path):
    path = tmp_path / "s"
    plain = StoreWriter(path)
    with pytest.raises(StoreError) as err:
        StoreWriter(path, rank=1)
    msg = str(err.value)
    assert isinstance(err.value, StoreWriteError) and "\n" not in msg
    assert msg == (f"a writer without a rank has the activation store at {str(path)!r} open (it holds "
                   f"{str(path / '.writer.lock')!r}); StoreWriter(rank=1) cannot open beside it")
    plain.close()

    r0, r1 = StoreWriter(path, rank=0), StoreWriter(path, rank=1)  # ranks side by side are fine
    with pytest.raises(StoreError) as err:
        StoreWriter(path, mode="overwrite")
    assert str(err.value) == (f"rank writer(s) rank0, rank1 have the activation store at {str(path)!r} open; a writer "
                              f"without a rank cannot open beside them")
    with pytest.raises(StoreError, match="another writer has the activation store at .*rank1' open"):
        StoreWriter(path, rank=1, mode="append")
    for w in (r0, r1):
        w.append({"h": np.ones((4, 3), np.float32)})
        w.close()
    assert ActivationStore(path / "rank0").rows == ActivationStore(path / "rank1").rows == 4
    with StoreWriter(path, mode="append") as w:  # every rank writer closed: free again
        w.append({"h": np.ones((4, 3), np.float32)})
