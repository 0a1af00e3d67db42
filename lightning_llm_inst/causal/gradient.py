"""AtP and EAP-IG over one batch of pairs: activation differences times metric gradients.

Stage: attribution, gradient methods. :func:`_gradient_batch_values` records the corrupt run,
then takes the metric's gradients at every node (and receiver, for edges) at the clean run
(AtP) or averaged over ``ig_steps`` runs whose input embeddings are ``x_corrupt + (k / steps)
(x_clean - x_corrupt)``, ``k = 1 .. steps`` (EAP-IG); :func:`_score_gradients` adds
``(a_corrupt - a_clean) . dM/da`` per node and ``(a_corrupt,u - a_clean,u) . dM/dx_v`` per edge
(one matrix product per group of receivers that read the same residual) to the accumulator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_llm_inst.causal.engine import Values, attention_read_grads, check_sequential, metric_sums, record
from lightning_llm_inst.causal.nodes import NodeSpace
from lightning_llm_inst.causal.pairs import PairBatch, logit_diff_per_pair
from lightning_llm_inst.causal.scores import _Accumulator, _reduce, _sae_deltas


def _grad_run(space: NodeSpace, batch: PairBatch, metric: Any, *, input_value: Tensor | None,
              receivers: bool) -> tuple[Values, dict[str, Any], float]:
    """One clean run with gradients: (values, gradients by node, metric sum)."""
    v = record(space, batch.clean, grad=True, input_value=input_value, receivers=receivers)
    msum = metric_sums(v.logits, batch, metric)[0]
    keys: list[tuple] = [("x0",), ("logits",)]
    tensors: list[Tensor] = [v.x0, v.logits]
    for layer, t in v.z.items():
        keys.append(("z", layer)), tensors.append(t)
    for layer, t in v.m.items():
        keys.append(("m", layer)), tensors.append(t)
    for hook, t in v.sae_x.items():
        keys.append(("sae", hook)), tensors.append(t)
    if receivers:
        for key, t in v.qkv.items():
            keys.append(("qkv",) + key), tensors.append(t)
        for layer, t in v.mid.items():
            keys.append(("mid", layer)), tensors.append(t)
        keys.append(("final",)), tensors.append(v.final)
    grads = torch.autograd.grad(msum, tensors, allow_unused=True)
    out: dict[Any, Any] = {}
    for key, g, t in zip(keys, grads, tensors):
        out[key] = torch.zeros_like(t, dtype=torch.float32) if g is None else g.float()
    if receivers:
        for layer in range(space.parts.n_layers):
            if "heads" in space.nodes:
                g = {kind: out.pop(("qkv", kind, layer)) for kind in "qkv"}
                out[("reads", layer)] = attention_read_grads(space, layer, v.resid[layer], g)
            else:
                for kind in "qkv":
                    out.pop(("qkv", kind, layer), None)
    return v.detached(), out, float(msum.detach())


def _senders(space: NodeSpace, clean: Values, corrupt: Values, sae_d: dict) -> tuple[Tensor, Tensor]:
    """All senders' output differences stacked ``[n, rows, seq, d]`` in write order, with their
    global sender indices ``[n]`` (SAE latents: only those that changed in this batch)."""
    parts = space.parts
    blocks, index = [], []
    for seg in space.segments:
        if seg.kind == "input":
            d = (corrupt.x0.float() - clean.x0.float())[None]
            idx = torch.tensor([seg.start])
        elif seg.kind == "heads":
            w = parts.w_out(seg.layer).float()  # [heads, head_dim, d]
            dz = corrupt.z[seg.layer].float() - clean.z[seg.layer].float()
            d = torch.einsum("bphe,hed->hbpd", dz, w)
            idx = torch.arange(seg.start, seg.start + seg.size)
        elif seg.kind == "mlp":
            d = (corrupt.m[seg.layer].float() - clean.m[seg.layer].float())[None]
            idx = torch.tensor([seg.start])
        elif seg.kind == "sae":
            df, _, rows = sae_d[seg.hook]
            changed = (df != 0).flatten(0, -2).any(dim=0).nonzero()[:, 0]
            d = torch.einsum("bpf,fd->fbpd", df[..., changed], rows[changed])
            idx = changed.cpu() + seg.start
        else:
            d = sae_d[seg.hook][1][None]
            idx = torch.tensor([seg.start])
        blocks.append(d)
        index.append(idx)
    return torch.cat(blocks), torch.cat(index)


def _receiver_grads(space: NodeSpace, grads: dict) -> list[tuple[float, Tensor, slice]]:
    """Receiver gradient groups ``(read position, [m, rows, seq, d], receiver columns)``."""
    parts = space.parts
    out = []
    col = 0
    for layer in range(parts.n_layers):
        if "heads" in space.nodes:
            g = grads[("reads", layer)]  # [heads, 3, rows, seq, d]
            n = parts.n_heads * 3
            out.append((4 * layer + 1, g.reshape(n, *g.shape[2:]), slice(col, col + n)))
            col += n
        if "mlp" in space.nodes:
            out.append((4 * layer + 3, grads[("mid", layer)][None], slice(col, col + 1)))
            col += 1
    out.append((4 * parts.n_layers + 1, grads[("final",)][None], slice(col, col + 1)))
    return out


def _add_edges(acc: _Accumulator, space: NodeSpace, deltas: Tensor, index: Tensor, writes: Tensor,
               receivers: list[tuple[float, Tensor, slice]]) -> None:
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)  # [n, rows*seq*d]
    for read, g, cols in receivers:
        k = int((writes < read).sum())
        if k == 0:
            continue
        if acc.per_position:
            e = torch.einsum("ubpd,mbpd->ump", deltas[:k], g)
        else:
            e = flat[:k] @ g.reshape(g.shape[0], -1).T  # [k, m]
        acc.edges[index[:k].to(acc.edges.device), cols] += e.double()


def _score_gradients(acc: _Accumulator, space: NodeSpace, clean: Values, corrupt: Values, grads: dict,
                     edges: bool) -> None:
    pp = acc.per_position
    sae_d = _sae_deltas(space, clean, corrupt, acc)
    for seg in space.segments:
        if seg.kind == "input":
            acc.add(seg, _reduce(((corrupt.x0.float() - clean.x0.float()) * grads[("x0",)]).sum(-1), pp), 0)
        elif seg.kind == "heads":
            dz = corrupt.z[seg.layer].float() - clean.z[seg.layer].float()
            acc.add(seg, _reduce((dz * grads[("z", seg.layer)]).sum(-1), pp))
        elif seg.kind == "mlp":
            dm = corrupt.m[seg.layer].float() - clean.m[seg.layer].float()
            acc.add(seg, _reduce((dm * grads[("m", seg.layer)]).sum(-1), pp), 0)
        elif seg.kind == "sae":
            df, _, rows = sae_d[seg.hook]
            acc.add(seg, _reduce(df * (grads[("sae", seg.hook)] @ rows.T), pp))
        else:
            acc.add(seg, _reduce((sae_d[seg.hook][1] * grads[("sae", seg.hook)]).sum(-1), pp), 0)
    dl = corrupt.logits.float() - clean.logits.float()
    acc.nodes[-1] += _reduce((dl * grads[("logits",)]).sum(-1), pp).double()
    if edges:
        deltas, index = _senders(space, clean, corrupt, sae_d)
        writes = torch.tensor(space.sender_writes(), device=deltas.device)[index.to(deltas.device)]
        _add_edges(acc, space, deltas, index, writes, _receiver_grads(space, grads))


def _per_pair(logits: Tensor, batch: PairBatch, metric: Any) -> Tensor:
    """The metric of each pair of the batch ``[batch]`` (a callable metric: its batch mean, repeated)."""
    if metric is None:
        return logit_diff_per_pair(logits, batch)
    return metric_sums(logits, batch, metric)[0].expand(len(batch)) / len(batch)


def _gradient_batch_values(space: NodeSpace, batch: PairBatch, metric: Any, method: str, ig_steps: int,
                           edges: bool, first: bool) -> tuple[Values, Values, dict, Tensor, Tensor]:
    """Clean and corrupt node outputs, the (averaged) gradients, and each pair's M(clean), M(corrupt)."""
    with torch.no_grad():
        corrupt = record(space, batch.corrupt, reads=first)
    if first:
        check_sequential(space, corrupt)
    if method == "atp":
        clean, grads, _ = _grad_run(space, batch, metric, input_value=None, receivers=edges)
    else:
        with torch.no_grad():
            clean = record(space, batch.clean)
        grads = {}
        for k in range(1, ig_steps + 1):
            x = corrupt.x0 + (k / ig_steps) * (clean.x0 - corrupt.x0)
            _, g, _ = _grad_run(space, batch, metric, input_value=x, receivers=edges)
            for key, value in g.items():
                grads[key] = grads[key] + value if key in grads else value
        grads = {key: value / ig_steps for key, value in grads.items()}
    with torch.no_grad():
        return clean, corrupt, grads, _per_pair(clean.logits, batch, metric), _per_pair(corrupt.logits, batch, metric)


def _gradient_batch(acc: _Accumulator, space: NodeSpace, batch: PairBatch, metric: Any, method: str,
                    ig_steps: int, edges: bool, first: bool) -> None:
    clean, corrupt, grads, m_clean, m_corr = _gradient_batch_values(space, batch, metric, method, ig_steps,
                                                                    edges, first)
    acc.clean_sum += float(m_clean.double().sum())
    acc.corrupt_sum += float(m_corr.double().sum())
    _score_gradients(acc, space, clean, corrupt, grads, edges)
