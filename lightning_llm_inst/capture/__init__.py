"""Capture of activations: hook points, and the hooks that hand captured tensors on."""

from lightning_llm_inst.capture.hooks import (
    HookHandles,
    HookPoint,
    ModelLayout,
    available_hook_names,
    normalize_input,
    normalize_output,
    register_hooks,
    resolve_hook_points,
    resolve_layout,
)
from lightning_llm_inst.capture.sink import ActivationSink, CountingSink

__all__ = [
    "ActivationSink",
    "CountingSink",
    "HookHandles",
    "HookPoint",
    "ModelLayout",
    "available_hook_names",
    "normalize_input",
    "normalize_output",
    "register_hooks",
    "resolve_hook_points",
    "resolve_layout",
]
