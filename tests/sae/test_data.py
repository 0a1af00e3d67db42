"""ActivationDataModule: the right rows, a held-out validation set, DDP splits and resuming without
repeating or skipping rows."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_llm_inst.sae.data import ActivationDataModule
from lightning_llm_inst.store import StoreError, StoreWriter

HOOK = "blocks.2.hook_resid_post"
ROWS = 2500  # not a multiple of the chunk rows (64) or the batch size


def write_store(path, rows: int = ROWS, d: int = 8, hooks: tuple[str, ...] = (HOOK,)):
    """Column 0 of every row holds its row id (exact in float32), so a batch names its rows."""
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.arange(rows, dtype=torch.float32)
    with StoreWriter(path, codec="lz4", chunk_size="2KiB", shard_size="40KB", metadata={"model": {"name": "m"}}) as w:
        for a in range(0, rows, 300):
            w.append({h: x[a : a + 300] for h in hooks})
    return x


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].long().tolist()


def epoch_rows(loader) -> list[int]:
    return [i for batch in loader for i in ids(batch)]


def _as_rank(dm: ActivationDataModule, rank: int, world_size: int) -> ActivationDataModule:
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, training=True)
    return dm


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "store"
    write_store(path)
    return path


def test_batches_hold_the_rows_and_validation_is_held_out_as_whole_chunks(store):
    dm = ActivationDataModule(store, batch_size=100, num_workers=2, val_fraction=0.2, seed=3)
    dm.setup("fit")
    assert dm.hook == HOOK and dm.d_in == 8 and dm.model_name == "m"
    train, val = epoch_rows(dm.train_dataloader()), epoch_rows(dm.val_dataloader())
    assert len(train) == len(set(train)) == dm.train_rows and len(val) == len(set(val)) == dm.val_rows_held_out
    assert sorted(train + val) == list(range(ROWS))
    assert 0.2 * ROWS <= len(val) < 0.2 * ROWS + 64
    assert train != sorted(train)  # shuffled
    assert val == sorted(val)  # validation reads in order
    blocks = dm.store.chunk_blocks(HOOK)  # whole chunks: the held-out rows are a union of them
    held = [blk for blk in blocks if blk[0] in set(val)]
    assert sorted(i for a, b in held for i in range(a, b)) == val
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (100, 8) and batch.dtype == torch.float32
    assert torch.equal(batch, dm.store[HOOK][ids(batch)].float())
    # a fixed split: the same seed, the same validation rows
    dm2 = ActivationDataModule(store, batch_size=64, num_workers=0, val_rows=500, seed=3)
    dm2.setup("fit")
    assert dm2.val_rows_held_out >= 500 and epoch_rows(dm2.val_dataloader())[:100] == val[:100]


def test_no_validation_set_and_dtype_and_sample(store):
    dm = ActivationDataModule(store, batch_size=256, num_workers=0, dtype="bfloat16")
    dm.setup("fit")
    assert dm.val_dataloader() == [] and dm.train_rows == ROWS
    assert next(iter(dm.train_dataloader())).dtype == torch.bfloat16
    dm = ActivationDataModule(store, batch_size=256, num_workers=0, val_fraction=0.3)
    dm.setup("fit")
    sample = dm.sample(700)
    held_out = set(epoch_rows(dm.val_dataloader()))
    assert sample.shape == (700, 8) and len(set(ids(sample))) == 700 and not set(ids(sample)) & held_out
    assert torch.equal(dm.sample(700), sample) and not torch.equal(dm.sample(700, seed=1), sample)
    assert dm.sample(10**6).shape == (dm.train_rows, 8)


def test_clear_errors(tmp_path, store):
    with pytest.raises(StoreError, match=r"store_path='.*missing'.*does not exist"):
        ActivationDataModule(tmp_path / "missing").setup("fit")
    with pytest.raises(ValueError, match=r"hook='blocks.9.hook_mlp_out' is not in the store .* it holds: " + HOOK):
        ActivationDataModule(store, hook="blocks.9.hook_mlp_out").setup("fit")
    for kwargs, match in (({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
                          ({"num_workers": -1}, "num_workers must be an integer >= 0"),
                          ({"val_fraction": 1.0}, "val_fraction must be a number in"),
                          ({"val_fraction": 0.1, "val_rows": 10}, "give val_fraction or val_rows, not both"),
                          ({"dtype": "int8"}, "dtype='int8' is not valid; choose one of: float32")):
        with pytest.raises(ValueError, match=match):
            ActivationDataModule(store, **kwargs)
    with pytest.raises(ValueError, match="nothing is left to train on"):
        ActivationDataModule(store, val_rows=ROWS).setup("fit")


def test_first_hook_is_the_default(tmp_path):
    write_store(tmp_path / "s", rows=300, hooks=("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"))
    dm = ActivationDataModule(tmp_path / "s", hook=None)
    assert dm.hook == "blocks.0.hook_resid_post"
    assert ActivationDataModule(tmp_path / "s", hook="blocks.1.hook_mlp_out").hook == "blocks.1.hook_mlp_out"


def test_ddp_ranks_get_disjoint_rows_and_the_same_number_of_batches(store):
    loaders = []
    for rank in (0, 1):
        dm = _as_rank(ActivationDataModule(store, batch_size=96, num_workers=0, val_fraction=0.25), rank, 2)
        dm.setup("fit")
        loaders.append((dm.train_dataloader(), dm.val_dataloader()))
    train = [epoch_rows(t) for t, _ in loaders]
    val = [epoch_rows(v) for _, v in loaders]
    assert len(loaders[0][0]) == len(loaders[1][0])  # DDP needs equal batch counts
    assert [len(list(t)) for t, _ in loaders] == [len(loaders[0][0])] * 2
    assert not set(train[0]) & set(train[1])
    assert not set(val[0]) & set(val[1]) and len(val[0] + val[1]) == dm.val_rows_held_out  # each once
    assert not (set(train[0]) | set(train[1])) & (set(val[0]) | set(val[1]))


@pytest.mark.parametrize("consumed", [0, 1, 7, 17])  # of 18 batches
def test_resume_mid_epoch_neither_repeats_nor_skips_rows(store, consumed):
    def fresh():
        dm = ActivationDataModule(store, batch_size=128, num_workers=0, val_fraction=0.1, seed=5)
        dm.setup("fit")
        return dm

    dm = fresh()
    loader = dm.train_dataloader()
    full0 = epoch_rows(loader)
    loader.sampler.set_epoch(1)  # as Lightning does at the start of each epoch
    seen = []
    for batch in loader:
        if len(seen) == consumed:
            break
        dm.on_after_batch_transfer(batch, 0)
        seen.append(ids(batch))
    state = dm.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == consumed

    resumed = fresh()
    resumed.load_state_dict(state)
    loader2 = resumed.train_dataloader()
    assert len(loader2) == len(loader)  # Lightning counts the epoch's batches from the checkpoint on
    rest = [ids(b) for b in loader2]
    assert len(seen) + len(rest) == len(loader)
    rows = [i for b in seen + rest for i in b]
    assert sorted(rows) == sorted(full0) and rows != full0  # epoch 1 completed exactly, in epoch 1's order
    # the next epoch is whole again
    loader2.sampler.set_epoch(2)
    assert sorted(epoch_rows(loader2)) == sorted(full0)


def test_resume_from_the_end_of_an_epoch_starts_the_next(store):
    dm = ActivationDataModule(store, batch_size=500, num_workers=0)
    loader = dm.train_dataloader()
    for batch in loader:
        dm.on_after_batch_transfer(batch, 0)
    resumed = ActivationDataModule(store, batch_size=500, num_workers=0)
    resumed.load_state_dict(dm.state_dict())
    loader2 = resumed.train_dataloader()
    assert loader2.sampler.epoch == 1 and len(list(loader2)) == len(loader)


class _RecordRows(L.LightningModule):
    """Trains nothing; records the row ids of every training batch per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.rows: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.rows.setdefault(self.current_epoch, []).extend(ids(batch))
        return (self.w * batch[:, 1:].sum()).square()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("given", ["datamodule", "dataloader"])
