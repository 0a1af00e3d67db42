"""Writer behaviour users rely on: clear errors, nothing lost, bounded memory, resumable."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_llm_inst.store import ActivationStore, StoreWriteError, StoreWriter
from lightning_llm_inst.store import shard as shard_mod

REPO = Path(__file__).resolve().parents[2]


def _append_all(w, batches):
    for b in batches:
        w.append(b["acts"], tokens=b["tokens"])


def _slow_sink(monkeypatch, delay_s: float) -> None:
    real = shard_mod.OpenShard.write_chunk

    def slow(self, *args, **kwargs):
        time.sleep(delay_s)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(shard_mod.OpenShard, "write_chunk", slow)


# ---------------------------------------------------------------------------- bad input
def test_bad_batches_name_the_hook_and_what_was_expected(tmp_path, batch_factory):
    b = batch_factory(0, 10)
    with StoreWriter(tmp_path / "s") as w:
        w.append(b["acts"], tokens=b["tokens"])
        with pytest.raises(ValueError, match=r"hook point 'blocks.0.hook_resid_post': feature shape \(47,\) differs "
                                             r"from earlier batches' \(48,\)"):
            w.append({**b["acts"], "blocks.0.hook_resid_post": torch.zeros(10, 47, dtype=torch.bfloat16)},
                     tokens=b["tokens"])
        with pytest.raises(TypeError, match=r"hook point 'blocks.1.hook_mlp_out': dtype float32 differs from earlier "
                                            r"batches' bfloat16"):
            w.append({**b["acts"], "blocks.1.hook_mlp_out": torch.zeros(10, 3, 5)}, tokens=b["tokens"])
        with pytest.raises(ValueError, match=r"same number of rows.*'blocks.0.hook_resid_post'\]: 9.*"
                                             r"'blocks.1.hook_mlp_out'\]: 10"):
            w.append({**b["acts"], "blocks.0.hook_resid_post": b["acts"]["blocks.0.hook_resid_post"][:9]},
                     tokens=b["tokens"])
        with pytest.raises(TypeError, match=r"activations\['blocks.0.hook_resid_post'\] must be a torch.Tensor or "
                                            r"numpy.ndarray, got list"):
            w.append({**b["acts"], "blocks.0.hook_resid_post": [[1.0] * 48] * 10}, tokens=b["tokens"])
        with pytest.raises(ValueError, match=r"missing: \['blocks.1.hook_mlp_out'\], unexpected: none"):
            w.append({"blocks.0.hook_resid_post": b["acts"]["blocks.0.hook_resid_post"]}, tokens=b["tokens"])
        with pytest.raises(TypeError, match=r"tokens\['position'\] has dtype torch.float32"):
            w.append(b["acts"], tokens={**b["tokens"], "position": torch.zeros(10)})
        with pytest.raises(ValueError, match=r"hook point name 'a/b' is not valid"):
            w.append({"a/b": torch.zeros(3, 2)})
        w.append(b["acts"], tokens=b["tokens"])  # still usable after rejected input
    assert ActivationStore(tmp_path / "s").rows == 20


@pytest.mark.parametrize("kwargs, needle", [
    ({"mode": "replace"}, "mode='replace' is not valid; choose one of: create, append, overwrite"),
    ({"on_full": "wait"}, "on_full='wait' is not valid; choose one of: block, drop"),
    ({"shard_size": "12 parsecs"}, "shard_size='12 parsecs' is not a byte count"),
    ({"max_buffer_bytes": 0}, "max_buffer_bytes must be positive, got 0"),
    ({"num_workers": 0}, "num_workers must be a positive integer, got 0"),
    ({"codec": "brotli"}, "'brotli' is not supported"),
    ({"metadata": {"x": object()}}, "metadata must be JSON-serialisable"),
])
def test_bad_arguments(tmp_path, kwargs, needle):
    with pytest.raises(ValueError) as err:
        StoreWriter(tmp_path / "s", **kwargs)
    assert needle in str(err.value)


def test_buffer_too_small_for_the_columns_is_explained(tmp_path):
    w = StoreWriter(tmp_path / "s", max_buffer_bytes="1MiB", chunk_size="1MiB", num_workers=2)
    with pytest.raises(ValueError, match="max_buffer_bytes=1048576 is too small for 2 columns"):
        w.append({"a": torch.zeros(4, 1024 * 256), "b": torch.zeros(4, 8)})
    w.close()


# ---------------------------------------------------------------------------- policies and memory
def test_block_loses_nothing_and_holds_memory_under_its_bound(tmp_path, monkeypatch):
    _slow_sink(monkeypatch, 0.004)
    bound = 8 * 2**20
    x = torch.randn(2048, 512)  # 4 MiB per batch, 160 MiB in all: 20x the bound
    rss_peak = [0]
    stop = threading.Event()

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def sample():
        while not stop.is_set():
            rss_peak[0] = max(rss_peak[0], rss())
            time.sleep(0.002)

    w = StoreWriter(tmp_path / "s", codec="lz4", max_buffer_bytes=bound, chunk_size="256KiB", num_workers=2,
                    shard_size="32MiB")
    w.append({"x": x[:1]}, tokens={"seq": torch.zeros(1, dtype=torch.int64)})
    base = rss()
    t = threading.Thread(target=sample)
    t.start()
    try:
        for i in range(40):
            w.append({"x": x}, tokens={"seq": torch.full((2048,), i + 1, dtype=torch.int64)})
    finally:
        stop.set()
        t.join()
    stats = w.stats()
    w.close()
    assert stats["peak_buffered_bytes"] <= bound
    assert stats["time_blocked_s"] > 0  # the slow sink did push back
    assert rss_peak[0] - base < bound + 48 * 2**20, (rss_peak[0] - base) / 2**20
    store = ActivationStore(tmp_path / "s")
    assert store.rows == 1 + 40 * 2048 and store.dropped == {"batches": 0, "rows": 0}
    assert torch.equal(store["x"][1:2049], x) and torch.equal(store["x"][-2048:], x)
    assert torch.equal(torch.unique(store.tokens["seq"][:]), torch.arange(41))


def test_drop_counts_every_dropped_batch_in_the_manifest(tmp_path, monkeypatch, caplog):
    _slow_sink(monkeypatch, 0.02)
    w = StoreWriter(tmp_path / "s", codec="none", on_full="drop", max_buffer_bytes="4MiB", chunk_size="128KiB",
                    num_workers=1)
    taken = []
    for i in range(60):
        if w.append({"x": torch.full((1024, 128), float(i))}, tokens={"seq": torch.full((1024,), i)}):
            taken.append(i)
    assert w.stats()["peak_buffered_bytes"] <= 4 * 2**20 + 1024 * 128 * 4  # at most one batch over
    w.close()
    dropped = 60 - len(taken)
    assert dropped > 0 and taken, (dropped, taken)
    assert "dropped a batch of 1024 rows" in caplog.text
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["dropped"] == {"batches": dropped, "rows": dropped * 1024}
    store = ActivationStore(tmp_path / "s")
    assert store.rows == len(taken) * 1024
    seq = store.tokens["seq"][:]
    assert torch.unique_consecutive(seq).tolist() == taken
    assert torch.equal(store["x"][:, 0], seq.float())


# ---------------------------------------------------------------------------- errors in the caller's thread
def test_disk_full_while_writing_reaches_the_caller_and_keeps_committed_shards(tmp_path, monkeypatch, batch_factory):
    real = shard_mod.OpenShard.write_chunk
    calls = [0]

    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(shard_mod.OpenShard, "write_chunk", failing)
    path = tmp_path / "s"
    w = StoreWriter(path, codec="zstd:1", shard_size="30KB", chunk_size="2KiB")
    with pytest.raises(StoreWriteError) as err:
        for i in range(200):
            w.append(activations=batch_factory(i, 50)["acts"])
            time.sleep(0.001)
        w.close()
    msg = str(err.value)
    assert "No space left on device" in msg and str(path) in msg and ".h5.tmp" in msg
    assert err.value.errno == errno.ENOSPC and isinstance(err.value.__cause__, OSError)
    with pytest.raises(StoreWriteError, match="No space left on device"):
        w.append(batch_factory(0, 5)["acts"])
    with pytest.raises(StoreWriteError):
        w.close()
    store = ActivationStore(path)
    assert store.num_shards >= 1 and store.verify().ok
    assert not list(path.glob("*.tmp"))


def test_disk_full_at_fsync_keeps_the_previous_manifest(tmp_path, monkeypatch, batch_factory):
    path = tmp_path / "s"
    with StoreWriter(path, codec="lz4") as w:
        w.append(batch_factory(0, 100)["acts"])
    before = (path / "manifest.json").read_text()

    def full(p):
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    monkeypatch.setattr(shard_mod, "fsync_path", full)
    w = StoreWriter(path, codec="lz4", mode="append")
    w.append(batch_factory(1, 100)["acts"])
    with pytest.raises(StoreWriteError, match="No space left on device"):
        w.close()
    assert (path / "manifest.json").read_text() == before
    store = ActivationStore(path)
    assert store.rows == 100 and store.verify().ok


def test_bad_paths_give_clear_errors(tmp_path):
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(StoreWriteError, match=r"cannot create activation store at '.*file.txt/store': Not a directory"):
        StoreWriter(afile / "store")
    with pytest.raises(StoreWriteError, match=r"file.txt': exists and is not a directory"):
        StoreWriter(afile)


_READONLY_CHILD = r"""
import sys
from lightning_llm_inst.store import StoreWriter, StoreWriteError
try:
    StoreWriter(sys.argv[1])
