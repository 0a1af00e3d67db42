"""Causal-graph benchmark: AtP, EAP-IG and exact patching on SmolLM2-135M-Instruct, their time,
their agreement with exact patching and the faithfulness of the circuits they pick.

What it measures (one process, one run), for each task (``examples/data/causal_ioi.jsonl``,
``causal_capitals.jsonl``, 16 prompt pairs each; metric: logit(answer) - logit(wrong) at the last
position, mean over pairs) on the full node graph: ``input``, 270 heads ``a{L}.h{H}`` (one per query
head), 30 MLPs ``m{L}`` and ``logits``:

- Time of ``attribute(model, pairs, method=..., batch_size=16)`` per method, ``time.perf_counter``
  around the call (``torch.cuda.synchronize()`` before and after on CUDA), after one warm-up
  ``method="atp"`` call on the same task (first-call overheads left out). AtP and EAP-IG
  (``ig_steps=5``): median of ``--repeats`` calls; exact: ``--exact-repeats`` calls (default one).
  With curves, the ``edges=True`` graphs of AtP / EAP-IG are timed too (one call each).
- Agreement with exact patching (``method="exact"``, the ground truth of single-node patching):
  Pearson over the 270 heads, over the 30 MLPs, top-20 overlap (|top 20 by |score| of the method
  ∩ top 20 of exact| / 20, over all 301 nodes but ``logits``), sign agreement over all 301 nodes
  and over exact's top 20.
- Faithfulness curves (``faithfulness_curve``, MIB's sizes unless ``--sizes``): node level for the
  AtP, EAP-IG and exact graphs; edge level for the ``edges=True`` AtP and EAP-IG graphs. As in MIB,
  CMD = area between faithfulness and 1 for circuits ranked by |score|, CPR = area under
  faithfulness for circuits ranked by signed score (what carries the clean behaviour first).
- M(clean) and M(corrupt) (the graphs' metadata).

Reference figures of an independent implementation (same CPU class, its own 16 pairs) are printed
beside ours in the Markdown; they are not a same-run baseline (different pairs, different code).
Exact patching of the same pairs in the same run is the baseline of every quality number.

Run it (results go to ``benchmarks/results/causal-<device>.json`` / ``.md`` and under ``$OUT`` when set)::

    python benchmarks/causal.py                                 # CPU, both tasks, everything
    python benchmarks/causal.py --device cuda                   # GPU (file tag from the GPU name)
    python benchmarks/causal.py --tasks capitals --methods atp,eap-ig --skip-curves   # quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from lightning_llm_inst.causal import CausalGraph, PromptPairs, attribute, faithfulness_curve  # noqa: E402
from lightning_llm_inst.causal.circuits import DEFAULT_SIZES  # noqa: E402

T_START = time.perf_counter()
MODEL_NAME = "SmolLM2-135M-Instruct"
TASKS = ("ioi", "capitals")
METHODS = ("atp", "eap-ig", "exact")
LABEL = {"atp": "AtP", "eap-ig": "EAP-IG", "exact": "exact"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOP = 20
REFERENCE_LABEL = "reference (independent implementation, same CPU class, its own 16 pairs)"
REFERENCE: dict[str, Any] = {
    "capitals": {"clean": 9.36, "corrupt": -8.76, "atp": {"pearson_heads": 0.970, "pearson_mlp": 0.968},
                 "eap-ig": {"pearson_heads": 0.989, "pearson_mlp": 0.997, "cpr": 1.26, "cmd": 0.09}},
    "ioi": {"clean": 5.43, "corrupt": -4.97, "atp": {"pearson_heads": 0.854, "pearson_mlp": -0.826},
            "eap-ig": {"pearson_heads": 0.892, "pearson_mlp": 0.997, "cpr": 1.39, "cmd": 0.09}},
    "seconds": {"atp": "0.7-1.5", "eap-ig": "2-5", "exact": "14-38"},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "device": str(device), "description": gpu or f"{cpu}, {os.cpu_count()} cores",
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda_version": torch.version.cuda, "transformers": transformers.__version__}


def device_tag(device: torch.device) -> str:
    """``cpu``, or the GPU's model in lower case (``h100``), for the result file name."""
    if device.type != "cuda":
        return "cpu"
    match = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", torch.cuda.get_device_name(device))
    return match.group(1).lower() if match else "cuda"


