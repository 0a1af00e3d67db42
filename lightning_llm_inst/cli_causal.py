"""``llm-inst causal``: a causal graph from the command line.

Stage: the user's shell, after attribution. :func:`cmd_causal` loads a model and prompt pairs
and runs :func:`~lightning_llm_inst.causal.attribution.attribute` (or, with ``--store``, reads the
graph of a store written by ``capture_attribution``), prints the strongest nodes and edges and,
on request, verifies the top scores by exact patching (``--verify K``), measures the faithfulness
curve (``--curve``), writes the graph's files (``--output DIR``) and its TensorBoard views
(``--tensorboard DIR``).

Options come from defaults, then the YAML file of ``--config`` (its keys are the option names with
underscores), then the command line; :func:`causal_options` checks all of them in one place, and
a bad value is a ``ValueError`` whose one line names the option, the value and what is allowed
(``llm-inst`` prints it as ``error: ...`` with exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CAUSAL_DEFAULTS", "add_parser", "causal_options", "cmd_causal"]


#: option name (as in the YAML of --config) -> default
CAUSAL_DEFAULTS: dict[str, Any] = {
    "pairs": None, "model": "smollm2", "method": "eap-ig", "ig_steps": 5, "nodes": "heads,mlp", "edges": False,
    "per_position": False, "batch_size": 8, "store": None, "output": None, "verify": None, "curve": False,
    "tensorboard": None, "top": 20, "device": None, "dtype": "float32", "quiet": False}
_CAUSAL_FLAGS = ("edges", "per_position", "curve", "quiet")
_CAUSAL_INTS = ("ig_steps", "batch_size", "verify", "top")  # integers >= 1
_CAUSAL_CHOICES = {"device": ("cpu", "cuda"), "dtype": ("float32", "bfloat16")}


def _causal_value(name: str, value: Any, where: str) -> Any:
    """One option's value, checked; ``where`` says where it came from (for the message)."""
    from lightning_llm_inst.causal.attribution import METHODS
    from lightning_llm_inst.causal.nodes import NODE_KINDS

    given = value

    def bad(allowed: str) -> ValueError:
        return ValueError(f"--{name.replace('_', '-')}{where}: got {given!r}; allowed: {allowed}")

    if value is None and (CAUSAL_DEFAULTS[name] is None or name == "device"):
        return None
    if name in _CAUSAL_FLAGS:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if name in _CAUSAL_INTS:
        if isinstance(value, str) and value.strip().lstrip("+").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad("an integer >= 1")
        return value
    if name == "method":
        if value not in METHODS:
            raise bad(", ".join(METHODS))
        return value
    if name == "nodes":
        items = value.split(",") if isinstance(value, str) else value
        items = [str(n).strip() for n in items] if isinstance(items, (list, tuple)) else []
        if not items or any(n not in NODE_KINDS for n in items):
            raise bad(f"a comma-separated, non-empty subset of {','.join(NODE_KINDS)}")
        return tuple(dict.fromkeys(items))
    if name in _CAUSAL_CHOICES:
        if value not in _CAUSAL_CHOICES[name]:
            raise bad(", ".join(_CAUSAL_CHOICES[name]))
        return value
    if not isinstance(value, str) or not value:
        raise bad("a path" if name != "model" else "a model name or path")
    return value


def causal_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the YAML of ``--config``, then the command line; checked in one place."""
    import torch
    import yaml

    options = dict(CAUSAL_DEFAULTS)
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"--config: no such file {args.config!r}; expected a YAML file of causal options")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"--config: {args.config} is not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(loaded, (Mapping, type(None))):
            raise ValueError(f"--config: {args.config} holds a {type(loaded).__name__}; expected a mapping of "
                             f"options such as 'method: atp'")
        for key, value in (loaded or {}).items():
            if key not in CAUSAL_DEFAULTS:
                raise ValueError(f"--config: unknown option {key!r} in {args.config}; allowed: "
                                 f"{', '.join(CAUSAL_DEFAULTS)}")
            options[key] = _causal_value(key, value, f" (in {args.config})")
    for key in CAUSAL_DEFAULTS:
        if getattr(args, key) is not None:  # given on the command line
            options[key] = _causal_value(key, getattr(args, key), "")
    options["nodes"] = _causal_value("nodes", options["nodes"], "")
    if options["store"] is None and options["pairs"] is None:
        raise ValueError("--pairs: required: a JSONL file of prompt pairs (or --store PATH for a graph from an "
                         "activation store)")
    if options["pairs"] is not None and not Path(options["pairs"]).is_file():
        raise ValueError(f"--pairs: no such file {options['pairs']!r}; expected a JSONL file of prompt pairs "
                         f'({{"clean", "corrupt", "answer", "wrong"}} per line)')
    if options["edges"] and options["method"] == "exact" and options["store"] is None:
        raise ValueError("--edges: method 'exact' scores nodes only; allowed with --edges: --method atp or eap-ig")
    if options["device"] is None:
        options["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    elif options["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: got 'cuda' but no CUDA device is available; allowed here: cpu")
    return options


def _table(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (1, 2)) -> str:
    """A plain-text table; the columns in ``left`` are left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def fmt(row: list[str]) -> str:
        return "  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def _load_model(name: str, dtype: str, device: str) -> tuple[Any, Any]:
    import torch

    from lightning_llm_inst.models import load_causal_lm, load_smollm2

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    try:
        if name == "smollm2":  # cached per (dtype, device): never moved after loading
            return load_smollm2(dtype=torch_dtype, device=device)
        model, tokenizer = load_causal_lm(name, dtype=torch_dtype)
    except ImportError as exc:
        raise ValueError(f"--model={name!r}: {exc}") from exc
    if tokenizer is None:
        raise ValueError(f"--model={name!r} has no tokenizer of its own; the prompt pairs file needs one")
    return model.to(device), tokenizer


