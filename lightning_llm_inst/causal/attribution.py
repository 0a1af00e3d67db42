"""Attribution: the score of every node (and edge) of a causal graph, from a live model.

Stage: analysis. ``attribute(model, pairs)`` runs the corrupt prompts once to record every
node's output, then, per method:

- ``"atp"``: one forward and backward pass of the clean prompts; ``score(n) = (a_corrupt - a_clean)
  . dM/da`` at the clean run;
- ``"eap-ig"``: the same product with the gradient averaged over ``ig_steps`` runs whose input
  embeddings are ``x_corrupt + (k / steps) (x_clean - x_corrupt)``, ``k = 1 .. steps``;
- ``"exact"``: one patched run per node (all nodes of a chunk stacked into one batch; blocks
  below the lowest patched layer reuse the clean run's outputs): ``M(patched) - M(clean)``.

Edges (``atp`` / ``eap-ig``) score ``(a_corrupt,u - a_clean,u) . dM/dx_v`` for every sender u
upstream of each receiver v's read. Everything accumulates in float32; scores are means over
pairs, summed over positions unless ``per_position``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_llm_inst.causal.engine import (Values, attention_read_grads, check_sequential, metric_sums, record,
                                              repeat_block_outputs, sae_parts, training_off)
from lightning_llm_inst.causal.graph import CausalGraph
from lightning_llm_inst.causal.nodes import NodeSpace, Segment
from lightning_llm_inst.causal.pairs import Metric, PairBatch, PromptPairs, logit_diff_per_pair, resolve_metric
from lightning_llm_inst.causal.parts import ModelParts
from lightning_llm_inst.causal.sites import Site, SiteFn, hooked, run_model, sae_hook_points, skipped_blocks

__all__ = ["METHODS", "attribute"]

METHODS = ("atp", "eap-ig", "exact")


def _check_args(model: Any, pairs: Any, method: str, ig_steps: int, batch_size: int, edges: bool,
                per_position: bool, saes: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a Hugging Face causal LM (torch.nn.Module), got {type(model).__name__}")
    if not isinstance(pairs, PromptPairs):
        raise TypeError(f"pairs: expected a PromptPairs (PromptPairs.from_text / from_jsonl), got {type(pairs).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}; allowed: {', '.join(repr(m) for m in METHODS)}")
    if not isinstance(ig_steps, int) or isinstance(ig_steps, bool) or ig_steps < 1:
        raise ValueError(f"ig_steps: got {ig_steps!r}; allowed: an integer >= 1")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size!r}; allowed: an integer >= 1")
    if edges and method == "exact":
        raise ValueError("edges: exact edge scores need one run per edge; use method='atp' or 'eap-ig' for "
                         "edges and verify(model, pairs, graph, k, edges=True) for exact path patching of the top edges")
    if per_position and len(set(pairs.lengths)) > 1:
        raise ValueError(f"per_position: needs pairs of one token length; got lengths {sorted(set(pairs.lengths))}")
    if saes is not None and not isinstance(saes, Mapping):
        raise TypeError(f"saes: expected a mapping {{hook name: SparseAutoencoder}}, got {type(saes).__name__}")


def build_space(model: torch.nn.Module, nodes: Sequence[str], saes: Mapping[str, Any] | None) -> NodeSpace:
    parts = ModelParts(model)
    points = sae_hook_points(model, list(saes or {}))
    for hook, sae in (saes or {}).items():
        if int(sae.cfg.d_in) != parts.d_model:
            raise ValueError(f"saes: the SAE at {hook!r} has d_in {sae.cfg.d_in}, the model's d_model is "
                             f"{parts.d_model}; SAE nodes need SAEs on residual-width hook points")
    return NodeSpace(parts, nodes, saes, points)


def _reduce(t: Tensor, per_position: bool) -> Tensor:
    """``[rows, seq, *rest]`` -> sum over rows (and seq) -> ``[*rest]`` or ``[*rest, seq]``."""
    t = t.float().sum(dim=0)
    return t.movedim(0, -1) if per_position else t.sum(dim=0)


class _Accumulator:
    """Node scores ``[senders (+1 logits), (seq)]`` and edge scores ``[senders, receivers, (seq)]``."""

    def __init__(self, space: NodeSpace, per_position: bool, seq: int, edges: bool, device: torch.device) -> None:
        extra = (seq,) if per_position else ()
        self.space = space
        self.per_position = per_position
        self.nodes = torch.zeros(space.num_senders + 1, *extra, dtype=torch.float64, device=device)
        n_recv = len(space.receiver_names)
        self.edges = torch.zeros(space.num_senders, n_recv, *extra, dtype=torch.float64, device=device) if edges else None
        self.active = {hook: torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool, device=device)
                       for hook, sae in space.saes.items()}
        self.clean_sum = 0.0
        self.corrupt_sum = 0.0
        self.pairs = 0

    def add(self, seg: Segment, value: Tensor, offset: int = 0) -> None:
        """``value [seg.size, (seq)]`` or one row at ``offset``."""
        if value.dim() == (1 if self.per_position else 0):
            self.nodes[seg.start + offset] += value.double()
        else:
            self.nodes[seg.start:seg.start + seg.size] += value.double()


def _sae_deltas(space: NodeSpace, clean: Values, corrupt: Values, acc: _Accumulator
                ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Per SAE: ``(delta f [rows, seq, d_sae], delta err [rows, seq, d], decoder rows [d_sae, d])``."""
    out = {}
    for hook, sae in space.saes.items():
        rows, encode = sae_parts(sae)
        with torch.no_grad():
            f_clean = encode(clean.sae_x[hook].detach()).float()
            f_corr = encode(corrupt.sae_x[hook]).float()
        acc.active[hook] |= (f_clean != 0).flatten(0, -2).any(dim=0) | (f_corr != 0).flatten(0, -2).any(dim=0)
        df = f_corr - f_clean  # [rows, seq, d_sae]
        dx = (corrupt.sae_x[hook].float() - clean.sae_x[hook].detach().float())
        out[hook] = (df, dx - df @ rows.float(), rows.float())
    return out


