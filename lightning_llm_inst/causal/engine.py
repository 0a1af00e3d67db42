"""Runs of the model for attribution: record every node's output, take gradients of the
metric at every node and receiver, or run with some nodes patched.

Stage: interventions, one level above :mod:`~lightning_llm_inst.causal.sites`. A *record* run
keeps each node's output (detached) in a :class:`Values`; a *gradient* run also keeps the
tensors themselves so that one ``torch.autograd.grad`` call gives the metric's gradient at all
of them; receiver gradients for the q, k and v reads of each head come from the projection
outputs through one batched vector-Jacobian product of the attention's norm (every head's read
is the same residual, normalised by the same norm, then multiplied by its own rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_llm_inst.causal.nodes import NodeSpace
from lightning_llm_inst.causal.pairs import MetricFn, PairBatch, logit_diff_per_pair
from lightning_llm_inst.causal.sites import Site, SiteFn, hooked, replace_first, run_model

__all__ = ["Values", "metric_sums", "record", "sae_parts", "training_off"]


@dataclass
class Values:
    """Node outputs (and reads) of one run over a batch; tensors ``[rows, seq, ...]``."""

    x0: Tensor | None = None  # input of block 0
    z: dict[int, Tensor] = field(default_factory=dict)  # [rows, seq, heads, head_dim]
    m: dict[int, Tensor] = field(default_factory=dict)  # MLP outputs
    sae_x: dict[str, Tensor] = field(default_factory=dict)  # SAE inputs
    resid: dict[int, Tensor] = field(default_factory=dict)  # attention's read (norm input)
    mid: dict[int, Tensor] = field(default_factory=dict)  # MLP's read
    final: Tensor | None = None  # the unembedding's read
    qkv: dict[tuple[str, int], Tensor] = field(default_factory=dict)  # projection outputs per query head
    blocks: dict[int, Any] = field(default_factory=dict)  # raw block outputs (for reuse below a patch)
    logits: Tensor | None = None

    def detached(self) -> Values:
        def d(t: Any) -> Any:
            return t.detach() if isinstance(t, Tensor) else t
        return Values(d(self.x0), {k: d(v) for k, v in self.z.items()}, {k: d(v) for k, v in self.m.items()},
                      {k: d(v) for k, v in self.sae_x.items()}, {k: d(v) for k, v in self.resid.items()},
                      {k: d(v) for k, v in self.mid.items()}, d(self.final),
                      {k: d(v) for k, v in self.qkv.items()}, self.blocks, d(self.logits))


@contextlib.contextmanager
def training_off(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the block, the previous mode restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def sae_parts(sae: Any) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``(decoder rows in raw units [d_sae, d_in], encode)`` of an SAE: latent i adds
    ``f_i * rows[i]`` to the activation; the rest (the error term) is ``x - f @ rows``."""
    rows = sae.W_dec.detach() / sae.scaling_factor.detach()
    return rows, sae.encode


def _block_recorder(values: Values, layer: int) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            values.blocks[layer] = output.detach()
        elif isinstance(output, tuple):
            values.blocks[layer] = tuple(o.detach() if isinstance(o, Tensor) else o for o in output)
    return hook


def record(space: NodeSpace, ids: Tensor, *, grad: bool = False, input_value: Tensor | None = None,
           reads: bool = False, receivers: bool = False, blocks: bool = False,
           extra: dict[Site, SiteFn] | None = None) -> Values:
    """One forward pass over ``ids`` keeping every node's output.

    ``grad``: keep the live tensors (on the autograd path; the input becomes a leaf that
    requires grad) for :func:`torch.autograd.grad`. ``input_value`` replaces the input of
    block 0 (integrated gradients). ``reads``: also keep the residual the attention, the MLP
    and the unembedding read. ``receivers``: keep the q/k/v projection outputs and the reads
    on the autograd path (edge gradients). ``blocks``: keep raw block outputs.
    """
    parts = space.parts
    v = Values()
    live = grad

    def keep(store: Callable[[Tensor], None]) -> SiteFn:
        def fn(x: Tensor) -> Tensor | None:
            if live:
                y = x.view_as(x)
                store(y)
                return y
            store(x.detach())
            return None
        return fn

    def on_input(x: Tensor) -> Tensor | None:
        value = x if input_value is None else input_value
        if live:
            leaf = value.detach().clone().requires_grad_(True)
            v.x0 = leaf
            return leaf
        v.x0 = value.detach()
        return None if input_value is None else input_value

    fns: dict[Site, SiteFn] = {("input",): on_input}
    for layer in range(parts.n_layers):
        if "heads" in space.nodes or receivers:
            fns[("z", layer)] = keep(lambda t, layer=layer: v.z.__setitem__(layer, t))
        if "mlp" in space.nodes or receivers:
            fns[("mlp", layer)] = keep(lambda t, layer=layer: v.m.__setitem__(layer, t))
        if reads or receivers:
            fns[("resid", layer)] = lambda t, layer=layer: v.resid.__setitem__(layer, t.detach())
            fns[("mid", layer)] = lambda t, layer=layer: v.mid.__setitem__(layer, t if receivers and live else t.detach())
        if receivers:
            for kind in "qkv":
                fns[(kind, layer)] = keep(lambda t, kind=kind, layer=layer: v.qkv.__setitem__((kind, layer), t))
    if reads or receivers:
        fns[("final",)] = lambda t: setattr(v, "final", t if receivers and live else t.detach())
    for hook in space.saes:
        fns[("sae", hook)] = keep(lambda t, hook=hook: v.sae_x.__setitem__(hook, t))
    fns.update(extra or {})
    handles = []
    try:
        if blocks:
            handles = [p.block.register_forward_hook(_block_recorder(v, i)) for i, p in enumerate(parts.blocks)]
        with hooked(parts, fns, space.sae_points), torch.set_grad_enabled(grad):
            logits = run_model(parts, ids)
    finally:
        for h in handles:
            h.remove()
    v.logits = logits if grad else logits.detach()
    return v


