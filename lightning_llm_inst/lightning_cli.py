"""LightningCLI entry points: capture runs and SAE training from a YAML file.

Stage: the command line, for Lightning users::

    llm-inst lightning predict --config configs/capture_smollm2.yaml
    python -m lightning_llm_inst.lightning_cli validate --config configs/capture_tiny.yaml
    llm-inst sae fit --config configs/sae_tiny.yaml

Capture (:func:`main`): any ``LightningModule`` / ``LightningDataModule`` can be named in the YAML
(``class_path``); :class:`~lightning_llm_inst.lm.CausalLM` and :class:`~lightning_llm_inst.lm.TextDataModule`
are the defaults, and ``ActivationCapture`` goes under ``trainer.callbacks``.

SAE training (:func:`sae_main`): :class:`~lightning_llm_inst.sae.module.SAEModule` on an
:class:`~lightning_llm_inst.sae.data.ActivationDataModule`; the logger defaults to TensorBoard under
``runs/sae`` (checkpoints go to its version folder), and ``SAELensExport`` under ``trainer.callbacks``
writes the trained SAE for sae-lens.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "sae_main"]

SAE_LOG_DIR = "runs/sae"


def _run(*classes: Any, argv: Sequence[str] | None, **kwargs: Any) -> None:
    from lightning.pytorch.cli import LightningCLI

    with warnings.catch_warnings():
        # `llm-inst <command> ...` hands the rest of its own command line over as args: no mistake
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        LightningCLI(*classes, args=list(argv) if argv is not None else None, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    from lightning_llm_inst.lm import CausalLM, TextDataModule

    _run(CausalLM, TextDataModule, argv=argv, subclass_mode_model=True, subclass_mode_data=True,
         save_config_callback=None, seed_everything_default=0)


def sae_main(argv: Sequence[str] | None = None) -> None:
    """``fit`` / ``validate`` an SAE from a YAML file (``--config``), with any option overridden on the line."""
    from lightning_llm_inst.sae.data import ActivationDataModule
    from lightning_llm_inst.sae.module import SAEModule

    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": SAE_LOG_DIR, "name": "sae"}}
    _run(SAEModule, ActivationDataModule, argv=argv, trainer_defaults={"logger": logger}, seed_everything_default=0,
         parser_kwargs={"prog": "llm-inst sae"})


if __name__ == "__main__":
    main(sys.argv[1:])
