"""capture_gradients: the gradients of captured activations, row for row with their forward rows.

Every reference gradient here comes from a second, uncaptured run of the same model on the same
inputs: forward hooks of the test keep each hook point's output and ``torch.autograd.grad``
differentiates the same loss with respect to them.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_llm_inst import InstrumentationConfig, InstrumentationFramework
from lightning_llm_inst.capture import ActivationSink
from lightning_llm_inst.capture.callback import ActivationCapture
from lightning_llm_inst.capture.hooks import resolve_hook_points
from lightning_llm_inst.models import tiny_model
from lightning_llm_inst.store import ActivationStore

TOKEN_FIELDS = ("input_ids", "sequence_id", "position", "step")


def _batch(seed: int, b: int = 3, t: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (no pad / BOS ids among them) and a mask with left and right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, t - 3 :] = 0  # right padding
    mask[2, :2] = 0  # left padding
    return ids, mask


def _loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the real tokens."""
    logp = logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [b, t - 1]
    keep = (mask[:, 1:] * mask[:, :-1]).float()
    return (nll * keep).sum() / keep.sum()


def _model(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return tiny_model(arch, dtype=dtype).to(device)


def _reference(arch: str, spec, batches, loss_of=_loss, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """``[(activations, gradients)]`` per batch, each ``{hook: [b, t, ...]}`` on the CPU, from an
    uncaptured run."""
    model = _model(arch, device, dtype)
    points = resolve_hook_points(model, spec)
    out = []
    for ids, mask in batches:
        kept: dict[str, torch.Tensor] = {}
        handles = []
        for hp in points:
            def keep(module, args, output, name=hp.name):
                kept[name] = output[0] if isinstance(output, tuple) else output
            handles.append(model.get_submodule(hp.module_name).register_forward_hook(keep))
        try:
            logits = model(ids.to(device), attention_mask=mask.to(device)).logits
        finally:
            for h in handles:
                h.remove()
        names = list(kept)
        grads = torch.autograd.grad(loss_of(logits, ids.to(device), mask.to(device)), [kept[n] for n in names])
        out.append(({n: kept[n].detach().cpu() for n in names}, {n: g.cpu() for n, g in zip(names, grads)}))
    return out


def _keep(mask: torch.Tensor, drop_bos: bool = False, window: tuple[int, int] | None = None) -> torch.Tensor:
    """``[b, t]`` bool: the positions a capture stores (row-major order is the store's)."""
    position = mask.cumsum(1) - 1
    keep = mask.bool()
    if drop_bos:
        keep &= position != 0
    if window is not None:
        keep &= (position >= window[0]) & (position < window[1])
    return keep


def _capture(tmp_path, arch: str, batches, *, backward=(True,), loss_of=_loss, device: str = "cpu",
             dtype: torch.dtype = torch.float32, **cfg):
    """Capture each batch with grad enabled; ``backward[i]`` (cycled): run its loss backward."""
    model = _model(arch, device, dtype)
    fw = InstrumentationFramework(InstrumentationConfig(capture_gradients=True, **cfg))
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "acts"):
        for i, (ids, mask) in enumerate(batches):
            ids, mask = ids.to(device), mask.to(device)
            logits = model(ids, attention_mask=mask).logits
            if backward[i % len(backward)]:
                loss_of(logits, ids, mask).backward()
    return ActivationStore(tmp_path / "acts"), fw.stats()


@pytest.mark.parametrize("arch, cfg", [
    ("llama", {"granularity": "all"}),
    ("gpt2", {"granularity": "all"}),
    ("llama", {"granularity": "residual", "drop_bos": True}),
    ("gpt2", {"granularity": "residual", "position_window": (2, 7)}),
    ("llama", {"hooks": "blocks.*.hook_mlp_out", "storage_dtype": "bfloat16", "compression_algorithm": "lz4"}),
])
def test_gradient_rows_equal_autograd_row_for_row_with_the_forward_rows(tmp_path, arch, cfg):
    batches = [_batch(0), _batch(1)]
    store, stats = _capture(tmp_path, arch, batches, **cfg)
    grads = ActivationStore(tmp_path / "acts" / "gradients")
    assert store.verify().ok and grads.verify().ok
    assert set(grads.hooks) == {f"{h}.grad" for h in store.hooks}
    assert grads.rows == store.rows == stats["gradient_rows"] and stats["gradient_batches"] == 2
    assert torch.equal(grads.tokens["forward_row"][:], torch.arange(store.rows))
    for name in TOKEN_FIELDS:
        assert torch.equal(grads.tokens[name][:], store.tokens[name][:]), name
    spec = cfg.get("hooks") or cfg["granularity"]
    ref = _reference(arch, spec, batches)
    keeps = [_keep(mask, cfg.get("drop_bos", False), cfg.get("position_window")) for _, mask in batches]
    dtype = getattr(torch, cfg.get("storage_dtype") or "float32")
    for hook in store.hooks:
        want_act = torch.cat([acts[hook][k] for (acts, _), k in zip(ref, keeps)]).to(dtype)  # [rows, d]
        want_grad = torch.cat([g[hook][k] for (_, g), k in zip(ref, keeps)]).to(dtype)
        assert grads[f"{hook}.grad"].dtype == store[hook].dtype == dtype
        torch.testing.assert_close(store[hook][:], want_act, rtol=0, atol=0)  # the rows are the same tokens
        torch.testing.assert_close(grads[f"{hook}.grad"][:], want_grad, rtol=1e-5, atol=1e-7)
        assert want_grad.abs().sum() > 0


def test_with_capture_gradients_off_a_backward_writes_nothing_more(tmp_path):
    batches = [_batch(0)]
    on, _ = _capture(tmp_path / "on", "llama", batches, granularity="residual")
    model = tiny_model("llama")
    fw = InstrumentationFramework(InstrumentationConfig(granularity="residual"))
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "off" / "acts"):
        ids, mask = batches[0]
        _loss(model(ids, attention_mask=mask).logits, ids, mask).backward()
    off = ActivationStore(tmp_path / "off" / "acts")
    assert sorted(p.name for p in (tmp_path / "off" / "acts").iterdir()) == sorted(
        p.name for p in (tmp_path / "on" / "acts").iterdir() if p.name != "gradients")
    assert not (tmp_path / "off" / "acts" / "gradients").exists()
    assert "gradient_rows" not in fw.stats()
    assert list(off.hooks) == list(on.hooks) and off.rows == on.rows
    for hook in off.hooks:  # the forward rows do not change with gradients on
        assert off[hook].numpy(slice(None)).tobytes() == on[hook].numpy(slice(None)).tobytes()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_without_grad_nothing_is_hooked_and_one_warning_says_so(tmp_path, mode):
    model = tiny_model("llama")
    fw = InstrumentationFramework(InstrumentationConfig(granularity="residual", capture_gradients=True))
    fw.instrument_model(model)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with pytest.warns(UserWarning, match="no captured activation of the first batch requires grad") as record:
        with fw.capture_activations(tmp_path / "acts"), ctx():
            for seed in range(3):
                ids, mask = _batch(seed)
                model(ids, attention_mask=mask)
    assert sum("requires grad" in str(w.message) for w in record) == 1
    store = ActivationStore(tmp_path / "acts")
    grads = ActivationStore(tmp_path / "acts" / "gradients")
    assert store.rows == 3 * int(_batch(0)[1].sum()) and grads.rows == 0 and not grads.hooks
    assert fw.stats()["gradient_batches"] == 0


