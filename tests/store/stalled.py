"""A store writer whose commits wait for the test: a disk that has stalled."""

from __future__ import annotations

import threading

from lightning_llm_inst.store import StoreWriter


class GatedCommits(StoreWriter):
    """Commits wait until the test opens ``gate``."""

    def __init__(self, *args, **kwargs):
        self.gate = threading.Event()
        super().__init__(*args, **kwargs)

    def publish_shard(self, shard):
        self.gate.wait()
        super().publish_shard(shard)
