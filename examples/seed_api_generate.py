"""The seed API around ``model.generate()``: capture the prefill and every decode step.

Run: ``python examples/seed_api_generate.py``. Uses SmolLM2-135M-Instruct offline.
"""

from __future__ import annotations

import torch

from lightning_llm_inst import ActivationStore, HookGranularity, InstrumentationConfig, InstrumentationFramework
from lightning_llm_inst.models import load_smollm2


def main(out: str = "runs/generate") -> None:
    model, tok = load_smollm2()
    config = InstrumentationConfig(granularity=HookGranularity.ALL, compression_algorithm="zstd",
                                   target_throughput_gbps=1.0, max_memory_gb=1.0, layers=[0, 15, 29])
    framework = InstrumentationFramework(config)
    model = framework.instrument_model(model)
    prompts = ["The capital of France is", "Water boils at a temperature of"]
    batch = tok(prompts, return_tensors="pt", padding=True)  # left padding
    with framework.capture_activations(out, mode="overwrite"):
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    for text in tok.batch_decode(generated, skip_special_tokens=True):
        print(repr(text))
    store = ActivationStore(out)
    steps = store.tokens["step"][:]
    print(f"\n{store.rows} rows: prefill {int((steps == 0).sum())}, decode steps {int(steps.max())}")
    report = framework.analyze_activations(out)
    for hook, h in report["hooks"].items():
        print(f"{hook:28s} rows {h['rows']:4d}  mean row norm {h['norm_mean']:8.2f}  "
              f"top-10 PCs explain {h['top_k_explained_variance']:.0%}")


if __name__ == "__main__":
    main()