def _check_fits(model: Any, graph: Any, name: str) -> None:
    """The model that verifies a graph from a store must have the graph's layers and heads."""
    config = getattr(model, "config", None)
    have = (getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None))
    want = (graph.metadata.get("n_layers"), graph.metadata.get("n_heads"))
    if None not in have and None not in want and have != want:
        raise ValueError(f"--model={name!r} has {have[0]} layers of {have[1]} heads but the graph of --store has "
                         f"{want[0]} of {want[1]}; give the model the store was captured from")


def _stored_pairs(graph: Any) -> Any:
    """The prompt pairs (token ids) a graph from a store was computed on."""
    from lightning_llm_inst.causal import PromptPairs

    stored = graph.metadata.get("pairs") or {}
    try:
        return PromptPairs.from_ids(stored["clean_ids"], stored["corrupt_ids"], stored["answer_ids"],
                                    stored["wrong_ids"])
    except KeyError:
        raise ValueError("--store: the graph keeps no prompt pairs; give --pairs for --verify and --curve") from None


def _print_top(graph: Any, top: int) -> None:
    meta = graph.metadata
    clean, corrupt = meta.get("clean_metric"), meta.get("corrupt_metric")
    print(f"graph     {meta.get('method', '?')} on {meta.get('n_pairs', '?')} pair(s), model {meta.get('model', '?')}: "
          f"{sum(1 for n in graph.nodes if n != 'logits')} nodes, {len(graph.edges)} edges")
    if isinstance(clean, (int, float)) and isinstance(corrupt, (int, float)):
        print(f"metric    {meta.get('metric', 'metric')}: clean {clean:.4f}, corrupt {corrupt:.4f}")
    print()
    rows = [[str(i), name, graph.node_kind(name), f"{score:+.5f}"] for i, (name, score) in enumerate(graph.top(top), 1)]
    print(_table(["rank", "node", "kind", "score"], rows))
    if len(graph.edges):
        rows = [[str(i), name, "edge", f"{score:+.5f}"]
                for i, (name, score) in enumerate(graph.top(top, kind="edges"), 1)]
        print()
        print(_table(["rank", "edge", "kind", "score"], rows))


