"""The pack step: captured tensor -> the bytes of its stored rows, in one destination buffer.

Stage: inside a forward hook, on the compute stream. ``pack_rows`` gathers the selected
token rows, casts them to the storage dtype and, when the store shuffles, lays them out as
byte planes (byte ``b`` of every element in plane ``b``: HDF5's shuffle order), so that
neither the copy to the host nor the CPU has to touch individual bytes again. The result
lands in a slice of the ring buffer and goes to the writer's ``add_packed``.

``pack_rows_torch`` is the reference; a CUDA kernel with the same signature must produce
the same bytes (``impl`` picks one; see :mod:`._backend`).
"""

from __future__ import annotations

import torch

__all__ = ["pack_rows", "pack_rows_torch", "packed_nbytes"]


def packed_nbytes(rows: int, row_elems: int, dtype: torch.dtype) -> int:
    return rows * row_elems * torch.empty((), dtype=dtype).element_size()


def pack_rows_torch(x: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype, out: torch.Tensor,
                    shuffle: bool) -> torch.Tensor:
    """Pack rows of ``x`` into ``out``.

    Args:
        x: ``[tokens, *feature]`` (any strides); row ``i`` is token ``i``.
        index: ``[rows]`` int64 rows to keep, in order; ``None`` keeps all.
        dtype: storage dtype (the rows are cast to it).
        out: uint8, ``rows * prod(feature) * itemsize`` bytes, contiguous, on ``x``'s device.
        shuffle: write byte planes ``[itemsize, rows * F]`` instead of row-major bytes.

    Returns ``out`` viewed as ``[itemsize, rows * F]`` if ``shuffle`` else ``[rows * F * itemsize]``.
    """
    rows = x.reshape(x.shape[0], -1)  # [tokens, F]
    if index is not None:
        rows = rows.index_select(0, index)  # [rows, F]
    rows = rows.to(dtype)
    itemsize = rows.element_size()
    n_elems = rows.numel()
    if out.numel() != n_elems * itemsize or out.dtype != torch.uint8:
        raise ValueError(f"out must be uint8 with {n_elems * itemsize} bytes, got {out.dtype} with {out.numel()}")
    raw = rows.contiguous().view(torch.uint8).reshape(n_elems, itemsize)  # [rows * F, itemsize]
    if shuffle:
        planes = out.view(itemsize, n_elems)
        planes.copy_(raw.t())
        return planes
    out.copy_(raw.reshape(-1))
    return out


def pack_rows(x: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype, out: torch.Tensor, shuffle: bool,
              impl: str = "torch") -> torch.Tensor:
    """Pack with the chosen implementation (``"torch"`` or ``"cuda"``)."""
    if impl == "cuda":
        from lightning_llm_inst.buffer import _backend

        return _backend.pack_rows_cuda(x, index, dtype, out, shuffle)
    return pack_rows_torch(x, index, dtype, out, shuffle)
