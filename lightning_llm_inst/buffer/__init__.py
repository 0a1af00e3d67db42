"""Buffers between the model and the store writer: the pack step and the ring buffers."""

from lightning_llm_inst.buffer.pack import pack_rows, pack_rows_torch
from lightning_llm_inst.buffer.ring_buffer import ByteRing, CaptureBuffers

__all__ = ["ByteRing", "CaptureBuffers", "pack_rows", "pack_rows_torch"]
