"""Summary statistics of a store: per hook point, rows, dtype, means, norms and the share of
variance along the top principal directions; with an SAE, its features on the store's rows.

Stage: analysis, reading the store (never the model). Statistics are exact over every row
(streamed chunk by chunk in float64); principal directions come from the covariance of every
row when the feature dimension allows it (up to 8192), else from a row sample.

SAE features (``sae_feature_stats``) stream the rows of one hook point through the SAE in
blocks sized to a fixed memory budget and keep, per latent, how often it fires (non-zero), its
``contexts`` largest activations and their rows, plus the reconstruction error overall and per
token position. As in SAE training, the first token of each sequence and special tokens are left
out of the feature statistics and of ``fvu`` by default (their activations are outliers that
dominate any average); ``fvu_all_tokens`` keeps them, and the per-position error covers every row. ``token_contexts`` turns rows back into windows of token ids around them, and
``summarize_sae_features`` makes the ``"sae_features"`` entry of a summary; ``viz.tensorboard``
draws the same statistics.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_llm_inst.store.reader import ActivationStore

if TYPE_CHECKING:
    from lightning_llm_inst.sae.model import SparseAutoencoder

__all__ = ["SAEFeatureStats", "decode_tokens", "format_context", "resolve_sae", "resolve_tokenizer",
           "sae_feature_stats", "summarize_sae_features", "summarize_store", "token_contexts"]

logger = logging.getLogger(__name__)

MAX_COV_DIM = 8192
LATENT_BUDGET_BYTES = 32 << 20
"""Latents held at once while streaming rows through an SAE (sizes the row blocks)."""


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


def summarize_store(data_path: str | os.PathLike, top_k: int = 10, chunk_rows: int = 8192, *,
                    sae: SparseAutoencoder | str | os.PathLike | None = None, hook: str | None = None,
                    tokenizer: Any = None, contexts_per_feature: int = 5, context_window: int = 8,
                    max_rows: int | None = None, features: Sequence[int] | None = None, exclude_bos: bool = True,
                    exclude_special_tokens: bool = True,
                    special_token_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Per hook point: ``rows``, ``dtype``, ``shape``, ``mean_norm`` (norm of the mean vector),
    ``norm_mean`` / ``norm_std`` / ``norm_min`` / ``norm_max`` (of row norms),
    ``top_explained_variance_ratio`` (share of variance along each of the ``top_k`` principal
    directions), ``top_k_explained_variance`` and ``effective_rank``; plus the store's totals.

    A store written by :func:`~lightning_llm_inst.causal.capture_attribution` gives
    ``"causal_graph"``: the :class:`~lightning_llm_inst.causal.CausalGraph` read from it
    (:func:`~lightning_llm_inst.causal.attribute_from_store`); its ``attr.*`` columns are not
    summarised as hook points.

    With ``sae`` (a SparseAutoencoder or a SAELens-format directory) the result gains
    ``"sae_features"`` (see :func:`summarize_sae_features`) for ``hook`` (default: the SAE's
    hook name, or the store's only hook point); the other arguments are passed on to it."""
    with ActivationStore(data_path) as store:
        if sae is not None:  # fail before the long pass over every hook point
            sae = resolve_sae(sae)
            hook = _sae_hook(store, sae, hook)
        from lightning_llm_inst.causal.store import ATTRIBUTION_PREFIX, has_attribution

        attribution = has_attribution(store)
        hooks = {h: _hook_summary(store, h, top_k, chunk_rows) for h in store.hooks
                 if not (attribution and h.startswith(ATTRIBUTION_PREFIX))}
        out = {
            "path": os.fspath(data_path),
            "rows": store.rows,
            "shards": store.num_shards,
            "codec": store.codec.spec,
            "dropped": store.dropped,
            "compression_ratio": {h: c.ratio for h, c in store.hooks.items()},
            "hooks": hooks,
        }
        if attribution:
            from lightning_llm_inst.causal.store import attribute_from_store

            out["causal_graph"] = attribute_from_store(data_path, window_rows=chunk_rows)
        if sae is not None:
            out["sae_features"] = summarize_sae_features(
                store, sae, hook, tokenizer=tokenizer, contexts_per_feature=contexts_per_feature,
                context_window=context_window, max_rows=max_rows, features=features, exclude_bos=exclude_bos,
                exclude_special_tokens=exclude_special_tokens, special_token_ids=special_token_ids)
        return out


