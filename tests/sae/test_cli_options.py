"""`llm-inst sae` options with a fixed set of values: a wrong value is one short line on stderr that
names the choices; `--optimizer AdamW` (LightningCLI's own option) and `--model.optimizer=AdamW` train."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.sae.test_module import write_sparse_store

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "sae_tiny.yaml"
LLM_INST = Path(sys.executable).parent / "llm-inst"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "store"
    write_sparse_store(path, rows=2048)
    return path


def llm_inst(store, cwd, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(LLM_INST), "sae", "fit", "--config", str(CONFIG), f"--data.store_path={store}",
           "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def _check_one_line(returncode: int, stderr: str, option: str, choices: list[str]) -> None:
    assert returncode != 0
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) <= 2, stderr  # no usage dump, no traceback
    key, value = option[2:].split("=")
    assert key in stderr and value in stderr
    assert all(c in stderr for c in choices), stderr


@pytest.mark.parametrize("option, choices", [
    ("--model.architecture=gated", ["'topk'", "'batchtopk'", "'relu'", "'jumprelu'"]),
    ("--model.optimizer=SGD", ["'Adam'", "'AdamW'"]),
])
def test_a_value_outside_the_choices_is_one_line_naming_them(store, tmp_path, option, choices):
    done = llm_inst(store, tmp_path, option)
    _check_one_line(done.returncode, done.stderr, option, choices)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("option, choices", [
    ("--model.dtype=float8", ["'float32'", "'float64'", "'float16'", "'bfloat16'"]),
    ("--model.b_dec_init=median", ["'geometric_median'", "'mean'", "'zeros'"]),
    ("--data.dtype=int8", ["'float32'", "'bfloat16'", "'float16'"]),
])
def test_other_enum_options_in_process(store, tmp_path, monkeypatch, capsys, option, choices):
    from lightning_llm_inst.cli import main

    monkeypatch.chdir(tmp_path)
    try:
        code = main(["sae", "fit", "--config", str(CONFIG), f"--data.store_path={store}", option])
    except SystemExit as exc:
        code = exc.code
    _check_one_line(code, capsys.readouterr().err, option, choices)


def _optimizer_state(run: Path) -> dict:
    (ckpt,) = (run / "checkpoints").glob("*.ckpt")
    raw = torch.load(ckpt, weights_only=True)
    return raw["optimizer_states"][0]["param_groups"][0] | {"schedulers": raw["lr_schedulers"]}


def test_lightning_cli_optimizer_option_trains_the_sae(store, tmp_path):
    done = llm_inst(store, tmp_path, "--optimizer", "AdamW", "--optimizer.lr=0.002", "--trainer.max_steps=4")
    assert done.returncode == 0, done.stderr[-3000:]
    group = _optimizer_state(tmp_path / "runs" / "sae" / "tiny" / "version_0")
    assert group["decoupled_weight_decay"] is True and group["lr"] == pytest.approx(0.002)
    assert len(group["params"]) == 4  # W_dec, W_enc, b_enc, b_dec: the SAE's parameters, built from the store's d_in


def test_module_optimizer_option_trains_with_the_schedule(store, tmp_path, monkeypatch):
    from lightning_llm_inst.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sae", "fit", "--config", str(CONFIG), f"--data.store_path={store}", "--model.optimizer=AdamW",
                 "--model.weight_decay=0.05", "--trainer.max_steps=4", "--trainer.enable_progress_bar=false"]) == 0
    group = _optimizer_state(tmp_path / "runs" / "sae" / "tiny" / "version_0")
    assert group["decoupled_weight_decay"] is True and group["weight_decay"] == pytest.approx(0.05)
    assert group["schedulers"]  # the module's warmup / decay schedule is kept
