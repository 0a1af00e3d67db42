"""GPU: the CUDA pack kernel's bytes equal the torch path's, and a GPU capture equals a CPU
capture of the same model and inputs. Marked ``gpu``: skipped where there is no CUDA."""

from __future__ import annotations

import pytest
import torch

from lightning_llm_inst.buffer.pack import pack_rows

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _both(x, index, dtype, shuffle, group_rows=None):
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = x.shape[0] if index is None else index.numel()
    n = rows * (x.numel() // max(1, x.shape[0])) * itemsize
    outs = []
    for impl in ("torch", "cuda"):
        out = torch.full((n,), 0xAB, dtype=torch.uint8, device="cuda")
        pack_rows(x, index, dtype, out, shuffle, impl=impl, group_rows=group_rows)
        outs.append(out.cpu())
    return outs


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("shape", [(8 * 1024, 2048), (777, 576), (1000, 3), (5, 4)])
def test_kernel_bytes_equal_torch(in_dtype, out_dtype, shuffle, shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(*shape, device="cuda", generator=g) * 300).to(in_dtype)
    x.view(-1)[::97] = float("inf")
    x.view(-1)[1::89] = float("nan")
    index = torch.nonzero(torch.rand(shape[0], device="cuda", generator=g) > 0.3).squeeze(1)
    a, b = _both(x, index, out_dtype, shuffle)
    assert torch.equal(a, b)
    a, b = _both(x, None, out_dtype, shuffle)  # full mask
    assert torch.equal(a, b)
    a, b = _both(x, index[:0], out_dtype, shuffle)  # empty mask
    assert a.numel() == b.numel() == 0


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 7, 256, 300, 5000])
def test_kernel_grouped_planes_equal_torch(in_dtype, out_dtype, group):
    g = torch.Generator(device="cuda").manual_seed(2)
    x = (torch.randn(2 * 1024 + 37, 576, device="cuda", generator=g) * 30).to(in_dtype)
    index = torch.nonzero(torch.rand(x.shape[0], device="cuda", generator=g) > 0.1).squeeze(1)
    for idx in (index, None):
        a, b = _both(x, idx, out_dtype, True, group_rows=group)
        assert torch.equal(a, b)
    strided = x.t().contiguous().t()  # same values, column-major
    a, b = _both(strided, index, out_dtype, True, group_rows=group)
    assert torch.equal(a, b)


@pytest.mark.parametrize("group", [None, 128, 1000])
@pytest.mark.parametrize("shuffle", [False, True])
def test_fused_pack_copy_lands_the_packed_bytes_in_pinned_memory(group, shuffle):
    from lightning_llm_inst.buffer import _backend

    x = torch.randn(4, 777, 256, device="cuda", dtype=torch.bfloat16)[:, 5:]  # [4, 772, 256], strided
    tokens = 4 * 772
    index = torch.nonzero(torch.rand(tokens, device="cuda") > 0.2).squeeze(1)
    ring = torch.zeros(64 << 20, dtype=torch.uint8, device="cuda")
    host = torch.zeros(64 << 20, dtype=torch.uint8, pin_memory=True)
    side = torch.cuda.Stream()
    events = _backend.EventPool()
    for idx, dtype, offset in ((index, torch.float16, 4096), (None, torch.bfloat16, 1 << 20), (index[:0], torch.float32, 0)):
        rows = tokens if idx is None else idx.numel()
        nbytes = rows * 256 * dtype.itemsize
        expect = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        pack_rows(x.reshape(tokens, 256), idx, dtype, expect, shuffle, impl="torch", group_rows=group)
        packed, copied = events.get(), events.get()
        assert _backend.fused_eligible(x, dtype, 256)
        _backend.pack_copy(x, tokens, idx, dtype, ring, offset, nbytes, shuffle, group, host.data_ptr() + offset,
                           side.cuda_stream, packed, copied)
        events.synchronize(copied)
        assert torch.equal(host[offset : offset + nbytes], expect.cpu())
        assert torch.equal(ring[offset : offset + nbytes].cpu(), expect.cpu())
        events.put(packed)
        events.put(copied)
    events.close()


@pytest.mark.parametrize("shuffle", [False, True])
def test_kernel_noncontiguous_input(shuffle):
    x = torch.randn(2048, 1031, device="cuda", dtype=torch.bfloat16).t()  # [1031, 2048], strided
    index = torch.arange(0, 1031, 3, device="cuda")
    a, b = _both(x, index, torch.bfloat16, shuffle)
    assert torch.equal(a, b)
    y = torch.randn(4, 333, 96, device="cuda")[:, ::2]  # strided 3-D
    a, b = _both(y.reshape(-1, 96), None, torch.float16, shuffle)
    assert torch.equal(a, b)