# ---------------------------------------------------------------------- SAE features

def resolve_sae(sae: SparseAutoencoder | str | os.PathLike) -> SparseAutoencoder:
    """``sae`` itself, or the SAE loaded from a SAELens-format directory."""
    if isinstance(sae, (str, os.PathLike)):
        from lightning_llm_inst.sae.saelens import load_saelens

        return load_saelens(sae)
    if not isinstance(sae, torch.nn.Module) or not hasattr(sae, "cfg"):
        raise TypeError(f"sae: expected a SparseAutoencoder or a SAELens directory path, got {type(sae).__name__}")
    return sae


def _sae_hook(store: ActivationStore, sae: SparseAutoencoder, hook: str | None) -> str:
    if hook is None:
        named = getattr(sae.cfg, "hook_name", None)
        if named in store.hooks:
            hook = named
        elif len(store.hooks) == 1:
            hook = next(iter(store.hooks))
        else:
            raise ValueError(f"hook: got None and the SAE's hook_name {named!r} is not one of the store's hook "
                             f"points; choose one of: {', '.join(store.hooks)}")
    if hook not in store.hooks:
        raise ValueError(f"hook: {hook!r} is not in the store at {os.fspath(store.path)!r}; it holds: "
                         f"{', '.join(store.hooks) or 'nothing'}")
    shape = store.hooks[hook].feature_shape
    if tuple(shape) != (sae.cfg.d_in,):
        raise ValueError(f"hook: {hook!r} holds rows of shape {tuple(shape)}, the SAE takes d_in={sae.cfg.d_in}")
    return hook


@dataclass
class SAEFeatureStats:
    """What :func:`sae_feature_stats` measured on ``rows`` rows of ``hook``."""

    hook: str
    rows: int  # rows measured: without those left out and those holding NaN / inf
    density: torch.Tensor  # [d_sae] float64: share of rows on which each latent is non-zero
    top_values: torch.Tensor  # [contexts, d_sae] float32, descending per latent
    top_rows: torch.Tensor  # [contexts, d_sae] int64; -1 where the latent fired on fewer rows
    mse: float  # mean over rows and features of the squared reconstruction error
    fvu: float  # fraction of variance unexplained
    l0: float  # mean number of non-zero latents per row
    position_sse: torch.Tensor  # [positions] float64: squared error summed per token position
    position_norm2: torch.Tensor  # [positions] float64: squared activation norm summed per position
    position_rows: torch.Tensor  # [positions] int64: rows per position
    fvu_all_tokens: float = math.nan  # fvu over every finite row, those left out included
    excluded_rows: int = 0  # finite rows left out (first tokens of sequences, special tokens)

    @property
    def dead_fraction(self) -> float:
        """Share of latents that never fired on these rows."""
        return float((self.density == 0).double().mean())


