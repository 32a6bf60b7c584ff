"""The feature bank of PTA (docs/method.md §4.1): the latest detached penultimate feature of every image of a
synthetic set, one row per image id, on the features' device.

PTA compares each class's synthetic *set* with real features, but a recover call sees only the images of its
batch. The bank holds the others: the recover loop writes every call's features into it, and a class's point
set is its live images (features with gradient) plus the banked features of its other images. Recovering a
class group's micro-batches in lockstep (:func:`reta_fast.recover`, ``micro_batches``) keeps every banked
feature at most one lockstep round old.

All bookkeeping (which row holds which id, which rows a call reads and writes) is host work done once per
batch layout; a call itself only gathers and writes rows on the device (no host synchronisation).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["FeatureBank"]


class FeatureBank:
    """Rows of detached features keyed by image id.

    Attributes:
        feats: ``[S, D]`` float32 rows (``None`` until the first id is registered).
        written: ``[S]`` int64: the step (:attr:`step` at the write) that wrote each row; -1 for rows put
            there by :meth:`seed` (e.g. features of initial images).
        step: a counter the owner advances once per call (:meth:`tick`), for :attr:`written`.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.slot: Dict[int, int] = {}  # image id -> row
        self.cls: List[int] = []  # class of each row
        self.ids: List[int] = []  # image id of each row
        self.feats: Optional[torch.Tensor] = None
        self.written: Optional[torch.Tensor] = None
        self.step = 0

    def __len__(self) -> int:
        return len(self.ids)

    def tick(self) -> None:
        self.step += 1

    def register(self, ids: Sequence[int], classes: Sequence[int], dim: int, device) -> bool:
        """Give every new id a (zero) row; an id keeps its class (re-registering it with another raises).
        Returns whether any id was new."""
        new = []
        for i, c in zip(ids, classes):
            i, c = int(i), int(c)
            if i in self.slot:
                if self.cls[self.slot[i]] != c:
                    raise ValueError(f"image id {i} was registered with class {self.cls[self.slot[i]]}, now seen "
                                     f"with class {c}: ids must identify images (a new set of images: call reset() on "
                                     f"the RETALoss first)")
                continue
            self.slot[i] = len(self.ids)
            self.ids.append(i)
            self.cls.append(c)
            new.append(i)
        if not new:
            return False
        rows = torch.zeros((len(new), dim), dtype=torch.float32, device=device)
        marks = torch.full((len(new),), -1, dtype=torch.int64, device=device)
        if self.feats is None:
            self.feats, self.written = rows, marks
        else:
            if self.feats.shape[1] != dim:
                raise ValueError(f"features of dimension {dim} for a bank of dimension {self.feats.shape[1]}")
            self.feats = torch.cat([self.feats, rows.to(self.feats.device)])
            self.written = torch.cat([self.written, marks.to(self.written.device)])
        return True

    def members(self, c: int) -> List[int]:
        """Rows of class ``c`` in registration order."""
        return [r for r, k in enumerate(self.cls) if k == c]

    @torch.no_grad()
    def seed(self, feats: torch.Tensor, y: Sequence[int], ids: Sequence[int]) -> None:
        """Register ``ids`` (classes ``y``) and store their features ``[N, D]`` (marked as seeded, -1)."""
        self.register(ids, y, feats.shape[1], feats.device)
        rows = torch.tensor([self.slot[int(i)] for i in ids], dtype=torch.int64).to(self.feats.device)
        self.feats.index_copy_(0, rows, feats.detach().float().to(self.feats.device))
        self.written.index_fill_(0, rows, -1)

    @torch.no_grad()
    def write(self, rows: torch.Tensor, feats: torch.Tensor) -> None:
        """Store ``feats`` ``[R, D]`` at device ``rows`` ``[R]`` (this step's features); no synchronisation."""
        self.feats.index_copy_(0, rows, feats.detach().float())
        self.written.index_fill_(0, rows, self.step)
