"""write_graph_views: a causal graph and its faithfulness curve, read back from the event file."""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_llm_inst.causal.circuits import FaithfulnessCurve
from lightning_llm_inst.causal.graph import CausalGraph
from lightning_llm_inst.viz import write_graph_views
from lightning_llm_inst.viz.causal_views import graph_markdown

SAE = "sae.model.layers.0.hook_resid_post"
NODES = ["input", "a0.h0", "a0.h1", "m0", f"{SAE}.f3", f"{SAE}.f7", f"{SAE}.err", "a1.h0", "a1.h1", "m1", "logits"]
SCORES = [0.5, -0.25, float("nan"), 1.5, 0.125, -2.0, 0.0625, float("inf"), 0.75, -1.0, 0.0]
RECEIVERS = ["a1.h0<q>", "a1.h0<v>", "m1", "logits"]
EDGES = [(0, 0), (1, 1), (3, 2), (5, 3), (9, 3), (8, 2)]  # (node index, receiver index)
EDGE_SCORES = [0.3, -0.1, 0.9, float("nan"), -0.6, 0.2]
METADATA = {"method": "eap-ig", "metric": "logit_diff", "clean_metric": 3.25, "corrupt_metric": -1.5, "n_pairs": 4,
            "pairs": {"clean_ids": [[1, 2, 3]]}}


def _graph(*, edges: bool = True, metadata: dict | None = None) -> CausalGraph:
    kwargs = {}
    if edges:
        kwargs = {"receivers": RECEIVERS, "edge_index": torch.tensor(EDGES).T, "edge_scores": torch.tensor(EDGE_SCORES)}
    return CausalGraph(NODES, torch.tensor(SCORES), metadata=METADATA if metadata is None else metadata, **kwargs)


def _curve() -> FaithfulnessCurve:
    return FaithfulnessCurve(level="nodes", sizes=[0.0, 0.1, 0.5, 1.0], counts=[0, 1, 5, 10],
                             faithfulness=[0.0, 0.4, 0.9, 1.0], cpr=0.7875, cmd=0.2125, clean_metric=3.25,
                             corrupt_metric=-1.5)


