"""Attribution on a CUDA device gives the CPU's graph (float32), and runs in bfloat16."""

from __future__ import annotations

import pytest
import torch

from lightning_llm_inst.causal import attribute, attribute_from_store, capture_attribution, evaluate_circuit, verify
from lightning_llm_inst.models import tiny_model
from tests.causal.test_attribution import make_pairs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cuda_graph_equals_cpu_graph(arch, tmp_path):
    cpu = tiny_model(arch)
    gpu = tiny_model(arch).cuda()
    pairs = make_pairs()
    for method, kw in (("atp", {"edges": True}), ("eap-ig", {"edges": True}), ("exact", {})):
        a = attribute(cpu, pairs, method=method, progress=False, **kw)
        b = attribute(gpu, pairs, method=method, progress=False, **kw)
        assert a.nodes == b.nodes
        torch.testing.assert_close(b.scores, a.scores, atol=1e-5, rtol=1e-3)
        if kw:
            torch.testing.assert_close(b.edges.scores, a.edges.scores, atol=1e-5, rtol=1e-3)
    assert evaluate_circuit(gpu, pairs, ["logits"]) == pytest.approx(0.0, abs=1e-4)
    graph = attribute(gpu, pairs, edges=True, progress=False)
    assert len(verify(gpu, pairs, graph, k=3, edges=True).exact) == 3
    path = capture_attribution(gpu, pairs, tmp_path / "attr", edges=True, codec=None, progress=False)
    back = attribute_from_store(path, progress=False)
    torch.testing.assert_close(back.scores, graph.scores, atol=1e-6, rtol=1e-4)


def test_bfloat16_model_accumulates_in_float32():
    model32 = tiny_model("llama").cuda()
    model16 = tiny_model("llama", dtype=torch.bfloat16).cuda()
    pairs = make_pairs()
    a = attribute(model32, pairs, method="eap-ig", progress=False)
    b = attribute(model16, pairs, method="eap-ig", progress=False)
    assert b.scores.dtype == torch.float32
    assert float(torch.corrcoef(torch.stack([a.scores, b.scores]))[0, 1]) > 0.95
