"""The pack step: captured tensor -> the bytes of its stored rows, in one destination buffer.

Stage: inside a forward hook, on the compute stream. ``pack_rows`` gathers the selected
token rows, casts them to the storage dtype and, when the store shuffles, lays them out as
byte planes (byte ``b`` of every element in plane ``b``: HDF5's shuffle order), so that
neither the copy to the host nor the CPU has to touch individual bytes again. With
``group_rows`` the planes are laid out per group of that many rows -- one HDF5 chunk each --
so every chunk is one contiguous run the writer can compress where it lies. The result
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
                    shuffle: bool, group_rows: int | None = None) -> torch.Tensor:
    """Pack rows of ``x`` into ``out``.

    Args:
        x: ``[tokens, *feature]`` (any strides); row ``i`` is token ``i``.
        index: ``[rows]`` int64 rows to keep, in order; ``None`` keeps all.
        dtype: storage dtype (the rows are cast to it).
        out: uint8, ``rows * prod(feature) * itemsize`` bytes, contiguous, on ``x``'s device.
        shuffle: write byte planes ``[itemsize, rows * F]`` instead of row-major bytes.
        group_rows: with ``shuffle``, lay the planes out per group of this many rows: group
            ``g`` (rows ``g * R .. min((g + 1) * R, rows)``) is ``[itemsize, rows_g * F]``, the
            groups one after another. ``None`` (or ``>= rows``): one group.

    Returns ``out`` viewed as ``[itemsize, rows * F]`` if ``shuffle`` with one group, else flat.
    """
    if group_rows is not None and (isinstance(group_rows, bool) or not isinstance(group_rows, int) or group_rows < 1):
        raise ValueError(f"group_rows must be None or a positive integer, got {group_rows!r}")
    rows = x.reshape(x.shape[0], -1)  # [tokens, F]
    if not shuffle:  # row-major: gather and cast straight into ``out``, no temporary of the rows
        n_rows = rows.shape[0] if index is None else index.numel()
        itemsize = torch.empty((), dtype=dtype).element_size()
        if out.numel() != n_rows * rows.shape[1] * itemsize or out.dtype != torch.uint8:
            raise ValueError(f"out must be uint8 with {n_rows * rows.shape[1] * itemsize} bytes, got {out.dtype} "
                             f"with {out.numel()}")
        dst = out.view(dtype).view(n_rows, rows.shape[1])  # [rows, F]
        if index is None:
            dst.copy_(rows)
        elif rows.dtype == dtype:
            torch.index_select(rows, 0, index, out=dst)
        else:
            dst.copy_(rows.index_select(0, index))
        return out
    if index is not None:
        rows = rows.index_select(0, index)  # [rows, F]
    rows = rows.to(dtype)
    itemsize = rows.element_size()
    n_elems = rows.numel()
    if out.numel() != n_elems * itemsize or out.dtype != torch.uint8:
        raise ValueError(f"out must be uint8 with {n_elems * itemsize} bytes, got {out.dtype} with {out.numel()}")
    raw = rows.contiguous().view(torch.uint8).reshape(n_elems, itemsize)  # [rows * F, itemsize]
    n_rows = rows.shape[0]
    if shuffle and group_rows is not None and group_rows < n_rows:
        f = rows.shape[1]
        full = n_rows // group_rows
        head = full * group_rows * f  # elements in full groups
        out[: head * itemsize].view(full, itemsize, group_rows * f).copy_(
            raw[:head].reshape(full, group_rows * f, itemsize).transpose(1, 2))
        if head < n_elems:
            out[head * itemsize :].view(itemsize, n_elems - head).copy_(raw[head:].t())
        return out
    if shuffle:
        planes = out.view(itemsize, n_elems)
        planes.copy_(raw.t())
        return planes
    out.copy_(raw.reshape(-1))
    return out


def pack_rows(x: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype, out: torch.Tensor, shuffle: bool,
              impl: str = "torch", group_rows: int | None = None) -> torch.Tensor:
    """Pack with the chosen implementation (``"torch"`` or ``"cuda"``)."""
    if impl == "cuda":
        from lightning_llm_inst.buffer import _backend

        return _backend.pack_rows_cuda(x, index, dtype, out, shuffle, group_rows)
    return pack_rows_torch(x, index, dtype, out, shuffle, group_rows)