# ---------------------------------------------------------------------------- gradient methods
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


# ---------------------------------------------------------------------------- exact patching
def _replicas(space: NodeSpace, sae_d: dict, seq: int, per_position: bool) -> list[tuple[Segment, int, int | None]]:
    """(segment, offset, position or None) for every patch of this batch, lowest layer first."""
    out = []
    for seg in space.segments:
        if seg.kind == "sae":
            changed = (sae_d[seg.hook][0] != 0).flatten(0, -2).any(dim=0).nonzero()[:, 0].tolist()
            offsets = changed
        else:
            offsets = list(range(seg.size))
        for off in offsets:
            for pos in (range(seq) if per_position else [None]):
                out.append((seg, off, pos))
    return out


def _patch_fns(space: NodeSpace, chunk: list, clean: Values, corrupt: Values, sae_d: dict, rows: int
               ) -> dict[Site, SiteFn]:
    """Site functions that set, in copy c of the batch, node chunk[c] to its corrupt value."""
    by_site: dict[Site, list[tuple[int, Segment, int, int | None]]] = {}
    for c, (seg, off, pos) in enumerate(chunk):
        site: Site = {"input": ("input",), "heads": ("z", seg.layer), "mlp": ("mlp", seg.layer)}.get(
            seg.kind, ("sae", seg.hook))
        by_site.setdefault(site, []).append((c, seg, off, pos))
    reps = len(chunk)

    def make(site: Site, items: list) -> SiteFn:
        def fn(x: Tensor) -> Tensor:
            y = x.clone()
            yv = y.view(reps, rows, *y.shape[1:])
            for c, seg, off, pos in items:
                sl = slice(None) if pos is None else slice(pos, pos + 1)
                if seg.kind == "input":
                    yv[c, :, sl] = corrupt.x0[:, sl].to(y.dtype)
                elif seg.kind == "heads":
                    yv[c, :, sl, off] = corrupt.z[seg.layer][:, sl, off].to(y.dtype)
                elif seg.kind == "mlp":
                    yv[c, :, sl] = corrupt.m[seg.layer][:, sl].to(y.dtype)
                elif seg.kind == "sae":
                    df, _, dec = sae_d[seg.hook]
                    yv[c, :, sl] += (df[:, sl, off, None] * dec[off]).to(y.dtype)
                else:
                    yv[c, :, sl] += sae_d[seg.hook][1][:, sl].to(y.dtype)
            return y
        return fn

    return {site: make(site, items) for site, items in by_site.items()}


