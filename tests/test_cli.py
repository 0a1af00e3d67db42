"""The llm-inst command line: info and verify on real stores, LightningCLI runs, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

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


# ---------------------------------------------------------------- one-line errors

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _llm_inst(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_llm_inst.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def _one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit code 2, stderr exactly one line ``error: ...`` naming every one of ``names``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in proc.stderr, line
    for name in names:
        assert name.lower() in line.lower(), (name, line)
    return line


def _garbage_store(path: Path) -> Path:
    path.mkdir()
    (path / "manifest.json").write_text("{not json")
    return path


@pytest.mark.parametrize("command", ["info", "verify"])
@pytest.mark.parametrize("case", ["missing", "not a store", "garbage manifest"])
def test_store_errors_are_one_line(tmp_path, command, case):
    path = {"missing": lambda: tmp_path / "missing", "not a store": lambda: Path(tmp_path, "empty").mkdir() or
            tmp_path / "empty", "garbage manifest": lambda: _garbage_store(tmp_path / "bad")}[case]()
    line = _one_line_error(_llm_inst(command, str(path), cwd=tmp_path), str(path))
    if case == "garbage manifest":
        assert "manifest.json" in line


@pytest.mark.parametrize("exc", [OSError("cannot read shard-00001.h5:\n  Input/output error"),
                                 ValueError("manifest.json: rows is not an integer")])
@pytest.mark.parametrize("command", ["info", "verify"])
def test_value_and_os_errors_of_the_store_are_one_line(tmp_path, monkeypatch, capsys, exc, command):
    import lightning_llm_inst.store as store_pkg

    def fail(path, **kwargs):
        raise exc

    monkeypatch.setattr(store_pkg, "ActivationStore", fail)
    assert main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {' '.join(str(exc).split())}\n"


def test_usage_errors_are_one_line(tmp_path):
    _one_line_error(_llm_inst("info", cwd=tmp_path), "required: path")


@pytest.mark.parametrize("args, names", [
    # the dtype of CausalLM (a Literal): the option, the value and every choice
    (["lightning", "predict", "--config", str(CONFIGS / "capture_tiny.yaml"), "--model.dtype", "float64"],
     ["model.dtype", "float64", "float32", "bfloat16", "float16"]),
    # the reported defect: a model name that is not local is an error, not a random model
    (["lightning", "predict", "--config", str(CONFIGS / "capture_tiny.yaml"), "--model.model", "gpt2"],
     ["model='gpt2'", "not found locally", "nothing is downloaded", "random:<arch>"]),
    (["lightning", "predict", "--config", str(CONFIGS / "capture_tiny.yaml"), "--data.padding_side", "up"],
     ["padding_side", "up", "right", "left"]),
    # ActivationCapture's codec and granularity, configured under trainer.callbacks
    (["lightning", "predict", "--config", str(CONFIGS / "capture_tiny.yaml"),
      "--trainer.callbacks.init_args.codec", "nope"], ["codec", "nope", "zstd", "lz4"]),
    (["lightning", "predict", "--config", str(CONFIGS / "capture_tiny.yaml"),
      "--trainer.callbacks.init_args.granularity", "nope"], ["granularity", "nope", "attention_only", "ffn_only"]),
    # SAEModule's architecture and optimizer
    (["sae", "fit", "--config", str(CONFIGS / "sae_tiny.yaml"), "--model.architecture", "nope"],
     ["architecture", "nope", "topk", "batchtopk", "jumprelu"]),
    (["sae", "fit", "--config", str(CONFIGS / "sae_tiny.yaml"), "--model.optimizer", "nope"],
     ["optimizer", "nope", "adam"]),
    (["lightning", "nope"], ["nope", "predict"]),
], ids=["dtype", "model-not-local", "padding_side", "codec", "granularity", "architecture", "optimizer",
        "subcommand"])
def test_config_errors_are_one_line(tmp_path, args, names):
    _one_line_error(_llm_inst(*args, cwd=tmp_path, env={"HF_HUB_CACHE": str(tmp_path / "empty-hub-cache")}), *names)


class BoringLM(L.LightningModule):
    """A LightningModule that is not a CausalLM, with its own data: `llm-inst lightning` runs it."""

    def __init__(self, marker: str, rows: int = 6) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.marker, self.rows, self.seen = marker, rows, 0

    def predict_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(self.rows, 4), batch_size=2)

    def predict_step(self, batch, batch_idx):
        self.seen += batch.shape[0]
        return self.layer(batch)

    def on_predict_end(self) -> None:
        Path(self.marker).write_text(str(self.seen))


def test_lightning_cli_runs_any_lightning_module(tmp_path, monkeypatch):
    from lightning_llm_inst.lightning_cli import main as lightning_main

    config = tmp_path / "boring.yaml"
    config.write_text(f"""model:
  class_path: {__name__}.BoringLM
  init_args:
    marker: {tmp_path / "seen.txt"}
    rows: 6
trainer:
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
""")
    monkeypatch.chdir(tmp_path)
    lightning_main(["predict", "--config", str(config)])
    assert (tmp_path / "seen.txt").read_text() == "6"
