"""Summary statistics of a store: per hook point, rows, dtype, means, norms and the share of
variance along the top principal directions.

Stage: analysis, reading the store (never the model). Statistics are exact over every row
(streamed chunk by chunk in float64); principal directions come from the covariance of every
row when the feature dimension allows it (up to 8192), else from a row sample.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lightning_llm_inst.store.reader import ActivationStore

__all__ = ["summarize_store"]

MAX_COV_DIM = 8192


def _hook_summary(store: ActivationStore, hook: str, top_k: int, chunk_rows: int) -> dict[str, Any]:
    view = store[hook]
    info = view.info
    d = int(torch.tensor(info.feature_shape).prod().item()) if info.feature_shape else 1
    n = 0
    total = torch.zeros(d, dtype=torch.float64)
    norm_sum = norm_sq_sum = 0.0
    norm_min, norm_max = float("inf"), 0.0
    nonfinite = 0
    use_cov = d <= MAX_COV_DIM
    gram = torch.zeros(d, d, dtype=torch.float64) if use_cov else None
    for block in view.iter_chunks(chunk_rows):
        x = block.reshape(block.shape[0], -1).to(torch.float64)  # [rows, d]
        finite = torch.isfinite(x).all(dim=1)
        nonfinite += int((~finite).sum())
        x = x[finite]
        if not x.shape[0]:
            continue
        n += x.shape[0]
        total += x.sum(0)
        norms = x.norm(dim=1)
        norm_sum += float(norms.sum())
        norm_sq_sum += float((norms**2).sum())
        norm_min = min(norm_min, float(norms.min()))
        norm_max = max(norm_max, float(norms.max()))
        if gram is not None:
            gram += x.T @ x
    out: dict[str, Any] = {"rows": info.rows, "dtype": info.dtype, "shape": list(info.feature_shape),
                           "nonfinite_rows": nonfinite}
    if n == 0:
        return out
    mean = total / n
    mean_norm = norm_sum / n
    out.update(
        mean_norm=float(mean.norm()),
        mean_abs=float(mean.abs().mean()),
        norm_mean=mean_norm,
        norm_std=max(0.0, norm_sq_sum / n - mean_norm**2) ** 0.5,
        norm_min=norm_min,
        norm_max=norm_max,
    )
    if gram is not None and n > 1:
        cov = (gram - n * torch.outer(mean, mean)) / (n - 1)
        eig = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)  # descending
        total_var = float(eig.sum())
        k = min(top_k, d)
        out["total_variance"] = total_var
        out["top_explained_variance_ratio"] = [float(v) / total_var if total_var else 0.0 for v in eig[:k]]
        out["top_k_explained_variance"] = float(eig[:k].sum()) / total_var if total_var else 0.0
        out["effective_rank"] = (total_var**2 / float((eig**2).sum())) if total_var else 0.0
    return out


def summarize_store(data_path: str | os.PathLike, top_k: int = 10, chunk_rows: int = 8192) -> dict[str, Any]:
    """Per hook point: ``rows``, ``dtype``, ``shape``, ``mean_norm`` (norm of the mean vector),
    ``norm_mean`` / ``norm_std`` / ``norm_min`` / ``norm_max`` (of row norms),
    ``top_explained_variance_ratio`` (share of variance along each of the ``top_k`` principal
    directions), ``top_k_explained_variance`` and ``effective_rank``; plus the store's totals."""
    with ActivationStore(data_path) as store:
        hooks = {h: _hook_summary(store, h, top_k, chunk_rows) for h in store.hooks}
        return {
            "path": os.fspath(data_path),
            "rows": store.rows,
            "shards": store.num_shards,
            "codec": store.codec.spec,
            "dropped": store.dropped,
            "compression_ratio": {h: c.ratio for h, c in store.hooks.items()},
            "hooks": hooks,
        }