def test_gpu_capture_of_a_llama_matches_cpu_within_kernel_rounding(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_llm_inst import HookGranularity, InstrumentationConfig, InstrumentationFramework
    from lightning_llm_inst.store import ActivationStore

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (3, 17))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[0, :5] = 0
    stores = {}
    for device in ("cpu", "cuda"):
        m = model.to(device)
        fw = InstrumentationFramework(InstrumentationConfig(granularity=HookGranularity.ALL,
                                                            storage_dtype="bfloat16"))
        fw.instrument_model(m)
        with torch.no_grad(), fw.capture_activations(tmp_path / device):
            m(ids.to(device), attention_mask=mask.to(device))
        stores[device] = ActivationStore(tmp_path / device)
    cpu, gpu = stores["cpu"], stores["cuda"]
    assert cpu.rows == gpu.rows == int(mask.sum())
    for name in ("input_ids", "sequence_id", "position", "step"):
        assert torch.equal(cpu.tokens[name][:], gpu.tokens[name][:])
    # the embedding is computed identically on both devices, so the first residual read
    # must match exactly in the stored dtype; deeper layers may differ by kernel rounding
    for hook in cpu.hooks:
        a, b = cpu[hook][:].float(), gpu[hook][:].float()
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


class _Block(torch.nn.Module):
    def __init__(self, d: int, g: torch.Generator) -> None:
        super().__init__()
        self.attn = torch.nn.Linear(d, d, bias=False)
        self.mlp = torch.nn.Linear(d, d, bias=False)
        with torch.no_grad():  # weights in {-1, 0, 1}: every sum is an exact small integer
            self.attn.weight.copy_(torch.randint(-1, 2, (d, d), generator=g).float())
            self.mlp.weight.copy_(torch.randint(-1, 2, (d, d), generator=g).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + torch.relu(self.mlp(x))


class _ExactModel(torch.nn.Module):
    """Integer arithmetic in float32: the same values on any device, so the two captures
    must agree byte for byte."""

    def __init__(self, vocab: int = 50, d: int = 24, layers: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, d)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randint(-3, 4, (vocab, d), generator=g).float())
        self.layers = torch.nn.ModuleList(_Block(d, g) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("storage_dtype", [None, "bfloat16", "float16"])
@pytest.mark.parametrize("codec", ["zstd", "lz4", None])
@pytest.mark.parametrize("whole_chunks", [False, True])
def test_gpu_capture_equals_cpu_capture_byte_for_byte(tmp_path, storage_dtype, codec, whole_chunks):
    from lightning_llm_inst import HookGranularity, InstrumentationConfig, InstrumentationFramework
    from lightning_llm_inst.store import ActivationStore

    torch.backends.cuda.matmul.allow_tf32 = False
    model = _ExactModel().eval()
    ids = torch.randint(0, 50, (4, 33), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 33, dtype=torch.long)
    mask[1, :7] = 0
    mask[3, 20:] = 0
    stores = {}
    for device in ("cpu", "cuda"):
        m = model.to(device)
        # whole_chunks: 16 rows a chunk, so each forward's 112 rows after the first are 7 whole
        # chunks, packed per chunk on the GPU and compressed where they lie in pinned memory
        itemsize = 4 if storage_dtype is None else 2
        cfg = InstrumentationConfig(granularity=HookGranularity.ALL, storage_dtype=storage_dtype,
                                    compression_algorithm=codec,
                                    chunk_size=16 * 24 * itemsize if whole_chunks else "1MiB")
        fw = InstrumentationFramework(cfg)
        fw.instrument_model(m)
        with torch.no_grad(), fw.capture_activations(tmp_path / device):
            for _ in range(3):
                m(ids.to(device), attention_mask=mask.to(device))
        stats = fw.stats()
        if device == "cuda":
            assert stats["host_pool_pinned"]
        if whole_chunks:
            assert stats["writer_zero_copy_chunks"] >= 2 * 7 * 9, device
        stores[device] = ActivationStore(tmp_path / device)
    cpu, gpu = stores["cpu"], stores["cuda"]
    assert set(cpu.hooks) == set(gpu.hooks) and len(cpu.hooks) == 9
    assert cpu.rows == gpu.rows == 3 * int(mask.sum())
    for hook in cpu.hooks:
        assert cpu[hook].numpy(slice(None)).tobytes() == gpu[hook].numpy(slice(None)).tobytes(), hook
    for name in cpu.token_fields:
        assert torch.equal(cpu.tokens[name][:], gpu.tokens[name][:])
    assert gpu.verify().ok
