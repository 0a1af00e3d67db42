"""Configuration of a capture: which hook points, how they are stored.

Stage: the user's entry point; validated here once and handed to the capture pipeline.
"""

from __future__ import annotations

import enum

__all__ = ["HookGranularity"]


class HookGranularity(str, enum.Enum):
    """Which hook points of each transformer block a capture takes."""

    ALL = "all"
    """Residual stream (block outputs), attention outputs and MLP outputs."""
    ATTENTION_ONLY = "attention_only"
    """Attention sub-layer outputs only."""
    FFN_ONLY = "ffn_only"
    """MLP / feed-forward sub-layer outputs only."""
    RESIDUAL = "residual"
    """Block outputs (the residual stream after each block) only."""
