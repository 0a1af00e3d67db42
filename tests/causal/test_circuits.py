"""Circuit faithfulness, curves and verification against naive interventions written here."""

from __future__ import annotations

import pytest
import torch

from lightning_llm_inst.causal import attribute, evaluate_circuit, faithfulness_curve, node_outputs, verify
from lightning_llm_inst.models import tiny_model
from tests.causal.test_attribution import blocks, head_dim, ids, make_pairs, metric, naive_recordings, o_proj


def naive_circuit_metric(model, pairs, keep):
    """M(clean run with every node outside ``keep`` set to its corrupt output)."""
    clean, corrupt = ids(pairs)
    z_c, m_c, x_c = naive_recordings(model, corrupt)
    nh, hd = model.config.num_attention_heads, head_dim(model)
    hooks = []
    if "input" not in keep:
        hooks.append(blocks(model)[0].register_forward_pre_hook(
            lambda m, a, k: ((x_c,) + a[1:], k) if a else (a, {**k, "hidden_states": x_c}), with_kwargs=True))
    for layer in range(len(blocks(model))):
        out = [h for h in range(nh) if f"a{layer}.h{h}" not in keep]

        def pre(mod, a, layer=layer, out=out):
            z = a[0].clone()
            for h in out:
                z[..., h * hd:(h + 1) * hd] = z_c[layer][..., h * hd:(h + 1) * hd]
            return (z,)
        hooks.append(o_proj(model, layer).register_forward_pre_hook(pre))
        if f"m{layer}" not in keep:
            hooks.append(blocks(model)[layer].mlp.register_forward_hook(lambda m, a, o, layer=layer: m_c[layer]))
    try:
        with torch.no_grad():
            return float(metric(model(input_ids=clean).logits))
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_node_circuits_match_naive_and_full_empty(arch):
    model = tiny_model(arch)
    pairs = make_pairs()
    clean, corrupt = ids(pairs)
    with torch.no_grad():
        m_clean, m_corr = float(metric(model(input_ids=clean).logits)), float(metric(model(input_ids=corrupt).logits))
    graph = attribute(model, pairs, progress=False)
    everything = list(graph.nodes)
    assert evaluate_circuit(model, pairs, everything) == pytest.approx(1.0, abs=1e-4)
    assert evaluate_circuit(model, pairs, ["logits"]) == pytest.approx(0.0, abs=1e-4)
    assert evaluate_circuit(model, pairs, []) == pytest.approx(0.0, abs=1e-4)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        keep = [n for n in everything if torch.rand((), generator=g) < 0.5]
        want = (naive_circuit_metric(model, pairs, set(keep)) - m_corr) / (m_clean - m_corr)
        assert evaluate_circuit(model, pairs, keep, batch_size=2) == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_edge_circuit_of_a_node_set_equals_the_node_circuit():
    model = tiny_model("llama")  # grouped keys/values: their reads are per query head
    pairs = make_pairs()
    graph = attribute(model, pairs, edges=True, progress=False)
    assert evaluate_circuit(model, pairs, list(graph.edges.names)) == pytest.approx(1.0, abs=1e-4)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        keep = {n for n in graph.nodes if torch.rand((), generator=g) < 0.6} | {"logits"}
        owner = {r: r.split("<")[0] for r in graph.receivers}
        edges = [e for e in graph.edges.names if e.split("->")[0] in keep and owner[e.split("->")[1]] in keep]
        assert evaluate_circuit(model, pairs, edges) == pytest.approx(evaluate_circuit(model, pairs, sorted(keep)),
                                                                      abs=1e-4)


def test_faithfulness_curve_and_areas():
    model = tiny_model("gpt2")
    pairs = make_pairs()
    graph = attribute(model, pairs, method="eap-ig", edges=True, progress=False)
    curve = faithfulness_curve(model, pairs, graph, sizes=[0.0, 0.25, 0.5, 1.0], progress=False)
    assert curve.counts == [0, 3, 6, 11] and curve.faithfulness[0] == pytest.approx(0.0, abs=1e-4)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
    top3 = [n for n, _ in graph.top(3)]
    assert curve.faithfulness[1] == pytest.approx(evaluate_circuit(model, pairs, top3 + ["logits"]), abs=1e-6)
    f = curve.faithfulness
    assert curve.cpr == pytest.approx(0.25 * (f[0] + f[1]) / 2 + 0.25 * (f[1] + f[2]) / 2 + 0.5 * (f[2] + f[3]) / 2)
    assert curve.cmd == pytest.approx(sum(w * (abs(1 - a) + abs(1 - b)) / 2
                                          for w, a, b in zip([0.25, 0.25, 0.5], f[:-1], f[1:])))
    edges = faithfulness_curve(model, pairs, graph, level="edges", progress=False)
    assert edges.faithfulness[-1] == pytest.approx(1.0, abs=1e-4) and edges.counts[-1] == len(graph.edges)
    assert curve.figure().axes and curve.to_dict()["level"] == "nodes"
    with pytest.raises(ValueError, match="sizes: got"):
        faithfulness_curve(model, pairs, graph, sizes=[0.5, 0.1])


def test_verify_nodes_equal_exact_and_edges_equal_naive_path_patching():
    model = tiny_model("llama")
    pairs = make_pairs()
    clean, corrupt = ids(pairs)
    graph = attribute(model, pairs, edges=True, progress=False)
    exact = attribute(model, pairs, method="exact", progress=False)
    ver = verify(model, pairs, graph, k=4)
    assert ver.names == [n for n, _ in graph.top(4)]
    for name, value in zip(ver.names, ver.exact):
        assert value == pytest.approx(exact.score(name), abs=1e-6)
    assert "pearson" in ver.table() and ver.to_dict()["level"] == "nodes"
    # path patching of edges into an MLP and into the logits, naive: only that read is changed
    outs_c, outs_k = node_outputs(model, corrupt), node_outputs(model, clean)
    with torch.no_grad():
        base = float(metric(model(input_ids=clean).logits))
    names = [e for e in graph.edges.names if e.endswith("->m1") or e.endswith("->logits")][:6]
    top = verify(model, pairs, graph, k=len(graph.edges), edges=True)
    got = dict(zip(top.names, top.exact))
    for name in names:
        u, v = name.split("->")
        delta = outs_c[u] - outs_k[u]
        module = blocks(model)[1].post_attention_layernorm if v == "m1" else model.model.norm
        hook = module.register_forward_pre_hook(lambda m, a: (a[0] + delta,))
        try:
            with torch.no_grad():
                want = float(metric(model(input_ids=clean).logits)) - base
        finally:
            hook.remove()
        assert got[name] == pytest.approx(want, abs=1e-6), name


def test_circuit_errors():
    model = tiny_model("llama")
    pairs = make_pairs()
    with pytest.raises(ValueError, match="circuit: unknown node"):
        evaluate_circuit(model, pairs, ["a9.h0"])
    with pytest.raises(ValueError, match="is not an edge"):
        evaluate_circuit(model, pairs, ["m1->a0.h0<q>"])
    with pytest.raises(ValueError, match="mixes node names and edge names"):
        evaluate_circuit(model, pairs, ["m1", "input->m0"])
    graph = attribute(model, pairs, progress=False)
    with pytest.raises(ValueError, match="k: got 0"):
        verify(model, pairs, graph, k=0)
    with pytest.raises(ValueError, match="the graph has no edges"):
        verify(model, pairs, graph, k=2, edges=True)