def _read(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"histograms": 0, "scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _write(logdir, graph: CausalGraph, **kwargs) -> EventAccumulator:
    with SummaryWriter(str(logdir)) as writer:
        write_graph_views(writer, graph, **kwargs)
    return _read(logdir)


def _text(acc: EventAccumulator, tag: str) -> str:
    (event,) = acc.Tensors(f"{tag}/text_summary")
    return event.tensor_proto.string_val[0].decode()


def test_graph_views_read_back(tmp_path):
    graph = _graph()
    acc = _write(tmp_path, graph, step=7)
    tags = acc.Tags()
    assert set(tags["images"]) == {"causal/graph"}
    scalars = {t: acc.Scalars(t) for t in tags["scalars"]}
    assert set(scalars) == {"causal/clean_metric", "causal/corrupt_metric", "causal/n_nodes", "causal/n_edges"}
    assert all(len(v) == 1 and v[0].step == 7 for v in scalars.values())
    assert scalars["causal/clean_metric"][0].value == graph.metadata["clean_metric"]
    assert scalars["causal/corrupt_metric"][0].value == graph.metadata["corrupt_metric"]
    assert scalars["causal/n_nodes"][0].value == len(graph) - 1  # the logits sink is not a scored node
    assert scalars["causal/n_edges"][0].value == len(graph.edges)

    finite = {  # finite scores of each kind; NaN and inf are left out, logits is not a node score
        "all": [0.5, -0.25, 1.5, 0.125, -2.0, 0.0625, 0.75, -1.0], "heads": [-0.25, 0.75], "mlp": [1.5, -1.0],
        "sae_latents": [0.125, -2.0], "sae_errors": [0.0625]}
    hist = {t: acc.Histograms(t)[0].histogram_value for t in tags["histograms"]}
    assert set(hist) == {f"causal/node_scores/{k}" for k in finite} | {"causal/edge_scores"}
    for kind, values in finite.items():
        h = hist[f"causal/node_scores/{kind}"]
        assert (h.num, h.min, h.max, h.sum) == (len(values), min(values), max(values), pytest.approx(sum(values)))
    edges = hist["causal/edge_scores"]
    assert edges.num == sum(math.isfinite(s) for s in EDGE_SCORES) and edges.max == pytest.approx(0.9)

    top_nodes = _text(acc, "causal/top_nodes")
    assert "| rank | node | kind | score |" in top_nodes
    rows = [line for line in top_nodes.splitlines() if line.startswith("| 1 ")]
    assert rows and "`a1.h0`" in rows[0] and "head" in rows[0]  # inf is the strongest |score|
    top_edges = _text(acc, "causal/top_edges")
    assert "`m0->m1`" in top_edges and "+0.9" in top_edges
    metadata = _text(acc, "causal/metadata")
    assert "`eap-ig`" not in metadata and '`"eap-ig"`' in metadata and "clean_ids" not in metadata


def test_curve_views_and_prefix(tmp_path):
    curve = _curve()
    acc = _write(tmp_path, _graph(), curve=curve, prefix="ioi")
    tags = acc.Tags()
    assert set(tags["images"]) == {"ioi/graph", "ioi/faithfulness"}
    assert acc.Scalars("ioi/cpr")[0].value == pytest.approx(curve.cpr)
    assert acc.Scalars("ioi/cmd")[0].value == pytest.approx(curve.cmd)
    table = _text(acc, "ioi/faithfulness")
    assert "CPR 0.7875" in table and "| 0.5 | 5 | 0.9 |" in table
    assert not any(t.startswith("causal/") for kind in tags.values() if isinstance(kind, list) for t in kind)


def test_graph_without_edges_or_metrics(tmp_path):
    graph = _graph(edges=False, metadata={})
    acc = _write(tmp_path, graph)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"causal/n_nodes", "causal/n_edges"}
    assert acc.Scalars("causal/n_edges")[0].value == 0
    assert "causal/edge_scores" not in tags["histograms"]
    assert set(tags["tensors"]) == {"causal/top_nodes/text_summary"}


def test_non_finite_metrics_are_not_written(tmp_path):
    acc = _write(tmp_path, _graph(metadata={"clean_metric": float("nan"), "corrupt_metric": "n/a"}))
    assert set(acc.Tags()["scalars"]) == {"causal/n_nodes", "causal/n_edges"}


def test_markdown_escapes_table_cells():
    graph = CausalGraph(["input", "sae.x|y.f1", "logits"], torch.tensor([1.0, -2.0, 0.0]))
    md = graph_markdown(graph, 5)
    assert "`sae.x\\|y.f1`" in md and md.count("\n| ") == 3
    assert graph_markdown(CausalGraph(["input", "logits"], torch.zeros(2)), kind="edges") == "The graph has no edges."


@pytest.mark.parametrize("kwargs, match", [
    ({"writer": object()}, "writer: expected a tensorboard SummaryWriter, got object"),
    ({"graph": {"a0.h0": 1.0}}, "graph: expected a CausalGraph, got dict"),
    ({"curve": [0.1, 0.2]}, "curve: expected None or a FaithfulnessCurve"),
    ({"prefix": ""}, "prefix: got ''"),
    ({"step": -1}, "step: got -1; allowed: an integer >= 0"),
    ({"top_edges": 1.5}, "top_edges: got 1.5"),
])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, match):
    with SummaryWriter(str(tmp_path)) as writer:
        args = {"writer": writer, "graph": _graph(), **kwargs}
        with pytest.raises((TypeError, ValueError), match=match.replace("|", "\\|")):
            write_graph_views(args.pop("writer"), args.pop("graph"), **args)
