"""The memory cap (``max_memory_gb``) bounds what a capture holds, the first batch included."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_llm_inst import ActivationStore, InstrumentationConfig, InstrumentationFramework
from lightning_llm_inst.models import tiny_model

REPO = Path(__file__).resolve().parents[2]
WIDE = dict(hidden_size=512, intermediate_size=1024, pad_token_id=None)  # rows of 2 KiB a hook point


def _wide_llama() -> nn.Module:
    model = tiny_model("llama", **WIDE)
    model.generation_config.pad_token_id = None
    return model


def _least(msg: str) -> float:
    m = re.search(r"set max_memory_gb to at least ([0-9.e+-]+)$", msg)
    assert m, msg
    return float(m.group(1))


HELD_SCRIPT = """
import json, sys, torch
from lightning_llm_inst import InstrumentationConfig, InstrumentationFramework
from tests.capture.test_memory import _wide_llama

def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

model = _wide_llama()
ids = torch.randint(3, 256, (256, 128), generator=torch.Generator().manual_seed(0))  # 32768 rows: 128 MiB a forward
with torch.no_grad():
    model(ids); model(ids)  # the allocator warm
    reset(); model(ids); plain = hwm()
    fw = InstrumentationFramework(InstrumentationConfig(granularity="residual", max_memory_gb=0.064,
                                                        compression_algorithm=None, num_workers=1))
    fw.instrument_model(model)
    error = None
    reset()
    with fw.capture_activations(sys.argv[1]):
        try:
            model(ids)  # the first batch: twice the cap
        except ValueError as exc:
            error = str(exc)
        model(ids[:16])  # a small first batch sets the layout; then big batches stream through
        model(ids)
        model(ids)
        stats = fw.stats()
    captured = hwm()
print(json.dumps({"plain": plain, "captured": captured, "error": error, "stats": stats}))
"""


def test_first_batch_far_larger_than_the_cap_is_refused_and_held_memory_stays_under_it(tmp_path):
    """Peak RSS of forwards with a capture exceeds that of the same forward without one by less
    than the cap plus a little (threads, token metadata); a first batch of twice the cap is
    refused by an error naming the cap and the batch, and later batches of that size stream."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs /proc/self/clear_refs to reset the peak RSS")
    script = tmp_path / "held.py"
    script.write_text(HELD_SCRIPT)
    # fixed glibc thresholds: freed blocks go back to the system at once, so that peak RSS follows
    # live bytes (the dynamic ones keep up to 64 MB of the model's own freed activations resident)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072",
           "MALLOC_TRIM_THRESHOLD_": "1048576"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True,
                          env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    cap = 0.064e9
    assert out["error"] is not None and "\n" not in out["error"]
    assert "max_memory_gb=0.064" in out["error"] and "32768 rows" in out["error"], out["error"]
    assert _least(out["error"]) > 0.064 + 2 * 2**20 * 64 / 1e9  # more than the first batch's 128 MiB
    grown = out["captured"] - out["plain"]
    assert grown < cap + 12 * 2**20, f"peak RSS grew {grown / 2**20:.0f} MiB under a cap of {cap / 2**20:.0f} MiB"
    s = out["stats"]
    assert s["writer_peak_buffered_bytes"] <= s["writer_max_buffer_bytes"]
    assert s["host_pool_peak_bytes"] <= s["host_pool_bytes"]
    assert s["host_pool_bytes"] + s["writer_max_buffer_bytes"] <= cap
    store = ActivationStore(tmp_path / "s")
    assert store.rows == 16 * 128 + 2 * 256 * 128 and store.verify().ok


def test_the_least_cap_an_error_names_holds_that_first_batch(tmp_path):
    model = _wide_llama()
    ids = torch.randint(3, 256, (64, 128), generator=torch.Generator().manual_seed(0))  # 32 MiB a forward
    cfg = dict(granularity="residual", compression_algorithm=None, num_workers=1)
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.03, **cfg))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(tmp_path / "small"):
        with pytest.raises(ValueError, match=r"max_memory_gb=0.03 is too small: the first batch \(8192 rows\)") as err:
            model(ids)
    least = _least(str(err.value))
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=least, **cfg))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(tmp_path / "enough"):
        model(ids)
        stats = fw.stats()
    assert ActivationStore(tmp_path / "enough").rows == ids.numel()
    # the first batch's copy counted against the writer's budget, and stayed in it
    assert 2 * ids.numel() * 512 * 4 <= stats["writer_peak_buffered_bytes"] <= stats["writer_max_buffer_bytes"]


class WideRows(nn.Module):
    """Rows of 4 MiB: no cap of 17 MB holds one of them with the store's chunk buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.wide = nn.Linear(8, 2**20, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wide(self.embed(input_ids))


def test_cap_too_small_for_one_row_of_every_hook_point_fails_at_the_first_forward(tmp_path):
    model = WideRows().eval()
    ids = torch.tensor([[3, 4]])
    cfg = dict(hooks="wide", compression_algorithm=None, num_workers=1)
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.017, **cfg))
    fw.instrument_model(model)
    with torch.no_grad():
        with pytest.raises(ValueError) as err:
            with fw.capture_activations(tmp_path / "small"):
                model(ids)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("max_memory_gb=0.017 is too small: rows of hook point 'wide' have "
                                              "4194304 bytes"), msg
    least = _least(msg)
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=least, **cfg))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(tmp_path / "enough"):
        y = model(ids)
    store = ActivationStore(tmp_path / "enough")
    assert torch.equal(store["wide"][:], y.reshape(2, -1))


def test_store_writer_counts_the_first_batch_it_holds_and_refuses_one_over_its_limit(tmp_path):
    """The writer's own accounting (also without a capture pipeline): the copy of the first
    batch, held until the batch ends, counts against max_buffer_bytes; a first batch over it is
    refused (before it is copied), and an aborted one is given back."""
    from lightning_llm_inst.store import StoreWriter

    rows = torch.ones(4096, 256)  # 4 MiB
    tokens = {"position": torch.arange(4096)}
    with StoreWriter(tmp_path / "w", codec=None, max_buffer_bytes="16MiB", num_workers=1, chunk_size="64KiB") as w:
        w.begin_batch(4096, tokens)
        w.add("a", rows)
        w.add("b", rows)
        assert w.stats()["buffered_bytes"] >= 2 * rows.numel() * 4
        with pytest.raises(ValueError, match=r"max_buffer_bytes=16777216 cannot hold the first batch \(4096 rows"):
            for name in "cdef":
                w.add(name, rows)
        assert w.stats()["buffered_bytes"] <= 16 * 2**20
        w.abort_batch()
        assert w.stats()["buffered_bytes"] == 0
        assert w.append({"a": rows[:8], "b": rows[:8]}, {"position": tokens["position"][:8]})
    assert ActivationStore(tmp_path / "w").rows == 8
