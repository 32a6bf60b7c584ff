"""Batches of variable-size segments (the edges of each graph, the points of each diagram) are stored flat
with host offsets ``[B + 1]``; one helper turns the offsets into each row's segment id."""
from __future__ import annotations

import torch

__all__ = ["segment_ids"]


def segment_ids(offsets: torch.Tensor, device=None) -> torch.Tensor:
    """``[offsets[-1]]`` int64: the segment of each row, for host ``offsets`` ``[B + 1]`` (built on the host,
    where the sizes are known, and copied to ``device`` once: no synchronisation on the device)."""
    offsets = torch.as_tensor(offsets).cpu()
    ids = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
    return ids if device is None else ids.to(device)
