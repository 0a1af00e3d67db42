"""LightningCLI entry point for capture runs from a YAML file.

Stage: the command line, for Lightning users::

    llm-inst lightning predict --config configs/capture_smollm2.yaml
    python -m lightning_llm_inst.lightning_cli validate --config configs/capture_tiny.yaml

Any ``LightningModule`` / ``LightningDataModule`` can be named in the YAML (``class_path``);
:class:`~lightning_llm_inst.lm.CausalLM` and :class:`~lightning_llm_inst.lm.TextDataModule`
are the defaults, and ``ActivationCapture`` goes under ``trainer.callbacks``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    from lightning.pytorch.cli import LightningCLI

    from lightning_llm_inst.lm import CausalLM, TextDataModule

    LightningCLI(CausalLM, TextDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 args=list(argv) if argv is not None else None, save_config_callback=None,
                 seed_everything_default=0)


if __name__ == "__main__":
    main(sys.argv[1:])