def test_no_warning_when_the_first_batch_requires_grad(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _capture(tmp_path, "llama", [_batch(0)], granularity="residual")


def test_a_batch_that_no_backward_reaches_stores_no_gradient_rows(tmp_path):
    batches = [_batch(0), _batch(1), _batch(2)]
    store, stats = _capture(tmp_path, "llama", batches, backward=(False, True, False), granularity="residual")
    grads = ActivationStore(tmp_path / "acts" / "gradients")
    rows = [int(m.sum()) for _, m in batches]
    assert store.rows == sum(rows) and grads.rows == rows[1] and stats["gradient_batches"] == 1
    assert torch.equal(grads.tokens["forward_row"][:], torch.arange(rows[0], rows[0] + rows[1]))
    fwd_rows = grads.tokens["forward_row"][:]
    for name in TOKEN_FIELDS:  # forward_row joins each gradient row to its activation row
        assert torch.equal(grads.tokens[name][:], store.tokens[name][fwd_rows]), name
    _, ref = _reference("llama", "residual", batches[1:2])[0]
    for hook in store.hooks:
        torch.testing.assert_close(grads[f"{hook}.grad"][:], ref[hook][batches[1][1].bool()], rtol=1e-5, atol=1e-7)


def test_one_backward_through_two_forwards_stores_both_gradient_batches(tmp_path):
    """Summed losses of two forwards: the second forward's gradients arrive first."""
    batches = [_batch(0), _batch(1)]
    model = tiny_model("llama")
    fw = InstrumentationFramework(InstrumentationConfig(granularity="all", capture_gradients=True))
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "acts"):
        losses = [_loss(model(ids, attention_mask=mask).logits, ids, mask) for ids, mask in batches]
        sum(losses).backward()
    store = ActivationStore(tmp_path / "acts")
    grads = ActivationStore(tmp_path / "acts" / "gradients")
    assert grads.rows == store.rows and fw.stats()["gradient_batches"] == 2
    order = torch.argsort(grads.tokens["forward_row"][:])  # batches are stored in the order they end
    assert torch.equal(grads.tokens["forward_row"][:][order], torch.arange(store.rows))
    ref = _reference("llama", "all", batches)  # d(l0 + l1)/d(act of batch i) = d(l_i)/d(act)
    for hook in store.hooks:
        want = torch.cat([g[hook][m.bool()] for (_, g), (_, m) in zip(ref, batches)])
        torch.testing.assert_close(grads[f"{hook}.grad"][:][order], want, rtol=1e-5, atol=1e-7)


