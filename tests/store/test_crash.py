"""A writer killed with SIGKILL at random moments loses at most its open shard, never a
committed one, and the next writer resumes exactly where the committed rows end."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lightning_llm_inst.store import ActivationStore

REPO = Path(__file__).resolve().parents[2]
D = 96
BATCH = 50

# Appends an endless, deterministic row stream: row r's values are a function of r alone,
# so any committed row can be checked exactly and a resumed writer continues at r = rows.
CHILD = r"""
import json, sys
import numpy as np
from lightning_llm_inst.store.writer import StoreWriter

def rows(start, n, d):
    r = np.arange(start, start + n, dtype=np.int64)
    base = (r[:, None] * 2654435761 + np.arange(d) * 40503) % 65521
    return base.astype(np.float32) / 7.0 - 4000.0, (base * 7 % 65536).astype(np.uint16), r

w = StoreWriter(sys.argv[1], mode="append", codec=sys.argv[2], shard_size="48KB", chunk_size="4KiB",
                max_buffer_bytes="4MiB", num_workers=2)
print(json.dumps({"start": w.rows_committed, "recovered": w.recovered}), flush=True)
start = w.rows_committed
limit = int(sys.argv[3])
while start < limit:
    x, h, r = rows(start, BATCH_ROWS, FEATURES)
    w.append({"x": x, "h": h}, tokens={"row": r})
    start += BATCH_ROWS
w.close()
print("closed", flush=True)
""".replace("BATCH_ROWS", str(BATCH)).replace("FEATURES", str(D))


def expected(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(start, start + n, dtype=np.int64)
    base = (r[:, None] * 2654435761 + np.arange(D) * 40503) % 65521
    return base.astype(np.float32) / 7.0 - 4000.0, (base * 7 % 65536).astype(np.uint16)


def _spawn(path: Path, codec: str, limit: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), codec, str(limit)],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _check_store(path: Path) -> int:
    store = ActivationStore(path)
    n = store.rows
    if n == 0:  # killed before the first commit
        assert store.num_shards == 0
        return 0
    rows = store.tokens["row"].numpy(slice(None))
    assert np.array_equal(rows, np.arange(n)), "committed rows must be contiguous, without gaps or duplicates"
    x, h = expected(0, n)
    assert store["x"].numpy(slice(None)).tobytes() == x.tobytes()
    assert store["h"].numpy(slice(None)).tobytes() == h.tobytes()
    listed = {Path(s["file"]).name for s in store.manifest["shards"]}
    assert not any(name.endswith(".tmp") for name in listed)
    assert store.verify().ok
    store.close()
    return n


def test_sigkill_at_random_moments_never_loses_a_committed_shard(tmp_path):
    path = tmp_path / "store"
    rng = random.Random(1234)
    reported: list[dict] = []
    kills = 0
    last_rows = 0
    limit = 10**9
    while kills < 24:
        proc = _spawn(path, "zstd:1", limit)
        hello = json.loads(proc.stdout.readline() or "{}")
        if not hello:
            raise AssertionError(proc.stderr.read())
        assert hello["start"] == last_rows  # resumes exactly at the committed rows
        reported += hello["recovered"]
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        last_rows = _check_store(path)
    assert last_rows > 0
    # a final writer cleans the last leftovers, finishes and closes normally
    proc = _spawn(path, "zstd:1", last_rows + 20 * BATCH)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    reported += json.loads(out.splitlines()[0])["recovered"]
    final = _check_store(path)
    assert final >= last_rows + 19 * BATCH
    store = ActivationStore(path)
    assert store.leftovers == []
    # every removed leftover was reported to the user and recorded in the manifest
    assert reported, "at least one kill should have caught an open shard"
    assert [r["file"] for r in store.recovered] == [r["file"] for r in reported]