def metric_sums(logits: Tensor, batch: PairBatch, metric: MetricFn | None, reps: int = 1) -> Tensor:
    """Sum over the batch's pairs of the metric, for each of ``reps`` stacked copies: ``[reps]``."""
    n = len(batch)
    if metric is None:
        return logit_diff_per_pair(logits, batch).view(reps, n).sum(dim=1)
    out = []
    for r in range(reps):
        value = metric(logits[r * n:(r + 1) * n], batch.pairs)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"metric: the callable must return a scalar tensor, got "
                             f"{type(value).__name__}{tuple(value.shape) if isinstance(value, Tensor) else ''}")
        out.append(value.reshape(()).float() * n)
    return torch.stack(out)


def attention_read_grads(space: NodeSpace, layer: int, resid: Tensor, grads: dict[str, Tensor]) -> Tensor:
    """Gradient of the metric at each head's q, k and v read of the residual stream:
    ``[heads, 3, rows, seq, d_model]`` (q, k, v), from the gradients at the projection
    outputs ``grads[kind] [rows, seq, heads, head_dim]`` and the read residual ``resid``."""
    parts = space.parts
    us = []
    for kind in "qkv":
        w, _ = parts.w_in(layer, kind)  # [heads, head_dim, d_model]
        us.append(torch.einsum("bphe,hed->bphd", grads[kind].to(w.dtype), w))  # [rows, seq, heads, d_model]
    u = torch.stack(us, dim=3)  # [rows, seq, heads, 3, d_model]
    with torch.enable_grad():
        x = resid.detach()[:, :, None, None, :].expand(u.shape).contiguous().requires_grad_(True)
        h = parts.blocks[layer].ln_attn.forward(x)
        (gx,) = torch.autograd.grad(h, x, u.to(h.dtype))
    return gx.float().permute(2, 3, 0, 1, 4)  # [heads, 3, rows, seq, d_model]


def repeat_block_outputs(outputs: dict[int, Any], reps: int) -> dict[int, Any]:
    """Block outputs for ``reps`` stacked copies of the batch."""
    out: dict[int, Any] = {}
    for layer, value in outputs.items():
        main = value if isinstance(value, Tensor) else value[0]
        out[layer] = replace_first(value, main.repeat(reps, *([1] * (main.dim() - 1))))
    return out


def check_sequential(space: NodeSpace, v: Values, tol: float = 1e-3) -> None:
    """Refuse a model whose blocks are not ``x + attn(norm(x))`` then ``+ mlp(norm(x))``:
    the MLP's read plus the MLP output must be the next attention's read."""
    parts = space.parts
    for layer in range(parts.n_layers):
        if layer not in v.m or layer not in v.mid:
            return
        nxt = v.resid.get(layer + 1) if layer + 1 < parts.n_layers else v.final
        if nxt is None:
            return
        expect = (v.mid[layer] + v.m[layer]).float()
        err = (nxt.float() - expect).abs().max().item()
        scale = expect.abs().max().item() + 1e-6
        if err > tol * scale:
            raise ValueError(f"model: block {layer} of {type(parts.model).__name__} is not sequential pre-norm "
                             f"(residual after the block differs from the MLP's read plus the MLP output by "
                             f"{err:.3g}); causal attribution needs x + attn(norm(x)) then + mlp(norm(x))")
