"""Checking a graph by real interventions: circuit faithfulness and its curve.

Stage: analysis, after attribution. A *circuit* is a set of nodes (or of edges). Running the
clean prompts with every node outside the circuit set to its corrupt-run value, while circuit
nodes compute normally from what they read, gives ``M(circuit)``;
``faithfulness = (M(circuit) - M(corrupt)) / (M(clean) - M(corrupt))`` (MIB). For an edge
circuit every receiver reads the corrupt residual plus, for each of its circuit edges, the
sender's current output minus its corrupt output. :func:`faithfulness_curve` keeps the
strongest fraction of nodes or edges for a range of fractions and integrates: CPR is the area
under faithfulness, CMD the area between it and 1 (:mod:`.verify` checks single nodes and edges).
"""

from __future__ import annotations

import contextlib

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_llm_inst.causal.engine import Values, check_sequential, metric_sums, record, sae_parts, training_off
from lightning_llm_inst.causal.graph import CausalGraph
from lightning_llm_inst.causal.nodes import NodeSpace
from lightning_llm_inst.causal.pairs import Metric, PromptPairs, resolve_metric
from lightning_llm_inst.causal.scores import build_space
from lightning_llm_inst.causal.sites import Site, SiteFn, hooked, run_model

__all__ = ["DEFAULT_SIZES", "FaithfulnessCurve", "evaluate_circuit", "faithfulness_curve"]

