"""Merging per-rank manifests of a DDP capture into the store's top-level manifest.

Stage: end of a distributed capture. Each rank writes its own shards and manifest under
``rank<N>/``; after a barrier, rank 0 calls :func:`merge_rank_manifests`, which lists every
rank's committed shards (paths relative to the store root) in ``manifest.json``. Each rank's
manifest is checked first (:mod:`.manifest`): a malformed one, or a shard path outside its
rank folder, is a :class:`~lightning_llm_inst.store.format.StoreError`.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning_llm_inst.store.format import MANIFEST, StoreError, read_manifest, write_json_atomic
from lightning_llm_inst.store.manifest import shard_path

__all__ = ["merge_manifest_dicts", "merge_rank_manifests"]

_SUMMED = ("rows", "raw_bytes", "stored_bytes")


def merge_manifest_dicts(parts: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Combine ``[(subdir, manifest), ...]`` into one manifest whose shard files are
    ``subdir/shard-...``. Hook points, dtypes and codecs must agree across parts."""
    if not parts:
        raise StoreError("no per-rank manifests to merge")
    first = parts[0][1]
    merged: dict[str, Any] = {k: v for k, v in first.items() if k not in ("shards", "hooks", "tokens")}
    merged.update(shards=[], rows=0, ranks=[], dropped={"batches": 0, "rows": 0}, recovered=[],
                  hooks=None, tokens=None, updated=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    for sub, m in parts:
        if m["codec"] != first["codec"]:
            raise StoreError(f"{sub}: codec {m['codec']} differs from {parts[0][0]}'s {first['codec']}")
        for key in ("hooks", "tokens"):
            theirs = m.get(key)
            if theirs is None:
                continue
            if merged[key] is None:
                merged[key] = {n: dict(d) for n, d in theirs.items()}
                continue
            if set(theirs) != set(merged[key]):
                raise StoreError(f"{sub}: {key} {sorted(theirs)} differ from the other ranks' {sorted(merged[key])}")
            for n, d in theirs.items():
                mine = merged[key][n]
                if (d["dtype"], d.get("shape"), d["chunk_rows"]) != (mine["dtype"], mine.get("shape"), mine["chunk_rows"]):
                    raise StoreError(f"{sub}: {key[:-1]} {n!r} is {d['dtype']} {d.get('shape')}, other ranks have "
                                     f"{mine['dtype']} {mine.get('shape')}")
                for s in _SUMMED:
                    mine[s] = mine.get(s, 0) + d.get(s, 0)
        for sh in m["shards"]:
            merged["shards"].append({**sh, "file": f"{sub}/{sh['file']}" if sub else sh["file"]})
        merged["rows"] += m["rows"]
        merged["ranks"].append(sub)
        merged["dropped"]["batches"] += m.get("dropped", {}).get("batches", 0)
        merged["dropped"]["rows"] += m.get("dropped", {}).get("rows", 0)
        merged["recovered"] += [{**r, "file": f"{sub}/{r['file']}"} for r in m.get("recovered", [])]
    return merged


def merge_rank_manifests(root: str | os.PathLike, world_size: int) -> dict[str, Any]:
    """Write ``root/manifest.json`` listing the shards of ``root/rank0 .. rank<world_size-1>``."""
    root = Path(root)
    parts = []
    for r in range(world_size):
        sub = f"rank{r}"
        if not (root / sub / MANIFEST).exists():
            raise StoreError(f"cannot merge the store at {os.fspath(root)!r}: {sub}/{MANIFEST} is missing")
        m = read_manifest(root / sub)
        for i, sh in enumerate(m["shards"]):  # a rank's shards lie in its own folder
            shard_path(root / sub, sh["file"], f"shards[{i}].file", root / sub / MANIFEST)
        parts.append((sub, m))
    merged = merge_manifest_dicts(parts)
    write_json_atomic(root / MANIFEST, merged)
    return merged
