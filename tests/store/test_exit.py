"""A writer the program never closes is closed at interpreter exit: complete batches are
committed, the process exits by itself with code 0 (no crash in h5py's own exit handler)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_llm_inst.store import ActivationStore

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import sys
import numpy as np
from lightning_llm_inst.store import StoreWriter

w = StoreWriter(sys.argv[1], shard_size="64KB", chunk_size="8KiB", num_workers=2)
for i in range(20):
    w.append({"x": np.full((100, 64), i, np.float32)}, tokens={"seq": np.full(100, i, np.int64)})
if sys.argv[2] == "1":  # a batch still open at exit: discarded, the complete ones are kept
    w.begin_batch(100, tokens={"seq": np.full(100, 20, np.int64)})
print("appended", flush=True)
"""


@pytest.mark.parametrize("open_batch", [False, True], ids=["complete", "batch-open"])
def test_writer_never_closed_commits_complete_batches_and_exits_0(tmp_path, open_batch):
    path = tmp_path / "s"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(int(open_batch))],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "appended\n"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    store = ActivationStore(path)
    assert store.rows == 2000 and store.leftovers == []
    seq = store.tokens["seq"].numpy(slice(None))
    assert np.array_equal(seq, np.repeat(np.arange(20), 100))
    assert np.array_equal(store["x"].numpy(slice(None))[:, 0], seq.astype(np.float32))
    assert store.verify().ok
