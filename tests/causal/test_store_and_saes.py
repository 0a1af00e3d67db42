"""Graphs from a store equal live graphs; SAE latent and error nodes against naive patching."""

from __future__ import annotations

import pytest
import torch

from lightning_llm_inst import ActivationStore, InstrumentationFramework
from lightning_llm_inst.causal import (PromptPairs, attribute, attribute_from_store, capture_attribution,
                                       evaluate_circuit, node_outputs)
from lightning_llm_inst.models import tiny_model
from lightning_llm_inst.sae import SAEConfig, SparseAutoencoder
from tests.causal.test_attribution import ids, make_pairs, metric

HOOK = "blocks.0.hook_resid_post"


def make_sae(seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=48, architecture="topk", k=6, hook_name=HOOK))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.scaling_factor.fill_(0.5)
    return sae


def mixed_pairs() -> PromptPairs:
    a, b = make_pairs(seq=7, n=4), make_pairs(seq=5, n=3, seed=4, positions=(1, 3))
    return PromptPairs.from_ids(a.clean_ids + b.clean_ids, a.corrupt_ids + b.corrupt_ids,
                                a.answer_ids + b.answer_ids, a.wrong_ids + b.wrong_ids)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method", ["atp", "eap-ig"])
def test_store_graph_equals_live_graph(tmp_path, method):
    model = tiny_model("llama")
    pairs = mixed_pairs()
    live = attribute(model, pairs, method=method, edges=True, batch_size=2, progress=False)
    path = capture_attribution(model, pairs, tmp_path / "attr", method=method, edges=True, batch_size=3,
                               progress=False)
    with ActivationStore(path) as store:  # an ordinary store: manifest, readers, checksums
        assert store.verify().ok and store.rows == sum(pairs.lengths)
        assert {"attr.clean.z.1", "attr.grad.m.0", "attr.grad.reads.1", "attr.grad.final"} <= set(store.hooks)
        assert store.tokens["sequence_id"][:].tolist().count(0) == 7
    graph = attribute_from_store(path, window_rows=5, progress=False)
    assert graph.nodes == live.nodes and graph.edges.names == live.edges.names
    assert rel_err(graph.scores, live.scores) < 1e-4
    assert rel_err(graph.edges.scores, live.edges.scores) < 1e-4
    assert graph.metadata["clean_metric"] == pytest.approx(live.metadata["clean_metric"], rel=1e-6)
    assert graph.metadata["corrupt_metric"] == pytest.approx(live.metadata["corrupt_metric"], rel=1e-6)
    report = InstrumentationFramework().analyze_activations(path)
    assert report["causal_graph"].nodes == live.nodes and not any(h.startswith("attr.") for h in report["hooks"])


def test_store_per_position_and_saes(tmp_path):
    model = tiny_model("gpt2")
    pairs = make_pairs()
    saes = {HOOK: make_sae()}
    live = attribute(model, pairs, saes=saes, per_position=True, progress=False)
    path = capture_attribution(model, pairs, tmp_path / "attr", saes=saes, progress=False)
    graph = attribute_from_store(path, per_position=True, window_rows=4, progress=False)
    assert graph.nodes == live.nodes and graph.scores.shape == live.scores.shape
    assert rel_err(graph.scores, live.scores) < 1e-4
    with pytest.raises(ValueError, match="holds no attribution data"):
        store = tmp_path / "plain"
        from lightning_llm_inst.store import StoreWriter
        with StoreWriter(store) as w:
            w.append({"x": torch.zeros(2, 3)})
        attribute_from_store(store)


def test_sae_nodes_sum_to_activation_and_match_naive_patching():
    model = tiny_model("llama")
    pairs = make_pairs()
    sae = make_sae()
    saes = {HOOK: sae}
    clean, corrupt = ids(pairs)
    outs = node_outputs(model, clean, saes=saes)
    resid = {}
    hook = model.model.layers[0].register_forward_hook(lambda m, a, o: resid.__setitem__(0, o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(input_ids=clean)
    finally:
        hook.remove()
    total = sum(outs[f"sae.{HOOK}.f{i}"] for i in range(48)) + outs[f"sae.{HOOK}.err"]
    torch.testing.assert_close(total, resid[0], atol=1e-5, rtol=1e-5)

    exact = attribute(model, pairs, method="exact", saes=saes, progress=False)
    atp = attribute(model, pairs, method="atp", saes=saes, progress=False)
    assert exact.nodes == atp.nodes
    latents = [n for n in exact.nodes if n.startswith(f"sae.{HOOK}.f")]
    # only latents active on some clean or corrupt token are nodes
    _, corrupt_ids = ids(pairs)
    with torch.no_grad():
        active = (sae.encode(resid[0]) != 0).flatten(0, 1).any(0)
    assert 0 < len(latents) <= 48 and all(f"sae.{HOOK}.f{i}" in latents for i in active.nonzero()[:, 0].tolist())
    out_c = node_outputs(model, corrupt, saes=saes)
    with torch.no_grad():
        base = float(metric(model(input_ids=clean).logits))
    for name in latents[:4] + [f"sae.{HOOK}.err"]:
        delta = out_c[name] - outs[name]
        h = model.model.layers[0].register_forward_hook(
            lambda m, a, o: (o[0] + delta, *o[1:]) if isinstance(o, tuple) else o + delta)
        try:
            with torch.no_grad():
                want = float(metric(model(input_ids=clean).logits)) - base
        finally:
            h.remove()
        assert exact.score(name) == pytest.approx(want, abs=1e-5), name
    # the circuit of everything (latents, error, heads, MLPs) is the clean run; none is the corrupt run
    assert evaluate_circuit(model, pairs, list(exact.nodes), saes=saes) == pytest.approx(1.0, abs=1e-4)
    assert evaluate_circuit(model, pairs, ["logits"], saes=saes) == pytest.approx(0.0, abs=1e-4)
    # AtP of a latent: its output difference dotted with the gradient at the hook point (naive)
    live = {}

    def keep(m, a, o):
        t = (o[0] if isinstance(o, tuple) else o).view_as(o[0] if isinstance(o, tuple) else o)
        live["x"] = t
        return (t, *o[1:]) if isinstance(o, tuple) else t
    h = model.model.layers[0].register_forward_hook(keep)
    try:
        value = metric(model(input_ids=clean).logits)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(value, live["x"])
    for name in latents[:6] + [f"sae.{HOOK}.err"]:
        want = float(((out_c[name] - outs[name]) * g).sum())
        assert atp.score(name) == pytest.approx(want, abs=1e-6), name


def test_capture_attribution_errors(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="method: got 'exact'"):
        capture_attribution(model, make_pairs(), tmp_path / "a", method="exact")
    with pytest.raises(ValueError, match="edges: edges from a store"):
        capture_attribution(model, make_pairs(), tmp_path / "b", edges=True, saes={HOOK: make_sae()})
