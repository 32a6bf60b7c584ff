"""How the items ``(class c, index i)`` of a distilled set are cut into recover units and shared out over
torchrun ranks: a fixed order, so shards never depend on what already exists.

A *batch* is ``batch_classes`` classes x ``ipc_per_batch`` items of each, starting at an ipc index ``s``. A
*unit* is what one recover call optimises: one batch, or, when PTA aligns each class's whole synthetic set
(``DistillConfig.lockstep``), every batch of a class group, recovered in lockstep (docs/method.md §2.1). Ranks
take every ``world_size``-th unit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from .config import DistillConfig

__all__ = ["Unit", "shard_units", "shard_items"]


@dataclass(frozen=True)
class Unit:
    """A class group (index into ``groups``) and the ipc start of each of its batches, in lockstep order."""

    group: int
    starts: Tuple[int, ...]


def shard_units(cfg: DistillConfig, C: int, rank: int, world_size: int):
    """Recover methods: ``(classes per batch, items per batch, class groups, this rank's units)``. Without
    lockstep the units are the batches of the slice ``[cfg.ipc_start, cfg.end)``; with it, every class
    group is one unit holding all its ipc indices (whatever the slice: a class's set is recovered whole)."""
    bc, ipb = cfg.batch_shape(C)
    groups = [list(range(a, min(C, a + bc))) for a in range(0, C, bc)]
    if cfg.lockstep:
        every = tuple(range(0, cfg.ipc, ipb))
        units = [Unit(gi, every) for gi in range(len(groups))]
    else:
        starts = range((cfg.ipc_start // ipb) * ipb, cfg.end, ipb)
        units = [Unit(gi, (s,)) for s in starts for gi in range(len(groups))]
    return bc, ipb, groups, [u for n, u in enumerate(units) if n % world_size == rank]


def unit_items(cfg: DistillConfig, unit: Unit, ipb: int, groups) -> List[List[tuple]]:
    """The items ``(c, i)`` of each batch of ``unit`` (all of them, in and out of the slice)."""
    return [[(c, i) for i in range(s, min(s + ipb, cfg.ipc)) for c in groups[unit.group]] for s in unit.starts]


def shard_items(cfg: DistillConfig, C: int, rank: int, world_size: int) -> List[tuple]:
    """The items ``(c, i)`` of the slice that rank ``rank`` of ``world_size`` produces (a fixed order:
    shards never depend on what exists)."""
    all_items = [(c, i) for i in range(cfg.ipc_start, cfg.end) for c in range(C)]
    if not cfg.uses_recover:
        return [it for n, it in enumerate(all_items) if n % world_size == rank]
    _, ipb, groups, mine = shard_units(cfg, C, rank, world_size)
    return [it for u in mine for batch in unit_items(cfg, u, ipb, groups) for it in batch
            if cfg.ipc_start <= it[1] < cfg.end]
