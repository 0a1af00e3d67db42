"""The llm-inst command line: info and verify on real stores."""

from __future__ import annotations

import subprocess
import sys


from lightning_llm_inst.cli import main
from lightning_llm_inst.store import StoreWriter


def _store(path, batch_factory):
    with StoreWriter(path, codec="zstd:1", shard_size="20KB", chunk_size="2KiB") as w:
        for i in range(4):
            b = batch_factory(i, 64)
            w.append(b["acts"], tokens=b["tokens"])


def test_info_prints_a_table_of_hook_points(tmp_path, batch_factory, capsys):
    _store(tmp_path / "s", batch_factory)
    assert main(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "codec     zstd:1+shuffle" in out and "rows      256 in" in out
    line = next(l for l in out.splitlines() if l.startswith("blocks.0.hook_resid_post"))
    assert "48" in line and "bfloat16" in line and "256" in line
    ratio = float(line.split()[-1])
    assert ratio > 1.0
    assert any(l.startswith("tokens/input_ids") for l in out.splitlines())
    assert out.splitlines()[-1].startswith("total")


def test_verify_exit_codes(tmp_path, batch_factory, capsys):
    _store(tmp_path / "s", batch_factory)
    assert main(["verify", "-q", str(tmp_path / "s")]) == 0
    assert "OK:" in capsys.readouterr().out
    shard = sorted((tmp_path / "s").glob("shard-*.h5"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    assert main(["verify", "-q", str(tmp_path / "s")]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {shard.name}:" in out and "FAILED:" in out
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "no activation store at" in capsys.readouterr().err


def test_console_script_runs_as_a_module(tmp_path, batch_factory):
    _store(tmp_path / "s", batch_factory)
    proc = subprocess.run([sys.executable, "-m", "lightning_llm_inst.cli", "verify", "-q", str(tmp_path / "s")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK:") and "256 rows" in proc.stdout, proc.stdout


def test_lightning_cli_yaml_runs_a_capture(tmp_path):
    """configs/capture_tiny.yaml: LightningCLI builds the model, data and ActivationCapture."""
    from pathlib import Path

    from lightning_llm_inst.store import ActivationStore

    config = Path(__file__).resolve().parents[1] / "configs" / "capture_tiny.yaml"
    proc = subprocess.run([sys.executable, "-m", "lightning_llm_inst.cli", "lightning", "predict", "--config",
                           str(config), "--trainer.enable_progress_bar=false"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = ActivationStore(tmp_path / "runs" / "tiny" / "predict")
    assert len(store.hooks) == 6 and store.rows == 32 * 64 and store.verify().ok
