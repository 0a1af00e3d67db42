"""SAEModule trained by a Lightning Trainer on a small synthetic store: it learns, checkpoints load with
weights_only, a resumed fit continues where it stopped, and the SAE exports for sae-lens."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_llm_inst.sae import load_saelens
from lightning_llm_inst.sae.data import ActivationDataModule
from lightning_llm_inst.sae.model import SAEConfig, SparseAutoencoder
from lightning_llm_inst.sae.module import SAELensExport, SAEModule
from lightning_llm_inst.store import StoreWriter

HOOK = "blocks.1.hook_resid_post"
D_IN = 32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: threads only contend on a small CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_sparse_store(path, rows: int = 8192, features: int = 64, active: int = 3, seed: int = 0) -> None:
    """Each row: a few of ``features`` unit directions with positive weights, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(features, D_IN, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)  # [features, d_in]
    which = torch.rand(rows, features, generator=g).argsort(dim=1)[:, :active]  # [rows, active]
    weight = torch.rand(rows, active, generator=g) * 3 + 0.5
    x = torch.einsum("ra,rad->rd", weight, dictionary[which]) + 0.5  # [rows, d_in]
    with StoreWriter(path, codec="lz4", chunk_size="8KiB", metadata={"model": {"name": "synthetic"}}) as w:
        for a in range(0, rows, 1024):
            w.append({HOOK: x[a : a + 1024].bfloat16()})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("sae") / "store"
    write_sparse_store(path)
    return path


def _data(store, **kwargs) -> ActivationDataModule:
    kwargs = {"batch_size": 256, "num_workers": 0, "val_fraction": 0.1, **kwargs}
    return ActivationDataModule(store, **kwargs)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    checkpoints = any(isinstance(c, ModelCheckpoint) for c in kwargs.get("callbacks", []))
    kwargs = {"accelerator": "cpu", "logger": False, "enable_checkpointing": checkpoints, "enable_progress_bar": False,
              "enable_model_summary": False, "default_root_dir": tmp_path, **kwargs}
    return L.Trainer(**kwargs)


class _LearningRates(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_topk_sae_learns_the_store_and_keeps_decoder_rows_unit_norm(store, tmp_path):
    dm = _data(store)
    module = SAEModule(expansion_factor=2, k=4, lr=1e-2, lr_warmup_steps=10, lr_decay_steps=20,
                       init_sample_rows=2048, dead_window_tokens=4096)
    assert module.sae is None  # d_in comes from the datamodule
    lrs = _LearningRates()
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[lrs])
    before = trainer.validate(module, dm, verbose=False)[0]  # builds the SAE, not yet initialised
    trainer.fit(module, dm)
    metrics = dict(trainer.callback_metrics)
    after = trainer.validate(module, dm, verbose=False)[0]
    sae = module.sae
    assert isinstance(sae, SparseAutoencoder) and sae.cfg.d_in == D_IN and sae.cfg.d_sae == 64
    assert module.hparams["d_in"] == D_IN and module.hparams["hook_name"] == HOOK == sae.cfg.hook_name
    assert sae.cfg.model_name == "synthetic"
    assert after["val/fvu"] < 0.35 and before["val/fvu"] > 0.9
    assert after["val/fvu"] == pytest.approx(float(metrics["val/fvu"]))  # the last validation of the fit
    assert after["val/l0"] == pytest.approx(4.0)
    assert float(sae.scaling_factor) != 1.0  # initialised from data
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    for key in ("train/loss", "train/mse_loss", "train/aux_loss", "train/fvu", "train/l0", "train/dead_fraction",
                "val/loss", "val/mse", "val/dead_fraction"):
        assert key in metrics and torch.isfinite(metrics[key])
    # warmup to lr over 10 steps, flat, then a linear decay to 0 over the last 20
    steps = len(lrs.lrs)
    assert lrs.lrs[0] == pytest.approx(1e-3) and lrs.lrs[9] == pytest.approx(1e-2)
    assert lrs.lrs[steps - 21] == pytest.approx(1e-2) and lrs.lrs[-1] == pytest.approx(1e-2 / 20)


