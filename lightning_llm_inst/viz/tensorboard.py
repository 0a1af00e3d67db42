"""TensorBoard views of a sparse autoencoder on the rows of an activation store.

Stage: the end of the flow, looking. :func:`write_sae_views` streams rows of one hook point
through an SAE (:func:`~lightning_llm_inst.analysis.summary.sae_feature_stats`) and writes,
to any ``SummaryWriter``:

- scalars ``<prefix>/fvu``, ``mse``, ``l0`` and ``dead_fraction`` on those rows (the first
  ``max_rows`` of the store, whatever split a data module makes of them, without each sequence's
  first token and special tokens by default, as in training), and ``<prefix>/fvu_all_tokens``
  with those rows included;
- histograms ``<prefix>/log10_feature_density`` (latents that never fired are left out: their
  log is -inf; the dead fraction says how many) and ``<prefix>/decoder_norm``;
- text ``<prefix>/top_contexts``: for a sample of live latents, the token windows where they
  fire most, the activating token in bold (token ids when no tokenizer is given);
- figure ``<prefix>/reconstruction_error_by_position`` (matplotlib, when installed);
- the projector: decoder directions (at most ``projector_points``, the most frequent latents
  first) labelled with each latent's top token and density.

:class:`SAETensorBoard` is the Lightning callback that writes these views through the trainer's
``TensorBoardLogger`` on rank 0, after each validation (every ``every_n_validations``) and, with
the projector, at the end of fit. Only finite values reach the histograms.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_llm_inst.analysis.summary import (
    SAEFeatureStats,
    decode_tokens,
    resolve_sae,
    resolve_tokenizer,
    sae_feature_stats,
    token_contexts,
)
from lightning_llm_inst.store.reader import ActivationStore

if TYPE_CHECKING:
    from lightning_llm_inst.sae.model import SparseAutoencoder

__all__ = ["SAETensorBoard", "write_sae_views"]

logger = logging.getLogger(__name__)

MAX_PROJECTOR_POINTS = 10_000
View = Literal["scalars", "histograms", "contexts", "figure", "projector"]
VIEWS: tuple[str, ...] = get_args(View)
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def _positive_int(value: Any, name: str, *, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upper is not None and value > upper):
        allowed = f"an integer in [1, {upper}]" if upper is not None else "a positive integer"
        raise ValueError(f"{name}: expected {allowed}, got {value!r}")
    return value


def _md(text: str) -> str:
    """``text`` safe inside a markdown table cell, whitespace kept visible."""
    text = text.replace("\r", "").replace("\n", "\u21b5").replace("\t", "\u2192")
    return _MD_SPECIAL.sub(r"\\\1", text).replace(" ", "\u00a0")


def _label(text: str) -> str:
    """``text`` as one projector metadata cell (no tabs or newlines)."""
    return text.replace("\t", " ").replace("\r", " ").replace("\n", "\\n").strip() or repr(text)


def _sample_features(stats: SAEFeatureStats, count: int, seed: int) -> list[int]:
    alive = torch.nonzero(stats.density > 0)[:, 0]
    if alive.numel() <= count:
        return alive.tolist()
    g = torch.Generator().manual_seed(seed)
    return sorted(alive[torch.randperm(alive.numel(), generator=g)[:count]].tolist())


def _context_md(tokenizer: Any, ids: list[int], at: int) -> str:
    """Markdown of a token window with the token at ``at`` in bold (its surrounding whitespace outside the bold,
    which markdown needs; a token of only whitespace shows as visible marks)."""
    token = decode_tokens(tokenizer, ids[at:at + 1])
    core = token.strip()
    lead, trail = token[:len(token) - len(token.lstrip())], token[len(token.rstrip()):]
    if not core:
        lead, core, trail = "", token.replace(" ", "\u2423") or "\u2205", ""
    parts = [_md(decode_tokens(tokenizer, ids[:at])) if at else "", f"{_md(lead)}**{_md(core)}**{_md(trail)}",
             _md(decode_tokens(tokenizer, ids[at + 1:])) if at + 1 < len(ids) else ""]
    return ("" if tokenizer is not None else " ").join(p for p in parts if p)


def _contexts_markdown(store: ActivationStore, stats: SAEFeatureStats, features: list[int], tokenizer: Any,
                       window: int) -> str:
    if not features:
        return f"No latent fired on the {stats.rows} rows of `{stats.hook}` read."
    top_rows = stats.top_rows[:, features].T  # [features, contexts]
    fired = top_rows >= 0
    contexts = iter(token_contexts(store, top_rows[fired], window))
    lines = [f"Top contexts on {stats.rows} rows of `{stats.hook}`; the activating token is in bold.", "",
             "| latent | density | activation | context |", "|---:|---:|---:|:---|"]
    for slot, feature in enumerate(features):
        for c in range(int(fired[slot].sum())):
            item = next(contexts)
            head = f"{feature} | {float(stats.density[feature]):.2e}" if c == 0 else " | "
            text = _context_md(tokenizer, item["context_ids"], item["context_index"])
            lines.append(f"| {head} | {float(stats.top_values[c, feature]):.3g} | {text} |")
    return "\n".join(lines)


def _error_figure(stats: SAEFeatureStats, d_in: int) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no reconstruction-error figure (pip install matplotlib)")
        return None
    seen = stats.position_rows > 0
    pos = torch.nonzero(seen)[:, 0].numpy()
    rows = stats.position_rows[seen].double()
    fig = Figure(figsize=(7, 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(pos, (stats.position_sse[seen] / (rows * d_in)).numpy(), color="tab:blue", label="MSE")
    ax.set_xlabel("token position")
    ax.set_ylabel("MSE (mean over features)", color="tab:blue")
    rel = ax.twinx()
    norm2 = stats.position_norm2[seen]
    rel.plot(pos, (stats.position_sse[seen] / norm2.clamp_min(1e-30)).numpy(), color="tab:orange")
    rel.set_ylabel("|x - x_hat|^2 / |x|^2", color="tab:orange")
    ax.set_title(f"reconstruction error by position ({stats.hook}, {stats.rows} rows)")
    fig.tight_layout()
    return fig


def _write_projector(writer: Any, sae: SparseAutoencoder, store: ActivationStore, stats: SAEFeatureStats,
                     tokenizer: Any, points: int, step: int, tag: str) -> None:
    order = torch.argsort(stats.density, descending=True, stable=True)[:points]  # most frequent latents first
    top = stats.top_rows[0, order]  # [points]; -1 for latents that never fired
    if "input_ids" in store.tokens:
        ids = store.tokens["input_ids"].numpy(top.clamp_min(0).numpy()).tolist()
    else:
        ids = [None] * len(order)
    labels = [[str(int(i)), _label(decode_tokens(tokenizer, [t])) if r >= 0 and t is not None else "(never fired)",
               f"{float(stats.density[i]):.3g}"] for i, r, t in zip(order.tolist(), top.tolist(), ids)]
    mat = sae.W_dec.detach()[order.to(sae.W_dec.device)].float().cpu()  # [points, d_in]
    writer.add_embedding(mat, metadata=labels, metadata_header=["latent", "top_token", "density"], global_step=step,
                         tag=tag)


@torch.no_grad()
def write_sae_views(writer: Any, sae: SparseAutoencoder | str | os.PathLike, store: ActivationStore | str | os.PathLike,
                    hook: str | None = None, *, tokenizer: Any = None, step: int = 0, prefix: str = "sae",
                    max_rows: int | None = 65_536, num_features: int = 16, contexts_per_feature: int = 3,
                    context_window: int = 8, projector_points: int = MAX_PROJECTOR_POINTS, seed: int = 0,
                    views: tuple[View, ...] | list[View] = VIEWS, exclude_bos: bool = True,
                    exclude_special_tokens: bool = True,
                    special_token_ids: list[int] | None = None) -> SAEFeatureStats:
    """Write the views listed in this module's docstring to ``writer`` (a ``SummaryWriter``).

    Args:
        sae: the SAE, or a SAELens-format directory.
        store: an :class:`ActivationStore` or its path; ``hook``: its hook point (default: the
            SAE's ``hook_name``, or the store's only hook point).
        tokenizer: ``None`` (contexts as token ids), an object with ``decode``, or ``"smollm2"``.
        step: global step of every value written.
        max_rows: rows read from the start of the store (``None``: all).
        num_features: live latents, sampled with ``seed``, whose contexts are shown.
        contexts_per_feature, context_window: contexts per latent, tokens either side.
        projector_points: at most this many decoder directions go to the projector.
        views: which of ``"scalars"``, ``"histograms"``, ``"contexts"``, ``"figure"`` and
            ``"projector"`` to write (default: all).
        exclude_bos, exclude_special_tokens, special_token_ids: which rows are left out of every
            view but ``fvu_all_tokens`` and the per-position figure (see
            :func:`~lightning_llm_inst.analysis.summary.sae_feature_stats`).

    Returns the statistics the views were drawn from.
    """
    _positive_int(num_features, "num_features")
    _positive_int(projector_points, "projector_points", upper=MAX_PROJECTOR_POINTS)
    unknown = [v for v in views if v not in VIEWS]
    if unknown or isinstance(views, str):
        raise ValueError(f"views: got {views!r}; choose a list from: {', '.join(VIEWS)}")
    if not hasattr(writer, "add_scalar") or not hasattr(writer, "add_embedding"):
        raise TypeError(f"writer: expected a tensorboard SummaryWriter, got {type(writer).__name__}")
    if not isinstance(store, ActivationStore):
        with ActivationStore(store) as opened:
            return write_sae_views(writer, sae, opened, hook, tokenizer=tokenizer, step=step, prefix=prefix,
                                   max_rows=max_rows, num_features=num_features,
                                   contexts_per_feature=contexts_per_feature, context_window=context_window,
                                   projector_points=projector_points, seed=seed, views=views,
                                   exclude_bos=exclude_bos, exclude_special_tokens=exclude_special_tokens,
                                   special_token_ids=special_token_ids)
    sae = resolve_sae(sae)
    tokenizer = resolve_tokenizer(tokenizer)
    stats = sae_feature_stats(sae, store, hook, contexts=contexts_per_feature, max_rows=max_rows,
                              exclude_bos=exclude_bos, exclude_special_tokens=exclude_special_tokens,
                              special_token_ids=special_token_ids)
    if "scalars" in views:
        for name in ("fvu", "fvu_all_tokens", "mse", "l0", "dead_fraction"):
            value = float(getattr(stats, name))
            if math.isfinite(value):  # NaN when no row was read
                writer.add_scalar(f"{prefix}/{name}", value, step)
    if "histograms" in views:
        log_density = stats.density[stats.density > 0].log10()
        if log_density.numel():
            writer.add_histogram(f"{prefix}/log10_feature_density", log_density, step)
        norms = sae.W_dec.detach().float().norm(dim=1).cpu()  # [d_sae]
        norms = norms[torch.isfinite(norms)]
        if norms.numel():
            writer.add_histogram(f"{prefix}/decoder_norm", norms, step)
    if "contexts" in views and "input_ids" in store.tokens:
        features = _sample_features(stats, num_features, seed)
        writer.add_text(f"{prefix}/top_contexts",
                        _contexts_markdown(store, stats, features, tokenizer, context_window), step)
    fig = _error_figure(stats, int(sae.cfg.d_in)) if "figure" in views and stats.rows else None
    if fig is not None:
        writer.add_figure(f"{prefix}/reconstruction_error_by_position", fig, step, close=False)
    if "projector" in views:
        _write_projector(writer, sae, store, stats, tokenizer, min(projector_points, int(sae.cfg.d_sae)), step,
                         f"{prefix}_decoder")
    writer.flush()
    return stats


class SAETensorBoard(Callback):
    """Write :func:`write_sae_views` of the module's ``sae`` to the trainer's TensorBoardLogger.

    Rank 0 only; after every ``every_n_validations``-th validation (not the sanity check) at the
    trainer's global step, and at the end of fit with the projector.

    Args:
        store: path of the activation store; default: the datamodule's ``store`` attribute.
        hook: hook point; default: the datamodule's ``hook``, else the SAE's ``hook_name``.
        The rows left out (``exclude_bos``, ``exclude_special_tokens``, ``special_token_ids``) are
        the datamodule's, or :func:`write_sae_views`' defaults when it has none.
        tokenizer: ``None`` (token ids), a tokenizer object, or ``"smollm2"``.
        max_rows, num_features, contexts_per_feature, context_window, projector_points, seed,
        prefix: as in :func:`write_sae_views`.
        every_n_validations: write after every n-th validation run.
    """

    def __init__(self, store: str | None = None, hook: str | None = None, tokenizer: Any = None,
                 max_rows: int | None = 65_536, num_features: int = 16, contexts_per_feature: int = 3,
                 context_window: int = 8, projector_points: int = MAX_PROJECTOR_POINTS, every_n_validations: int = 1,
                 prefix: str = "sae", seed: int = 0) -> None:
        super().__init__()
        if store is not None and not isinstance(store, (str, os.PathLike)):
            raise TypeError(f"store: expected a store path or None, got {type(store).__name__}")
        if max_rows is not None:
            _positive_int(max_rows, "max_rows")
        _positive_int(num_features, "num_features")
        _positive_int(contexts_per_feature, "contexts_per_feature")
        _positive_int(projector_points, "projector_points", upper=MAX_PROJECTOR_POINTS)
        _positive_int(every_n_validations, "every_n_validations")
        if isinstance(context_window, bool) or not isinstance(context_window, int) or context_window < 0:
            raise ValueError(f"context_window: expected a non-negative integer, got {context_window!r}")
        if tokenizer is not None and not hasattr(tokenizer, "decode") and tokenizer != "smollm2":  # loaded lazily
            raise ValueError(f"tokenizer: expected None, a tokenizer object or 'smollm2', got {tokenizer!r}")
        self.store, self.hook, self.tokenizer = store, hook, tokenizer
        self.options: dict[str, Any] = {
            "max_rows": max_rows, "num_features": num_features, "contexts_per_feature": contexts_per_feature,
            "context_window": context_window, "projector_points": projector_points, "prefix": prefix, "seed": seed}
        self.every_n_validations = every_n_validations
        self._validations = 0
        self._last_step: int | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._logger(trainer) is None:
            rank_zero_warn("SAETensorBoard: the trainer has no TensorBoardLogger; nothing will be written")
        if self.store is None and getattr(trainer.datamodule, "store", None) is None:
            raise ValueError("SAETensorBoard: store=None and the datamodule has no 'store' attribute; pass the "
                             "store path")

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self._write(trainer, pl_module, [v for v in VIEWS if v != "projector"])

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self._write(trainer, pl_module, VIEWS)

    @staticmethod
    def _logger(trainer: Trainer) -> Any:
        from lightning.pytorch.loggers import TensorBoardLogger

        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    def _write(self, trainer: Trainer, pl_module: LightningModule, views: list[str] | tuple[str, ...]) -> None:
        tb_logger = self._logger(trainer)
        sae = getattr(pl_module, "sae", None)
        if tb_logger is None or sae is None:
            return
        step = trainer.global_step
        if isinstance(self.tokenizer, str):
            self.tokenizer = resolve_tokenizer(self.tokenizer)
        datamodule = trainer.datamodule
        store = self.store if self.store is not None else datamodule.store
        hook = self.hook or getattr(datamodule, "hook", None) or sae.cfg.hook_name
        if "projector" in views and self._last_step == step:  # the other views of this step are written
            views = ["projector"]
        rows = {key: getattr(datamodule, key) for key in ("exclude_bos", "exclude_special_tokens", "special_token_ids")
                if hasattr(datamodule, key)}  # the rows the SAE is trained on
        write_sae_views(tb_logger.experiment, sae, store, hook, tokenizer=self.tokenizer, step=step, views=views,
                        **rows, **self.options)
        self._last_step = step