def timed(device: torch.device, fn: Any) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------- quality
def pearson(a: list[float], b: list[float]) -> float:
    if len(a) < 2:
        return float("nan")
    return float(torch.corrcoef(torch.tensor([a, b], dtype=torch.float64))[0, 1])


def agreement(graph: CausalGraph, exact: CausalGraph) -> dict[str, Any]:
    """``graph``'s node scores against exact patching's (the same nodes, the same pairs)."""
    est, truth = dict(graph.top(None)), dict(exact.top(None))
    heads = [n for n, _ in exact.top(None, kind="heads")]
    mlps = [n for n, _ in exact.top(None, kind="mlp")]
    names = list(truth)
    top_est = [n for n, _ in graph.top(TOP)]
    top_exact = [n for n, _ in exact.top(TOP)]
    same_sign = [(est[n] > 0) == (truth[n] > 0) for n in names]
    return {"pearson_heads": pearson([est[n] for n in heads], [truth[n] for n in heads]),
            "pearson_mlp": pearson([est[n] for n in mlps], [truth[n] for n in mlps]),
            "pearson_all": pearson([est[n] for n in names], [truth[n] for n in names]),
            "top_overlap": len(set(top_est) & set(top_exact)) / TOP,
            "sign_agreement": sum(same_sign) / len(same_sign),
            "sign_agreement_exact_top": sum((est[n] > 0) == (truth[n] > 0) for n in top_exact) / len(top_exact),
            "nodes": len(names), "heads": len(heads), "mlps": len(mlps)}


