"""The capture's CUDA paths: decode steps of ``generate()``, the mask passed positionally and the
memory cap, with the model on a GPU (the pinned pool, deferred token selection and the
first-forward checks run only there). Marked ``gpu``: CI skips them, the GPU machine runs them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lightning_llm_inst import ActivationStore, InstrumentationConfig, InstrumentationFramework  # noqa: E402
from tests.capture.test_capture_models import (  # noqa: E402
    BATCH,
    PAD,
    SEQ,
    _batch,
    _model,
    _module_of,
    _positions,
    _real,
    _recording,
)

pytestmark = pytest.mark.gpu


def _on_gpu(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in batch.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_on_a_gpu_stores_prefill_and_every_decode_step(tmp_path: Path, arch: str) -> None:
    model = copy.deepcopy(_model(arch)).cuda()  # _model is cached: leave the CPU copy to other tests
    batch = _on_gpu(_batch(arch))
    mask = batch["attention_mask"].cpu()
    new = 5
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=PAD, use_cache=True)
    name = "blocks.0.hook_resid_post"
    with _recording(model, {name: _module_of(arch, name)}) as plain, torch.no_grad():
        expected = model.generate(**batch, **gen)
    fw = InstrumentationFramework(InstrumentationConfig(hooks=[name], compression_algorithm="zstd"))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(tmp_path / "acts"):
        out = model.generate(**batch, **gen)
    assert torch.equal(out, expected)
    store = ActivationStore(tmp_path / "acts")
    keep = mask.bool()
    prefill = int(mask.sum())
    assert store.rows == prefill + BATCH * (new - 1)
    tok = {k: store.tokens[k][:].long() for k in ("sequence_id", "position", "step")}
    assert torch.equal(tok["step"][prefill:], torch.arange(1, new).repeat_interleave(BATCH))
    assert torch.equal(tok["position"][:prefill], _positions(mask)[keep])
    true_len = mask.sum(-1)
    first_seq = tok["sequence_id"][:prefill]
    row_of = torch.arange(BATCH).unsqueeze(1).expand(BATCH, SEQ)[keep]
    seq_of_row = [int(first_seq[row_of == b].unique()) for b in range(BATCH)]
    got = store[name][:]
    assert torch.equal(got[:prefill], _real(plain[name][0].cpu(), keep))
    for k in range(1, new):
        sl = slice(prefill + BATCH * (k - 1), prefill + BATCH * k)
        assert torch.equal(tok["position"][sl], true_len + k - 1), k
        assert tok["sequence_id"][sl].tolist() == seq_of_row, k
        assert torch.equal(got[sl], plain[name][k][:, 0].cpu()), k


def test_mask_passed_positionally_on_a_gpu_keeps_padding_out(tmp_path: Path) -> None:
    model = copy.deepcopy(_model("llama")).cuda()
    batch = _on_gpu(_batch("llama"))
    name = "blocks.0.hook_resid_post"
    fw = InstrumentationFramework(InstrumentationConfig(hooks=[name]))
    fw.instrument_model(model)
    with torch.no_grad(), fw.capture_activations(tmp_path / "acts"):
        model(batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"].cpu()
    store = ActivationStore(tmp_path / "acts")
    assert store.rows == int(mask.sum())
    assert torch.equal(store.tokens["input_ids"][:].long(), batch["input_ids"].cpu()[mask.bool()])


def test_memory_cap_on_a_gpu_bounds_the_pinned_pool_and_refuses_an_oversized_first_batch(tmp_path: Path) -> None:
    from lightning_llm_inst.models import tiny_model

    model = tiny_model("llama", hidden_size=512, intermediate_size=1024, pad_token_id=None).cuda()
    model.generation_config.pad_token_id = None
    g = torch.Generator().manual_seed(0)
    big = torch.randint(3, 256, (512, 128), generator=g).cuda()  # 65536 rows x 2 KiB x 3 layers: 384 MiB
    small = big[:16]
    cap = 0.064
    fw = InstrumentationFramework(InstrumentationConfig(granularity="residual", max_memory_gb=cap,
                                                        compression_algorithm="zstd"))
    fw.instrument_model(model)
    torch.cuda.synchronize()
    with torch.no_grad(), fw.capture_activations(tmp_path / "acts"):
        with pytest.raises(ValueError, match=r"max_memory_gb=0.064 is too small"):
            model(big)
        model(small)
        for _ in range(3):
            model(big[:128])
        stats = fw.stats()
    assert stats["host_pool_bytes"] + stats["writer_max_buffer_bytes"] <= cap * 1e9
    assert stats["host_pool_peak_bytes"] <= stats["host_pool_bytes"]
    assert stats["writer_peak_buffered_bytes"] <= stats["writer_max_buffer_bytes"]
    store = ActivationStore(tmp_path / "acts")
    assert store.rows == 16 * 128 + 3 * 128 * 128
    assert store.verify().ok
