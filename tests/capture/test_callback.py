"""ActivationCapture in Lightning loops: DDP, exceptions, resume, memory bound, logging."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_llm_inst.capture.callback import ActivationCapture
from lightning_llm_inst.config import HookGranularity, InstrumentationConfig
from lightning_llm_inst.framework import InstrumentationFramework
from lightning_llm_inst.store import ActivationStore
from lightning_llm_inst.store import shard as shard_mod
from tests.capture.lightning_job import LM, samples

REPO = Path(__file__).resolve().parents[2]


def _trainer(cb, **kw):
    return L.Trainer(accelerator="cpu", devices=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=cb.output_path, **kw)


def _expected_rows(n: int, seq: int = 12) -> int:
    return sum(seq - (i % 4) for i in range(n))


def _our_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_predict_capture_stores_every_token_once_with_its_metadata(tmp_path):
    cb = ActivationCapture(tmp_path / "acts", granularity="residual", stages=["predict"])
    lm = LM()
    before = _our_hooks(lm)
    data = samples(7)
    _trainer(cb).predict(lm, DataLoader(data, batch_size=3), return_predictions=False)
    assert _our_hooks(lm) == before
    store = ActivationStore(tmp_path / "acts" / "predict")
    assert store.rows == _expected_rows(7) and store.verify().ok
    seq = store.tokens["sequence_id"][:]
    assert torch.bincount(seq).tolist() == [12 - (i % 4) for i in range(7)]
    ids = torch.cat([d["input_ids"][d["attention_mask"].bool()] for d in data])
    assert torch.equal(store.tokens["input_ids"][:], ids)
    assert store.metadata["stage"] == "predict" and store.metadata["model"]["class"] == "LlamaForCausalLM"
    stats = cb.stats()
    assert stats["rows"] == store.rows and stats["writer_rows_committed"] == store.rows


def test_ddp_two_processes_write_per_rank_shards_and_one_merged_manifest(tmp_path):
    out = tmp_path / "acts"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests/capture/lightning_job.py"), str(out), "--devices", "2",
                           "--samples", "11"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = out / "predict"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["rank0", "rank1"]
    assert list((root / "rank0").glob("shard-*.h5")) and list((root / "rank1").glob("shard-*.h5"))
    store = ActivationStore(root)
    assert store.manifest["ranks"] == ["rank0", "rank1"]
    assert {s["file"].split("/")[0] for s in store.manifest["shards"]} == {"rank0", "rank1"}
    seq = store.tokens["sequence_id"][:]
    assert torch.bincount(seq).tolist() == [12 - (i % 4) for i in range(11)]  # every sample exactly once
    assert store.rows == _expected_rows(11) and store.verify().ok


def test_exception_mid_run_keeps_complete_batches_and_removes_hooks(tmp_path):
    cb = ActivationCapture(tmp_path / "acts", granularity="residual")
    lm = LM(fail_at=3)
    before = _our_hooks(lm)
    with pytest.raises(RuntimeError, match="predict_step failed on purpose"):
        _trainer(cb).predict(lm, DataLoader(samples(12), batch_size=2), return_predictions=False)
    assert _our_hooks(lm) == before + 1  # only the test's own failing hook is left
    store = ActivationStore(tmp_path / "acts" / "predict")
    assert store.verify().ok
    assert torch.unique(store.tokens["sequence_id"][:]).tolist() == [0, 1, 2, 3, 4, 5]
    assert store.rows == _expected_rows(6)


def test_sanity_check_is_skipped_and_validation_appends_each_epoch(tmp_path):
    class FitLM(LM):
        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch["input_ids"]).logits.float().mean() * 0

        def validation_step(self, batch, batch_idx):
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    cb = ActivationCapture(tmp_path / "acts", granularity="residual", stages=["validate"])
    data = samples(4)
    _trainer(cb, max_epochs=2, num_sanity_val_steps=2).fit(FitLM(), DataLoader(data, batch_size=2),
                                                              DataLoader(data, batch_size=2))
    store = ActivationStore(tmp_path / "acts" / "validate")
    assert store.rows == 2 * _expected_rows(4)  # two epochs, no sanity-check rows
    assert not (tmp_path / "acts" / "fit").exists()


def test_state_dict_resume_skips_batches_already_stored(tmp_path):
    data = samples(8)
    first = ActivationCapture(tmp_path / "acts", granularity="residual")
    # a run that stored the first two batches, then stopped
    _trainer(first, limit_predict_batches=2).predict(LM(), DataLoader(data, batch_size=2), return_predictions=False)
    state = first.state_dict()
    assert state["batches_done"] == {"predict": {0: 2}}
    resumed = ActivationCapture(tmp_path / "acts", granularity="residual")
    resumed.load_state_dict(state)
    _trainer(resumed).predict(LM(), DataLoader(data, batch_size=2), return_predictions=False)
    store = ActivationStore(tmp_path / "acts" / "predict")
    assert torch.bincount(store.tokens["sequence_id"][:]).tolist() == [12 - (i % 4) for i in range(8)]


def test_counters_go_to_the_trainers_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb = ActivationCapture(tmp_path / "acts", granularity="residual", log_every_n_batches=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, callbacks=[cb], logger=CSVLogger(tmp_path / "logs"),
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(LM(), DataLoader(samples(8), batch_size=2), return_predictions=False)
    text = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    for name in ("capture/rows", "capture/writer_compression_ratio", "capture/writer_time_blocked_s",
                 "capture/forwards_dropped"):
        assert name in text


@pytest.mark.parametrize("kwargs, needle", [
    ({"stages": ["train"]}, "stages=['train'] is not valid; choose from: fit, validate, test, predict"),
    ({"granularity": "everything"},
     "granularity='everything' is not valid; choose one of: 'all', 'attention_only', 'ffn_only', 'residual'"),
    ({"codec": "gzip"}, "codec='gzip' is not valid; choose one of: 'zstd', 'lz4', 'none'"),
    ({"codec": "lz4", "codec_level": 3}, "codec_level=3 is not valid; only zstd has levels"),
    ({"codec_level": 30}, "codec_level=30 is not valid; use an integer from 1 to 22"),
    ({"on_full": "wait"}, "on_full='wait' is not valid; choose one of: 'block', 'drop'"),
    ({"storage_dtype": "int8"}, "storage_dtype='int8' is not valid; choose one of: None, 'float32', 'float16'"),
    ({"mode": "replace"}, "mode='replace' is not valid; choose one of: create, append, overwrite"),
    ({"max_memory_gb": 0}, "max_memory_gb=0 is not valid; use a positive number"),
])
def test_bad_callback_arguments(tmp_path, kwargs, needle):
    with pytest.raises(ValueError) as err:
        ActivationCapture(tmp_path, **kwargs)
    msg = str(err.value)
    assert msg.startswith("ActivationCapture: ") and needle in msg and "\n" not in msg, msg


def test_codec_forms_and_deprecated_names(tmp_path):
    assert ActivationCapture(tmp_path).config.codec_spec == "zstd:1"
    assert ActivationCapture(tmp_path, codec="lz4").config.codec_spec == "lz4"
    assert ActivationCapture(tmp_path, codec="none").config.codec_spec == "none"
    assert ActivationCapture(tmp_path, codec=None).config.codec_spec == "none"
    assert ActivationCapture(tmp_path, codec="zstd", codec_level=7).config.codec_spec == "zstd:7"
    assert ActivationCapture(tmp_path, codec="zstd:5").config.codec_spec == "zstd:5"
    assert ActivationCapture(tmp_path, granularity=HookGranularity.FFN_ONLY).config.granularity is \
        HookGranularity.FFN_ONLY
    with pytest.deprecated_call(match="use codec="):
        assert ActivationCapture(tmp_path, compression="lz4").config.codec_spec == "lz4"
    with pytest.deprecated_call(match="use codec="):
        assert ActivationCapture(tmp_path, compression=None).config.codec_spec == "none"  # the seed's None
    with pytest.deprecated_call(match="use codec_level="):
        assert ActivationCapture(tmp_path, compression_level=3).config.codec_spec == "zstd:3"
    with pytest.raises(ValueError, match="give codec= only; compression= is its deprecated name"):
        ActivationCapture(tmp_path, codec="lz4", compression="zstd")
    with pytest.raises(TypeError, match="unexpected keyword argument.*'compresion'"):
        ActivationCapture(tmp_path, compresion="lz4")


@pytest.mark.parametrize("line, needle", [
    ("codec: gzip", "codec=gzip is not valid; choose one of: 'zstd', 'lz4', 'none'"),
    ("granularity: everything", "granularity=everything is not valid; choose one of: 'all', 'attention_only'"),
    ("on_full: wait", "on_full=wait is not valid; choose one of: 'block', 'drop'"),
    ("stages: [train]", "stages=train is not valid; choose one of: 'fit', 'validate', 'test', 'predict'"),
])
def test_lightning_cli_rejects_a_bad_choice_in_one_line(tmp_path, line, needle):
    from lightning_llm_inst.lightning_cli import ConfigError, main

    text = (REPO / "configs" / "capture_tiny.yaml").read_text()
    assert "        codec: zstd\n" in text
    config = tmp_path / "bad.yaml"
    config.write_text(text.replace("        codec: zstd\n", f"        {line}\n"))
    with pytest.raises(ConfigError) as err:
        main(["predict", "--config", str(config)])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg


def test_memory_stays_bounded_with_a_stalled_writer_and_blocking_stops_once_it_catches_up(tmp_path, monkeypatch):
    real = shard_mod.OpenShard.write_chunk
    gate = threading.Event()  # closed: the disk does not take anything

    def write_chunk(self, *a, **k):
        gate.wait()
        return real(self, *a, **k)

    monkeypatch.setattr(shard_mod.OpenShard, "write_chunk", write_chunk)
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 256, (8, 128))
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.06, compression_algorithm=None,
                                                        num_workers=1))
    fw.instrument_model(model)

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    done = [0]
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            with torch.no_grad():
                for _ in range(n):  # 12 hook points x 1 MiB = 12 MiB a forward
                    model(ids)
                    done[0] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with fw.capture_activations(tmp_path / "acts"):
        try:
            gate.set()
            run(1)  # warm up: allocator, schema
            gate.clear()
            base = rss()
            peak = base
            t = threading.Thread(target=run, args=(10,))
            t.start()
            last, still = -1, 0
            while still < 20 and t.is_alive():  # until no forward has finished for 1 s
                time.sleep(0.05)
                peak = max(peak, rss())
                still = still + 1 if done[0] == last else 0
                last = done[0]
            assert t.is_alive() and done[0] < 1 + 10, done[0]  # the model is held back, not racing ahead
            assert peak - base < 0.06e9 + 64 * 2**20, f"RSS grew {(peak - base) / 2**20:.0f} MiB"
            assert fw.stats()["host_pool_wait_s"] + fw.stats()["writer_time_blocked_s"] > 0
        finally:
            gate.set()  # the writer catches up
        t.join(timeout=120)
        assert not t.is_alive() and not errors
        fw.pipeline.flush()
        waited = fw.stats()["host_pool_wait_s"], fw.stats()["writer_time_blocked_s"]
        run(2)  # 24 MiB fit in the pool and the writer's buffers: no waiting any more
        fw.pipeline.flush()
        assert (fw.stats()["host_pool_wait_s"], fw.stats()["writer_time_blocked_s"]) == waited
    store = ActivationStore(tmp_path / "acts")
    assert store.rows == 13 * 8 * 128 and store.dropped["batches"] == 0


class PositionalLM(L.LightningModule):
    """Calls a model whose config has a pad id the way some pipelines do: the mask positionally,
    or not at all (``call="ids_only"``; the batch still carries it)."""

    def __init__(self, call: str) -> None:
        super().__init__()
        from lightning_llm_inst.models import tiny_model

        self.model = tiny_model("llama")  # pad_token_id 0
        self.call = call

    def predict_step(self, batch, batch_idx):
        if self.call == "positional":
            return self.model(batch["input_ids"], batch["attention_mask"]).logits.argmax(-1)
        return self.model(batch["input_ids"]).logits.argmax(-1)


def _padded_samples(n: int, seq: int = 12, with_mask: bool = True) -> list[dict[str, torch.Tensor]]:
    out = []
    for d in samples(n, seq):
        item = {"input_ids": d["input_ids"].masked_fill(d["attention_mask"] == 0, 0), "sequence_id": d["sequence_id"]}
        if with_mask:
            item["attention_mask"] = d["attention_mask"]
        out.append(item)
    return out


@pytest.mark.parametrize("call", ["positional", "ids_only"])
def test_callback_finds_the_mask_passed_positionally_or_left_in_the_batch(tmp_path, call):
    cb = ActivationCapture(tmp_path / "acts", granularity="residual")
    data = _padded_samples(7)
    _trainer(cb).predict(PositionalLM(call), DataLoader(data, batch_size=3), return_predictions=False)
    store = ActivationStore(tmp_path / "acts" / "predict")
    assert store.rows == _expected_rows(7)
    assert torch.bincount(store.tokens["sequence_id"][:]).tolist() == [12 - (i % 4) for i in range(7)]
    assert torch.equal(store.tokens["input_ids"][:], torch.cat([d["input_ids"][d["attention_mask"].bool()]
                                                                for d in data]))


def test_callback_refuses_padded_batches_without_a_mask_unless_include_padding(tmp_path):
    data = _padded_samples(4, with_mask=False)
    cb = ActivationCapture(tmp_path / "acts", granularity="residual")
    with pytest.raises(ValueError, match="include_padding=True"):
        _trainer(cb).predict(PositionalLM("ids_only"), DataLoader(data, batch_size=2), return_predictions=False)
    cb = ActivationCapture(tmp_path / "all", granularity="residual", include_padding=True)
    _trainer(cb).predict(PositionalLM("ids_only"), DataLoader(data, batch_size=2), return_predictions=False)
    assert ActivationStore(tmp_path / "all" / "predict").rows == 4 * 12