# ---------------------------------------------------------------------------- one task
def run_task(model: torch.nn.Module, tokenizer: Any, task: str, args: argparse.Namespace,
             device: torch.device) -> dict[str, Any]:
    if tokenizer is None:  # --random-init: the token ids SmolLM2's tokenizer gives (committed beside this file)
        ids = json.loads((HERE / "data" / f"causal_{task}_smollm2_ids.json").read_text())
        pairs = PromptPairs.from_ids(ids["clean_ids"], ids["corrupt_ids"], ids["answer_ids"], ids["wrong_ids"])
    else:
        pairs = PromptPairs.from_jsonl(REPO / "examples" / "data" / f"causal_{task}.jsonl", tokenizer)
    if args.pairs:
        pairs = pairs[:args.pairs]
    bs = args.batch_size
    out: dict[str, Any] = {"pairs": len(pairs), "token_lengths": sorted(set(pairs.lengths)), "timings": {},
                           "metrics": {}, "quality": {}, "curves": {}, "top_nodes": {}}
    _, warm = timed(device, lambda: attribute(model, pairs, method="atp", batch_size=bs, progress=False))
    log(f"{task}: {len(pairs)} pairs, warm-up AtP {warm:.2f} s")
    out["warmup_s"] = warm
    graphs: dict[str, CausalGraph] = {}
    for method in args.methods:
        runs, load = [], [loadavg()]
        for _ in range(args.exact_repeats if method == "exact" else args.repeats):
            graphs[method], dt = timed(device, lambda: attribute(model, pairs, method=method, batch_size=bs,
                                                                 ig_steps=args.ig_steps, progress=False))
            runs.append(dt)
        load.append(loadavg())
        out["timings"][method] = {"runs": runs, "median": statistics.median(runs), "min": min(runs),
                                  "loadavg_before_after": load}
        g = graphs[method]
        out["metrics"][method] = {"clean": g.metadata["clean_metric"], "corrupt": g.metadata["corrupt_metric"]}
        out["top_nodes"][method] = g.top(10)
        log(f"  {method}: {statistics.median(runs):.2f} s (median of {len(runs)}: "
            f"{', '.join(f'{r:.2f}' for r in runs)}), M(clean) {g.metadata['clean_metric']:+.3f}, "
            f"M(corrupt) {g.metadata['corrupt_metric']:+.3f}, load {load[-1]}")
    out["nodes"] = len(next(iter(graphs.values()))) if graphs else None
    if "exact" in graphs:
        for method in graphs:
            if method != "exact":
                q = out["quality"][method] = agreement(graphs[method], graphs["exact"])
                log(f"  {method} vs exact: Pearson heads {q['pearson_heads']:.3f}, MLPs {q['pearson_mlp']:.3f}, "
                    f"top-{TOP} overlap {q['top_overlap']:.2f}, sign agreement {q['sign_agreement']:.2f}")
    if not args.skip_curves:
        for method in [m for m in ("eap-ig", "atp", "exact") if m in graphs]:
            curve_sets = [("nodes", graphs[method])]
            if method != "exact" and "edges" in args.curve_levels:
                eg, dt = timed(device, lambda: attribute(model, pairs, method=method, edges=True, batch_size=bs,
                                                         ig_steps=args.ig_steps, progress=False))
                out["timings"][f"{method}+edges"] = {"runs": [dt], "median": dt, "min": dt, "edges": len(eg.edges)}
                log(f"  {method} with {len(eg.edges):,} edges: {dt:.2f} s")
                curve_sets.append(("edges", eg))
            for level, g in curve_sets:
                if level not in args.curve_levels:
                    continue
                c, dt = timed(device, lambda: faithfulness_curve(model, pairs, g, sizes=args.sizes, level=level,
                                                                 batch_size=bs, progress=False))
                # MIB ranks circuits by |score| for CMD and by signed score (what carries the clean
                # behaviour first) for CPR: two curves
                cs, dts = timed(device, lambda: faithfulness_curve(model, pairs, g, sizes=args.sizes, level=level,
                                                                   by="signed", batch_size=bs, progress=False))
                out["curves"][f"{method}/{level}"] = {**c.to_dict(), "seconds": dt, "cpr_abs": c.cpr,
                                                      "cpr": cs.cpr, "signed": {**cs.to_dict(), "seconds": dts}}
                log(f"  {method} {level} curve: CPR {cs.cpr:.3f} (signed ranking; {c.cpr:.3f} by |score|), "
                    f"CMD {c.cmd:.3f} ({dt + dts:.1f} s): |score| "
                    + ", ".join(f"{s:g}:{v:+.2f}" for s, v in zip(c.sizes, c.faithfulness))
                    + "; signed " + ", ".join(f"{s:g}:{v:+.2f}" for s, v in zip(cs.sizes, cs.faithfulness)))
    return out


