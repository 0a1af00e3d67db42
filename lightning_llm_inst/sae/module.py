"""SAE training with Lightning: a LightningModule around :class:`~lightning_llm_inst.sae.model.SparseAutoencoder`.

Stage: training, between :class:`~lightning_llm_inst.sae.data.ActivationDataModule` (batches of raw
activations ``[batch, d_in]``) and the exported SAE (``export_saelens``, the :class:`SAELensExport`
callback). :class:`SAEModule` builds the SAE once ``d_in`` is known (given, or taken from the
datamodule in ``setup``), initialises ``b_dec`` and the input scaling from a data sample when a fit
starts, trains it with Adam (warmup and linear decay of the learning rate), keeps decoder rows at unit
norm, feeds AuxK with the dead latents of the last ``dead_window_tokens`` tokens and logs loss, MSE,
FVU, L0 and the dead fraction. Validation metrics are torchmetrics objects, so they reduce exactly
across DDP ranks. Checkpoints hold plain hyperparameters, so ``SAEModule.load_from_checkpoint`` works.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import MISSING, fields
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_llm_inst.sae import metrics as M
from lightning_llm_inst.sae.model import SAEConfig, SparseAutoencoder

__all__ = ["SAELensExport", "SAEModule"]

log = logging.getLogger(__name__)

_D = {f.name: f.default for f in fields(SAEConfig) if f.default is not MISSING}
_CONFIG_KEYS = tuple(f.name for f in fields(SAEConfig))


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"SAEModule({name}={value!r}) is not valid; {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SAEModule(L.LightningModule):
    """Train a sparse autoencoder on one hook point's activations.

    The first group of arguments are the fields of :class:`~lightning_llm_inst.sae.model.SAEConfig`
    (same names and defaults); the rest set up training. Hyperparameters are saved as plain values,
    with ``d_in`` and ``d_sae`` filled in once known, so ``SAEModule.load_from_checkpoint`` rebuilds
    the same SAE (``weights_only`` loading works); checkpoints also carry ``sae_config``.

    Args:
        d_in: activation width; ``None``: the datamodule's ``d_in``, read in ``setup``.
        d_sae: number of latents; ``None``: ``round(expansion_factor * d_in)``.
        expansion_factor: ``d_sae / d_in`` when ``d_sae`` is not given.
        architecture: ``"topk"``, ``"batchtopk"``, ``"relu"`` or ``"jumprelu"``.
        k: active latents per token (topk; on average for batchtopk).
        l1_coefficient: relu: weight of the L1 penalty.
        l0_coefficient: jumprelu: weight of the L0 penalty.
        jumprelu_bandwidth: jumprelu: straight-through kernel width.
        jumprelu_init_threshold: jumprelu: initial threshold.
        batchtopk_threshold_decay: batchtopk: decay of the running inference threshold.
        aux_k: AuxK latents; ``None``: ``d_in // 2``.
        aux_coefficient: weight of the AuxK loss (0: off).
        normalize_activations: scale inputs to mean norm ``sqrt(d_in)`` (measured on the init sample).
        b_dec_init: ``"geometric_median"``, ``"mean"`` or ``"zeros"``.
        hook_name: hook point the SAE reads; ``None``: the datamodule's ``hook``.
        model_name: the captured model; ``None``: the datamodule's ``model_name``.
        dtype: parameter dtype (``"float32"``, ``"bfloat16"``, ...).
        lr: Adam learning rate; ``None``: ``2e-4 / sqrt(d_sae / 16384)`` (smaller for wider SAEs).
        lr_warmup_steps: optimizer steps of linear warmup from 0.
        lr_decay_steps: final optimizer steps over which the rate decays linearly to 0 (needs a
            finite number of steps: ``max_steps`` or ``max_epochs``).
        adam_betas: Adam's ``(beta1, beta2)``.
        dead_window_tokens: a latent that has not fired in this many training tokens (all ranks
            together) is dead: counted in ``train/dead_fraction`` and used by the AuxK loss.
        init_from_data: set ``b_dec`` and the input scaling from a data sample when a fit starts
            (not when it resumes from a checkpoint).
        init_sample_rows: rows of that sample.

    Logged: ``train/loss``, ``train/mse_loss``, ``train/sparsity_loss``, ``train/aux_loss`` (the
    training objective, normalized units), ``train/mse``, ``train/fvu``, ``train/l0`` (of the batch,
    raw units) and ``train/dead_fraction`` every step; ``val/loss``, ``val/mse``, ``val/fvu``,
    ``val/l0`` and ``val/dead_fraction`` (latents that never fired on the validation set) per
    validation run, reduced over all ranks.
    """

    def __init__(self, d_in: int | None = None, d_sae: int | None = None, expansion_factor: float = 8.0,
                 architecture: str = _D["architecture"], k: int = _D["k"], l1_coefficient: float = _D["l1_coefficient"],
                 l0_coefficient: float = _D["l0_coefficient"], jumprelu_bandwidth: float = _D["jumprelu_bandwidth"],
                 jumprelu_init_threshold: float = _D["jumprelu_init_threshold"],
                 batchtopk_threshold_decay: float = _D["batchtopk_threshold_decay"], aux_k: int | None = _D["aux_k"],
                 aux_coefficient: float = _D["aux_coefficient"],
                 normalize_activations: bool = _D["normalize_activations"], b_dec_init: str = _D["b_dec_init"],
                 hook_name: str | None = None, model_name: str | None = None, dtype: str = _D["dtype"],
                 lr: float | None = None, lr_warmup_steps: int = 0, lr_decay_steps: int = 0,
                 adam_betas: tuple[float, float] = (0.9, 0.999), dead_window_tokens: int = 10_000_000,
                 init_from_data: bool = True, init_sample_rows: int = 16384) -> None:
        super().__init__()
        _check("d_in", d_in, d_in is None or (_is_int(d_in) and d_in > 0), "use a positive integer or None")
        _check("d_sae", d_sae, d_sae is None or (_is_int(d_sae) and d_sae > 0), "use a positive integer or None")
        _check("expansion_factor", expansion_factor,
               isinstance(expansion_factor, (int, float)) and not isinstance(expansion_factor, bool)
               and expansion_factor > 0, "use a number > 0")
        _check("lr", lr, lr is None or (isinstance(lr, (int, float)) and lr > 0), "use a number > 0 or None")
        for name, value in (("lr_warmup_steps", lr_warmup_steps), ("lr_decay_steps", lr_decay_steps)):
            _check(name, value, _is_int(value) and value >= 0, "use an integer >= 0")
        _check("adam_betas", adam_betas, len(tuple(adam_betas)) == 2 and all(0 <= b < 1 for b in adam_betas),
               "use two numbers in [0, 1)")
        for name, value in (("dead_window_tokens", dead_window_tokens), ("init_sample_rows", init_sample_rows)):
            _check(name, value, _is_int(value) and value > 0, "use a positive integer")
        self.save_hyperparameters()
        self.sae: SparseAutoencoder | None = None
        self._initialized = False
        if d_in is not None:
            self._build(d_in)  # also checks the SAE settings early

    # ------------------------------------------------------------------ building
    @property
    def sae_config(self) -> SAEConfig:
        """The :class:`SAEConfig` these hyperparameters describe (``d_in`` must be known)."""
        hp = self.hparams
        if hp["d_in"] is None:
            raise ValueError("SAEModule: d_in is not known yet; give d_in or let setup() read it from the datamodule")
        d_sae = hp["d_sae"] if hp["d_sae"] is not None else max(1, round(hp["expansion_factor"] * hp["d_in"]))
        values = {key: hp[key] for key in _CONFIG_KEYS if key in hp}
        values.update(d_in=hp["d_in"], d_sae=d_sae)
        return SAEConfig(**values)

    def _build(self, d_in: int) -> None:
        self.hparams["d_in"] = d_in
        cfg = self.sae_config
        self.hparams["d_sae"] = cfg.d_sae
        self.sae = SparseAutoencoder(cfg)
        self.train_dead = M.DeadLatentFraction(cfg.d_sae, self.hparams["dead_window_tokens"])
        self.val_loss = MeanMetric()
        self.val_mse = M.ReconstructionMSE()
        self.val_fvu = M.FractionOfVarianceUnexplained(cfg.d_in)
        self.val_l0 = M.L0()
        self.val_density = M.FeatureDensity(cfg.d_sae)

    @override
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        for key in ("hook_name", "model_name"):
            source = getattr(dm, "hook" if key == "hook_name" else key, None)
            if self.hparams[key] is None and isinstance(source, str):
                self.hparams[key] = source
        if self.sae is None:
            d_in = getattr(dm, "d_in", None)
            if not _is_int(d_in):
                raise ValueError("SAEModule(d_in=None) needs a datamodule with a d_in attribute (such as "
                                 "ActivationDataModule), or give d_in")
            self._build(d_in)
        elif dm is not None and _is_int(getattr(dm, "d_in", None)) and dm.d_in != self.hparams["d_in"]:
            raise ValueError(f"SAEModule(d_in={self.hparams['d_in']}) does not match the datamodule's d_in={dm.d_in}")
        assert self.sae is not None
        self.sae.cfg.hook_name, self.sae.cfg.model_name = self.hparams["hook_name"], self.hparams["model_name"]
        world = self.trainer.world_size if self._trainer is not None else 1
        self.train_dead.window_tokens = max(1, math.ceil(self.hparams["dead_window_tokens"] / world))

    def _require_sae(self) -> SparseAutoencoder:
        if self.sae is None:
            raise RuntimeError("SAEModule: the SAE is built in setup() once d_in is known; run it through a Trainer "
                               "or give d_in")
        return self.sae

    # ------------------------------------------------------------------ initialisation and checkpoints
    @override
    def on_fit_start(self) -> None:
        if not self.hparams["init_from_data"] or self._initialized:
            return
        sae = self._require_sae()
        dm = self.trainer.datamodule
        if dm is None or not callable(getattr(dm, "sample", None)):
            rank_zero_warn("SAEModule: the datamodule has no sample(rows); the SAE is not initialised from data "
                           "(b_dec = 0, scaling_factor = 1)")
        else:
            sae.initialize_from_data(dm.sample(self.hparams["init_sample_rows"]).to(self.device))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in [*sae.parameters(), *sae.buffers()]:  # every rank starts from rank 0's exact values
                torch.distributed.broadcast(t.data, src=0)
        self._initialized = True

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sae_config"] = self.sae_config.to_dict()
        checkpoint["sae_initialized"] = self._initialized

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._initialized = bool(checkpoint.get("sae_initialized", True))

    # ------------------------------------------------------------------ training
    @override
    def forward(self, x: Tensor) -> Any:
        return self._require_sae()(x)

    def _dead_mask(self) -> Tensor:
        """Dead latents over every rank's window (a minimum over ranks under DDP)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        with self.train_dead.sync_context(should_sync=distributed, distributed_available=lambda: distributed):
            return self.train_dead.dead_mask().clone()

    @override
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        sae = self._require_sae()
        x = batch.reshape(-1, sae.cfg.d_in)  # [batch, d_in]
        dead = self._dead_mask()  # [d_sae]
        out = sae.training_loss(x, dead_mask=dead)
        self.train_dead.update(out["latents"])
        n = x.shape[0]
        every = getattr(self._trainer, "log_every_n_steps", 1) if self._trainer is not None else 1
        if every and self.global_step % every == 0:  # the batch metrics only where the logger takes them
            log = {"train/loss": out["loss"].detach(), "train/mse_loss": out["mse_loss"],
                   "train/sparsity_loss": out["sparsity_loss"], "train/aux_loss": out["aux_loss"],
                   "train/mse": M.reconstruction_mse(x, out["reconstruction"]).float(),
                   "train/fvu": M.fraction_of_variance_unexplained(x, out["reconstruction"]).float(),
                   "train/l0": M.l0(out["latents"]).float(), "train/dead_fraction": dead.float().mean()}
            self.log_dict(log, on_step=True, on_epoch=False, batch_size=n)
            self.log("loss", out["loss"].detach(), prog_bar=True, logger=False, on_step=True, on_epoch=False,
                     batch_size=n)
        return out["loss"]

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._require_sae().remove_parallel_gradients()

    @override
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._require_sae().normalize_decoder()

    # ------------------------------------------------------------------ validation
    @override
    def on_validation_epoch_start(self) -> None:
        # fresh states made in this loop's grad mode: states reset inside a validate() call's inference
        # mode are inference tensors, which a later fit's validation (no_grad) cannot update in place
        for metric in (self.val_loss, self.val_mse, self.val_fvu, self.val_l0, self.val_density):
            metric.reset()

    @override
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        sae = self._require_sae()
        x = batch.reshape(-1, sae.cfg.d_in)  # [batch, d_in]
        loss = sae.training_loss(x)["loss"]
        recon, latents = sae(x)
        self.val_loss.update(loss, weight=x.shape[0])
        self.val_mse.update(x, recon)
        self.val_fvu.update(x, recon)
        self.val_l0.update(latents)
        self.val_density.update(latents)
        for name in ("loss", "mse", "fvu", "l0"):
            self.log(f"val/{name}", getattr(self, f"val_{name}"), on_step=False, on_epoch=True, prog_bar=name == "fvu")

    @override
    def on_validation_epoch_end(self) -> None:
        if self.val_density.update_count == 0:
            return
        density = self.val_density.compute()  # [d_sae], over every rank's tokens
        self.log("val/dead_fraction", (density == 0).float().mean(), sync_dist=True)
        self.val_density.reset()

    # ------------------------------------------------------------------ optimizer
    @override
    def configure_optimizers(self) -> Any:
        sae = self._require_sae()
        hp = self.hparams
        lr = hp["lr"] if hp["lr"] is not None else 2e-4 / math.sqrt(sae.cfg.d_sae / 2**14)
        optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=tuple(hp["adam_betas"]))
        warmup, decay = hp["lr_warmup_steps"], hp["lr_decay_steps"]
        if not warmup and not decay:
            return optimizer
        total = self.trainer.estimated_stepping_batches if decay else math.inf
        if decay and not math.isfinite(total):
            raise ValueError(f"SAEModule(lr_decay_steps={decay}) needs a finite training length: set the "
                             "trainer's max_steps or max_epochs")
        decay_start = total - decay

        def factor(step: int) -> float:
            f = min(1.0, (step + 1) / warmup) if warmup else 1.0
            if decay and step >= decay_start:
                f *= max(0.0, (total - step) / decay)
            return f

        rank_zero_info(f"SAEModule: Adam lr={lr:.3g}, warmup {warmup} steps, decay over the last {decay} steps")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ export
    def export_saelens(self, directory: str | os.PathLike) -> Any:
        """Write the SAE in the layout ``sae-lens`` loads (``cfg.json`` + ``sae_weights.safetensors``)."""
        from lightning_llm_inst.sae.saelens import save_saelens

        return save_saelens(self._require_sae(), directory)


class SAELensExport(Callback):
    """Export the trained SAE for ``sae-lens`` when a fit ends (on rank 0).

    Args:
        dirpath: where to write ``cfg.json`` and ``sae_weights.safetensors``; ``None``: ``saelens/``
            in the trainer's log directory (or its ``default_root_dir``).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__()
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise TypeError(f"SAELensExport(dirpath=...) must be a path or None, got {type(dirpath).__name__}")
        self.dirpath = dirpath

    def directory(self, trainer: L.Trainer) -> str:
        if self.dirpath is not None:
            return os.fspath(self.dirpath)
        return os.path.join(trainer.log_dir or trainer.default_root_dir, "saelens")

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "export_saelens", None)):
            raise TypeError(f"SAELensExport needs a LightningModule with export_saelens(directory), such as "
                            f"SAEModule; got {type(pl_module).__name__}")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.directory(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            pl_module.export_saelens(path)  # type: ignore[operator]
            rank_zero_info(f"SAELensExport: wrote the SAE to {path}")
