"""Token selection: which positions of a forward pass become stored rows, and their metadata.

Stage: the start of every captured forward pass. From ``input_ids`` and the attention mask
(padding excluded), optional filters (BOS, special token ids, a position window) pick the
rows; each row gets its token id, sequence id, true position and generation step, so every
stored row maps back to its text. Hooks then gather these rows from each captured tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TokenSelection", "TokenSelector"]


@dataclass
class TokenSelection:
    """The rows one forward pass contributes, in row-major ``[batch, seq]`` order."""

    index: torch.Tensor
    """``[rows]`` int64 flat indices into ``batch * seq``, on the activations' device."""
    batch_size: int
    seq_len: int
    tokens: dict[str, torch.Tensor]
    """Per-row metadata on the CPU: ``input_ids``, ``sequence_id``, ``position``, ``step``."""
    all_rows: bool = False
    """True when every position is kept (no gather needed)."""
    next_position: np.ndarray | None = None
    """``[batch]`` position the next token of each sequence will have (real tokens seen so far):
    where a decode step that is not given the whole mask continues."""

    @property
    def rows(self) -> int:
        return int(self.index.numel())


class TokenSelector:
    """Decide which token positions are stored.

    Args:
        drop_bos: skip the first real token of each sequence (position 0).
        drop_token_ids: token ids never stored (e.g. the tokenizer's special tokens).
        position_window: ``(start, stop)``: keep only positions ``start <= p < stop``
            (``stop`` may be ``None``).
        pad_token_ids: ids the model's inputs are padded with. A pass given no attention mask
            whose rows begin or end with one of them (where padding sits) is refused, since its
            padding cannot be told from text -- unless ``include_padding``.
        bos_token_ids: ids of the BOS token; a pad id equal to one counts as padding at the
            start of a row only when the next token is one too (a row starts with its BOS).
        include_padding: store every position of a pass given no attention mask, padding or not.
    """

    def __init__(self, drop_bos: bool = False, drop_token_ids: Iterable[int] = (),
                 position_window: tuple[int, int | None] | None = None, *, pad_token_ids: Iterable[int] = (),
                 bos_token_ids: Iterable[int] = (), include_padding: bool = False) -> None:
        if not isinstance(drop_bos, bool):
            raise ValueError(f"drop_bos must be True or False, got {drop_bos!r}")
        ids = sorted({int(i) for i in drop_token_ids})
        if any(i < 0 for i in ids):
            raise ValueError(f"drop_token_ids must be non-negative token ids, got {ids}")
        if position_window is not None:
            if (not isinstance(position_window, (tuple, list)) or len(position_window) != 2
                    or not isinstance(position_window[0], int)
                    or not (position_window[1] is None or isinstance(position_window[1], int))
                    or position_window[0] < 0
                    or (position_window[1] is not None and position_window[1] <= position_window[0])):
                raise ValueError(f"position_window must be (start, stop) with 0 <= start < stop (stop may be None), "
                                 f"got {position_window!r}")
            position_window = (int(position_window[0]), position_window[1])
        if not isinstance(include_padding, bool):
            raise ValueError(f"include_padding must be True or False, got {include_padding!r}")
        self.drop_bos = drop_bos
        self.drop_token_ids = ids
        self.position_window = position_window
        self.include_padding = include_padding
        pads = {int(i) for i in pad_token_ids}
        bos = {int(i) for i in bos_token_ids}
        self.pad_token_ids = sorted(pads)
        self._pads_at_end = np.asarray(sorted(pads), dtype=np.int64)
        self._pads_at_start = np.asarray(sorted(pads - bos), dtype=np.int64)
        self._pads_as_bos = np.asarray(sorted(pads & bos), dtype=np.int64)

    def select(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, sequence_ids: torch.Tensor,
               step: int = 0, device: torch.device | None = None, past: np.ndarray | None = None) -> TokenSelection:
        """Rows of one forward pass.

        Args:
            input_ids: ``[batch, seq]`` token ids of this pass (for a decode step, ``seq`` is 1).
            attention_mask: ``[batch, past + seq]`` (as ``generate`` passes it) or ``[batch, seq]``;
                ``None`` means no padding.
            sequence_ids: ``[batch]`` id of each sequence (the same across decode steps).
            step: generation step (0 for a prefill or a plain forward).
            device: where the activations live (the index is built there).
            past: ``[batch]`` real tokens of each sequence before this pass that ``attention_mask``
                does not cover (a decode step given only its own mask, or none); ``None``: the
                mask covers everything before this pass.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        # numpy on the host: these are a few thousand elements, and torch's CPU kernels would wake
        # its intra-op thread pool on every forward while capture threads keep the cores busy
        ids = _host_int64(input_ids)  # [b, t]
        if attention_mask is None:
            if past is None and step == 0 and not self.include_padding and self._pads_at_end.size:
                self._refuse_padding(ids)
            mask = np.ones((b, t), dtype=np.int64)
        else:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < t:
                raise ValueError(f"attention_mask must be [batch, >= seq] = [{b}, >= {t}], got "
                                 f"{tuple(attention_mask.shape)}")
            mask = _host_int64(attention_mask)  # [b, past + t]
        # true position of each token: count of real tokens before it (left padding included)
        seen = np.cumsum(mask, axis=1)  # [b, past + t]
        if past is not None:
            seen += np.asarray(past, dtype=np.int64).reshape(b, 1)
        position = (seen - 1)[:, -t:]  # [b, t]
        keep = mask[:, -t:] != 0  # [b, t]
        if self.drop_bos:
            keep &= position != 0
        if self.drop_token_ids:
            keep &= ~np.isin(ids, np.asarray(self.drop_token_ids, dtype=np.int64))
        if self.position_window is not None:
            lo, hi = self.position_window
            keep &= position >= lo
            if hi is not None:
                keep &= position < hi
        flat = keep.reshape(-1)
        all_rows = bool(flat.all())
        seq = np.repeat(_host_int64(torch.as_tensor(sequence_ids)).reshape(-1), t)  # [b * t]
        if seq.size != b * t:
            raise ValueError(f"sequence_ids must hold one id per sequence ({b}), got {seq.size // max(1, t)}")
        if all_rows:
            index_np = np.arange(b * t, dtype=np.int64)
            fields = (ids.reshape(-1).copy(), seq, position.reshape(-1).copy())
        else:
            index_np = np.flatnonzero(flat)  # [rows]
            fields = (ids.reshape(-1)[index_np], seq[index_np], position.reshape(-1)[index_np])
        tokens = {
            "input_ids": torch.from_numpy(fields[0]),
            "sequence_id": torch.from_numpy(np.ascontiguousarray(fields[1])),
            "position": torch.from_numpy(np.ascontiguousarray(fields[2])),
            "step": torch.full((index_np.size,), int(step), dtype=torch.int64),
        }
        index = torch.from_numpy(index_np)
        if device is not None and torch.device(device).type != "cpu" and not all_rows:
            index = index.pin_memory().to(device, non_blocking=True)
        return TokenSelection(index=index, batch_size=b, seq_len=t, tokens=tokens, all_rows=all_rows,
                              next_position=seen[:, -1].copy())

    def _refuse_padding(self, ids: np.ndarray) -> None:
        """Raise if rows of a pass with no attention mask look padded: a pad id at their end,
        or at their start (twice, where the pad id is also the BOS id)."""
        padded = np.isin(ids[:, -1], self._pads_at_end) | np.isin(ids[:, 0], self._pads_at_start)
        if self._pads_as_bos.size and ids.shape[1] > 1:
            padded |= np.isin(ids[:, 0], self._pads_as_bos) & np.isin(ids[:, 1], self._pads_as_bos)
        if padded.any():
            rows = np.flatnonzero(padded)
            raise ValueError(
                f"input_ids look padded (rows {rows[:8].tolist()} of {ids.shape[0]} begin or end with pad token id "
                f"{self.pad_token_ids[0] if len(self.pad_token_ids) == 1 else self.pad_token_ids}) but no "
                f"attention_mask reached the model, so padding cannot be told from text and would be stored; pass "
                f"attention_mask to the model (by keyword or position, or in the batch), or set include_padding=True "
                f"to store every position")


def _host_int64(t: torch.Tensor) -> np.ndarray:
    """``t`` as an int64 numpy array on the host (a copy only where needed)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.numpy().astype(np.int64, copy=False)