@torch.no_grad()
def sae_feature_stats(sae: SparseAutoencoder, store: ActivationStore, hook: str | None = None, *,
                      contexts: int = 5, max_rows: int | None = None, block_rows: int | None = None,
                      exclude_bos: bool = True, exclude_special_tokens: bool = True,
                      special_token_ids: Sequence[int] | None = None) -> SAEFeatureStats:
    """Stream the first ``max_rows`` rows (default: all) of ``hook`` through ``sae`` (rows holding
    NaN or inf are left out, with a warning; ``rows`` counts the others).

    Rows at ``position == 0`` (``exclude_bos``) and rows of special tokens
    (``exclude_special_tokens``: ``special_token_ids``, default the BOS / EOS / PAD ids of the model
    config the store records) are left out of every statistic but ``fvu_all_tokens`` and the
    per-position error, as in :class:`~lightning_llm_inst.sae.data.ActivationDataModule`.

    Rows go in blocks of ``block_rows`` (default: as many as keep the block's latents within
    32 MiB), so memory stays bounded whatever the store's size."""
    from lightning_llm_inst.sae.metrics import L0, FeatureDensity, FractionOfVarianceUnexplained, ReconstructionMSE
    from lightning_llm_inst.sae.rows import excluded_between, scan_rows

    hook = _sae_hook(store, sae, hook)
    if isinstance(contexts, bool) or not isinstance(contexts, int) or contexts < 1:
        raise ValueError(f"contexts: expected a positive integer, got {contexts!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows: expected None or a positive integer, got {max_rows!r}")
    d_in, d_sae = int(sae.cfg.d_in), int(sae.cfg.d_sae)
    if block_rows is None:
        block_rows = int(min(8192, max(64, LATENT_BUDGET_BYTES // (4 * d_sae))))
    param = sae.W_dec
    device = param.device
    local = {"sync_on_compute": False}  # this process's rows only: may run on rank 0 alone under DDP
    mse, fvu, fvu_all, l0, density = (m.to(device) for m in (
        ReconstructionMSE(**local), FractionOfVarianceUnexplained(d_in, **local),
        FractionOfVarianceUnexplained(d_in, **local), L0(**local), FeatureDensity(d_sae, **local)))
    top_values = torch.zeros(contexts, d_sae, device=device)  # [contexts, d_sae]
    top_rows = torch.full((contexts, d_sae), -1, dtype=torch.int64, device=device)
    pos_sse, pos_norm2, pos_rows = (torch.zeros(0, dtype=dt) for dt in (torch.float64, torch.float64, torch.int64))
    positions = store.tokens.get("position")
    view = store[hook]
    n = min(store.rows, max_rows) if max_rows is not None else store.rows
    excluded = scan_rows(store, exclude_bos=exclude_bos, exclude_special_tokens=exclude_special_tokens,
                         special_token_ids=special_token_ids, stop=n).excluded  # sorted row ids
    skipped = left_out = 0
    was_training = sae.training
    sae.eval()
    try:
        for a in range(0, n, block_rows):
            b = min(n, a + block_rows)
            x = view[a:b].to(device, param.dtype)  # [rows, d_in]
            row_ids = torch.arange(a, b, device=device)  # [rows]
            pos = positions[a:b].long() if positions is not None else torch.arange(a, b)  # [rows]
            finite = torch.isfinite(x).all(dim=1)
            if not bool(finite.all()):  # as in the summary: rows with NaN / inf are left out
                x, row_ids, pos = x[finite], row_ids[finite], pos[finite.cpu()]
                skipped += int((~finite).sum())
                if not x.shape[0]:
                    continue
            out = sae(x)
            fvu_all.update(x, out.reconstruction)
            size = int(pos.max()) + 1
            if size > pos_sse.numel():
                pos_sse, pos_norm2, pos_rows = (torch.cat([t, t.new_zeros(size - t.numel())])
                                                for t in (pos_sse, pos_norm2, pos_rows))
            pos_sse.index_add_(0, pos, (x.double() - out.reconstruction.double()).pow(2).sum(1).cpu())
            pos_norm2.index_add_(0, pos, x.double().pow(2).sum(1).cpu())
            pos_rows.index_add_(0, pos, torch.ones_like(pos))
            drop = excluded_between(excluded, a, b)  # left out of the feature statistics
            if drop.size:
                keep = ~torch.isin(row_ids.cpu(), torch.from_numpy(drop)).to(device)
                left_out += int((~keep).sum())
                x, row_ids = x[keep], row_ids[keep]
                out = type(out)(out.reconstruction[keep], out.latents[keep])
                if not x.shape[0]:
                    continue
            latents = out.latents.float()  # [rows, d_sae]
            mse.update(x, out.reconstruction)
            fvu.update(x, out.reconstruction)
            l0.update(latents)
            density.update(latents)
            top_values, idx = torch.cat([top_values, latents]).topk(contexts, dim=0)  # [contexts, d_sae]
            top_rows = torch.cat([top_rows, row_ids[:, None].expand(-1, d_sae)]).gather(0, idx)
    finally:
        sae.train(was_training)
    if skipped:
        logger.warning("%s: %d of %d rows hold NaN or inf and were left out of the SAE statistics", hook, skipped, n)
    all_rows = n - skipped
    n = all_rows - left_out
    fvu_all_value = float(fvu_all.compute()) if all_rows else math.nan
    if n == 0:
        return SAEFeatureStats(hook, 0, torch.zeros(d_sae, dtype=torch.float64), top_values.cpu(), top_rows.cpu(),
                               math.nan, math.nan, math.nan, pos_sse, pos_norm2, pos_rows, fvu_all_value, left_out)
    top_rows = torch.where(top_values > 0, top_rows, -1)
    return SAEFeatureStats(hook, n, density.compute().cpu(), top_values.cpu(), top_rows.cpu(), float(mse.compute()),
                           float(fvu.compute()), float(l0.compute()), pos_sse, pos_norm2, pos_rows, fvu_all_value,
                           left_out)


def token_contexts(store: ActivationStore, rows: Sequence[int] | torch.Tensor, window: int = 8) -> list[dict[str, Any]]:
    """For each row, the tokens of its sequence at most ``window`` positions away.

    Each item: ``row``, ``token_id``, ``sequence_id``, ``position``, ``context_ids`` (token ids
    by position) and ``context_index`` (where the row's own token is in ``context_ids``).
    Neighbours are looked up within ``window`` rows either side (a forward pass stores each
    sequence's tokens in consecutive rows); tokens the capture did not keep are skipped."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window: expected a non-negative integer, got {window!r}")
    if "input_ids" not in store.tokens:
        raise ValueError(f"store: {os.fspath(store.path)!r} has no input_ids token column; contexts need it")
    wanted = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64).reshape(-1)
    if wanted.size == 0:
        return []
    if wanted.min() < 0 or wanted.max() >= store.rows:
        raise ValueError(f"rows: row ids must be in [0, {store.rows}), got {wanted.min()}..{wanted.max()}")
    raw = wanted[:, None] + np.arange(-window, window + 1)  # [rows, 2 * window + 1]
    index = np.clip(raw, 0, store.rows - 1)

    def column(name: str, fallback: np.ndarray) -> np.ndarray:
        view = store.tokens.get(name)
        return fallback if view is None else view.numpy(index.ravel()).reshape(index.shape).astype(np.int64)

    ids = column("input_ids", index)
    seq = column("sequence_id", np.zeros_like(index))
    pos = column("position", index)
    keep = ((raw == index) & (seq == seq[:, window:window + 1])
            & (np.abs(pos - pos[:, window:window + 1]) <= window))  # [rows, 2 * window + 1]
    out = []
    for r in range(wanted.size):
        cols = np.flatnonzero(keep[r])
        cols = cols[np.argsort(pos[r, cols], kind="stable")]
        out.append({"row": int(wanted[r]), "token_id": int(ids[r, window]), "sequence_id": int(seq[r, window]),
                    "position": int(pos[r, window]), "context_ids": ids[r, cols].tolist(),
                    "context_index": int(np.flatnonzero(cols == window)[0])})
    return out


def resolve_tokenizer(tokenizer: Any) -> Any:
    """``None``, a tokenizer object (with ``decode``), or ``"smollm2"`` for the offline SmolLM2 one."""
    if tokenizer is None or hasattr(tokenizer, "decode"):
        return tokenizer
    if isinstance(tokenizer, str) and tokenizer.lower() == "smollm2":
        from lightning_llm_inst.models import load_smollm2_tokenizer

        return load_smollm2_tokenizer()
    raise ValueError(f"tokenizer: expected None, an object with a decode() method or 'smollm2', got {tokenizer!r}")


def decode_tokens(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of ``ids``; without a tokenizer, the ids joined by spaces."""
    if tokenizer is None:
        return " ".join(str(int(i)) for i in ids)
    return str(tokenizer.decode([int(i) for i in ids]))


def format_context(tokenizer: Any, context_ids: Sequence[int], index: int, mark: tuple[str, str] = ("[[", "]]"),
                   ) -> str:
    """The context as text with the token at ``index`` between the two ``mark`` strings."""
    before = decode_tokens(tokenizer, context_ids[:index])
    after = decode_tokens(tokenizer, context_ids[index + 1:])
    sep = " " if tokenizer is None else ""
    return (f"{before}{sep if before else ''}{mark[0]}{decode_tokens(tokenizer, context_ids[index:index + 1])}"
            f"{mark[1]}{sep if after else ''}{after}")


def summarize_sae_features(store: ActivationStore | str | os.PathLike, sae: SparseAutoencoder | str | os.PathLike,
                           hook: str | None = None, *, tokenizer: Any = None, contexts_per_feature: int = 5,
                           context_window: int = 8, max_rows: int | None = None,
                           features: Sequence[int] | None = None, exclude_bos: bool = True,
                           exclude_special_tokens: bool = True,
                           special_token_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """SAE features on a store's rows of one hook point.

    Returns ``hook``, ``rows`` (evaluated: of the first ``max_rows``, default all, those not left
    out), ``excluded_rows`` (left out: first tokens of sequences and special tokens, see
    :func:`sae_feature_stats`), ``d_in``, ``d_sae``, ``mse`` (mean over rows and features), ``fvu``,
    ``fvu_all_tokens`` (the FVU with the rows left out included), ``l0`` (mean non-zero latents per
    row), ``dead_fraction`` (latents that never fired), ``density`` (per latent, all of them) and
    ``features``: for each latent in ``features`` (default: all), its ``index``, ``density``,
    ``max_activation`` and ``top_contexts`` (up to ``contexts_per_feature`` rows where it fired
    most, each as :func:`token_contexts` gives it plus ``activation``, and ``text`` / ``token``
    (the context with the row's token between ``[[`` and ``]]``) when a tokenizer is given)."""
    if not isinstance(store, ActivationStore):
        with ActivationStore(store) as opened:
            return summarize_sae_features(opened, sae, hook, tokenizer=tokenizer,
                                          contexts_per_feature=contexts_per_feature, context_window=context_window,
                                          max_rows=max_rows, features=features, exclude_bos=exclude_bos,
                                          exclude_special_tokens=exclude_special_tokens,
                                          special_token_ids=special_token_ids)
    sae = resolve_sae(sae)
    tokenizer = resolve_tokenizer(tokenizer)
    d_sae = int(sae.cfg.d_sae)
    chosen = list(range(d_sae)) if features is None else [int(i) for i in features]
    if any(not 0 <= i < d_sae for i in chosen):
        raise ValueError(f"features: latent indices must be in [0, {d_sae}), got {chosen}")
    stats = sae_feature_stats(sae, store, hook, contexts=contexts_per_feature, max_rows=max_rows,
                              exclude_bos=exclude_bos, exclude_special_tokens=exclude_special_tokens,
                              special_token_ids=special_token_ids)
    fired = (stats.top_rows[:, chosen] >= 0).T  # [chosen, contexts]; feature-major from here on
    rows = stats.top_rows[:, chosen].T[fired]  # [n]
    values = stats.top_values[:, chosen].T[fired].tolist()
    owner = torch.nonzero(fired)[:, 0].tolist()  # slot in `chosen` of each context
    per_feature: list[list[dict[str, Any]]] = [[] for _ in chosen]
    for slot, value, item in zip(owner, values, token_contexts(store, rows, context_window)):
        item["activation"] = value
        if tokenizer is not None:
            item["text"] = format_context(tokenizer, item["context_ids"], item["context_index"])
            item["token"] = decode_tokens(tokenizer, [item["token_id"]])
        per_feature[slot].append(item)
    density = stats.density
    return {
        "hook": stats.hook, "rows": stats.rows, "excluded_rows": stats.excluded_rows, "d_in": int(sae.cfg.d_in),
        "d_sae": d_sae, "mse": stats.mse, "fvu": stats.fvu, "fvu_all_tokens": stats.fvu_all_tokens, "l0": stats.l0,
        "dead_fraction": stats.dead_fraction,
        "density": density.tolist(),
        "features": [{"index": i, "density": float(density[i]), "max_activation": float(stats.top_values[0, i]),
                      "top_contexts": per_feature[slot]} for slot, i in enumerate(chosen)],
    }
