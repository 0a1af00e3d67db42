"""Causal graphs on real weights (SmolLM2-135M-Instruct, CPU): the node decomposition is exact,
circuits reproduce the clean and corrupt runs, and the gradient methods track exact patching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_llm_inst.causal import (PromptPairs, attribute, attribute_from_store, capture_attribution,
                                       evaluate_circuit, node_outputs)

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def test_head_outputs_sum_to_attention_output(smollm2):
    model, tok = smollm2
    pairs = PromptPairs.from_jsonl(DATA / "causal_ioi.jsonl", tok)
    ids = torch.tensor(pairs.clean_ids[:2])
    attn = {}
    hooks = [model.model.layers[i].self_attn.register_forward_hook(lambda m, a, o, i=i: attn.__setitem__(i, o[0]))
             for i in (0, 17, 29)]
    try:
        outs = node_outputs(model, ids)
    finally:
        for h in hooks:
            h.remove()
    for layer in (0, 17, 29):  # 9 query heads over 3 key/value heads; o_proj has no bias
        total = sum(outs[f"a{layer}.h{h}"] for h in range(9))
        torch.testing.assert_close(total, attn[layer], atol=1e-5, rtol=1e-5)


def test_capitals_task(smollm2):
    model, tok = smollm2
    pairs = PromptPairs.from_jsonl(DATA / "causal_capitals.jsonl", tok)[:8]
    assert pairs.clean_ids[0] == tok(pairs.clean[0])["input_ids"]  # as the tokenizer does by default
    exact = attribute(model, pairs, method="exact", batch_size=8, progress=False)
    atp = attribute(model, pairs, method="atp", batch_size=8, progress=False)
    assert exact.metadata["clean_metric"] > 5 and exact.metadata["corrupt_metric"] < -5
    heads = [i for i, n in enumerate(exact.nodes) if n.startswith("a")]
    assert len(heads) == 270 and len(exact.nodes) == 302
    assert pearson(atp.scores[heads], exact.scores[heads]) >= 0.95
    assert evaluate_circuit(model, pairs[:4], list(exact.nodes)) == pytest.approx(1.0, abs=1e-4)
    assert evaluate_circuit(model, pairs[:4], ["logits"]) == pytest.approx(0.0, abs=1e-4)


def test_ioi_eap_ig_beats_atp_on_mlps(smollm2):
    model, tok = smollm2
    pairs = PromptPairs.from_jsonl(DATA / "causal_ioi.jsonl", tok)
    exact = attribute(model, pairs, method="exact", nodes=("mlp",), batch_size=16, progress=False)
    atp = attribute(model, pairs, method="atp", nodes=("mlp",), batch_size=16, progress=False)
    ig = attribute(model, pairs, method="eap-ig", nodes=("mlp",), batch_size=16, progress=False)
    assert exact.metadata["clean_metric"] > 3 and exact.metadata["corrupt_metric"] < -3
    mlps = [i for i, n in enumerate(exact.nodes) if n.startswith("m")]
    assert pearson(ig.scores[mlps], exact.scores[mlps]) > max(0.9, pearson(atp.scores[mlps], exact.scores[mlps]))


def test_store_graph_equals_live_graph(smollm2, tmp_path):
    model, tok = smollm2
    pairs = PromptPairs.from_jsonl(DATA / "causal_ioi.jsonl", tok)[:4]
    live = attribute(model, pairs, method="atp", progress=False)
    path = capture_attribution(model, pairs, tmp_path / "ioi", method="atp", progress=False)
    graph = attribute_from_store(path, progress=False)
    assert graph.nodes == live.nodes
    assert float((graph.scores - live.scores).abs().max() / live.scores.abs().max()) < 1e-4
