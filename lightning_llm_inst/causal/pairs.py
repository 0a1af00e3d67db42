"""Prompt pairs and the metric: what a causal graph is computed on.

Stage: the input of attribution. A :class:`PromptPairs` holds clean and corrupt prompts of
the same token length, an answer token and a wrong token per pair, as the token ids the
model will see (``tokenizer(text)``, the tokenizer's default, so special tokens are added
exactly when the tokenizer adds them). :meth:`PromptPairs.batches` hands the attribution
engine ``[batch, seq]`` tensors of pairs of one length (never padded); :func:`logit_diff` is the default metric
``M = logit(answer) - logit(wrong)`` at each pair's last position.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

__all__ = ["MetricFn", "PairBatch", "PromptPairs", "logit_diff", "resolve_metric"]

MetricFn = Callable[[Tensor, "PromptPairs"], Tensor]
"""A metric: ``(logits [batch, seq, vocab], the PromptPairs of that batch) -> scalar tensor``, a
mean over the batch. Every batch holds pairs of one token length, so ``logits[:, -1]`` is each
pair's last position."""


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    out = tokenizer(text) if special else tokenizer(text, add_special_tokens=False)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a tokenizer that returns a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def _as_list(value: str | Sequence[str], name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{name}: expected a string or a list of strings, got {type(value).__name__}") from None
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}]: expected a string, got {type(item).__name__}")
    return items


@dataclass(frozen=True)
class PairBatch:
    """One batch of pairs of equal token length, as tensors (no padding)."""

    clean: Tensor  # [batch, seq] long
    corrupt: Tensor  # [batch, seq] long
    answer: Tensor  # [batch] long
    wrong: Tensor  # [batch] long
    pairs: PromptPairs  # the pairs of this batch
    indices: tuple[int, ...]  # their indices in the whole set

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.clean.to(device), self.corrupt.to(device), self.answer.to(device),
                         self.wrong.to(device), self.pairs, self.indices)