def test_hook_points_the_backward_does_not_reach_get_zero_rows(tmp_path):
    """A loss read from layer 0's output does not depend on layer 1: its gradient is zero."""
    model = tiny_model("llama")
    fw = InstrumentationFramework(InstrumentationConfig(granularity="residual", capture_gradients=True))
    fw.instrument_model(model)
    kept = {}
    model.model.layers[0].register_forward_hook(
        lambda m, a, out: kept.__setitem__("x", out[0] if isinstance(out, tuple) else out))
    ids, mask = _batch(0)
    with fw.capture_activations(tmp_path / "acts"):
        model(ids, attention_mask=mask)
        kept["x"].pow(2).sum().backward()
    grads = ActivationStore(tmp_path / "acts" / "gradients")
    want = (2 * kept["x"].detach())[mask.bool()]
    torch.testing.assert_close(grads["blocks.0.hook_resid_post.grad"][:], want)
    assert torch.count_nonzero(grads["blocks.1.hook_resid_post.grad"][:]) == 0
    assert fw.stats()["gradient_zero_filled"] == 1


def test_appended_capture_continues_forward_rows(tmp_path):
    batches = [_batch(0), _batch(1)]
    model = tiny_model("llama")
    fw = InstrumentationFramework(InstrumentationConfig(granularity="residual", capture_gradients=True))
    fw.instrument_model(model)
    for i, (ids, mask) in enumerate(batches):
        with fw.capture_activations(tmp_path / "acts", mode="create" if i == 0 else "append"):
            _loss(model(ids, attention_mask=mask).logits, ids, mask).backward()
    store = ActivationStore(tmp_path / "acts")
    grads = ActivationStore(tmp_path / "acts" / "gradients")
    assert grads.rows == store.rows
    assert torch.equal(grads.tokens["forward_row"][:], torch.arange(store.rows))
    assert torch.equal(grads.tokens["sequence_id"][:], store.tokens["sequence_id"][:])


