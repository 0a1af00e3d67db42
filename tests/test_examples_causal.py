"""The causal-graph example runs end to end and writes its files (a tiny random model, byte tokens)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lightning_llm_inst.causal import CausalGraph, PromptPairs
from lightning_llm_inst.models import load_causal_lm

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "causal_smollm2.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("causal_smollm2_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def byte_pairs(tokenizer) -> dict[str, PromptPairs]:
    """Both tasks in miniature: one byte per token, so the answers are single letters."""
    clean = ["When Mary and John met, John gave it to ", "When Anna and Paul met, Paul gave it to "]
    corrupt = ["When Mary and John met, Mary gave it to ", "When Anna and Paul met, Anna gave it to "]
    ioi = PromptPairs.from_text(tokenizer, clean, corrupt, ["M", "A"], ["J", "P"])
    capitals = PromptPairs.from_text(tokenizer, ["The capital of France is ", "The capital of Italy is "],
                                     ["The capital of Russia is ", "The capital of Spain is "], ["P", "R"], ["M", "M"])
    return {"ioi": ioi, "capitals": capitals}


def test_example_writes_graph_curve_and_figures(example, tmp_path: Path, capsys) -> None:
    model, tokenizer = load_causal_lm("random:llama")
    results = example.main("ioi", "eap-ig", str(tmp_path), model=model, tokenizer=tokenizer,
                           pairs=byte_pairs(tokenizer))
    assert list(results) == ["ioi"]
    for name in ("graph.json", "graph.png", "faithfulness.png"):
        path = tmp_path / "ioi" / name
        assert path.is_file() and path.stat().st_size > 0, path
    graph = CausalGraph.from_json(tmp_path / "ioi" / "graph.json")
    assert graph.nodes == results["ioi"]["graph"].nodes
    assert len(results["ioi"]["verification"].names) == 10
    assert results["ioi"]["curve"].faithfulness[-1] == pytest.approx(1.0, abs=1e-4)  # the whole graph is the model
    out = capsys.readouterr().out
    assert "top heads" in out and "pearson" in out and "CPR" in out


def test_example_rejects_unknown_task(example) -> None:
    with pytest.raises(ValueError, match="task: got 'greetings'"):
        example.main("greetings")