@dataclass(frozen=True)
class PromptPairs:
    """Clean / corrupt prompts with an answer and a wrong token each, as token ids.

    ``clean_ids[i]`` and ``corrupt_ids[i]`` have the same length; ``answer_ids[i]`` and
    ``wrong_ids[i]`` are single token ids. The texts are kept when the pairs came from text.
    """

    clean_ids: list[list[int]]
    corrupt_ids: list[list[int]]
    answer_ids: list[int]
    wrong_ids: list[int]
    clean: list[str] | None = None
    corrupt: list[str] | None = None
    answers: list[str] | None = None
    wrong: list[str] | None = None
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        # plain lists of ints and strings, whatever sequences were given
        for name in ("clean_ids", "corrupt_ids"):
            object.__setattr__(self, name, [[int(t) for t in seq] for seq in getattr(self, name)])
        for name in ("answer_ids", "wrong_ids"):
            object.__setattr__(self, name, [int(t) for t in getattr(self, name)])
        for name in ("clean", "corrupt", "answers", "wrong"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, list(getattr(self, name)))
        n = len(self.clean_ids)
        if n == 0:
            raise ValueError("pairs: the list of prompt pairs is empty; give at least one pair")
        for name in ("corrupt_ids", "answer_ids", "wrong_ids"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name}: {len(getattr(self, name))} entries for {n} clean prompts; "
                                 f"each pair needs one of each")
        for i, (c, k) in enumerate(zip(self.clean_ids, self.corrupt_ids)):
            if len(c) == 0:
                raise ValueError(f"pair {i}: the clean prompt {self._text(i, 'clean')}has no tokens")
            if len(c) != len(k):
                raise ValueError(f"pair {i}: clean prompt {self._text(i, 'clean')}has {len(c)} tokens but the "
                                 f"corrupt prompt {self._text(i, 'corrupt')}has {len(k)}; they must be the same length")

    def _text(self, i: int, field: str) -> str:
        texts = getattr(self, field)
        return f"{texts[i]!r} " if texts is not None else ""

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_ids(cls, clean_ids: Sequence[Sequence[int]], corrupt_ids: Sequence[Sequence[int]],
                 answer_ids: Sequence[int], wrong_ids: Sequence[int], *, pad_token_id: int = 0) -> PromptPairs:
        """Pairs from token ids directly (no tokenizer)."""
        return cls(list(clean_ids), list(corrupt_ids), list(answer_ids), list(wrong_ids),  # type: ignore[arg-type]
                   pad_token_id=int(pad_token_id))

    @classmethod
    def from_text(cls, tokenizer: Any, clean: str | Sequence[str], corrupt: str | Sequence[str],
                  answers: str | Sequence[str], wrong: str | Sequence[str]) -> PromptPairs:
        """Tokenize pairs: prompts with ``tokenizer(text)`` (its defaults), answers and wrong
        tokens without special tokens; each must be exactly one token (mind the leading space:
        ``" Mary"``)."""
        clean_l, corrupt_l = _as_list(clean, "clean"), _as_list(corrupt, "corrupt")
        answers_l, wrong_l = _as_list(answers, "answers"), _as_list(wrong, "wrong")
        n = len(clean_l)
        if n == 0:
            raise ValueError("clean: the list of prompt pairs is empty; give at least one pair")
        for name, items in (("corrupt", corrupt_l), ("answers", answers_l), ("wrong", wrong_l)):
            if len(items) != n:
                raise ValueError(f"{name}: {len(items)} entries for {n} clean prompts; each pair needs one of each")
        answer_ids, wrong_ids = [], []
        for i in range(n):
            for name, text, out in (("answer", answers_l[i], answer_ids), ("wrong", wrong_l[i], wrong_ids)):
                ids = _ids(tokenizer, text, special=False)
                if len(ids) != 1:
                    raise ValueError(f"pair {i}: {name} {text!r} is {len(ids)} tokens {ids}; it must be exactly one "
                                     f"token (a leading space often matters)")
                out.append(ids[0])
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        return cls([_ids(tokenizer, t, special=True) for t in clean_l],
                   [_ids(tokenizer, t, special=True) for t in corrupt_l],
                   answer_ids, wrong_ids, clean_l, corrupt_l, answers_l, wrong_l,
                   pad_token_id=int(pad) if isinstance(pad, int) else 0)

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, tokenizer: Any) -> PromptPairs:
        """One pair per line: ``{"clean": ..., "corrupt": ..., "answer": ..., "wrong": ...}``."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"path: no such file {str(p)!r}; expected a JSONL file of prompt pairs")
        rows: list[dict[str, Any]] = []
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
                missing = [k for k in ("clean", "corrupt", "answer", "wrong") if not isinstance(row, dict) or k not in row]
                if missing:
                    raise ValueError(f"{p}:{lineno}: missing key(s) {', '.join(missing)}; each line needs "
                                     f'{{"clean", "corrupt", "answer", "wrong"}}')
                rows.append(row)
        if not rows:
            raise ValueError(f"path: {str(p)!r} holds no prompt pairs")
        return cls.from_text(tokenizer, [r["clean"] for r in rows], [r["corrupt"] for r in rows],
                             [r["answer"] for r in rows], [r["wrong"] for r in rows])

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.clean_ids)

    def __getitem__(self, index: int | slice | Sequence[int]) -> PromptPairs:
        """The pairs at ``index`` (an int, a slice or a list of indices), as a PromptPairs."""
        if isinstance(index, slice):
            picks = list(range(len(self)))[index]
        elif isinstance(index, int):
            picks = [range(len(self))[index]]
        else:
            picks = [int(i) for i in index]

        def pick(v: list | None) -> list | None:
            return None if v is None else [v[i] for i in picks]

        return PromptPairs(pick(self.clean_ids), pick(self.corrupt_ids), pick(self.answer_ids),  # type: ignore[arg-type]
                           pick(self.wrong_ids), pick(self.clean), pick(self.corrupt), pick(self.answers),  # type: ignore[arg-type]
                           pick(self.wrong), pad_token_id=self.pad_token_id)

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.clean_ids]

    def to_dict(self) -> dict[str, Any]:
        """The token ids (and texts), JSON-serialisable."""
        d: dict[str, Any] = {"clean_ids": [list(c) for c in self.clean_ids],
                             "corrupt_ids": [list(c) for c in self.corrupt_ids],
                             "answer_ids": list(self.answer_ids), "wrong_ids": list(self.wrong_ids)}
        for key in ("clean", "corrupt", "answers", "wrong"):
            if getattr(self, key) is not None:
                d[key] = list(getattr(self, key))
        return d

    def batches(self, batch_size: int) -> Iterator[PairBatch]:
        """Batches of at most ``batch_size`` pairs of one token length each (no padding), the
        lengths in order of first appearance; ``PairBatch.indices`` says which pairs."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size!r}; allowed: an integer >= 1")
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(self.lengths):
            groups.setdefault(n, []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                idx = indices[start:start + batch_size]
                part = self[idx]
                clean = torch.tensor(part.clean_ids, dtype=torch.long)  # [batch, seq]
                corrupt = torch.tensor(part.corrupt_ids, dtype=torch.long)
                yield PairBatch(clean, corrupt, torch.tensor(part.answer_ids), torch.tensor(part.wrong_ids),
                                part, tuple(idx))


def logit_diff_per_pair(logits: Tensor, batch: PairBatch) -> Tensor:
    """``logit(answer) - logit(wrong)`` at the last position: ``[batch]`` float32.

    ``logits`` is ``[batch, seq, vocab]`` (or ``[batch, 1, vocab]``: only the last position)."""
    last = logits[:, -1]  # [batch, vocab]
    answer = batch.answer.to(logits.device).repeat(last.shape[0] // len(batch))
    wrong = batch.wrong.to(logits.device).repeat(last.shape[0] // len(batch))
    return (last.gather(1, answer[:, None]) - last.gather(1, wrong[:, None]))[:, 0].float()


def logit_diff(logits: Tensor, pairs: PromptPairs) -> Tensor:
    """The default metric as a callable: mean over the pairs of ``logit(answer) - logit(wrong)``
    at the last position (all pairs of a batch have the same length)."""
    last = logits[:, -1].float()  # [batch, vocab]
    answer = torch.tensor(pairs.answer_ids, device=logits.device)
    wrong = torch.tensor(pairs.wrong_ids, device=logits.device)
    return (last.gather(1, answer[:, None]) - last.gather(1, wrong[:, None])).mean()


Metric = Union[str, MetricFn]


def resolve_metric(metric: Metric) -> MetricFn | None:
    """``None`` for the built-in ``"logit_diff"`` (computed per pair, last position only), else the callable."""
    if isinstance(metric, str):
        if metric != "logit_diff":
            raise ValueError(f"metric: got {metric!r}; allowed: 'logit_diff' or a callable (logits, pairs) -> scalar")
        return None
    if not callable(metric):
        raise TypeError(f"metric: got {type(metric).__name__}; allowed: 'logit_diff' or a callable "
                        f"(logits, pairs) -> scalar")
    return metric
