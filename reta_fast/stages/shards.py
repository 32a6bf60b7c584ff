"""How the items ``(class c, index i)`` of a distilled set are cut into recover batches and shared out
over torchrun ranks: a fixed order, so shards never depend on what already exists."""
from __future__ import annotations

from typing import List

from .config import DistillConfig

__all__ = ["shard_batches", "shard_items"]


def shard_batches(cfg: DistillConfig, C: int, rank: int, world_size: int):
    """Recover methods: the batch shape, the class groups and this rank's batches ``(ipc start, group)``
    of the slice ``[cfg.ipc_start, cfg.end)``: every ``world_size``-th batch of a fixed order."""
    bc, ipb = cfg.batch_shape(C)
    groups = [list(range(a, min(C, a + bc))) for a in range(0, C, bc)]
    starts = list(range((cfg.ipc_start // ipb) * ipb, cfg.end, ipb))
    batches = [(s, gi) for s in starts for gi in range(len(groups))]
    return bc, ipb, groups, [b for n, b in enumerate(batches) if n % world_size == rank]


def shard_items(cfg: DistillConfig, C: int, rank: int, world_size: int) -> List[tuple]:
    """The items ``(c, i)`` of the slice that rank ``rank`` of ``world_size`` produces (a fixed order:
    shards never depend on what exists)."""
    all_items = [(c, i) for i in range(cfg.ipc_start, cfg.end) for c in range(C)]
    if not cfg.uses_recover:
        return [it for n, it in enumerate(all_items) if n % world_size == rank]
    _, ipb, groups, mine = shard_batches(cfg, C, rank, world_size)
    return [(c, i) for s, gi in mine for i in range(max(s, cfg.ipc_start), min(s + ipb, cfg.end)) for c in groups[gi]]