def test_lightning_resume_from_a_mid_epoch_checkpoint(store, tmp_path, given):
    def trainer(**kwargs):
        return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=tmp_path, **kwargs)

    def data():
        return ActivationDataModule(store, batch_size=200, num_workers=2, val_fraction=0.1)

    per_epoch = -(-data().train_rows // 200)  # 12 batches, the last one short
    ckpt = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    first = _RecordRows()
    trainer(max_epochs=3, max_steps=per_epoch + 3, callbacks=[ckpt]).fit(first, data())
    assert len(first.rows[1]) == 3 * 200  # stopped in epoch 1
    second = _RecordRows()
    dm = data()
    # the checkpoint after 2 batches of epoch 1
    path = tmp_path / "ckpt" / f"step={per_epoch + 2}.ckpt"
    if given == "datamodule":
        trainer(max_epochs=3).fit(second, dm, ckpt_path=path)
    else:  # the loader alone is resumable too (Lightning restores it from the fit loop's state)
        trainer(max_epochs=3, limit_val_batches=0).fit(second, train_dataloaders=dm.train_dataloader(),
                                                       ckpt_path=path)
    epoch1 = first.rows[1][:400] + second.rows[1]
    assert sorted(epoch1) == sorted(first.rows[0]) and len(epoch1) == dm.train_rows
    assert first.rows[1][400:] == second.rows[1][:200]  # the same order as the interrupted run
    assert sorted(second.rows[2]) == sorted(first.rows[0]) and second.rows[2] != first.rows[0]


def test_a_store_of_one_chunk_still_splits_for_validation_and_ranks(tmp_path):
    x = torch.randn(1000, 4)
    x[:, 0] = torch.arange(1000, dtype=torch.float32)
    with StoreWriter(tmp_path / "s", codec="none", chunk_size="1MiB") as w:
        w.append({HOOK: x})
    dms = [_as_rank(ActivationDataModule(tmp_path / "s", batch_size=64, num_workers=0, val_fraction=0.2), r, 2)
           for r in (0, 1)]
    assert len(dms[0].store.chunk_blocks(HOOK)) == 1
    train = [epoch_rows(dm.train_dataloader()) for dm in dms]
    val = [epoch_rows(dm.val_dataloader()) for dm in dms]
    assert all(train) and all(val) and 200 <= len(val[0] + val[1]) < 300
    assert sorted(train[0] + train[1] + val[0] + val[1]) == list(range(1000))
