"""Several processes on one job (torchrun): which rank this is, the process group the ranks share, and the
one stage record rank 0 makes of theirs."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch

from ..fileio import read_json, write_json
from .distill import merge_diagnostics, merge_loss_parts
from .records import write_stage_record

__all__ = ["rank_world", "join_process_group", "write_rank_record", "merge_rank_records"]


def rank_world():
    """``(RANK, WORLD_SIZE)`` from torchrun's environment (``(0, 1)`` in a plain process)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def join_process_group(device) -> bool:
    """Under torchrun (``MASTER_ADDR`` set) join the process group (NCCL on CUDA, gloo on the CPU) so that
    rank 0 can build the pool before the others start and merge the stage records at the end. A rank
    started alone with only ``RANK``/``WORLD_SIZE`` set (a restart) works without one: returns False."""
    import torch.distributed as dist

    if rank_world()[1] == 1 or not dist.is_available() or "MASTER_ADDR" not in os.environ:
        return False
    if not dist.is_initialized():
        if str(device).startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        # Ranks wait for rank 0 while it builds the pool, relabels (--labels stored) or writes the report:
        # hours at ImageNet scale, far beyond the default 10-30 min collective timeout.
        timeout = float(os.environ.get("RETA_FAST_DIST_TIMEOUT", 12 * 3600))
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
    return True


def write_rank_record(out, stage: str, rank: int, record: dict) -> None:
    write_json(Path(out) / "stages" / f"{stage}-rank{rank}.json", record)


def merge_rank_records(out, stage: str, world: int) -> None:
    """One record for the whole stage from the ranks' (``stages/<stage>-rank<r>.json``): the slowest rank's
    wall time, the largest peak memory, summed counts, and the distill diagnostics and final loss parts of
    every rank's units (not rank 0's alone)."""
    recs = [read_json(Path(out) / "stages" / f"{stage}-rank{r}.json", "stage record") for r in range(world)]
    merged = dict(recs[0], seconds=max(r["seconds"] for r in recs), ranks=world,
                  peak_bytes=max(r["peak_bytes"] for r in recs),
                  written=sum(r.get("written", 0) for r in recs), skipped=sum(r.get("skipped", 0) for r in recs))
    if any(r.get("diagnostics") for r in recs):
        merged["diagnostics"] = merge_diagnostics([r.get("diagnostics") for r in recs])
    if any(r.get("loss_parts") for r in recs):
        merged["loss_parts"] = merge_loss_parts([r.get("loss_parts") for r in recs],
                                                [r.get("loss_units", 0) for r in recs])
        merged["loss_units"] = sum(r.get("loss_units", 0) for r in recs)
    merged.pop("stage", None)
    write_stage_record(out, stage, dict(stage=stage, **merged))