except StoreWriteError as e:
    print("ERROR:", e)
"""


def test_read_only_directory_gives_a_clear_error(tmp_path):
    top = Path(tempfile.mkdtemp(prefix="llm-inst-ro-"))
    try:
        os.chmod(top, 0o755)
        ro = top / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
        if os.geteuid() != 0:
            with pytest.raises(StoreWriteError, match=r"cannot create activation store at '.*ro/store': Permission denied"):
                StoreWriter(ro / "store")
            with pytest.raises(StoreWriteError, match=r"cannot create activation store at '.*ro': Permission denied"):
                StoreWriter(ro)
            return
        # root writes anywhere: run the child as root without the capability to bypass permissions
        import shutil

        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is not available to drop CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        proc = subprocess.run([setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", "--", sys.executable, "-c",
                               _READONLY_CHILD, str(ro / "store")], env={**os.environ, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "ERROR: cannot create activation store at" in proc.stdout and "ro/store': Permission denied" in proc.stdout
    finally:
        os.chmod(top / "ro", 0o755)
        import shutil

        shutil.rmtree(top)


def test_permission_denied_mid_run_is_raised_in_the_caller(tmp_path, monkeypatch, batch_factory):
    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(shard_mod.OpenShard, "__init__", denied)
    w = StoreWriter(tmp_path / "s")
    w.append(batch_factory(0, 10)["acts"])
    with pytest.raises(StoreWriteError, match="Permission denied"):
        w.close()


# ---------------------------------------------------------------------------- modes, locking, resume
def test_modes_locking_and_resume(tmp_path, batch_factory):
    path = tmp_path / "s"
    batches = [batch_factory(i, 40 + i) for i in range(5)]
    with StoreWriter(path, codec="lz4", metadata={"model": "tiny"}) as w:
        with pytest.raises(StoreWriteError, match="another writer has the activation store"):
            StoreWriter(path, mode="append", codec="lz4")
        _append_all(w, batches[:2])
    with pytest.raises(StoreWriteError, match="already exists.*mode='append'"):
        StoreWriter(path)
    with pytest.raises(StoreWriteError, match="uses codec 'lz4\\+shuffle'; resume it with codec='lz4\\+shuffle'"):
        StoreWriter(path, mode="append", codec="zstd")
    with StoreWriter(path, mode="append", codec="lz4") as w:
        with pytest.raises(ValueError, match="missing: \\['blocks.1.hook_mlp_out'\\]"):
            w.append({"blocks.0.hook_resid_post": batches[2]["acts"]["blocks.0.hook_resid_post"]},
                     tokens=batches[2]["tokens"])
        _append_all(w, batches[2:])
    store = ActivationStore(path)
    assert store.rows == sum(40 + i for i in range(5)) and store.num_shards == 2
    assert store.metadata == {"model": "tiny"}
    want = torch.cat([b["acts"]["blocks.1.hook_mlp_out"] for b in batches])
    assert torch.equal(store["blocks.1.hook_mlp_out"][:], want)
    with StoreWriter(path, mode="overwrite", codec="none") as w:
        _append_all(w, batches[:1])
    assert ActivationStore(path).rows == 40 and ActivationStore(path).codec.name == "none"


def test_exception_in_the_with_block_commits_complete_batches(tmp_path, batch_factory):
    with pytest.raises(RuntimeError, match="boom"), StoreWriter(tmp_path / "s") as w:
        _append_all(w, [batch_factory(i, 30) for i in range(3)])
        raise RuntimeError("boom")
    assert ActivationStore(tmp_path / "s").rows == 90


def test_flush_makes_rows_visible_while_writing(tmp_path, batch_factory):
    w = StoreWriter(tmp_path / "s")
    w.append(activations=batch_factory(0, 25)["acts"])
    assert ActivationStore(tmp_path / "s").rows == 0
    w.flush()
    assert ActivationStore(tmp_path / "s").rows == 25
    w.append(activations=batch_factory(1, 5)["acts"])
    w.close()
    store = ActivationStore(tmp_path / "s")
    assert store.rows == 30 and store.num_shards == 2 and store.verify().ok


def test_empty_first_batch_and_store_with_no_rows(tmp_path):
    with StoreWriter(tmp_path / "s") as w:
        w.append({"a": torch.zeros(0, 4, dtype=torch.float16)}, tokens={"ids": torch.zeros(0, dtype=torch.int64)})
    store = ActivationStore(tmp_path / "s")
    assert store.rows == 0 and store["a"][:].shape == (0, 4) and store.verify().ok
    with StoreWriter(tmp_path / "t"):
        pass
    assert ActivationStore(tmp_path / "t").hooks == {}


def test_ddp_rank_folders_merge_into_one_manifest(tmp_path, batch_factory):
    from lightning_llm_inst.store import merge_rank_manifests

    for rank in (0, 1):
        with StoreWriter(tmp_path / "s", rank=rank, codec="zstd:1") as w:
            _append_all(w, [batch_factory(10 * rank + i, 20) for i in range(3)])
    unmerged = ActivationStore(tmp_path / "s")  # read through the rank manifests
    assert unmerged.rows == 120
    merged = merge_rank_manifests(tmp_path / "s", world_size=2)
    assert [s["file"].split("/")[0] for s in merged["shards"]] == ["rank0", "rank1"]
    store = ActivationStore(tmp_path / "s")
    seq = torch.cat([batch_factory(s, 20)["tokens"]["sequence_id"] for s in (0, 1, 2, 10, 11, 12)])
    assert torch.equal(store.tokens["sequence_id"][:], seq)
    assert store.rows == 120 and store.verify().ok
    want = torch.cat([batch_factory(s, 20)["acts"]["blocks.0.hook_resid_post"] for s in (0, 1, 2, 10, 11, 12)])
    assert torch.equal(store["blocks.0.hook_resid_post"][:], want)


def test_verify_finds_a_corrupted_chunk(tmp_path, batch_factory):
    path = tmp_path / "s"
    with StoreWriter(path, codec="none", chunk_size="1KiB") as w:
        _append_all(w, [batch_factory(i, 64) for i in range(4)])
    shard = next(path.glob("shard-*.h5"))
    data = bytearray(shard.read_bytes())
    x = np.frombuffer(batch_factory(2, 64)["acts"]["blocks.0.hook_resid_post"].view(torch.int16).numpy(), np.uint8)
    pos = bytes(data).find(x[:64].tobytes())
    assert pos > 0
    data[pos + 10] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = ActivationStore(path).verify()
    assert not report.ok and any("fails its CRC32 check" in p for p in report.problems)


# ---------------------------------------------------------------------------- hook-by-hook batches
def _stream(w, b):
    rows = next(iter(b["acts"].values())).shape[0]
    taken = w.begin_batch(rows, tokens=b["tokens"])
    for hook, x in b["acts"].items():
        w.add(hook, x)
    return taken


def test_batches_given_hook_by_hook_equal_whole_appends(tmp_path, batch_factory):
    batches = [batch_factory(i, 37 * (i + 1)) for i in range(6)]
    with StoreWriter(tmp_path / "a", chunk_size="1KiB", shard_size="40KB") as w:
        _append_all(w, batches)
    with StoreWriter(tmp_path / "b", chunk_size="1KiB", shard_size="40KB") as w:
        for b in batches:
            assert _stream(w, b)
            w.end_batch()
    a, b = ActivationStore(tmp_path / "a"), ActivationStore(tmp_path / "b")
    assert a.rows == b.rows == sum(37 * (i + 1) for i in range(6))
    # a shard holds whole batches: shard boundaries fall on batch boundaries
    bounds = np.cumsum([s["rows"] for s in b.manifest["shards"]])
    assert set(bounds) <= set(np.cumsum([37 * (i + 1) for i in range(6)]))
    for hook in a.hooks:
        assert a[hook].numpy(slice(None)).tobytes() == b[hook].numpy(slice(None)).tobytes()


@pytest.mark.parametrize("abort_after_hooks", [0, 1, 2])
def test_aborted_batch_leaves_no_trace(tmp_path, batch_factory, abort_after_hooks):
    """An aborted batch may already have filled and shipped chunks; they must all go."""
    good = [batch_factory(i, 150) for i in range(5)]
    with StoreWriter(tmp_path / "s", chunk_size="2KiB", shard_size="1MB", num_workers=1) as w:
        _append_all(w, good[:3])
        bad = batch_factory(99, 500)  # spans several chunks of every column
        w.begin_batch(500, tokens=bad["tokens"])
        for hook in list(bad["acts"])[:abort_after_hooks]:
            w.add(hook, bad["acts"][hook])
        time.sleep(0.05)  # let the writer thread write the shipped chunks
        w.abort_batch()
        _append_all(w, good[3:])
    store = ActivationStore(tmp_path / "s")
    assert store.rows == 750 and store.verify().ok
    for hook in good[0]["acts"]:
        want = torch.cat([b["acts"][hook] for b in good])
        assert store[hook].numpy(slice(None)).tobytes() == want.view(torch.int16).numpy().tobytes()
    assert torch.equal(store.tokens["sequence_id"][:], torch.cat([b["tokens"]["sequence_id"] for b in good]))


def test_batch_protocol_misuse_is_explained(tmp_path, batch_factory):
    b = batch_factory(0, 10)
    with StoreWriter(tmp_path / "s") as w:
        with pytest.raises(RuntimeError, match=r"add\('x'\) outside a batch; call begin_batch\(rows\) first"):
            w.add("x", torch.zeros(3))
        _append_all(w, [b])
        w.begin_batch(10, tokens=b["tokens"])
        with pytest.raises(RuntimeError, match="begin_batch\\(\\) called while a batch is open"):
            w.begin_batch(10)
        x = b["acts"]["blocks.0.hook_resid_post"]
        w.add("blocks.0.hook_resid_post", x[:9])  # parts are fine ...
        with pytest.raises(ValueError, match="hook point 'blocks.0.hook_resid_post' has 18 rows; the batch has 10"):
            w.add("blocks.0.hook_resid_post", x[:9])  # ... but not more rows than the batch
        w.add("blocks.0.hook_resid_post", x[9:])
        with pytest.raises(ValueError, match="'blocks.0.hook_resid_post' was already added"):
            w.add("blocks.0.hook_resid_post", x)
        w.add("blocks.1.hook_mlp_out", b["acts"]["blocks.1.hook_mlp_out"][:4])
        with pytest.raises(ValueError, match="'blocks.1.hook_mlp_out' got 4 of 10"):
            w.end_batch()  # incomplete: rolled back
        w.begin_batch(10, tokens=b["tokens"])
        w.add("blocks.0.hook_resid_post", x)
        with pytest.raises(ValueError, match=r"missing: \['blocks.1.hook_mlp_out'\]"):
            w.end_batch()  # incomplete: rolled back
        with pytest.raises(ValueError, match="token field 'position' has 9 rows; the batch has 10"):
            w.begin_batch(10, tokens={**b["tokens"], "position": b["tokens"]["position"][:9]})
    assert ActivationStore(tmp_path / "s").rows == 10


def test_dropped_streamed_batch_ignores_its_adds(tmp_path, monkeypatch):
    _slow_sink(monkeypatch, 0.02)
    w = StoreWriter(tmp_path / "s", codec="none", on_full="drop", max_buffer_bytes="4MiB", chunk_size="128KiB",
                    num_workers=1)
    results = []
    for i in range(40):
        taken = w.begin_batch(1024, tokens={"seq": torch.full((1024,), i)})
        w.add("x", torch.full((1024, 128), float(i)))
        w.end_batch()
        results.append(taken)
    w.close()
    store = ActivationStore(tmp_path / "s")
    assert not all(results) and any(results)
    assert store.dropped["batches"] == results.count(False)
    assert torch.unique_consecutive(store.tokens["seq"][:]).tolist() == [i for i, t in enumerate(results) if t]


def _planes(t: torch.Tensor) -> torch.Tensor:
    """Rows in byte-plane order, as a GPU pack step produces them: [itemsize, rows * F]."""
    bytes_ = t.contiguous().view(torch.uint8).reshape(t.numel(), t.element_size())
    return bytes_.t().contiguous()


@pytest.mark.parametrize("codec", ["zstd:1", "lz4", "none", "zstd-noshuffle"])
def test_packed_byte_planes_store_the_same_bytes(tmp_path, batch_factory, codec):
    batches = [batch_factory(i, 23 + 41 * i) for i in range(5)]
    with StoreWriter(tmp_path / "rows", codec=codec, chunk_size="1KiB") as w:
        _append_all(w, batches)
    with StoreWriter(tmp_path / "packed", codec=codec, chunk_size="1KiB") as w:
        for b in batches:
            rows = b["tokens"]["position"].shape[0]
            w.begin_batch(rows, tokens=b["tokens"])
            for hook, x in b["acts"].items():
                half = rows // 2  # in two parts, as a ring buffer may hand them over
                for part in (x[:half], x[half:]):
                    w.add_packed(hook, _planes(part), "bfloat16", tuple(x.shape[1:]))
            w.end_batch()
    a, p = ActivationStore(tmp_path / "rows"), ActivationStore(tmp_path / "packed")
    for hook in a.hooks:
        assert a[hook].numpy(slice(None)).tobytes() == p[hook].numpy(slice(None)).tobytes()
    assert p.verify().ok
    # identical chunk bytes on disk, not only identical values
    import h5py

    with h5py.File(next((tmp_path / "rows").glob("shard-*.h5"))) as fa, \
            h5py.File(next((tmp_path / "packed").glob("shard-*.h5"))) as fp:
        ds_a, ds_p = fa["activations/blocks.0.hook_resid_post"], fp["activations/blocks.0.hook_resid_post"]
        for i in range(ds_a.id.get_num_chunks()):
            off = ds_a.id.get_chunk_info(i).chunk_offset
            assert ds_a.id.read_direct_chunk(off) == ds_p.id.read_direct_chunk(off)


def test_packed_rows_are_checked(tmp_path):
    with StoreWriter(tmp_path / "s") as w:
        w.begin_batch(4)
        with pytest.raises(ValueError, match=r"packed rows of 'h' must be uint8 \[2, rows \* 6\] for bfloat16"):
            w.add_packed("h", torch.zeros(4, 12, dtype=torch.uint8), "bfloat16", (6,))
        with pytest.raises(TypeError, match="dtype 'bf16' is not one of"):
            w.add_packed("h", torch.zeros(2, 24, dtype=torch.uint8), "bf16", (6,))
        w.abort_batch()


def test_write_behind_starts_writeback_while_a_shard_fills(tmp_path, monkeypatch):
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: (calls.append(advice), real(fd, off, n, advice)))
    monkeypatch.setenv("LLM_INST_WRITE_BEHIND_MB", "0.25")
    x = torch.randn(4096, 64)
    with StoreWriter(tmp_path / "s", codec=None, shard_size="64MiB", chunk_size="64KiB") as w:
        for i in range(4):
            w.append({"h": x + i})
    assert calls and set(calls) == {os.POSIX_FADV_DONTNEED}  # 4 MiB stored, every 0.25 MiB
    store = ActivationStore(tmp_path / "s")
    assert torch.equal(store["h"][:], torch.cat([x + i for i in range(4)]))
    calls.clear()
    with StoreWriter(tmp_path / "t", codec=None, fsync=False) as w:  # nothing to make durable: left alone
        w.append({"h": x})
    assert calls == []