DEFAULT_SIZES = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Circuit sizes (fractions of nodes or edges) of the faithfulness curve, as in MIB."""


def _space_for(model: torch.nn.Module, pairs: PromptPairs, nodes: Sequence[str], saes: Mapping[str, Any] | None
               ) -> NodeSpace:
    if not isinstance(pairs, PromptPairs):
        raise TypeError(f"pairs: expected a PromptPairs, got {type(pairs).__name__}")
    return build_space(model, nodes, saes)


# ---------------------------------------------------------------------------- node circuits
def _node_circuit_fns(space: NodeSpace, keep: set[str], corrupt: Values) -> dict[Site, SiteFn]:
    parts = space.parts
    fns: dict[Site, SiteFn] = {}
    if "input" not in keep:
        fns[("input",)] = lambda x: corrupt.x0.to(x.dtype)
    for seg in space.segments:
        if seg.kind == "heads":
            out = [h for h in range(parts.n_heads) if f"a{seg.layer}.h{h}" not in keep]
            if out:
                def fz(z: Tensor, out: list[int] = out, layer: int = seg.layer) -> Tensor:
                    z = z.clone()
                    z[..., out, :] = corrupt.z[layer][..., out, :].to(z.dtype)
                    return z
                fns[("z", seg.layer)] = fz
        elif seg.kind == "mlp" and f"m{seg.layer}" not in keep:
            fns[("mlp", seg.layer)] = lambda x, layer=seg.layer: corrupt.m[layer].to(x.dtype)
    for hook in space.saes:
        rows, encode = sae_parts(space.saes[hook])
        seg = space.segment("sae", hook=hook)
        inside = torch.tensor([f"sae.{hook}.f{i}" in keep for i in range(seg.size)], device=rows.device)
        err_in = f"sae.{hook}.err" in keep
        with torch.no_grad():
            f_corr = encode(corrupt.sae_x[hook]).float()
        err_corr = corrupt.sae_x[hook].float() - f_corr @ rows.float()

        def fs(x: Tensor, rows: Tensor = rows, encode: Any = encode, inside: Tensor = inside, err_in: bool = err_in,
               f_corr: Tensor = f_corr, err_corr: Tensor = err_corr) -> Tensor:
            f = encode(x).float()  # [rows, seq, d_sae]
            new = x.float() - ((f - f_corr) * (~inside)) @ rows.float()
            if not err_in:
                new = new - ((x.float() - f @ rows.float()) - err_corr)
            return new.to(x.dtype)
        fns[("sae", hook)] = fs
    return fns


# ---------------------------------------------------------------------------- edge circuits
class _EdgeRun:
    """Site functions for one run of an edge circuit (or of single-edge path patches)."""

    def __init__(self, space: NodeSpace, corrupt: Values, in_edges: Mapping[str, Tensor]) -> None:
        self.space = space
        self.parts = space.parts
        self.corrupt = corrupt
        self.names = space.sender_names()
        self.writes = torch.tensor(space.sender_writes())
        self.in_edges = in_edges  # receiver name -> bool mask over senders
        self.deltas: list[Tensor] = []  # per sender, in write order: current - corrupt [rows, seq, d]

    def fns(self) -> dict[Site, SiteFn]:
        parts = self.parts
        fns: dict[Site, SiteFn] = {("input",): self._on_input}
        for layer in range(parts.n_layers):
            fns[("z", layer)] = lambda z, layer=layer: self._on_heads(layer, z)
            fns[("mlp", layer)] = lambda m, layer=layer: self._on_mlp(layer, m)
            for kind in "qkv":
                fns[(kind, layer)] = lambda out, kind=kind, layer=layer: self._on_read(layer, kind, out)
            fns[("mid", layer)] = lambda x, layer=layer: self._mix(f"m{layer}", self.corrupt.mid[layer], x)
        fns[("final",)] = lambda x: self._mix("logits", self.corrupt.final, x)
        return fns

    def _on_input(self, x: Tensor) -> None:
        self.deltas = [(x.float() - self.corrupt.x0.float())]
        return None

    def _on_heads(self, layer: int, z: Tensor) -> None:
        w = self.parts.w_out(layer).float()
        dz = z.float() - self.corrupt.z[layer].float()
        self.deltas.extend(torch.einsum("bphe,hed->hbpd", dz, w).unbind(0))
        return None

    def _on_mlp(self, layer: int, m: Tensor) -> None:
        self.deltas.append(m.float() - self.corrupt.m[layer].float())
        return None

    def _sum_in(self, receiver: str) -> Tensor | None:
        mask = self.in_edges.get(receiver)
        if mask is None:
            return None
        idx = mask[:len(self.deltas)].nonzero()[:, 0].tolist()
        if not idx:
            return None
        return torch.stack([self.deltas[i] for i in idx]).sum(0)

    def _mix(self, receiver: str, base: Tensor, x: Tensor) -> Tensor:
        add = self._sum_in(receiver)
        new = base.float() if add is None else base.float() + add
        return new.to(x.dtype)

    def _on_read(self, layer: int, kind: str, out: Tensor) -> Tensor:
        parts = self.parts
        base = self.corrupt.resid[layer].float()  # [rows, seq, d]
        reads = []
        for h in range(parts.n_heads):
            add = self._sum_in(f"a{layer}.h{h}<{kind}>")
            reads.append(base if add is None else base + add)
        x = torch.stack(reads, dim=2)  # [rows, seq, heads, d]
        ln = parts.blocks[layer].ln_attn
        h_in = ln.forward(x.to(out.dtype)).float()
        w, b = parts.w_in(layer, kind)
        new = torch.einsum("bphd,hed->bphe", h_in, w.float())
        if b is not None:
            new = new + b.float()
        return new.to(out.dtype)


def _edge_masks(space: NodeSpace, edges: Iterable[str]) -> dict[str, Tensor]:
    index = {name: i for i, name in enumerate(space.sender_names())}
    writes = space.sender_writes()
    reads = dict(zip(space.receiver_names, space.receiver_reads))
    masks: dict[str, Tensor] = {}
    for edge in edges:
        u, sep, v = edge.partition("->")
        if not sep or u not in index or v not in reads or writes[index[u]] >= reads[v]:
            raise ValueError(f"circuit: {edge!r} is not an edge of this model's graph (expected 'sender->receiver' "
                             f"with the sender below the receiver, e.g. 'a0.h1->a2.h3<q>' or 'm4->logits')")
        masks.setdefault(v, torch.zeros(space.num_senders, dtype=torch.bool))[index[u]] = True
    return masks


# ---------------------------------------------------------------------------- evaluation
def _metric_means(model: torch.nn.Module, space: NodeSpace, pairs: PromptPairs, metric: Any, batch_size: int,
                  circuits: Sequence[tuple[str, Any]]) -> tuple[float, float, list[float]]:
    """M(clean), M(corrupt) and M(circuit) for each ``(level, circuit)``, means over pairs."""
    parts = space.parts
    clean_sum, corr_sum = 0.0, 0.0
    sums = [0.0] * len(circuits)
    needs_edges = any(level == "edges" for level, _ in circuits)
    ctx = parts.ungrouped() if needs_edges else contextlib.nullcontext()
    with training_off(model), ctx, torch.no_grad():
        for i, batch in enumerate(pairs.batches(batch_size)):
            batch = batch.to(parts.device)
            corrupt = record(space, batch.corrupt, reads=True)
            if i == 0:
                check_sequential(space, corrupt)
            clean_logits = run_model(parts, batch.clean)
            clean_sum += float(metric_sums(clean_logits, batch, metric)[0])
            corr_sum += float(metric_sums(corrupt.logits, batch, metric)[0])
            for j, (level, circuit) in enumerate(circuits):
                if level == "nodes":
                    fns = _node_circuit_fns(space, circuit, corrupt)
                else:
                    fns = _EdgeRun(space, corrupt, circuit).fns()
                with hooked(parts, fns, space.sae_points):
                    logits = run_model(parts, batch.clean)
                sums[j] += float(metric_sums(logits, batch, metric)[0])
    n = len(pairs)
    return clean_sum / n, corr_sum / n, [s / n for s in sums]


def _faith(m: float, clean: float, corrupt: float) -> float:
    denom = clean - corrupt
    return float("nan") if denom == 0 else (m - corrupt) / denom


def _split_circuit(space: NodeSpace, circuit: Any) -> tuple[str, Any]:
    if isinstance(circuit, CausalGraph):
        circuit = list(circuit.nodes)
    if isinstance(circuit, str):
        raise TypeError("circuit: expected a collection of node names or of edge names ('u->v'), got one string")
    names = list(circuit)
    edges = [n for n in names if "->" in n]
    if edges and len(edges) != len(names):
        raise ValueError("circuit: mixes node names and edge names; give one kind")
    if edges:
        if space.saes or set(space.nodes) != {"heads", "mlp"}:
            raise ValueError("circuit: edge circuits need nodes=('heads', 'mlp') and no SAEs")
        return "edges", _edge_masks(space, edges)
    known = set(space.sender_names()) | {"logits"}
    unknown = [n for n in names if n not in known and not n.startswith("sae.")]
    if unknown:
        raise ValueError(f"circuit: unknown node(s) {unknown[:5]}; nodes are 'input', 'a{{L}}.h{{H}}', 'm{{L}}', "
                         f"'sae.{{hook}}.f{{i}}', 'sae.{{hook}}.err', 'logits'")
    return "nodes", set(names)


def evaluate_circuit(model: torch.nn.Module, pairs: PromptPairs, circuit: Any, *,
                     nodes: Sequence[str] = ("heads", "mlp"), saes: Mapping[str, Any] | None = None,
                     metric: Metric = "logit_diff", batch_size: int = 8) -> float:
    """Faithfulness of ``circuit`` (node names, edge names ``'u->v'``, or a CausalGraph's nodes):
    ``(M(circuit) - M(corrupt)) / (M(clean) - M(corrupt))``."""
    space = _space_for(model, pairs, nodes, saes)
    level, c = _split_circuit(space, circuit)
    clean, corrupt, (m,) = _metric_means(model, space, pairs, resolve_metric(metric), batch_size, [(level, c)])
    return _faith(m, clean, corrupt)


@dataclass
class FaithfulnessCurve:
    """Faithfulness of the strongest ``counts[i]`` nodes or edges (``sizes[i]`` as fractions)."""

    level: str
    sizes: list[float]
    counts: list[int]
    faithfulness: list[float]
    cpr: float  # area under faithfulness over sizes
    cmd: float  # area between faithfulness and 1
    clean_metric: float
    corrupt_metric: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def figure(self) -> Any:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5, 3.5))
        ax = fig.add_subplot()
        ax.plot(self.sizes, self.faithfulness, marker="o")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("symlog", linthresh=0.001)
        ax.set_xlim(left=0.0, right=1.0)
        ax.set_xlabel(f"circuit size (fraction of {self.level})")
        ax.set_ylabel("faithfulness")
        ax.set_title(f"CPR {self.cpr:.3f}   CMD {self.cmd:.3f}")
        fig.tight_layout()
        return fig


def _area(x: Sequence[float], y: Sequence[float]) -> float:
    return float(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1)))


def faithfulness_curve(model: torch.nn.Module, pairs: PromptPairs, graph: CausalGraph, *,
                       sizes: Sequence[float] | None = None, level: str = "nodes", by: str = "abs",
                       saes: Mapping[str, Any] | None = None, metric: Metric = "logit_diff",
                       batch_size: int = 8, progress: bool | None = None) -> FaithfulnessCurve:
    """Faithfulness of the top fraction of ``graph``'s nodes (or edges), for each of ``sizes``
    (default :data:`DEFAULT_SIZES`); CPR and CMD by the trapezoidal rule over the sizes.

    ``by="abs"`` ranks by |score|; ``by="signed"`` puts first what carries the clean behaviour
    (the most negative scores: corrupting them lowers M most), as MIB ranks circuits for CPR."""
    if level not in ("nodes", "edges"):
        raise ValueError(f"level: got {level!r}; allowed: 'nodes' or 'edges'")
    if by not in ("abs", "signed"):
        raise ValueError(f"by: got {by!r}; allowed: 'abs' or 'signed'")
    sizes = list(DEFAULT_SIZES if sizes is None else sizes)
    if not sizes or any(not 0.0 <= s <= 1.0 for s in sizes) or sorted(sizes) != sizes:
        raise ValueError(f"sizes: got {sizes!r}; allowed: increasing fractions in [0, 1]")
    nodes = tuple(graph.metadata.get("nodes", ("heads", "mlp")))
    space = _space_for(model, pairs, nodes, saes)
    if level == "nodes":
        items = graph.top(None)
    else:
        if not len(graph.edges):
            raise ValueError("level: 'edges' needs a graph with edges (attribute(..., edges=True))")
        items = graph.top(None, kind="edges")
    if by == "signed":
        items = sorted(items, key=lambda item: item[1])
    ranked = [n for n, _ in items]
    counts = [int(round(s * len(ranked))) for s in sizes]
    circuits = []
    for k in counts:
        chosen = ranked[:k]
        circuits.append(_split_circuit(space, chosen + ["logits"]) if level == "nodes"
                        else ("edges", _edge_masks(space, chosen)))
    from tqdm.auto import tqdm

    values: list[float] = []
    clean = corrupt = 0.0
    for level_c in tqdm(circuits, desc="faithfulness", unit="circuit",
                        disable=(None if progress is None else not progress)):
        clean, corrupt, (m,) = _metric_means(model, space, pairs, resolve_metric(metric), batch_size, [level_c])
        values.append(_faith(m, clean, corrupt))
    return FaithfulnessCurve(level, sizes, counts, values, _area(sizes, values),
                             _area(sizes, [abs(1 - v) for v in values]), clean, corrupt)
