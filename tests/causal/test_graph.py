"""CausalGraph: validation, queries, pruning, JSON (native and circuit-tracer), networkx, figure."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_llm_inst.causal.graph import FORMAT, CausalGraph, GraphKeyError, node_kind, receiver_owner

SAE = "sae.blocks.1.hook_resid_post"
NODES = ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1", f"{SAE}.f17", f"{SAE}.err", "logits"]
SCORES = [0.5, 0.1, -0.8, 0.3, 0.05, 2.0, -0.2, 0.6, 0.01, 1.0]
RECEIVERS = ["a1.h0<q>", "a1.h0<k>", "a1.h1<v>", "m0", "m1", "logits"]
EDGES = [  # (source, receiver, score)
    ("input", "a1.h0<q>", 0.4), ("input", "m0", 0.9), ("a0.h1", "a1.h0<q>", -0.7), ("a0.h1", "a1.h0<k>", 0.2),
    ("a0.h1", "m1", 0.05), ("m0", "a1.h1<v>", 1.5), ("a1.h1", "logits", 2.5), (f"{SAE}.f17", "logits", -0.3),
]


def make_graph(per_position: bool = False, scores: torch.Tensor | None = None, **overrides) -> CausalGraph:
    scores = torch.tensor(SCORES) if scores is None else scores
    edge_scores = torch.tensor([w for *_, w in EDGES])
    if per_position:  # three positions whose sum is the score
        scores = torch.stack([scores * 0.25, scores * 0.25, scores * 0.5], dim=1)
        edge_scores = torch.stack([edge_scores * 0.5, edge_scores * 0.5, torch.zeros_like(edge_scores)], dim=1)
    index = torch.tensor([[NODES.index(u) for u, _, _ in EDGES], [RECEIVERS.index(v) for _, v, _ in EDGES]])
    kwargs = dict(receivers=RECEIVERS, edge_index=index, edge_scores=edge_scores,
                  metadata={"method": "eap-ig", "metric": "logit_diff", "ig_steps": 5, "model": "tiny"})
    kwargs.update(overrides)
    return CausalGraph(NODES, scores, **kwargs)


def test_names_kinds_and_layers():
    g = make_graph()
    assert [node_kind(n) for n in NODES] == ["input", "head", "head", "mlp", "head", "head", "mlp", "sae_feature",
                                            "sae_error", "logits"]
    assert node_kind("embed") == "other" and g.node_kind("m3") == "mlp"
    assert receiver_owner("a1.h0<k>") == ("a1.h0", "k") and receiver_owner("logits") == ("logits", "")
    assert g.layers == (-1.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.5, 1.75, 1.75, 2.0)
    pre = CausalGraph(["input", "sae.model.layers.4.pre.f1", "sae.blocks.2.hook_resid_pre.err", "weird", "logits"],
                      torch.zeros(5))
    assert pre.layers == (-1.0, 4.75, 2.25, 0.0, 5.0)
    assert len(g) == 10 and len(g.edges) == 8 and g.edges
    assert repr(g) == "CausalGraph(nodes=10, edges=8, method='eap-ig')"
    assert g.edges.names[2] == "a0.h1->a1.h0<q>" and g.edges.names[6] == "a1.h1->logits"
    empty = CausalGraph(["input", "logits"], torch.zeros(2))
    assert len(empty.edges) == 0 and not empty.edges and empty.edges.edge_index.shape == (2, 0)


@pytest.mark.parametrize(("change", "argument"), [
    ({"nodes": ["input", "m0", "m0"], "scores": torch.zeros(3)}, "nodes"),
    ({"scores": torch.zeros(9)}, "scores"),
    ({"scores": torch.zeros(10, 2, 2)}, "scores"),
    ({"scores": torch.zeros(10, 0)}, "scores"),
    ({"edge_index": torch.tensor([[0], [99]]), "edge_scores": torch.zeros(1)}, "edge_index[1]"),
    ({"edge_index": torch.tensor([[-1], [0]]), "edge_scores": torch.zeros(1)}, "edge_index[0]"),
    ({"edge_index": torch.tensor([[9], [0]]), "edge_scores": torch.zeros(1)}, "edge_index[0]"),  # from logits
    ({"edge_index": torch.tensor([[0, 0], [1, 1]]), "edge_scores": torch.zeros(2)}, "edge_index"),  # duplicate
    ({"edge_index": torch.zeros(3, 1, dtype=torch.long), "edge_scores": torch.zeros(1)}, "edge_index"),
    ({"edge_scores": torch.zeros(7)}, "edge_scores"),
    ({"edge_scores": None}, "edge_scores"),
    ({"receivers": ["a9.h0<q>"], "edge_index": None, "edge_scores": None}, "receivers"),
    ({"layers": [0.0] * 3}, "layers"),
    ({"metadata": {"ids": torch.zeros(2)}}, "metadata['ids']"),
])
def test_validation_errors_are_one_line_and_name_the_argument(change, argument):
    change = dict(change)
    nodes, scores = change.pop("nodes", NODES), change.pop("scores", torch.tensor(SCORES))
    with pytest.raises(ValueError) as info:
        if "edge_index" not in change and "receivers" not in change:
            change["edge_index"] = torch.tensor([[0], [0]])
            change.setdefault("edge_scores", torch.zeros(1))
        CausalGraph(nodes, scores, receivers=change.pop("receivers", RECEIVERS), **change)
    message = str(info.value)
    assert "\n" not in message and f"CausalGraph {argument}=" in message


def test_edge_scores_positions_must_match_node_positions():
    with pytest.raises(ValueError, match="edge_scores=.*P=3"):
        make_graph(per_position=True, edge_scores=torch.zeros(len(EDGES), 2))


def test_score_edge_score_and_unknown_names():
    g = make_graph()
    assert g.score("a1.h1") == pytest.approx(2.0) and g.score("a0.h1") == pytest.approx(-0.8)
    assert g.edge_score("m0->a1.h1<v>") == pytest.approx(1.5)
    with pytest.raises(GraphKeyError) as info:
        g.score("a1.h2")
    assert str(info.value).startswith("unknown node 'a1.h2'; close names: a1.h1") and "\n" not in str(info.value)
    with pytest.raises(KeyError, match="unknown edge 'm0->a1.h1<q>'; close names: m0->a1.h1<v>"):
        g.edge_score("m0->a1.h1<q>")


def test_per_position_scores_total_over_positions():
    g = make_graph(per_position=True)
    assert g.n_positions == 3 and g.scores.shape == (10, 3) and g.edges.scores.shape == (8, 3)
    assert g.score("a1.h1") == pytest.approx(2.0) and g.edge_score("a1.h1->logits") == pytest.approx(2.5)
    assert [n for n, _ in g.top(3)] == ["a1.h1", "a0.h1", f"{SAE}.f17"]
    assert "positions=3" in repr(g)


def test_top_orders_and_filters():
    g = make_graph()
    names, values = zip(*g.top(3))
    assert names == ("a1.h1", "a0.h1", f"{SAE}.f17") and values == pytest.approx((2.0, -0.8, 0.6))
    assert [n for n, _ in g.top(3, by="signed")] == ["a1.h1", f"{SAE}.f17", "input"]
    assert [n for n, _ in g.top(None, kind="heads")] == ["a1.h1", "a0.h1", "a0.h0", "a1.h0"]
    assert [n for n, _ in g.top(5, kind="mlp")] == ["m0", "m1"]
    assert [n for n, _ in g.top(5, kind="sae")] == [f"{SAE}.f17", f"{SAE}.err"]
    assert g.top(5, kind="input") == [("input", 0.5)]
    assert [n for n, _ in g.top(2, kind="edges")] == ["a1.h1->logits", "m0->a1.h1<v>"]
    assert "logits" not in [n for n, _ in g.top(None)] and g.top(0) == []
    for kwargs, argument in (({"by": "size"}, "top(by)"), ({"kind": "attn"}, "top(kind)"), ({"k": -1}, "top(k)")):
        with pytest.raises(ValueError, match=rf"^CausalGraph {argument.replace('(', '[(]').replace(')', '[)]')}="):
            g.top(**kwargs)
    summary = g.summary()
    assert summary["kinds"] == {"input": 1, "head": 4, "mlp": 2, "sae_feature": 1, "sae_error": 1, "logits": 1}
    assert summary["top_nodes"][0][0] == "a1.h1" and summary["edges"] == 8


def test_prune_by_threshold_keeps_strong_nodes_and_reindexes_edges():
    g = make_graph()
    p = g.prune(0.3)
    assert p.nodes == ("input", "a0.h1", "m0", "a1.h1", f"{SAE}.f17", "logits")
    assert p.receivers == ("a1.h1<v>", "m0", "logits")  # receivers of dropped heads/MLPs go
    # kept: |score| >= 0.3 and both ends kept; input->a1.h0<q> (a1.h0 dropped) and a0.h1->m1 (0.05) go
    assert p.edges.names == ("input->m0", "m0->a1.h1<v>", "a1.h1->logits", f"{SAE}.f17->logits")
    for name in p.edges.names:
        assert p.edge_score(name) == g.edge_score(name)
    assert [p.nodes[i] for i in p.edges.edge_index[0]] == ["input", "m0", "a1.h1", f"{SAE}.f17"]
    assert p.layers == tuple(g.layers[g.index[n]] for n in p.nodes)
    assert p.metadata == {**g.metadata, "pruned": {"threshold": 0.3}}
    assert g.prune(100.0).nodes == ("input", "logits")


def test_prune_top_k_and_argument_errors():
    g = make_graph(per_position=True)
    p = g.prune(top_k=2)
    assert p.nodes == ("input", "a0.h1", "a1.h1", "logits") and p.scores.shape == (4, 3)
    assert p.edges.names == ("a1.h1->logits",)  # a0.h1's edges go to a1.h0 and m1, both dropped
    assert torch.equal(p.edges.scores, g.edges.scores[6:7])
    for args, kwargs, argument in (((), {}, "prune"), ((0.1,), {"top_k": 1}, "prune"),
                                   ((-1.0,), {}, "prune(threshold)"), ((float("nan"),), {}, "prune(threshold)"),
                                   ((), {"top_k": 1.5}, "prune(top_k)")):
        with pytest.raises(ValueError) as info:
            g.prune(*args, **kwargs)
        assert str(info.value).startswith(f"CausalGraph {argument}=") and "\n" not in str(info.value)


@pytest.mark.parametrize("per_position", [False, True])
def test_native_json_round_trip_is_lossless(tmp_path, per_position):
    odd = torch.tensor([1e-38, -0.0, 3.14159274, 1.17549435e-38, -3.4028235e38, 1e-45, 0.1, float("inf"), 7.0, 1.0])
    g = make_graph(per_position)
    scores = torch.stack([odd, -odd, odd / 3], 1) if per_position else odd
    edge_scores = torch.stack([odd[:8] / 7, odd[:8], odd[:8]], 1) if per_position else odd[:8] / 7
    g = CausalGraph(g.nodes, scores, receivers=g.receivers, edge_index=g.edges.edge_index, edge_scores=edge_scores,
                    layers=[x + 0.1 for x in g.layers], metadata={**g.metadata, "pairs": [[1, 2], [3, 4]]})
    path = g.to_json(tmp_path / "graph.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == FORMAT and raw["version"] == 1
    back = CausalGraph.from_json(path)
    assert torch.equal(back.scores, g.scores) and torch.equal(back.edges.scores, g.edges.scores)
    # bit-exact, including the sign of -0.0
    assert torch.equal(back.scores.view(torch.int32), g.scores.view(torch.int32))
    assert back.nodes == g.nodes and back.receivers == g.receivers and back.edges.names == g.edges.names
    assert torch.equal(back.edges.edge_index, g.edges.edge_index)
    assert back.layers == g.layers and back.metadata == g.metadata
    assert [p.name for p in tmp_path.iterdir()] == ["graph.json"]  # no temp file left behind
    empty = CausalGraph(["input", "logits"], torch.zeros(2), receivers=["logits"])
    assert CausalGraph.from_json(empty.to_json(tmp_path / "empty.json")).receivers == ("logits",)
    pruned = g.prune(top_k=0)  # no edge left; per-position edge scores keep their [0, P] shape
    back = CausalGraph.from_json(pruned.to_json(tmp_path / "pruned.json"))
    assert len(back.edges) == 0 and back.edges.scores.shape == pruned.edges.scores.shape


@pytest.mark.parametrize(("content", "fragment"), [
    ("not json {", "not JSON"),
    ('{"nodes": []}', "format=None"),
    ("[1, 2]", "format='list'"),
    (json.dumps({"format": FORMAT, "version": 9}), "version=9"),
    (json.dumps({"format": FORMAT, "version": 1, "nodes": ["input"]}), "missing key"),
    (json.dumps({"format": FORMAT, "version": 1, "nodes": ["a", "a"], "scores": {"shape": [2], "values": [0, 0]},
                 "receivers": [], "layers": None, "metadata": {},
                 "edges": {"sources": [], "receivers": [], "scores": {"shape": [0], "values": []}}}), "unique"),
])
def test_from_json_rejects_other_files_in_one_line(tmp_path, content, fragment):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        CausalGraph.from_json(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and fragment in message


def test_to_json_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match=r"^CausalGraph to_json\(format\)='graphml' is not valid; choose one of"):
        make_graph().to_json(tmp_path / "g.json", format="graphml")


def circuit_tracer_model() -> type:
    """A pydantic mirror of circuit-tracer's ``circuit_tracer/frontend/graph_models.py`` (``Metadata``,
    ``QParams``, ``Node``, ``Link``, ``Model``): every field with its type, required where it is
    required there, optional fields with their defaults. ``Model.links`` is ``list[dict]`` there; it is
    typed as ``Link`` here, which is what the viewer reads (``source``, ``target``, ``weight``).
    """
    pydantic = pytest.importorskip("pydantic")  # comes with the test extra (sae-lens -> wandb)

    class Metadata(pydantic.BaseModel):
        slug: str
        scan: str
        transcoder_list: list[str]
        prompt_tokens: list[str]
        prompt: str
        node_threshold: float | None = None
        schema_version: int | None = 1

    class QParams(pydantic.BaseModel):
        pinnedIds: list[str]
        supernodes: list[list[str]]
        linkType: str
        clickedId: str
        sg_pos: str

    class Node(pydantic.BaseModel):
        node_id: str
        feature: int
        layer: str
        ctx_idx: int
        feature_type: str
        token_prob: float = 0.0
        is_target_logit: bool = False
        run_idx: int = 0
        reverse_ctx_idx: int = 0
        jsNodeId: str
        clerp: str = ""
        influence: float | None = None
        activation: float | None = None

    class Link(pydantic.BaseModel):
        source: str
        target: str
        weight: float

    class Model(pydantic.BaseModel):
        metadata: Metadata
        qParams: QParams
        nodes: list[Node]
        links: list[Link]

    return Model


@pytest.mark.parametrize("per_position", [False, True])
def test_circuit_tracer_export_validates(tmp_path, per_position):
    g = make_graph(per_position)
    path = g.to_json(tmp_path / "tiny-graph.json", format="circuit-tracer",
                     prompt_tokens=["<bos>", "The", " cat"] if per_position else None)
    model = circuit_tracer_model().model_validate_json(path.read_text())
    assert model.metadata.slug == "tiny-graph" and model.metadata.scan == "tiny"
    assert len(model.nodes) == len(g)
    # q and k edges a0.h1 -> a1.h0 share one link; every other edge is its own link
    assert len(model.links) == len(g.edges) - 1
    by_clerp = {n.clerp: n for n in model.nodes}
    assert by_clerp["input"].feature_type == "embedding" and by_clerp["input"].layer == "E"
    assert by_clerp[f"{SAE}.f17"].feature_type == "cross layer transcoder" and by_clerp[f"{SAE}.f17"].layer == "1"
    assert by_clerp[f"{SAE}.err"].feature_type == "mlp reconstruction error"
    assert by_clerp["a1.h1"].feature_type == "attention head" and by_clerp["m1"].feature_type == "mlp"
    logit = next(n for n in model.nodes if n.feature_type == "logit")
    assert logit.is_target_logit and logit.layer == "2" and "(p=" in logit.clerp
    assert by_clerp["a1.h1"].influence == pytest.approx(2.0 / sum(abs(s) for s in SCORES[:-1]))
    assert by_clerp["a1.h1"].activation == pytest.approx(2.0)
    # per-position: the position of the largest |score| (the last of three here), else the last token
    assert {n.ctx_idx for n in model.nodes} == {len(model.metadata.prompt_tokens) - 1}
    assert len(model.metadata.prompt_tokens) >= 2  # the viewer hides nodes of a one-token prompt
    ids = {n.node_id for n in model.nodes}
    assert len(ids) == len(model.nodes) and all(link.source in ids and link.target in ids for link in model.links)
    link = next(x for x in model.links if x.source == by_clerp["a0.h1"].node_id and
                x.target == by_clerp["a1.h0"].node_id)
    assert link.weight == pytest.approx(-0.7 + 0.2)


def test_circuit_tracer_export_refuses_non_finite_scores(tmp_path):
    g = make_graph(scores=torch.tensor([float("nan")] + SCORES[1:]))
    with pytest.raises(ValueError, match="strict JSON"):
        g.to_json(tmp_path / "g.json", format="circuit-tracer")
    assert not list(tmp_path.iterdir())


def test_to_networkx_attributes():
    g = make_graph().to_networkx()
    assert g.number_of_nodes() == 10 and g.number_of_edges() == 7
    assert g.nodes["a0.h1"] == {"score": pytest.approx(-0.8), "layer": 0.0, "kind": "head"}
    qk = g.edges["a0.h1", "a1.h0"]
    assert qk["weight"] == pytest.approx(-0.5) and qk["receiver"] == "qk"
    assert qk["q"] == pytest.approx(-0.7) and qk["k"] == pytest.approx(0.2) and "v" not in qk
    assert g.edges["m0", "a1.h1"]["receiver"] == "v"
    assert g.edges["a1.h1", "logits"] == {"weight": pytest.approx(2.5), "receiver": ""}
    assert g.graph["method"] == "eap-ig"


@pytest.mark.parametrize("per_position", [False, True])
def test_figure_saves_png(tmp_path, per_position):
    from matplotlib.figure import Figure

    fig = make_graph(per_position).figure(top_edges=5)
    assert isinstance(fig, Figure)
    fig.savefig(tmp_path / "graph.png")
    assert (tmp_path / "graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = Figure().add_subplot()
    assert make_graph().figure(ax=ax) is ax.figure
    with pytest.raises(ValueError, match=r"figure\(top_edges\)=-1"):
        make_graph().figure(top_edges=-1)
