"""Hook sites: one forward pass of the model with each node's output and each receiver's read
exposed as a tensor that a function may record, replace or watch the gradient of.

Stage: interventions. The attribution methods and the circuit evaluation describe a forward
pass as a mapping ``site -> function``; :func:`hooked` registers the hooks (always removed on
exit) and calls each function with the tensor at its site. A function returns a tensor to
replace the value, or ``None`` to leave it. Sites (shapes for a ``[rows, seq]`` batch):

    ("input",)        input of block 0                        [rows, seq, d_model]
    ("z", L)          o_proj input, split by head             [rows, seq, heads, head_dim]
    ("mlp", L)        MLP output                              [rows, seq, d_model]
    ("resid", L)      input of the attention's norm (read)     [rows, seq, d_model]
    ("q"|"k"|"v", L)  projection output, per query head       [rows, seq, heads, head_dim]
    ("mid", L)        input of the MLP's norm                 [rows, seq, d_model]
    ("final",)        input of the final norm                 [rows, seq, d_model]
    ("lm_head",)      input of the unembedding                [rows, seq, d_model]
    ("sae", hook)     the activation an SAE reads             [rows, seq, d_model]
    ("block", L)      output of block L (only recorded)       [rows, seq, d_model]

``("resid", L)``, ``("mid", L)`` and ``("final",)`` hand the function a fresh view of the
residual stream that only that norm reads, so a gradient hook on it sees the gradient through
that read alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_llm_inst.capture.hooks import normalize_output, resolve_hook_points
from lightning_llm_inst.causal.parts import ModelParts

__all__ = ["Site", "SiteFn", "hooked", "replace_first", "sae_hook_points"]

Site = tuple[Any, ...]
SiteFn = Callable[[Tensor], "Tensor | None"]


def replace_first(value: Any, new: Tensor) -> Any:
    """``value`` with its main tensor (itself, or the first element of a tuple) replaced."""
    if isinstance(value, Tensor):
        return new
    if isinstance(value, tuple) and value and isinstance(value[0], Tensor):
        return (new, *value[1:])
    raise TypeError(f"cannot replace the tensor in a {type(value).__name__}")


def sae_hook_points(model: nn.Module, hooks: list[str]) -> dict[str, Any]:
    """The capture hook point of each SAE hook name (TransformerLens-style or a module name)."""
    out = {}
    for hook in hooks:
        points = resolve_hook_points(model, hook)
        if len(points) != 1:
            raise ValueError(f"saes: hook {hook!r} names {len(points)} hook points; give one per SAE")
        out[hook] = points[0]
    return out


def _pre(fn: SiteFn, view: bool = False) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        value = args[0] if args else kwargs["hidden_states"]
        x = normalize_output(value)
        x_in = x.view_as(x) if view else x  # a view: its gradient is this read's alone
        new = fn(x_in)
        if new is None and not view:
            return None
        value = replace_first(value, x_in if new is None else new)
        if args:
            return (value, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": value}
    return hook


def _post(fn: SiteFn) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        new = fn(normalize_output(output))
        return None if new is None else replace_first(output, new)
    return hook


def _heads(parts: ModelParts, fn: SiteFn) -> SiteFn:
    """Present a ``[..., heads * head_dim]`` tensor to ``fn`` as ``[..., heads, head_dim]``."""
    def wrapped(x: Tensor) -> Tensor | None:
        new = fn(x.view(*x.shape[:-1], parts.n_heads, parts.head_dim))
        return None if new is None else new.reshape(x.shape)
    return wrapped


def _c_attn(parts: ModelParts, fns: Mapping[str, SiteFn]) -> Callable[..., Any]:
    """GPT-2's fused q, k, v projection, split into the three sites."""
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        thirds = list(output.split(parts.d_model, dim=-1))
        changed = False
        for i, kind in enumerate("qkv"):
            if kind in fns:
                new = _heads(parts, fns[kind])(thirds[i])
                if new is not None:
                    thirds[i], changed = new, True
        return torch.cat(thirds, dim=-1) if changed else None
    return hook


@contextlib.contextmanager
def hooked(parts: ModelParts, fns: Mapping[Site, SiteFn], sae_points: Mapping[str, Any] | None = None
           ) -> Iterator[None]:
    """Register a hook per site in ``fns`` for the duration of the block."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        qkv: dict[int, dict[str, SiteFn]] = {}
        for site, fn in fns.items():
            kind = site[0]
            if kind == "input":
                handles.append(parts.blocks[0].block.register_forward_pre_hook(_pre(fn), with_kwargs=True))
            elif kind == "z":
                handles.append(parts.blocks[site[1]].o_proj.register_forward_pre_hook(
                    _pre(_heads(parts, fn)), with_kwargs=True))
            elif kind == "mlp":
                handles.append(parts.blocks[site[1]].mlp.register_forward_hook(_post(fn)))
            elif kind == "resid":
                handles.append(parts.blocks[site[1]].ln_attn.register_forward_pre_hook(_pre(fn, view=True),
                                                                                       with_kwargs=True))
            elif kind == "mid":
                handles.append(parts.blocks[site[1]].ln_mlp.register_forward_pre_hook(_pre(fn, view=True),
                                                                                      with_kwargs=True))
            elif kind == "final":
                handles.append(parts.final_norm.register_forward_pre_hook(_pre(fn, view=True), with_kwargs=True))
            elif kind == "lm_head":
                handles.append(parts.lm_head.register_forward_pre_hook(_pre(fn), with_kwargs=True))
            elif kind == "block":
                handles.append(parts.blocks[site[1]].block.register_forward_hook(_post(fn)))
            elif kind in ("q", "k", "v"):
                qkv.setdefault(site[1], {})[kind] = fn
            elif kind == "sae":
                point = (sae_points or {})[site[1]]
                module = parts.model.get_submodule(point.module_name)
                if point.pre:
                    handles.append(module.register_forward_pre_hook(_pre(fn), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(_post(fn)))
            else:
                raise ValueError(f"unknown hook site {site!r}")
        for layer, by_kind in qkv.items():
            p = parts.blocks[layer]
            if p.c_attn is not None:
                handles.append(p.c_attn.register_forward_hook(_c_attn(parts, by_kind)))
                continue
            for kind, fn in by_kind.items():
                proj = {"q": p.q_proj, "k": p.k_proj, "v": p.v_proj}[kind]
                handles.append(proj.register_forward_hook(_post(_heads(parts, fn))))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def skipped_blocks(parts: ModelParts, outputs: Mapping[int, Any]) -> Iterator[None]:
    """Blocks in ``outputs`` return the given output instead of computing (layers below a patch
    compute what the clean run computed; their recorded output is reused)."""
    saved = []
    try:
        for layer, out in outputs.items():
            block = parts.blocks[layer].block
            saved.append((block, block.__dict__.get("forward")))
            block.forward = (lambda value: (lambda *a, **k: value))(out)  # type: ignore[method-assign]
        yield
    finally:
        for block, original in saved:
            if original is None:
                del block.forward
            else:
                block.forward = original


def run_model(parts: ModelParts, ids: Tensor) -> Tensor:
    """Logits of a forward pass over ``ids [rows, seq]`` (no cache)."""
    out = parts.model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else normalize_output(out)