def _write_graph(graph: Any, out: Path, tokens: list[str] | None) -> list[Path]:
    written = [graph.to_json(out / "graph.json")]
    try:
        written.append(graph.to_json(out / "graph.circuit-tracer.json", format="circuit-tracer",
                                     prompt_tokens=tokens))
    except ValueError as exc:  # non-finite scores: the viewer reads strict JSON
        print(f"note: graph.circuit-tracer.json not written: {exc}", file=sys.stderr)
    try:
        graph.figure().savefig(out / "graph.png", dpi=120)
        written.append(out / "graph.png")
    except ImportError:
        print("note: graph.png not written: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return written


def cmd_causal(args: argparse.Namespace) -> int:
    """Run ``llm-inst causal``; see the module docstring."""
    from lightning_llm_inst.causal import PromptPairs, attribute, faithfulness_curve, verify

    opts = causal_options(args)
    progress = False if opts["quiet"] else None
    model = tokenizer = pairs = None
    if opts["store"] is None or opts["verify"] or opts["curve"]:  # the model runs
        model, tokenizer = _load_model(opts["model"], opts["dtype"], opts["device"])
        if opts["pairs"] is not None:
            pairs = PromptPairs.from_jsonl(opts["pairs"], tokenizer)
    if opts["store"] is not None:
        from lightning_llm_inst.causal import attribute_from_store

        graph = attribute_from_store(opts["store"], per_position=opts["per_position"], progress=progress)
        if model is not None:
            _check_fits(model, graph, opts["model"])
            pairs = _stored_pairs(graph) if pairs is None else pairs
    else:
        graph = attribute(model, pairs, method=opts["method"], nodes=opts["nodes"], edges=opts["edges"],
                          ig_steps=opts["ig_steps"], per_position=opts["per_position"],
                          batch_size=opts["batch_size"], progress=progress)
        graph.metadata.update(model=opts["model"], pairs_file=str(opts["pairs"]))
    _print_top(graph, opts["top"])
    out = Path(opts["output"]) if opts["output"] is not None else None
    written: list[Path] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        tokens = None
        if pairs is not None and len(set(pairs.lengths)) == 1:  # the viewer's prompt: the first pair
            tokens = [tokenizer.decode([i]) for i in pairs.clean_ids[0]]
        written += _write_graph(graph, out, tokens)
    edges = bool(len(graph.edges))  # verify and the curve check edges when the graph has them
    if opts["verify"] is not None:
        check = verify(model, pairs, graph, k=opts["verify"], edges=edges, batch_size=opts["batch_size"])
        print(f"\nverify    exact patching of the top {len(check.names)} {'edges' if edges else 'nodes'}")
        print(check.table())
        if out is not None:
            (out / "verification.json").write_text(json.dumps(check.to_dict(), indent=1) + "\n", encoding="utf-8")
            written.append(out / "verification.json")
    curve = None
    if opts["curve"]:
        curve = faithfulness_curve(model, pairs, graph, level="edges" if edges else "nodes",
                                   batch_size=opts["batch_size"], progress=progress)
        rows = [[f"{s:.4g}", str(c), f"{f:.4f}"] for s, c, f in zip(curve.sizes, curve.counts, curve.faithfulness)]
        print(f"\nfaithfulness of the top {curve.level} (1: the circuit alone restores the clean metric)")
        print(_table(["size", "count", "faithfulness"], rows, left=()))
        print(f"CPR {curve.cpr:.4f}   CMD {curve.cmd:.4f}")
        if out is not None:
            (out / "faithfulness.json").write_text(json.dumps(curve.to_dict(), indent=1) + "\n", encoding="utf-8")
            curve.figure().savefig(out / "faithfulness.png", dpi=120)
            written += [out / "faithfulness.json", out / "faithfulness.png"]
    if opts["tensorboard"] is not None:
        from torch.utils.tensorboard import SummaryWriter

        from lightning_llm_inst.viz import write_graph_views

        with SummaryWriter(opts["tensorboard"]) as writer:
            write_graph_views(writer, graph, curve=curve)
        written.append(Path(opts["tensorboard"]))
    if written:
        print(f"\nwrote     {', '.join(map(str, written))}")
    return 0


def add_parser(sub: Any) -> None:
    """Add the ``causal`` subcommand to ``llm-inst``'s subparsers."""
    c = sub.add_parser("causal", help="score the heads and MLPs (and edges) of a causal graph on prompt pairs, "
                       "e.g. `llm-inst causal --config configs/causal_smollm2.yaml`",
                       description="Attribute a metric (logit difference) to the nodes and edges of a model on "
                       "clean/corrupt prompt pairs; optionally verify the top scores by exact patching and draw "
                       "the faithfulness curve. Options on the command line override those of --config.")
    c.add_argument("--config", metavar="FILE.yaml", help="YAML file whose keys are these options (underscores)")
    c.add_argument("--pairs", metavar="FILE.jsonl", help='prompt pairs: {"clean", "corrupt", "answer", "wrong"} '
                   "per line")
    c.add_argument("--model", help="smollm2 (default), random:<arch>, a model directory, a .gguf file or a cached "
                   "Hugging Face id")
    c.add_argument("--method", help="atp, eap-ig (default) or exact")
    c.add_argument("--ig-steps", metavar="N", help="EAP-IG interpolation steps (default 5)")
    c.add_argument("--nodes", help="node kinds, comma-separated (default heads,mlp)")
    c.add_argument("--store", metavar="PATH", help="build the graph from an activation store written by "
                   "capture_attribution instead (attribute_from_store; --method, --nodes, --edges and --ig-steps "
                   "are the store's); --verify and --curve then run --model on --pairs, else on the store's pairs")
    c.add_argument("--batch-size", metavar="N", help="pairs per forward pass (default 8)")
    c.add_argument("--output", metavar="DIR", help="write graph.json, graph.png, graph.circuit-tracer.json (and "
                   "verification.json, faithfulness.json, faithfulness.png)")
    c.add_argument("--verify", metavar="K", help="exact patching of the top K nodes (edges when the graph has "
                   "them) beside their scores")
    c.add_argument("--tensorboard", metavar="DIR", help="write the graph views for TensorBoard to DIR")
    c.add_argument("--top", metavar="N", help="rows of the printed tables (default 20)")
    c.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    c.add_argument("--dtype", help="float32 (default) or bfloat16")
    for flag, text in (("--edges", "score edges too (atp, eap-ig)"), ("--per-position", "scores per token position"),
                       ("--curve", "faithfulness of the top nodes (edges) at growing sizes, with CPR and CMD"),
                       ("--quiet", "no progress bars")):
        c.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    c.set_defaults(func=cmd_causal)
