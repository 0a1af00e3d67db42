"""A checkpoint file cannot run code through any of our loading paths, even when the environment
asks torch to unpickle anything (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``), and an old torch whose
``weights_only`` loading is unsafe is refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_llm_inst.sae import load_saelens
from lightning_llm_inst.sae.data import ActivationDataModule
from lightning_llm_inst.sae.module import SAEModule
from tests.sae.test_module import D_IN, write_sparse_store

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sae_tiny.yaml"


class Payload:
    """Unpickling this creates ``marker``: the stand-in for code an attacker's file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("safety") / "store"
    write_sparse_store(path, rows=2048)
    return path


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A checkpoint-shaped file holding a payload, with the environment set to load it unrestricted."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    hparams = {"d_in": D_IN, "d_sae": 2 * D_IN, "k": 4}
    torch.save({"state_dict": {}, "hyper_parameters": hparams, "pytorch-lightning_version": L.__version__,
                "epoch": 0, "global_step": 0, "loops": {}, "callbacks": {}, "extra": Payload(marker)}, path)
    # the file is live: loaded without the restriction, it runs
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return path, marker


def _trainer(tmp_path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, max_steps=1)


def _refused(exc_info, marker: Path) -> None:
    chain, exc = [], exc_info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(e, pickle.UnpicklingError) for e in chain), chain
    assert not marker.exists()


def test_load_from_checkpoint_does_not_run_a_payload(planted):
    path, marker = planted
    with pytest.raises(pickle.UnpicklingError) as info:
        SAEModule.load_from_checkpoint(path)
    _refused(info, marker)


@pytest.mark.parametrize("loop", ["fit", "validate"])
def test_trainer_ckpt_path_does_not_run_a_payload(planted, store, tmp_path, loop):
    path, marker = planted
    dm = ActivationDataModule(store, batch_size=256, num_workers=0, val_fraction=0.25)
    with pytest.raises(pickle.UnpicklingError) as info:
        getattr(_trainer(tmp_path), loop)(SAEModule(expansion_factor=2, k=4), dm, ckpt_path=path)
    _refused(info, marker)


def test_cli_validate_ckpt_path_does_not_run_a_payload(planted, store, tmp_path, monkeypatch):
    from lightning_llm_inst.cli import main

    path, marker = planted
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception) as info:  # noqa: PT011 - the CLI may wrap it; the chain must hold it
        main(["sae", "validate", "--config", str(CONFIG), f"--data.store_path={store}", f"--ckpt_path={path}",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    _refused(info, marker)


def test_load_saelens_does_not_unpickle(planted, tmp_path):
    _, marker = planted
    directory = tmp_path / "sae"
    directory.mkdir()
    (directory / "cfg.json").write_text('{"architecture": "standard", "d_in": 4, "d_sae": 8}')
    torch.save({"W_enc": Payload(marker)}, directory / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_saelens(directory)
    assert not marker.exists()


def test_real_checkpoints_still_load_with_the_environment_set(store, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    ckpt = ModelCheckpoint(tmp_path / "ckpt", filename="last")
    dm = ActivationDataModule(store, batch_size=256, num_workers=0, val_fraction=0.25)
    module = SAEModule(expansion_factor=2, k=4, init_sample_rows=512)
    L.Trainer(accelerator="cpu", logger=False, callbacks=[ckpt], enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, max_steps=3).fit(module, dm)
    loaded = SAEModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    x = torch.randn(4, D_IN)
    assert torch.equal(loaded(x).reconstruction, module(x).reconstruction)
    result = _trainer(tmp_path).validate(SAEModule(expansion_factor=2, k=4), dm,
                                         ckpt_path=tmp_path / "ckpt" / "last.ckpt", verbose=False)
    assert result[0]["val/fvu"] > 0


def test_an_old_torch_is_refused(planted, store, tmp_path, monkeypatch):
    path, marker = planted
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(RuntimeError, match=r"torch 2.5.1 is older than 2.6.*CVE-2025-32434"):
        SAEModule.load_from_checkpoint(path)
    dm = ActivationDataModule(store, batch_size=256, num_workers=0, val_fraction=0.25)
    with pytest.raises(RuntimeError, match="CVE-2025-32434"):
        _trainer(tmp_path).validate(SAEModule(expansion_factor=2, k=4), dm, ckpt_path=path)
    assert not marker.exists()