def test_the_memory_cap_bounds_the_pool_and_both_writers(tmp_path):
    cap = 0.05
    store, stats = _capture(tmp_path, "llama", [_batch(0), _batch(1)], granularity="all", max_memory_gb=cap)
    assert stats["host_pool_bytes"] + stats["writer_max_buffer_bytes"] + \
        stats["gradient_writer_max_buffer_bytes"] <= cap * 1e9
    assert stats["gradient_writer_peak_buffered_bytes"] <= stats["gradient_writer_max_buffer_bytes"]
    assert stats["host_pool_peak_bytes"] <= stats["host_pool_bytes"]
    assert ActivationStore(tmp_path / "acts" / "gradients").rows == store.rows


def test_overwrite_without_gradients_removes_an_earlier_gradient_store(tmp_path):
    _capture(tmp_path, "llama", [_batch(0)], granularity="residual")
    assert (tmp_path / "acts" / "gradients" / "manifest.json").exists()
    model = tiny_model("llama")
    fw = InstrumentationFramework(InstrumentationConfig(granularity="residual"))
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "acts", mode="overwrite"), torch.no_grad():
        model(*_batch(1))
    assert not (tmp_path / "acts" / "gradients").exists()


class _Keep(ActivationSink):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def on_batch_start(self, rows, tokens):
        self.batches.append(({k: v.clone() for k, v in tokens.items()}, {}))

    def on_rows(self, hook, rows, start):
        assert start == 0
        self.batches[-1][1][hook] = rows.clone()


def test_a_sink_receives_gradient_batches_after_their_forward(tmp_path):
    batches = [_batch(0), _batch(1)]
    model = tiny_model("gpt2")
    fw = InstrumentationFramework(InstrumentationConfig(granularity="residual", capture_gradients=True))
    fw.instrument_model(model)
    sink = _Keep()
    with fw.capture_activations(sink=sink):
        for ids, mask in batches:
            _loss(model(ids, attention_mask=mask).logits, ids, mask).backward()
    assert [sorted(rows) for _, rows in sink.batches] == [
        ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
        ["blocks.0.hook_resid_post.grad", "blocks.1.hook_resid_post.grad"]] * 2
    ref = _reference("gpt2", "residual", batches)
    start = 0
    for i, (_, mask) in enumerate(batches):
        (ftok, fwd), (gtok, grad) = sink.batches[2 * i], sink.batches[2 * i + 1]
        n = int(mask.sum())
        assert torch.equal(gtok["forward_row"], torch.arange(start, start + n))
        for name in TOKEN_FIELDS:
            assert torch.equal(gtok[name], ftok[name])
        for hook in fwd:
            torch.testing.assert_close(grad[f"{hook}.grad"], ref[i][1][hook][mask.bool()], rtol=1e-5, atol=1e-7)
        start += n


# ---------------------------------------------------------------- Lightning


def _samples(n: int, seq: int = 10) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        ids, mask = _batch(i, t=seq)
        out.append({"input_ids": ids[i % 3], "attention_mask": mask[i % 3], "sequence_id": torch.tensor(i)})
    return out


