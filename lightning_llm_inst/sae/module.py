"""SAE training with Lightning: a LightningModule around :class:`~lightning_llm_inst.sae.model.SparseAutoencoder`.

Stage: training, between :class:`~lightning_llm_inst.sae.data.ActivationDataModule` (batches of raw
activations ``[batch, d_in]``) and the exported SAE (``export_saelens``, the :class:`SAELensExport`
callback). :class:`SAEModule` builds the SAE once ``d_in`` is known (given, or taken from the
datamodule in ``setup``; until then its parameters exist uninitialised, so an optimizer can be built
over them early, as LightningCLI's ``--optimizer`` does), initialises ``b_dec`` and the input scaling
from a data sample when a fit starts, trains it with Adam or AdamW (warmup and linear decay of the
learning rate), keeps decoder rows at unit norm, feeds AuxK with the dead latents of the last
``dead_window_tokens`` tokens and logs loss, MSE, FVU, L0 and the dead fraction. Validation metrics
are torchmetrics objects, so they reduce exactly across DDP ranks. Checkpoints hold plain
hyperparameters and load with ``weights_only=True`` only (``load_from_checkpoint`` and a trainer's
``ckpt_path`` alike), so a checkpoint file cannot run code.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import MISSING, fields
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_llm_inst.sae import metrics as M
from lightning_llm_inst.sae.checkpoint import guard_checkpoint_loading, require_safe_torch
from lightning_llm_inst.sae.model import Architecture, BDecInit, DType, SAEConfig, SparseAutoencoder

__all__ = ["OptimizerName", "SAELensExport", "SAEModule"]

OptimizerName = Literal["Adam", "AdamW"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
#: the datamodule's provenance keys that fill hyperparameters left at None (see ``ActivationDataModule.provenance``)
PROVENANCE_KEYS = ("hook_name", "model_name", "context_size", "prepend_bos", "dataset_path", "seqpos_slice",
                   "excluded_token_ids")

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
        model_name: the captured model; ``None``: the datamodule's ``model_name`` (a Hub id where known).
        dtype: parameter dtype (``"float32"``, ``"float64"``, ``"float16"`` or ``"bfloat16"``).
        context_size, prepend_bos, dataset_path, seqpos_slice, excluded_token_ids: where the
            activations come from and which rows were left out, exported in ``cfg.json``'s metadata
            (see :class:`~lightning_llm_inst.sae.model.SAEConfig`); ``None``: the datamodule's.
        optimizer: ``"Adam"`` or ``"AdamW"`` (``torch.optim`` classes).
        lr: learning rate; ``None``: ``2e-4 / sqrt(d_sae / 16384)`` (smaller for wider SAEs).
        lr_warmup_steps: optimizer steps of linear warmup from 0.
        lr_decay_steps: final optimizer steps over which the rate decays linearly to 0 (needs a
            finite number of steps: ``max_steps`` or ``max_epochs``).
        adam_betas: the optimizer's ``(beta1, beta2)``.
        weight_decay: the optimizer's ``weight_decay`` (AdamW: decoupled; Adam: an L2 term).
        dead_window_tokens: a latent that has not fired in this many training tokens (all ranks
            together) is dead: counted in ``train/dead_fraction`` and used by the AuxK loss.
        init_from_data: set ``b_dec`` and the input scaling from a data sample when a fit starts
            (not when it resumes from a checkpoint).
        init_sample_rows: rows of that sample.

    Logged: ``train/loss``, ``train/mse_loss``, ``train/sparsity_loss``, ``train/aux_loss`` (the
    training objective, normalized units), ``train/mse``, ``train/fvu``, ``train/l0`` (of the batch,
    raw units) and ``train/dead_fraction`` every step; ``val/loss``, ``val/mse``, ``val/fvu``,
    ``val/l0`` and ``val/dead_fraction`` (latents that never fired on the validation set) per
    validation run, reduced over all ranks, on the rows the datamodule serves (by default without
    each sequence's first token and special tokens); ``val/fvu_all_tokens``: the FVU over every
    validation row, those left out included, when the datamodule leaves any out.

    Until ``d_in`` is known the SAE's parameters are ``UninitializedParameter`` objects (``self.sae``
    is ``None``); ``setup`` gives them their shapes and initial values in place, so an optimizer built
    over ``module.parameters()`` before the fit (LightningCLI's ``--optimizer``) trains them.
    """

    def __init__(self, d_in: int | None = None, d_sae: int | None = None, expansion_factor: float = 8.0,
                 architecture: Architecture = _D["architecture"], k: int = _D["k"],
                 l1_coefficient: float = _D["l1_coefficient"],
                 l0_coefficient: float = _D["l0_coefficient"], jumprelu_bandwidth: float = _D["jumprelu_bandwidth"],
                 jumprelu_init_threshold: float = _D["jumprelu_init_threshold"],
                 batchtopk_threshold_decay: float = _D["batchtopk_threshold_decay"], aux_k: int | None = _D["aux_k"],
                 aux_coefficient: float = _D["aux_coefficient"],
                 normalize_activations: bool = _D["normalize_activations"], b_dec_init: BDecInit = _D["b_dec_init"],
                 hook_name: str | None = None, model_name: str | None = None, dtype: DType = _D["dtype"],
                 context_size: int | None = None, prepend_bos: bool | None = None, dataset_path: str | None = None,
                 seqpos_slice: list[int | None] | None = None, excluded_token_ids: list[int] | None = None,
                 optimizer: OptimizerName = "Adam", lr: float | None = None, lr_warmup_steps: int = 0,
                 lr_decay_steps: int = 0, adam_betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 dead_window_tokens: int = 10_000_000, init_from_data: bool = True,
                 init_sample_rows: int = 16384) -> None:
        super().__init__()
        _check("optimizer", optimizer, optimizer in OPTIMIZERS, f"choose one of: {', '.join(map(repr, OPTIMIZERS))}")
        _check("weight_decay", weight_decay, isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool)
               and math.isfinite(weight_decay) and weight_decay >= 0, "use a finite number >= 0")
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
        else:  # shapes come with d_in; an optimizer may hold these objects before then
            self._pending = nn.ParameterDict([(name, UninitializedParameter())  # a list keeps the order
                                              for name in SparseAutoencoder.parameter_names(architecture)])

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
        sae = SparseAutoencoder(cfg)
        pending = self._modules.pop("_pending", None)
        if pending is not None:  # give the early parameter objects their shapes and values, in place
            for name, param in pending.items():
                value = getattr(sae, name)
                param.materialize(value.shape, device=value.device, dtype=value.dtype)
                with torch.no_grad():
                    param.copy_(value)
                setattr(sae, name, param)
        self.sae = sae
        self.train_dead = M.DeadLatentFraction(cfg.d_sae, self.hparams["dead_window_tokens"])
        self.val_loss = MeanMetric()
        self.val_mse = M.ReconstructionMSE()
        self.val_fvu = M.FractionOfVarianceUnexplained(cfg.d_in)
        self.val_fvu_all = M.FractionOfVarianceUnexplained(cfg.d_in)
        self.val_l0 = M.L0()
        self.val_density = M.FeatureDensity(cfg.d_sae)

    @override
    def setup(self, stage: str) -> None:
        if self._trainer is not None:  # before Lightning restores a ckpt_path: nothing in it may run code
            guard_checkpoint_loading(self.trainer)
        dm = self.trainer.datamodule if self._trainer is not None else None
        provenance = dm.provenance() if callable(getattr(dm, "provenance", None)) else {}
        if not provenance and isinstance(getattr(dm, "hook", None), str):  # another datamodule with hook / model_name
            provenance = {"hook_name": dm.hook, "model_name": getattr(dm, "model_name", None)}
        for key in PROVENANCE_KEYS:
            if self.hparams[key] is None and provenance.get(key) is not None:
                self.hparams[key] = provenance[key]
        if self.sae is None:
            d_in = getattr(dm, "d_in", None)
            if not _is_int(d_in):
                raise ValueError("SAEModule(d_in=None) needs a datamodule with a d_in attribute (such as "
                                 "ActivationDataModule), or give d_in")
            self._build(d_in)
        elif dm is not None and _is_int(getattr(dm, "d_in", None)) and dm.d_in != self.hparams["d_in"]:
            raise ValueError(f"SAEModule(d_in={self.hparams['d_in']}) does not match the datamodule's d_in={dm.d_in}")
        assert self.sae is not None
        self.sae.cfg = self.sae_config  # with the provenance filled in (checked again)
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

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool = True, **kwargs: Any) -> SAEModule:
        """Lightning's ``load_from_checkpoint``, with ``weights_only=True`` by default.

        The file is read with ``torch.load(weights_only=True)`` whatever the environment says
        (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is ignored), so a checkpoint cannot run code; it needs
        torch >= 2.6. Pass ``weights_only=False`` only for a file you trust.
        """
        if weights_only:
            require_safe_torch(f"SAEModule.load_from_checkpoint({os.fspath(checkpoint_path)!r})"
                               if isinstance(checkpoint_path, (str, os.PathLike)) else "SAEModule.load_from_checkpoint")
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, weights_only=weights_only, **kwargs)

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
        for metric in (self.val_loss, self.val_mse, self.val_fvu, self.val_fvu_all, self.val_l0, self.val_density):
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
        self.val_fvu_all.update(x, recon)
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
        dm = self.trainer.datamodule if self._trainer is not None else None
        excluded = dm.excluded_val_batches() if callable(getattr(dm, "excluded_val_batches", None)) else None
        if excluded is None:  # the same answer on every rank: nothing is left out of validation
            return
        sae = self._require_sae()
        with self.trainer.precision_plugin.val_step_context():
            for x in excluded:  # this rank's validation rows that the datamodule leaves out
                x = x.to(self.device).reshape(-1, sae.cfg.d_in)  # [rows, d_in]
                self.val_fvu_all.update(x, sae(x).reconstruction)
        self.log("val/fvu_all_tokens", self.val_fvu_all.compute().float(), sync_dist=True)

    # ------------------------------------------------------------------ optimizer
    @override
    def configure_optimizers(self) -> Any:
        sae = self._require_sae()
        hp = self.hparams
        lr = hp["lr"] if hp["lr"] is not None else 2e-4 / math.sqrt(sae.cfg.d_sae / 2**14)
        optimizer_class = getattr(torch.optim, hp["optimizer"])
        optimizer = optimizer_class(sae.parameters(), lr=lr, betas=tuple(hp["adam_betas"]),
                                    weight_decay=hp["weight_decay"])
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

        rank_zero_info(f"SAEModule: {hp['optimizer']} lr={lr:.3g}, warmup {warmup} steps, decay over the last {decay} steps")
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
