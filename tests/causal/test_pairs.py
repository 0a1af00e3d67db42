"""PromptPairs: tokenization as the tokenizer does by default, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_llm_inst.causal import PromptPairs, logit_diff
from lightning_llm_inst.models import ByteTokenizer


def test_from_text_and_batches():
    tok = ByteTokenizer()
    pairs = PromptPairs.from_text(tok, ["abc", "hello", "xyz"], ["abd", "jello", "xyw"], ["d", "!", "q"],
                                  ["e", "?", "r"])
    assert pairs.clean_ids[1] == list(b"hello") == tok("hello")["input_ids"]
    assert pairs.answer_ids == [ord("d"), ord("!"), ord("q")]
    batches = list(pairs.batches(8))
    assert [b.indices for b in batches] == [(0, 2), (1,)]  # one token length per batch, no padding
    assert batches[0].clean.tolist() == [list(b"abc"), list(b"xyz")]
    assert len(pairs[[0, 2]]) == 2 and pairs[1].clean == ["hello"]
    logits = torch.zeros(2, 3, 256)
    logits[0, -1, ord("d")] = 2.0
    logits[1, -1, ord("r")] = 1.0
    assert float(logit_diff(logits, batches[0].pairs)) == pytest.approx((2.0 - 1.0) / 2)


def test_from_jsonl(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"clean": "ab", "corrupt": "cb", "answer": "x", "wrong": "y"}] * 3
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = PromptPairs.from_jsonl(path, ByteTokenizer())
    assert len(pairs) == 3 and pairs.to_dict()["clean"] == ["ab"] * 3
    path.write_text('{"clean": "ab", "corrupt": "cb", "answer": "x"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: missing key\(s\) wrong"):
        PromptPairs.from_jsonl(path, ByteTokenizer())
    with pytest.raises(FileNotFoundError, match="path: no such file"):
        PromptPairs.from_jsonl(tmp_path / "none.jsonl", ByteTokenizer())


def test_bad_pairs_name_the_pair():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"pair 1: clean prompt 'abcd' has 4 tokens but the corrupt prompt 'abc' has 3"):
        PromptPairs.from_text(tok, ["ab", "abcd"], ["cd", "abc"], ["x", "x"], ["y", "y"])
    with pytest.raises(ValueError, match=r"pair 0: answer 'xy' is 2 tokens"):
        PromptPairs.from_text(tok, "ab", "cd", "xy", "z")
    with pytest.raises(ValueError, match="the list of prompt pairs is empty"):
        PromptPairs.from_text(tok, [], [], [], [])
    with pytest.raises(ValueError, match="wrong: 1 entries for 2 clean prompts"):
        PromptPairs.from_text(tok, ["a", "b"], ["c", "d"], ["x", "y"], ["z"])
