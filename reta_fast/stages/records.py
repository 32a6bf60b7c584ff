"""Stage records: wall time, peak memory and what a stage did, in ``out/stages/<stage>.json``, with every
call of the stage kept (resumes, slices and torchrun ranks add up)."""
from __future__ import annotations

import logging
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .._version import __version__
from ..fileio import write_json

__all__ = ["Stage", "write_stage_record", "versions", "peak_memory", "cpu_model"]

logger = logging.getLogger(__name__)


class Stage:
    """Context manager timing one stage and recording its peak memory into ``out/stages/<name>.json``.

    Peak memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` during the stage; on the CPU
    the process's peak resident set size so far (``ru_maxrss``; it cannot be reset per stage).
    """

    def __init__(self, out: Optional[Path], name: str, device, quiet: bool = False):
        self.out, self.name, self.device, self.quiet = out, name, torch.device(device), quiet
        self.info: dict = {}

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        seconds = time.perf_counter() - self.t0
        peak, kind = peak_memory(self.device)
        rec = dict(stage=self.name, seconds=round(seconds, 3), peak_bytes=int(peak), peak_kind=kind,
                   ok=exc_type is None, **self.info)
        if self.device.type == "cpu":  # CPU results are bitwise reproducible at a fixed thread count only
            rec.setdefault("threads", torch.get_num_threads())  # ... and on one CPU model (its BLAS kernels)
            rec.setdefault("cpu", cpu_model())
        if self.out is not None and exc_type is None:
            rec = write_stage_record(self.out, self.name, rec)
        self.record = rec
        if exc_type is None:
            (logger.debug if self.quiet else logger.info)(f"[{self.name}] done in {seconds:.1f} s, peak memory {peak / 2**20:.0f} MiB ({kind})")
        return False


def peak_memory(device) -> tuple:
    """``(bytes, kind)``: CUDA's max allocated since the last reset, or the process's peak RSS so far."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024), \
        "process_peak_rss"


def write_stage_record(out, name: str, rec: dict) -> dict:
    """Write ``out/stages/<name>.json``: this call's record plus ``calls``, the summaries of every
    call of the stage so far (resumes, slices, torchrun runs add up; none is lost), and their totals."""
    path = Path(out) / "stages" / f"{name}.json"
    rec = dict(rec, calls=_previous_calls(path) + [_call_summary(rec)])
    rec["seconds_total"] = round(sum(c.get("seconds", 0) for c in rec["calls"]), 3)
    if "written" in rec:
        rec["written_total"] = sum(c.get("written", 0) for c in rec["calls"])
    write_json(path, rec)
    return rec


def _call_summary(rec: dict) -> dict:
    keep = ("seconds", "peak_bytes", "written", "skipped", "ipc_start", "ipc_end", "ranks", "threads", "cpu")
    return dict({k: rec[k] for k in keep if k in rec}, at=time.strftime("%Y-%m-%dT%H:%M:%S"))


def _previous_calls(path: Path) -> list:
    """The per-call summaries of an earlier record of the same stage (one call for a record written
    before calls were kept); none when there is none or it is unreadable."""
    if not path.is_file():
        return []
    try:
        prev = json.loads(path.read_text())
        return list(prev["calls"]) if isinstance(prev.get("calls"), list) else [_call_summary(prev)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    return dict(reta_fast=__version__, torch=torch.__version__, numpy=np.__version__,
                python=platform.python_version())
