"""Safe checkpoint loading for SAE training: nothing in a checkpoint file may run code.

Stage: training, where a fit resumes or a validation starts from a checkpoint. A Lightning
checkpoint is a pickle. ``torch.load`` refuses anything but tensors and plain types when it is
called with ``weights_only=True``. Lightning passes ``weights_only=None`` unless told otherwise,
and torch then reads the environment: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns the
restriction off, and any pickled object in the file can then run code. Before torch 2.6 even
``weights_only=True`` could be bypassed (CVE-2025-32434).

So every load this package does passes ``weights_only=True`` explicitly, and refuses to run on a
torch older than 2.6:

- :func:`require_safe_torch` raises on such a torch;
- :class:`WeightsOnlyCheckpointIO` wraps a strategy's ``CheckpointIO`` and turns a
  ``weights_only=None`` load (what ``trainer.fit/validate/test/predict(ckpt_path=...)`` does by
  default) into ``weights_only=True``; an explicit ``weights_only=False`` (a file you trust) passes;
- :func:`guard_checkpoint_loading` installs it on a trainer's strategy (``SAEModule.setup`` does,
  before Lightning restores a checkpoint).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from typing_extensions import override

__all__ = ["MIN_SAFE_TORCH", "WeightsOnlyCheckpointIO", "guard_checkpoint_loading", "require_safe_torch"]

log = logging.getLogger(__name__)

MIN_SAFE_TORCH = (2, 6)
"""The oldest torch whose ``weights_only=True`` loading is not known to run code (CVE-2025-32434)."""


def _torch_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    if match is None:  # pragma: no cover - every torch release has a numeric version
        raise RuntimeError(f"cannot read the torch version {torch.__version__!r}")
    return int(match.group(1)), int(match.group(2))


def require_safe_torch(what: str = "loading a checkpoint") -> None:
    """Raise when the installed torch is older than 2.6, whose ``weights_only`` loading can run code."""
    if _torch_version() < MIN_SAFE_TORCH:
        raise RuntimeError(f"{what}: torch {torch.__version__} is older than "
                           f"{'.'.join(map(str, MIN_SAFE_TORCH))}, whose weights_only loading can run code from the "
                           "file (CVE-2025-32434); install torch>=2.6")


class WeightsOnlyCheckpointIO(CheckpointIO):
    """A ``CheckpointIO`` that loads with ``weights_only=True`` unless the caller passes ``False``.

    Saving, removing and everything else is delegated to the wrapped ``checkpoint_io``.
    """

    def __init__(self, checkpoint_io: CheckpointIO) -> None:
        if isinstance(checkpoint_io, WeightsOnlyCheckpointIO):
            checkpoint_io = checkpoint_io.checkpoint_io
        self.checkpoint_io = checkpoint_io

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)

    @override
    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is None:
            weights_only = True
        if weights_only:
            require_safe_torch(f"loading the checkpoint {path}")
        else:
            log.warning("loading %s with weights_only=False: the file can run code; load only files you trust", path)
        kwargs = {} if map_location is None else {"map_location": map_location}
        return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only, **kwargs)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        self.checkpoint_io.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.checkpoint_io.teardown()

    def __getattr__(self, name: str) -> Any:  # other attributes a strategy may read
        if name == "checkpoint_io":
            raise AttributeError(name)
        return getattr(self.checkpoint_io, name)


def guard_checkpoint_loading(trainer: Any) -> None:
    """Make ``trainer`` load checkpoints with ``weights_only=True`` by default (idempotent)."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:
        return
    current = strategy.checkpoint_io
    if not isinstance(current, WeightsOnlyCheckpointIO):
        strategy.checkpoint_io = WeightsOnlyCheckpointIO(current)
