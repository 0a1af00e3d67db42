"""Captures handed to an ActivationSink instead of a store."""

from __future__ import annotations

import pytest
import torch

from lightning_llm_inst import ActivationStore, CountingSink, InstrumentationConfig, InstrumentationFramework
from lightning_llm_inst.capture import ActivationSink
from lightning_llm_inst.models import tiny_model


class KeepingSink(ActivationSink):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[dict] = []
        self.aborted = 0

    def on_batch_start(self, rows, tokens):
        self.batches.append({"rows": rows, "tokens": {k: v.clone() for k, v in tokens.items()}, "acts": {}})

    def on_rows(self, hook, rows, start):
        acts = self.batches[-1]["acts"].setdefault(hook, [])
        assert start == sum(len(a) for a in acts)
        acts.append(rows.clone())

    def on_batch_abort(self):
        self.aborted += 1
        self.batches.pop()


def _inputs():
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


def test_sink_gets_the_rows_a_store_holds(tmp_path):
    model = tiny_model("llama")
    cfg = InstrumentationConfig(hooks="blocks.*.hook_resid_post", compression_algorithm=None)
    ids, mask = _inputs()
    fw = InstrumentationFramework(cfg)
    fw.instrument_model(model)
    with torch.no_grad():
        with fw.capture_activations(tmp_path / "store"):
            model(input_ids=ids, attention_mask=mask)
        sink = KeepingSink()
        with fw.capture_activations(sink=sink):
            model(input_ids=ids, attention_mask=mask)
    store = ActivationStore(tmp_path / "store")
    assert len(sink.batches) == 1
    batch = sink.batches[0]
    assert batch["rows"] == store.rows == int(mask.sum())
    for name in store.hooks:
        got = torch.cat(batch["acts"][name])
        assert torch.equal(got, store[name][:])
    for field in ("input_ids", "position", "sequence_id"):
        assert torch.equal(batch["tokens"][field], store.tokens[field][:])
    assert fw.stats()["writer_rows"] == store.rows


def test_counting_sink_and_aborted_forward():
    model = tiny_model("llama")
    fw = InstrumentationFramework(InstrumentationConfig(hooks="blocks.*.hook_resid_post"))
    fw.instrument_model(model)
    sink = CountingSink()
    ids, mask = _inputs()
    with torch.no_grad(), fw.capture_activations(sink=sink):
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids)
    assert set(sink.rows_per_hook) == {hp.name for hp in fw.hook_points}
    assert all(n == int(mask.sum()) + ids.numel() for n in sink.rows_per_hook.values())
    assert sink.stats()["batches"] == 2


def test_output_path_or_sink_exactly_one(tmp_path):
    model = tiny_model("llama")
    fw = InstrumentationFramework(InstrumentationConfig())
    fw.instrument_model(model)
    with pytest.raises(ValueError, match="exactly one of output_path"):
        with fw.capture_activations():
            pass
    with pytest.raises(ValueError, match="exactly one of output_path"):
        with fw.capture_activations(tmp_path / "s", sink=CountingSink()):
            pass
    with pytest.raises(TypeError, match="sink must be an ActivationSink"):
        with fw.capture_activations(sink=lambda *a: None):
            pass