def _lowest_layer(chunk: list) -> int:
    return min(seg.layer for seg, _, _ in chunk)


def _exact_batch(acc: _Accumulator, space: NodeSpace, batch: PairBatch, metric: Any, first: bool,
                 token_budget: int, bar: Any, only: set[int] | None = None) -> None:
    with torch.no_grad():
        corrupt = record(space, batch.corrupt, reads=first)
        if first:
            check_sequential(space, corrupt)
        clean = record(space, batch.clean, blocks=True)
        m_clean = float(metric_sums(clean.logits, batch, metric)[0])
        m_corr = float(metric_sums(corrupt.logits, batch, metric)[0])
        acc.clean_sum += m_clean
        acc.corrupt_sum += m_corr
        sae_d = _sae_deltas(space, clean, corrupt, acc)
        rows, seq = batch.clean.shape
        if acc.per_position:
            acc.nodes[-1] += _exact_logits_per_position(space, batch, metric, clean, corrupt, m_clean)
        else:
            acc.nodes[-1] += m_corr - m_clean
        replicas = _replicas(space, sae_d, seq, acc.per_position)
        if only is not None:
            replicas = [r for r in replicas if r[0].start + r[1] in only]
        per_chunk = max(1, token_budget // (rows * seq))
        last_only = metric is None
        for start in range(0, len(replicas), per_chunk):
            chunk = replicas[start:start + per_chunk]
            reps = len(chunk)
            fns = _patch_fns(space, chunk, clean, corrupt, sae_d, rows)
            if last_only:
                fns[("lm_head",)] = lambda x: x[:, -1:]
            skip = repeat_block_outputs({i: clean.blocks[i] for i in range(max(0, _lowest_layer(chunk)))}, reps)
            with skipped_blocks(space.parts, skip), hooked(space.parts, fns, space.sae_points):
                logits = run_model(space.parts, batch.clean.repeat(reps, 1))
            m = metric_sums(logits, batch, metric, reps) - m_clean  # [reps]
            for c, (seg, off, pos) in enumerate(chunk):
                if pos is None:
                    acc.nodes[seg.start + off] += float(m[c])
                else:
                    acc.nodes[seg.start + off, pos] += float(m[c])
            if bar is not None:
                bar.update(reps)


def _exact_logits_per_position(space: NodeSpace, batch: PairBatch, metric: Any, clean: Values, corrupt: Values,
                               m_clean: float) -> Tensor:
    """Exact score of the sink per position: the clean logits with one position's logits corrupt."""
    seq = batch.clean.shape[1]
    out = torch.zeros(seq, dtype=torch.float64, device=acc_device(clean))
    for pos in range(seq):
        logits = clean.logits.clone()
        logits[:, pos] = corrupt.logits[:, pos]
        out[pos] = float(metric_sums(logits, batch, metric)[0]) - m_clean
    return out


def acc_device(v: Values) -> torch.device:
    return v.logits.device


# ---------------------------------------------------------------------------- the entry point
def attribute(model: torch.nn.Module, pairs: PromptPairs, *, method: str = "atp",
              nodes: Sequence[str] = ("heads", "mlp"), edges: bool = False, metric: Metric = "logit_diff",
              saes: Mapping[str, Any] | None = None, ig_steps: int = 5, per_position: bool = False,
              batch_size: int = 8, progress: bool | None = None, token_budget: int | None = None) -> CausalGraph:
    """Score every node (``input``, ``a{L}.h{H}``, ``m{L}``, SAE latents and errors, ``logits``)
    by the change of the metric when its output takes its corrupt-run value.

    ``method``: ``"atp"`` (first order, one backward pass), ``"eap-ig"`` (gradients averaged over
    ``ig_steps`` input interpolations), ``"exact"`` (one patched run per node). ``edges=True``
    adds edge scores (gradient methods). ``saes={hook: SparseAutoencoder}`` adds latent nodes
    (those active on some clean or corrupt token) and an error node per SAE. ``metric``:
    ``"logit_diff"`` or a callable ``(logits, pairs) -> scalar``. ``token_budget``: tokens per
    patched run of ``exact`` (default 4096 on CPU, 32768 on GPU). Returns a :class:`CausalGraph`.
    """
    _check_args(model, pairs, method, ig_steps, batch_size, edges, per_position, saes)
    metric_fn = resolve_metric(metric)
    space = build_space(model, nodes, saes)
    parts = space.parts
    device = parts.device
    budget = token_budget or (32768 if device.type == "cuda" else 4096)
    seq = max(pairs.lengths)
    acc = _Accumulator(space, per_position, seq, edges, device)
    from tqdm.auto import tqdm

    batches = list(pairs.batches(batch_size))
    if method == "exact":
        total = sum(len(_replicas_count(space, b, per_position)) for b in batches)
        bar = tqdm(total=total, unit="patch", desc="exact", disable=(None if progress is None else not progress))
    else:
        bar = tqdm(total=len(pairs), unit="pair", desc=method, disable=(None if progress is None else not progress))
    ungroup = parts.ungrouped() if edges else _null()
    try:
        with training_off(model), ungroup:
            for i, batch in enumerate(batches):
                batch = batch.to(device)
                if method == "exact":
                    _exact_batch(acc, space, batch, metric_fn, i == 0, budget, bar)
                else:
                    _gradient_batch(acc, space, batch, metric_fn, method, ig_steps, edges, i == 0)
                    bar.update(len(batch))
    finally:
        bar.close()
    return _to_graph(acc, space, pairs, method, metric, ig_steps, per_position, model)


def _replicas_count(space: NodeSpace, batch: PairBatch, per_position: bool) -> list:
    seq = batch.clean.shape[1]
    n = sum(seg.size for seg in space.segments if seg.kind != "sae")
    return [None] * (n * (seq if per_position else 1))


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _to_graph(acc: _Accumulator, space: NodeSpace, pairs: PromptPairs, method: str, metric: Metric,
              ig_steps: int, per_position: bool, model: torch.nn.Module) -> CausalGraph:
    n = len(pairs)
    names = space.sender_names() + ["logits"]
    layers = space.draw_layers() + [float(space.parts.n_layers)]
    keep = torch.ones(len(names), dtype=torch.bool)
    for seg in space.segments:
        if seg.kind == "sae":
            keep[seg.start:seg.start + seg.size] = acc.active[seg.hook].cpu()
    scores = (acc.nodes / n).float().cpu()
    kept = keep.nonzero()[:, 0]
    metadata: dict[str, Any] = {
        "method": method, "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "callable"),
        "ig_steps": ig_steps if method == "eap-ig" else None, "n_pairs": n, "per_position": per_position,
        "clean_metric": acc.clean_sum / n, "corrupt_metric": acc.corrupt_sum / n,
        "model": getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
        "model_class": type(model).__name__, **space.describe(), "pairs": pairs.to_dict()}
    graph_kwargs: dict[str, Any] = {}
    if acc.edges is not None:
        writes = torch.tensor(space.sender_writes())
        reads = torch.tensor(space.receiver_reads)
        valid = (writes[:, None] < reads[None, :]) & keep[:-1, None]
        src, dst = valid.nonzero(as_tuple=True)
        edge_scores = (acc.edges[src.to(acc.edges.device), dst.to(acc.edges.device)] / n).float().cpu()
        new_index = torch.full((len(names),), -1, dtype=torch.long)
        new_index[kept] = torch.arange(len(kept))
        graph_kwargs = {"receivers": list(space.receiver_names),
                        "edge_index": torch.stack([new_index[src], dst]), "edge_scores": edge_scores}
    return CausalGraph([names[i] for i in kept.tolist()], scores[kept], layers=[layers[i] for i in kept.tolist()],
                       metadata=metadata, **graph_kwargs)
