"""TensorBoard views of a causal graph and its faithfulness curve.

Stage: the end of the flow, looking. :func:`write_graph_views` takes a
:class:`~lightning_llm_inst.causal.graph.CausalGraph` (from ``attribute``, ``attribute_from_store``
or ``CausalGraph.from_json``) and, optionally, the
:class:`~lightning_llm_inst.causal.circuits.FaithfulnessCurve` checked against it, and writes to any
``SummaryWriter`` (``torch.utils.tensorboard`` or a Lightning ``TensorBoardLogger.experiment``):

- figure ``<prefix>/graph``: ``graph.figure(top_edges=...)``, layers bottom to top;
- histograms ``<prefix>/node_scores/all`` and, for the kinds the graph holds,
  ``node_scores/heads``, ``node_scores/mlp``, ``node_scores/sae_latents``, ``node_scores/sae_errors``,
  plus ``<prefix>/edge_scores`` (scores summed over positions; the ``logits`` sink and
  non-finite scores are left out, an empty histogram is not written);
- scalars ``<prefix>/clean_metric`` and ``corrupt_metric`` (from ``graph.metadata``, when finite
  numbers), ``n_nodes`` (``logits`` not counted) and ``n_edges``;
- text ``<prefix>/top_nodes`` and ``<prefix>/top_edges``: markdown tables of the strongest 20 by
  |score| (edges only when the graph has them), and ``<prefix>/metadata``;
- with ``curve``: figure ``<prefix>/faithfulness`` (``curve.figure()``), scalars ``<prefix>/cpr``
  and ``<prefix>/cmd``, and text ``<prefix>/faithfulness`` (the curve as a table).

Which process writes (rank 0 under DDP) is the caller's concern, as for ``write_sae_views``.
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lightning_llm_inst.causal.circuits import FaithfulnessCurve
    from lightning_llm_inst.causal.graph import CausalGraph

__all__ = ["HISTOGRAM_KINDS", "graph_markdown", "write_graph_views"]

logger = logging.getLogger(__name__)

#: histogram tag suffix -> the node kinds (``CausalGraph.node_kind``) it holds
HISTOGRAM_KINDS: dict[str, tuple[str, ...]] = {
    "heads": ("head",), "mlp": ("mlp",), "sae_latents": ("sae_feature",), "sae_errors": ("sae_error",)}
TOP_ROWS = 20
_CURVE_FIELDS = ("sizes", "counts", "faithfulness", "cpr", "cmd", "level")
_METADATA_SKIP = ("pairs",)  # long; the graph's JSON file keeps it


def _cell(text: str) -> str:
    """``text`` as an inline-code markdown table cell (node names hold ``<``, ``>``, ``.``, ``_``)."""
    return "`" + str(text).replace("`", "'").replace("|", "\\|") + "`"


def _finite(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().double().flatten().cpu()
    return values[torch.isfinite(values)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def graph_markdown(graph: CausalGraph, k: int = TOP_ROWS, *, kind: str | None = None) -> str:
    """The ``k`` strongest nodes (or edges, ``kind="edges"``) by |score| as a markdown table."""
    from lightning_llm_inst.causal.graph import node_kind

    rows = graph.top(k, kind=kind)
    what = "edges" if kind == "edges" else "nodes"
    total = len(graph.edges) if kind == "edges" else sum(1 for n in graph.nodes if n != "logits")
    method = graph.metadata.get("method")
    head = f"Top {len(rows)} of {total} {what} by |score|" + (f" ({method})" if method else "") + "."
    if not rows:
        return f"The graph has no {what}."
    if kind == "edges":
        lines = [head, "", "| rank | edge | score |", "|---:|:---|---:|"]
        lines += [f"| {i} | {_cell(name)} | {score:+.4g} |" for i, (name, score) in enumerate(rows, 1)]
    else:
        lines = [head, "", "| rank | node | kind | score |", "|---:|:---|:---|---:|"]
        lines += [f"| {i} | {_cell(name)} | {node_kind(name)} | {score:+.4g} |"
                  for i, (name, score) in enumerate(rows, 1)]
    return "\n".join(lines)


def _metadata_markdown(graph: CausalGraph) -> str:
    lines = ["| key | value |", "|:---|:---|"]
    for key, value in graph.metadata.items():
        if key not in _METADATA_SKIP:
            lines.append(f"| {_cell(key)} | {_cell(json.dumps(value))} |")
    return "\n".join(lines)


def _curve_markdown(curve: FaithfulnessCurve) -> str:
    lines = [f"Faithfulness of the top {curve.level} (CPR {curve.cpr:.4g}, CMD {curve.cmd:.4g}).", "",
             f"| size (fraction of {curve.level}) | count | faithfulness |", "|---:|---:|---:|"]
    lines += [f"| {s:.4g} | {c} | {f:.4g} |" for s, c, f in zip(curve.sizes, curve.counts, curve.faithfulness)]
    return "\n".join(lines)


def _check(writer: Any, graph: Any, curve: Any, prefix: Any, step: Any, top_edges: Any) -> None:
    from lightning_llm_inst.causal.graph import CausalGraph

    needed = ("add_scalar", "add_histogram", "add_text", "add_figure")
    if not all(hasattr(writer, name) for name in needed):
        raise TypeError(f"writer: expected a tensorboard SummaryWriter, got {type(writer).__name__}")
    if not isinstance(graph, CausalGraph):
        raise TypeError(f"graph: expected a CausalGraph, got {type(graph).__name__}")
    if curve is not None and not all(hasattr(curve, name) for name in _CURVE_FIELDS):
        raise TypeError(f"curve: expected None or a FaithfulnessCurve (faithfulness_curve(...)), "
                        f"got {type(curve).__name__}")
    if not isinstance(prefix, str) or not prefix.strip("/"):
        raise ValueError(f"prefix: got {prefix!r}; allowed: a non-empty tag prefix such as 'causal'")
    for name, value in (("step", step), ("top_edges", top_edges)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: got {value!r}; allowed: an integer >= 0")


def write_graph_views(writer: Any, graph: CausalGraph, *, curve: FaithfulnessCurve | None = None,
                      prefix: str = "causal", step: int = 0, top_edges: int = 50) -> None:
    """Write the views listed in this module's docstring to ``writer`` (a ``SummaryWriter``).

    Args:
        graph: the causal graph.
        curve: a faithfulness curve of that graph (``faithfulness_curve(model, pairs, graph)``),
            or ``None``.
        prefix: the first part of every tag.
        step: global step of every value written.
        top_edges: edges drawn in the graph figure.

    Figures are skipped with a warning when matplotlib is not installed.
    """
    _check(writer, graph, curve, prefix, step, top_edges)
    from lightning_llm_inst.causal.graph import node_kind

    prefix = prefix.rstrip("/")
    kinds = [node_kind(n) for n in graph.nodes]
    keep = torch.tensor([k != "logits" for k in kinds], dtype=torch.bool)  # [N]
    for name in ("clean_metric", "corrupt_metric"):
        value = _number(graph.metadata.get(name))
        if value is not None:
            writer.add_scalar(f"{prefix}/{name}", value, step)
    writer.add_scalar(f"{prefix}/n_nodes", int(keep.sum()), step)
    writer.add_scalar(f"{prefix}/n_edges", len(graph.edges), step)

    totals = graph.totals  # [N] float64, summed over positions
    groups = {"all": keep, **{tag: torch.tensor([k in members for k in kinds], dtype=torch.bool)
                              for tag, members in HISTOGRAM_KINDS.items()}}
    for tag, mask in groups.items():
        values = _finite(totals[mask])
        if values.numel():
            writer.add_histogram(f"{prefix}/node_scores/{tag}", values, step)
    edge_values = _finite(graph.edges.totals)
    if edge_values.numel():
        writer.add_histogram(f"{prefix}/edge_scores", edge_values, step)

    writer.add_text(f"{prefix}/top_nodes", graph_markdown(graph, TOP_ROWS), step)
    if len(graph.edges):
        writer.add_text(f"{prefix}/top_edges", graph_markdown(graph, TOP_ROWS, kind="edges"), step)
    if graph.metadata:
        writer.add_text(f"{prefix}/metadata", _metadata_markdown(graph), step)

    if curve is not None:
        for name in ("cpr", "cmd"):
            value = _number(getattr(curve, name))
            if value is not None:
                writer.add_scalar(f"{prefix}/{name}", value, step)
        writer.add_text(f"{prefix}/faithfulness", _curve_markdown(curve), step)
    try:
        writer.add_figure(f"{prefix}/graph", graph.figure(top_edges=top_edges), step, close=False)
        if curve is not None:
            writer.add_figure(f"{prefix}/faithfulness", curve.figure(), step, close=False)
    except ImportError:
        logger.warning("matplotlib is not installed: no causal graph figures (pip install matplotlib)")
    writer.flush()