def test_dead_latents_feed_the_auxk_loss(store, tmp_path):
    seen: list[tuple[int, float]] = []

    class Spy(SAEModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            seen.append((int(self._dead_mask().sum()), float(self.trainer.callback_metrics["train/aux_loss"])))
            return loss

    module = Spy(expansion_factor=8, k=2, lr=1e-2, dead_window_tokens=512, init_sample_rows=1024)
    _trainer(tmp_path, max_steps=12, limit_val_batches=0, log_every_n_steps=1).fit(module, _data(store))
    assert any(dead > 0 for dead, _ in seen)  # 256 latents, k=2 per token: many stay silent for 512 tokens
    first_dead = next(i for i, (dead, _) in enumerate(seen) if dead > 0)
    assert all(aux == 0 for _, aux in seen[: first_dead + 1])  # no AuxK before a latent is dead
    assert any(aux > 0 for _, aux in seen[first_dead + 1 :])


@pytest.mark.parametrize("architecture", ["batchtopk", "relu", "jumprelu"])
def test_other_architectures_train(store, tmp_path, architecture):
    module = SAEModule(expansion_factor=2, architecture=architecture, k=4, lr=5e-3, init_sample_rows=1024,
                       l1_coefficient=0.01, l0_coefficient=0.01)
    trainer = _trainer(tmp_path, max_steps=25, val_check_interval=25)
    trainer.fit(module, _data(store, val_fraction=0.05))
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss"]) and m["val/fvu"] < 0.8
    assert m["train/sparsity_loss"] > 0 if architecture in ("relu", "jumprelu") else m["train/sparsity_loss"] == 0
    assert torch.allclose(module.sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    if architecture == "batchtopk":
        assert float(module.sae.threshold) > 0  # learned for inference


def test_training_without_a_validation_set(store, tmp_path):
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(SAEModule(expansion_factor=1, k=2, init_sample_rows=256), _data(store, val_fraction=0.0))
    assert trainer.global_step == 3 and not any(k.startswith("val/") for k in trainer.callback_metrics)


def test_checkpoint_loads_with_weights_only_and_resume_continues(store, tmp_path, monkeypatch):
    ckpt = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1, filename="{step}")
    module = SAEModule(expansion_factor=2, k=4, lr=1e-2, init_sample_rows=1024)
    _trainer(tmp_path, max_steps=20, callbacks=[ckpt], limit_val_batches=0).fit(module, _data(store))
    path = tmp_path / "ckpt" / "step=20.ckpt"
    raw = torch.load(path, weights_only=True)  # only plain types in it
    assert raw["sae_config"] == module.sae.cfg.to_dict() and SAEConfig.from_dict(raw["sae_config"]).d_in == D_IN
    assert raw["hyper_parameters"]["d_in"] == D_IN and raw["hyper_parameters"]["d_sae"] == 64
    assert raw["ActivationDataModule"]["epoch"] == 0 and raw["ActivationDataModule"]["batches_consumed"] == 20
    loaded = SAEModule.load_from_checkpoint(path, weights_only=True)
    x = torch.randn(5, D_IN)
    assert torch.equal(loaded(x).reconstruction, module(x).reconstruction)
    assert torch.equal(loaded.train_dead.tokens_since_fired, module.train_dead.tokens_since_fired)

    calls = []
    monkeypatch.setattr(SparseAutoencoder, "initialize_from_data", lambda self, x: calls.append(x))
    resumed = SAEModule(expansion_factor=2, k=4, lr=1e-2, init_sample_rows=1024)
    trainer = _trainer(tmp_path, max_steps=30, limit_val_batches=0)
    trainer.fit(resumed, _data(store), ckpt_path=tmp_path / "ckpt" / "step=10.ckpt")
    assert calls == []  # a resumed fit keeps the checkpoint's initialisation
    assert trainer.global_step == 30
    assert float(resumed.sae.scaling_factor) == float(module.sae.scaling_factor)


def test_export_saelens_round_trips(store, tmp_path):
    module = SAEModule(expansion_factor=2, k=4, lr=1e-2, init_sample_rows=1024)
    export = SAELensExport(tmp_path / "export")
    _trainer(tmp_path, max_steps=5, limit_val_batches=0, callbacks=[export]).fit(module, _data(store))
    assert (tmp_path / "export" / "cfg.json").exists() and (tmp_path / "export" / "sae_weights.safetensors").exists()
    back = load_saelens(tmp_path / "export")
    x = ActivationDataModule(store).sample(64)
    assert torch.allclose(back(x).reconstruction, module(x).reconstruction, atol=1e-4)
    assert torch.equal(back.encode(x) != 0, module.sae.encode(x) != 0)


def test_clear_errors(store, tmp_path):
    with pytest.raises(ValueError, match=r"SAEModule\(d_in=0\) is not valid; use a positive integer or None"):
        SAEModule(d_in=0)
    with pytest.raises(ValueError, match=r"SAEModule\(lr_warmup_steps=-1\) is not valid"):
        SAEModule(lr_warmup_steps=-1)
    with pytest.raises(ValueError, match="SAEConfig.architecture='gated' is not valid"):
        SAEModule(d_in=8, architecture="gated")
    with pytest.raises(RuntimeError, match="built in setup"):
        SAEModule()(torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"SAEModule\(d_in=16\) does not match the datamodule's d_in=32"):
        _trainer(tmp_path, max_steps=1).fit(SAEModule(d_in=16), _data(store))
    with pytest.raises(ValueError, match="lr_decay_steps=5.*finite training length"):
        _trainer(tmp_path, max_steps=-1, max_epochs=-1, limit_val_batches=0).fit(
            SAEModule(lr_decay_steps=5), _data(store))
    with pytest.raises(TypeError, match="SAELensExport needs a LightningModule with export_saelens"):
        SAELensExport().setup(None, L.LightningModule(), "fit")


def test_cli_fits_from_the_tiny_config_then_validates_the_checkpoint(store, tmp_path, monkeypatch):
    """`llm-inst sae fit --config configs/sae_tiny.yaml` with the store given on the command line."""
    from pathlib import Path

    from lightning_llm_inst.cli import main

    config = Path(__file__).resolve().parents[2] / "configs" / "sae_tiny.yaml"
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(config), f"--data.store_path={store}", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false"]
    assert main(["sae", "fit", *common, "--trainer.max_steps=12", "--trainer.val_check_interval=6"]) == 0
    run = tmp_path / "runs" / "sae" / "tiny" / "version_0"
    checkpoints = list((run / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in checkpoints] == ["epoch=0-step=12.ckpt"]
    assert (run / "saelens" / "cfg.json").exists() and (run / "saelens" / "sae_weights.safetensors").exists()
    assert list(run.glob("events.out.tfevents.*"))  # TensorBoard logs
    exported = load_saelens(run / "saelens")
    assert exported.cfg.d_in == D_IN and exported.cfg.d_sae == 4 * D_IN and exported.cfg.k == 8
    module = SAEModule.load_from_checkpoint(checkpoints[0], weights_only=True)
    assert module.sae.cfg.hook_name == HOOK
    x = torch.randn(3, D_IN)
    assert torch.allclose(exported(x).reconstruction, module(x).reconstruction, atol=1e-4)
    assert main(["sae", "validate", *common, f"--ckpt_path={checkpoints[0]}"]) == 0