class _Trained(L.LightningModule):
    """Keeps the captured hook points' outputs with ``retain_grad`` and, after each backward,
    their gradients: the reference."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_model("llama").train()
        self.kept: dict[str, torch.Tensor] = {}
        self.reference: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        for i, layer in enumerate(self.model.model.layers):
            layer.register_forward_hook(self._keep(f"blocks.{i}.hook_resid_post"))

    def _keep(self, name):
        def hook(module, args, output):
            if torch.is_grad_enabled():
                x = output[0] if isinstance(output, tuple) else output
                x.retain_grad()
                self.kept[name] = x
        return hook

    def training_step(self, batch, batch_idx):
        self.mask = batch["attention_mask"]
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return _loss(logits, batch["input_ids"], batch["attention_mask"])

    def on_after_backward(self):
        self.reference.append((self.mask.bool(), {n: x.grad.detach().clone() for n, x in self.kept.items()}))

    def validation_step(self, batch, batch_idx):
        self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(cb, **kw):
    return L.Trainer(accelerator="cpu", devices=1, callbacks=[cb], logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=cb.output_path, **kw)


def test_lightning_fit_stores_the_gradients_of_each_training_step(tmp_path):
    cb = ActivationCapture(tmp_path / "acts", granularity="residual", stages=["fit"], capture_gradients=True,
                           codec="lz4")
    lm = _Trained()
    _trainer(cb, max_steps=3, limit_val_batches=0).fit(lm, DataLoader(_samples(6), batch_size=2))
    store = ActivationStore(tmp_path / "acts" / "fit")
    grads = ActivationStore(tmp_path / "acts" / "fit" / "gradients")
    assert len(lm.reference) == 3 and cb.stats()["gradient_batches"] == 3
    assert grads.rows == store.rows and torch.equal(grads.tokens["forward_row"][:], torch.arange(store.rows))
    assert torch.equal(grads.tokens["sequence_id"][:], store.tokens["sequence_id"][:])
    for hook in store.hooks:
        want = torch.cat([g[hook][mask] for mask, g in lm.reference])
        torch.testing.assert_close(grads[f"{hook}.grad"][:], want, rtol=1e-5, atol=1e-7)
    assert grads.metadata["gradients"]["row_field"] == "forward_row"


def test_lightning_validate_runs_without_grad_and_warns(tmp_path):
    cb = ActivationCapture(tmp_path / "acts", granularity="residual", capture_gradients=True)
    with pytest.warns(UserWarning, match="no captured activation of the first batch requires grad"):
        _trainer(cb).validate(_Trained(), DataLoader(_samples(4), batch_size=2))
    assert ActivationStore(tmp_path / "acts" / "validate").rows > 0
    assert ActivationStore(tmp_path / "acts" / "validate" / "gradients").rows == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_a_gpu_gradient_rows_equal_autograd_row_for_row(tmp_path, dtype):
    """The GPU path: tensor hooks on the autograd engine's device thread, the GPU ring, the
    pinned pool; a second step whose backward runs through two forwards at once."""
    batches = [_batch(0), _batch(1)]
    cfg = {"granularity": "all", "drop_bos": True, "compression_algorithm": "zstd"}
    store, stats = _capture(tmp_path / "one", "llama", batches, device="cuda", dtype=dtype, **cfg)
    grads = ActivationStore(tmp_path / "one" / "acts" / "gradients")
    assert grads.rows == store.rows == stats["gradient_rows"] and grads.verify().ok
    assert torch.equal(grads.tokens["forward_row"][:], torch.arange(store.rows))
    ref = _reference("llama", "all", batches, device="cuda", dtype=dtype)
    keeps = [_keep(mask, drop_bos=True) for _, mask in batches]
    for hook in store.hooks:
        want = torch.cat([g[hook][k] for (_, g), k in zip(ref, keeps)])
        torch.testing.assert_close(grads[f"{hook}.grad"][:], want)
    model = _model("llama", "cuda", dtype)  # one backward through two forwards
    fw = InstrumentationFramework(InstrumentationConfig(capture_gradients=True, **cfg))
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "two" / "acts"):
        sum(_loss(model(ids.cuda(), attention_mask=mask.cuda()).logits, ids.cuda(), mask.cuda())
            for ids, mask in batches).backward()
    two = ActivationStore(tmp_path / "two" / "acts" / "gradients")
    order = torch.argsort(two.tokens["forward_row"][:])
    assert torch.equal(two.tokens["forward_row"][:][order], torch.arange(store.rows))
    for hook in store.hooks:
        want = torch.cat([g[hook][k] for (_, g), k in zip(ref, keeps)])
        torch.testing.assert_close(two[f"{hook}.grad"][:][order], want)


def test_capture_gradients_must_be_a_bool(tmp_path):
    with pytest.raises(ValueError) as err:
        InstrumentationConfig(capture_gradients="yes")
    assert str(err.value) == "InstrumentationConfig.capture_gradients='yes' is not valid; use True or False"
    with pytest.raises(ValueError) as err:
        ActivationCapture(tmp_path, capture_gradients=1)
    assert str(err.value) == "ActivationCapture: capture_gradients=1 is not valid; use True or False"
    assert InstrumentationConfig(capture_gradients=True).to_dict()["capture_gradients"] is True
