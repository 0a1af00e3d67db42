"""Which attention heads and MLPs of SmolLM2-135M-Instruct decide two small tasks: a causal graph
by EAP-IG, checked by real interventions.

Run: ``python examples/causal_smollm2.py --task capitals`` (about 1-2 min on a CPU; ``--task both``
does both tasks, ``--method atp|exact`` scores the graph another way).

The tasks (16 prompt pairs each, ``examples/data/causal_*.jsonl``); the metric M is the logit
difference logit(answer) - logit(wrong) at the last position, a mean over the pairs:

- ``ioi`` (indirect object): "When Mary and John went to the store, John gave a drink to" should
  go on with " Mary" rather than " John"; the corrupt prompt swaps the second subject ("..., Mary
  gave a drink to"), which turns the preference around.
- ``capitals``: "The capital of France is" -> " Paris" rather than " Moscow"; the corrupt prompt
  names another country ("The capital of Russia is").

How to read the output, per task:

- ``M(clean)`` / ``M(corrupt)``: how strongly the model prefers the answer, before and after the
  corruption. The graph explains the gap between the two.
- top heads: a node's score estimates ``M(patched) - M(clean)`` when that node alone takes its
  output from the corrupt run. Negative = the head carries the clean answer (patching it hurts).
- faithfulness curve: keep the strongest fraction of nodes, give every other node its corrupt
  output; faithfulness = (M(circuit) - M(corrupt)) / (M(clean) - M(corrupt)): 0 = nothing of the
  behaviour is left, 1 = all of it. Two rankings, as in MIB: by |score| (CMD: the area between
  the curve and 1, lower is better) and by signed score, the nodes that carry the answer first
  (CPR: the area under the curve, higher is better; above 1 when a circuit does better than the
  whole model).
- verification: the 10 strongest nodes patched one at a time, for real, beside the estimates;
  a Pearson near 1 and full sign agreement mean the ranking can be trusted.

Files under ``OUTPUT/<task>/``: ``graph.json`` (``CausalGraph.from_json`` reads it back),
``graph.png`` (layers bottom to top, nodes coloured by score) and ``faithfulness.png``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_llm_inst.causal import PromptPairs, attribute, faithfulness_curve, verify

DATA = Path(__file__).resolve().parent / "data"
TASKS = ("ioi", "capitals")


def run_task(model: Any, pairs: PromptPairs, method: str, out: Path) -> dict[str, Any]:
    """Graph, faithfulness curve and verification of one task; files written under ``out``."""
    t0 = time.perf_counter()
    graph = attribute(model, pairs, method=method, batch_size=16)
    m = graph.metadata
    print(f"{method} graph of {len(graph)} nodes in {time.perf_counter() - t0:.1f} s; "
          f"M(clean) {m['clean_metric']:+.2f}, M(corrupt) {m['corrupt_metric']:+.2f}")
    print("\ntop heads (score = estimated M(patched) - M(clean)):")
    for name, score in graph.top(10, kind="heads"):
        print(f"  {name:<8} {score:+.4f}")

    curve = faithfulness_curve(model, pairs, graph)  # ranked by |score|: CMD
    carriers = faithfulness_curve(model, pairs, graph, by="signed")  # what carries the answer first: CPR
    print(f"\nfaithfulness of the strongest nodes (CPR {carriers.cpr:.3f}, CMD {curve.cmd:.3f}):")
    print("  size   nodes   by |score|   by signed score")
    for size, count, faith, signed in zip(curve.sizes, curve.counts, curve.faithfulness, carriers.faithfulness):
        print(f"  {size:6.1%} ({count:3d})  {faith:+10.3f}   {signed:+10.3f}")

    check = verify(model, pairs, graph, k=10)
    print("\nverification, the 10 strongest nodes patched exactly:")
    print(check.table())

    out.mkdir(parents=True, exist_ok=True)
    graph.to_json(out / "graph.json")
    graph.figure().savefig(out / "graph.png", dpi=120)
    curve.figure().savefig(out / "faithfulness.png", dpi=120)
    print(f"\nwrote {out}/graph.json, graph.png, faithfulness.png")
    return {"graph": graph, "curve": curve, "signed_curve": carriers, "verification": check}


def main(task: str = "both", method: str = "eap-ig", output: str = "runs/causal", *, model: Any = None,
         tokenizer: Any = None, pairs: PromptPairs | Mapping[str, PromptPairs] | None = None,
         ) -> dict[str, dict[str, Any]]:
    """Run ``task`` (``"ioi"``, ``"capitals"`` or ``"both"``) on SmolLM2, or on ``model`` /
    ``tokenizer`` when given; ``pairs`` (one PromptPairs for every task, or one per task name)
    replaces the pair files. Returns each task's graph, curve and verification."""
    tasks = TASKS if task == "both" else (task,)
    if any(t not in TASKS for t in tasks):
        raise ValueError(f"task: got {task!r}; allowed: 'ioi', 'capitals' or 'both'")
    if model is None:
        import torch

        from lightning_llm_inst.models import load_smollm2

        t0 = time.perf_counter()
        model, tokenizer = load_smollm2(dtype=torch.float32, device="cpu")
        print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s")
    results = {}
    for name in tasks:
        if pairs is None:
            task_pairs = PromptPairs.from_jsonl(DATA / f"causal_{name}.jsonl", tokenizer)
        else:
            task_pairs = pairs if isinstance(pairs, PromptPairs) else pairs[name]
        print(f"\n=== {name}: {len(task_pairs)} prompt pairs ===")
        results[name] = run_task(model, task_pairs, method, Path(output) / name)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("ioi", "capitals", "both"), default="both")
    parser.add_argument("--method", choices=("eap-ig", "atp", "exact"), default="eap-ig")
    parser.add_argument("--output", default="runs/causal", help="directory for the files (default: runs/causal)")
    args = parser.parse_args()
    main(args.task, args.method, args.output)