# ---------------------------------------------------------------------------- targets
def checks(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets, each PASS / FAIL, or NOT RUN when this run lacks what it needs."""
    tasks, on_cpu = res["tasks"], res["machine"]["device"] == "cpu"
    out: list[dict[str, Any]] = []

    def add(check: str, met: bool | None, value: str) -> None:
        out.append({"check": check, "status": "NOT RUN" if met is None else ("PASS" if met else "FAIL"),
                    "value": value})

    q = tasks.get("capitals", {}).get("quality", {}).get("atp")
    add("capitals: AtP vs exact, Pearson over heads >= 0.95", None if q is None else q["pearson_heads"] >= 0.95,
        "-" if q is None else f"{q['pearson_heads']:.3f}")
    qi = tasks.get("ioi", {}).get("quality", {})
    if "atp" in qi and "eap-ig" in qi:
        a, e = qi["atp"], qi["eap-ig"]
        add("ioi: EAP-IG closer to exact than AtP (higher Pearson over heads and over MLPs)",
            e["pearson_heads"] > a["pearson_heads"] and e["pearson_mlp"] > a["pearson_mlp"],
            f"heads {e['pearson_heads']:.3f} vs {a['pearson_heads']:.3f}, MLPs {e['pearson_mlp']:.3f} vs "
            f"{a['pearson_mlp']:.3f}")
    else:
        add("ioi: EAP-IG closer to exact than AtP (higher Pearson over heads and over MLPs)", None, "-")
    for task in TASKS:
        curves = {lvl: tasks.get(task, {}).get("curves", {}).get(f"eap-ig/{lvl}") for lvl in ("nodes", "edges")}
        have = {lvl: c for lvl, c in curves.items() if c is not None}
        meets = [lvl for lvl, c in have.items() if c["cpr"] >= 1.1 and c["cmd"] <= 0.15]
        value = "; ".join(f"{lvl}: CPR {c['cpr']:.3f}, CMD {c['cmd']:.3f}" for lvl, c in have.items()) or "-"
        add(f"{task}: EAP-IG circuit CPR >= 1.1 and CMD <= 0.15", bool(meets) if have else None,
            value + (f" (met at {' and '.join(meets)} level)" if meets else ""))
    for method, limit in (("atp", 10.0), ("exact", 180.0)):
        times = {t: r["timings"][method]["median"] for t, r in tasks.items() if method in r["timings"]}
        check = f"{LABEL[method]} < {limit:.0f} s per task on CPU"
        if not times:
            add(check, None, "-")
        elif not on_cpu:
            out.append({"check": check, "status": "SKIP",
                        "value": f"a CPU target; this run is on {res['machine']['device']}"})
        else:
            add(check, all(v < limit for v in times.values()), ", ".join(f"{t} {v:.2f} s" for t, v in times.items()))
    return out


# ---------------------------------------------------------------------------- report
def f(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def build_markdown(res: dict[str, Any]) -> str:
    m, c = res["machine"], res["config"]
    lines = [f"# Causal graphs: AtP, EAP-IG and exact patching on {MODEL_NAME} ({res['tag']})", "",
             f"{res['timestamp']}, `{res['command']}`", "",
             f"Machine: {m['description']} ({m['torch_threads']} torch threads), GPU: {m['gpu'] or 'none'}; "
             f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}. Load average at the start "
             f"{res['loadavg_start']}. Run wall time {res['wall_s'] / 60:.1f} min (model load "
             f"{res['load_s']:.1f} s).", "",
             f"Setup: {c['dtype']}, batch size {c['batch_size']}, EAP-IG with {c['ig_steps']} steps; nodes: input, "
             f"270 heads (per query head), 30 MLPs, logits; metric: logit difference at the last position, mean over "
             f"pairs. Times: AtP / EAP-IG median of {c['repeats']} calls, exact {c['exact_repeats']} call(s), each "
             f"task after one warm-up AtP call. Quality baseline: exact patching of the same pairs in the same "
             f"run.", "",
             f"`ref` = {REFERENCE_LABEL}; not a same-run baseline.", "", "## Time per graph (seconds)", "",
             "| task | pairs | AtP | EAP-IG | exact | exact / AtP | exact / EAP-IG | AtP, edges | EAP-IG, edges | "
             "ref AtP / EAP-IG / exact |", "|---|---|---|---|---|---|---|---|---|---|"]
    ref_s = " / ".join(REFERENCE["seconds"][k] for k in METHODS)
    for task, r in res["tasks"].items():
        t = {k: v["median"] for k, v in r["timings"].items()}
        ratio = lambda a, b: f(t[a] / t[b], ".1f") if a in t and b in t else "-"  # noqa: E731
        lines.append(f"| {task} | {r['pairs']} | {f(t.get('atp'), '.2f')} | {f(t.get('eap-ig'), '.2f')} | "
                     f"{f(t.get('exact'), '.1f')} | {ratio('exact', 'atp')} | {ratio('exact', 'eap-ig')} | "
                     f"{f(t.get('atp+edges'), '.2f')} | {f(t.get('eap-ig+edges'), '.2f')} | {ref_s} |")
    lines += ["", "## M(clean) / M(corrupt)", "", "| task | ours | ref |", "|---|---|---|"]
    for task, r in res["tasks"].items():
        mm = next(iter(r["metrics"].values()), None)
        ref = REFERENCE.get(task, {})
        lines.append(f"| {task} | {f(mm and mm['clean'], '+.2f')} / {f(mm and mm['corrupt'], '+.2f')} | "
                     f"{ref.get('clean', 0):+.2f} / {ref.get('corrupt', 0):+.2f} |")
    lines += ["", "## Agreement with exact patching (same pairs, same run)", "",
              f"| task | method | Pearson heads | Pearson MLPs | Pearson all | top-{TOP} overlap | "
              f"sign agreement (all) | sign agreement (exact top {TOP}) | ref Pearson heads / MLPs |",
              "|---|---|---|---|---|---|---|---|---|"]
    for task, r in res["tasks"].items():
        for method, q in r["quality"].items():
            ref = REFERENCE.get(task, {}).get(method, {})
            lines.append(f"| {task} | {LABEL[method]} | {f(q['pearson_heads'])} | {f(q['pearson_mlp'])} | "
                         f"{f(q['pearson_all'])} | {f(q['top_overlap'], '.2f')} | {f(q['sign_agreement'], '.2f')} | "
                         f"{f(q['sign_agreement_exact_top'], '.2f')} | {f(ref.get('pearson_heads'))} / "
                         f"{f(ref.get('pearson_mlp'))} |")
    curves = [(task, key, cv) for task, r in res["tasks"].items() for key, cv in r["curves"].items()]
    if curves:
        sizes = curves[0][2]["sizes"]
        lines += ["", "## Faithfulness of the top circuits", "",
                  "| task | graph / level | CPR | CMD | ref CPR / CMD | curve s | "
                  + " | ".join(f"{s:g}" for s in sizes) + " |", "|---|---|---|---|---|---|" + "---|" * len(sizes)]
        for task, key, cv in curves:
            method, level = key.split("/")
            ref = REFERENCE.get(task, {}).get(method, {})
            ref_s = f"{ref['cpr']:.2f} / {ref['cmd']:.2f}" if "cpr" in ref else "-"
            lines.append(f"| {task} | {LABEL[method]} / {level} | {f(cv['cpr'])} | {f(cv['cmd'])} | {ref_s} | "
                         f"{f(cv['seconds'], '.1f')} | " + " | ".join(f(v, "+.2f") for v in cv["faithfulness"]) + " |")
        lines += ["", "CPR: area under faithfulness for circuits ranked by signed score (the nodes or edges whose "
                  "corruption lowers M most come first), as MIB ranks for CPR; CMD: area between faithfulness and 1 "
                  "for circuits ranked by |score|. Columns after `curve s`: faithfulness of the top fraction by "
                  "|score|. The reference's EAP-IG CPR / CMD is set beside both of our levels (it does not state "
                  "its level)."]
    lines += ["", "## Targets", ""] + [f"- {k['status']}: {k['check']} ({k['value']})" for k in res["checks"]]
    lines += ["", "Definitions: a node's score estimates M(clean with that node's output from the corrupt run) - "
              "M(clean); exact measures it. Pearson over the 270 heads / 30 MLPs / all 301 nodes; top-20 overlap = "
              "|top 20 by |score| ∩ exact's top 20| / 20; sign agreement = fraction of nodes whose score has exact's "
              "sign. Faithfulness = (M(circuit) - M(corrupt)) / (M(clean) - M(corrupt)) with every node (edge) "
              "outside the circuit given its corrupt value; CPR = area under faithfulness over the circuit size "
              "(fraction of nodes or edges, trapezoids; signed ranking), CMD = area between faithfulness and 1 "
              "(|score| ranking)."]
    if res["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: ioi, capitals (default both)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: atp, eap-ig, exact (default all)")
    p.add_argument("--skip-curves", action="store_true", help="no faithfulness curves (and no edges=True graphs)")
    p.add_argument("--curve-levels", default="nodes,edges", help="comma-separated: nodes, edges (default both)")
    p.add_argument("--sizes", default=None, help="curve sizes, comma-separated fractions (default: MIB's 11)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ig-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed calls of AtP and EAP-IG (median reported)")
    p.add_argument("--exact-repeats", type=int, default=1, help="timed calls of exact")
    p.add_argument("--pairs", type=int, default=None, help="use only the first N pairs of each task (checks)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--random-init", action="store_true",
                   help="a random-init model of SmolLM2's shape on SmolLM2's token ids (where the weights cannot "
                        "be loaded, e.g. the GPU machine): timings only, the quality figures mean nothing")
    p.add_argument("--write-ids", action="store_true", help="write the token ids of both tasks for --random-init")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/causal-<device>.json); "
                                               "the Markdown goes next to it")
    a = p.parse_args(argv)
    a.tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    a.curve_levels = [c.strip() for c in a.curve_levels.split(",") if c.strip()]
    for name, values, allowed in (("--tasks", a.tasks, TASKS), ("--methods", a.methods, METHODS),
                                  ("--curve-levels", a.curve_levels, ("nodes", "edges"))):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            p.error(f"{name}: got {','.join(values) or 'nothing'}; allowed: {', '.join(allowed)}")
    a.sizes = list(DEFAULT_SIZES) if a.sizes is None else [float(s) for s in a.sizes.split(",")]
    if min(a.repeats, a.exact_repeats, a.batch_size, a.ig_steps) < 1:
        p.error("--repeats, --exact-repeats, --batch-size and --ig-steps must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(a.device)
    from lightning_llm_inst.models import load_smollm2

    start_load = loadavg()
    if a.write_ids:
        tok = load_smollm2()[1]
        for task in TASKS:
            pairs = PromptPairs.from_jsonl(REPO / "examples" / "data" / f"causal_{task}.jsonl", tok)
            target = HERE / "data" / f"causal_{task}_smollm2_ids.json"
            target.parent.mkdir(exist_ok=True)
            target.write_text(json.dumps({k: v for k, v in pairs.to_dict().items() if k.endswith("_ids")}) + "\n")
            log(f"wrote {target}")
        return 0
    if a.random_init:
        def build() -> tuple[torch.nn.Module, None]:
            import transformers as tf

            cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                 max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5)
            torch.manual_seed(0)
            return tf.LlamaForCausalLM(cfg).to(device=device, dtype=DTYPES[a.dtype]).eval(), None
        (model, tok), load_s = timed(device, build)
    else:
        (model, tok), load_s = timed(device, lambda: load_smollm2(dtype=DTYPES[a.dtype], device=device))
    log(f"loaded {MODEL_NAME}{' shape, random init' if a.random_init else ''} ({a.dtype}, {device}) in "
        f"{load_s:.1f} s; load average {start_load}")
    tasks = {task: run_task(model, tok, task, a, device) for task in a.tasks}
    notes = []
    if a.random_init:
        notes.append("random-init model of SmolLM2's shape (--random-init): timings only; quality and faithfulness "
                     "figures of a random model mean nothing")
    if a.pairs:
        notes.append(f"only the first {a.pairs} pairs of each task (--pairs): a check, not a result")
    if start_load and start_load[0] > 0.5 * (os.cpu_count() or 1) and device.type == "cpu":
        notes.append(f"load average {start_load} at the start on {os.cpu_count()} cores: other processes share "
                     f"the CPU, which slows every method")
    res: dict[str, Any] = {
        "tag": device_tag(device), "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else f"main({argv})",
        "machine": machine_info(device), "model": MODEL_NAME, "loadavg_start": start_load, "load_s": load_s,
        "config": {"dtype": a.dtype, "batch_size": a.batch_size, "ig_steps": a.ig_steps, "repeats": a.repeats,
                   "exact_repeats": a.exact_repeats, "pairs": a.pairs, "tasks": a.tasks, "methods": a.methods,
                   "curves": not a.skip_curves, "curve_levels": a.curve_levels, "sizes": a.sizes, "top": TOP},
        "tasks": tasks, "reference": {"label": REFERENCE_LABEL, **REFERENCE}, "notes": notes}
    res["checks"] = checks(res)
    res["wall_s"] = time.perf_counter() - T_START
    md = build_markdown(res)
    target = Path(a.out) if a.out else HERE / "results" / f"causal-{res['tag']}{'-random-init' if a.random_init else ''}.json"
    outs = [target] + ([Path(os.environ["OUT"]) / target.name] if os.environ.get("OUT") else [])
    for path in outs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1, default=str) + "\n")
        path.with_suffix(".md").write_text(md)
        log(f"wrote {path} and {path.with_suffix('.md').name}")
    print()
    for k in res["checks"]:
        print(f"{k['status']}: {k['check']} ({k['value']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
