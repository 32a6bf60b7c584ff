"""Cost model for ``reta distill`` (``reta plan``): size a job before launching it.

A short calibration run times the real recover step (augment, teacher forward with the BN hooks,
CE + BN + PTA, backward to the pixels, Adam, clamp) on one batch of the run's shape, and the pool's
per-image cost (decode + crop + teacher forward) on a sample of the data set; the model then counts
the job's batches and steps:

    batches    = ceil(C / classes_per_batch) * ceil(IPC / items_per_batch)
    units      = batches, or with PTA on a class's whole set (lockstep) ceil(C / classes_per_batch) units
                 of ceil(IPC / items_per_batch) batches each
    distill    = ceil(units / GPUs) * batches_per_unit * iterations * seconds_per_step   (ranks take units)
    pool       = C * min(pool_per_class, class size) * seconds_per_pool_image  (built once, by rank 0)
    peak       = the calibration batch's peak (CUDA max allocated; process RSS on the CPU), plus in
                 lockstep the state of the unit's other batches: 4 fp32 copies of their pixels at the
                 largest block resolution (the pixels, their gradient, Adam's two moments); a unit's
                 initial images stay on the host

At ImageNet-1K, IPC 50, 224 px and 100 classes per batch, a lockstep unit holds 5,000 images: 4 x 5,000 x
3 x 224 x 224 x 4 B = 12 GB of state on the device on top of one batch's step (fewer classes per batch
shrink it proportionally).

The step time does not depend on the teacher's weights, so an untrained network of the default
architecture stands in when no teacher exists yet (said so in the output).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from ..data.folder import dataset_targets
from ..data.sets import SizedImages
from ..models.features import teacher_features
from ..recover.loop import RecoverConfig, recover
from ..recover.loss import RETALoss, topo_weight
from .records import peak_memory

__all__ = ["Estimate", "estimate", "calibrate"]

logger = logging.getLogger(__name__)


@dataclass
class Estimate:
    """The model's answer; times in seconds, memory in bytes."""

    batches: int
    steps_per_batch: int
    seconds_per_step: float
    distill_seconds: float
    pool_images: int
    seconds_per_pool_image: float
    pool_seconds: float
    peak_bytes: int
    peak_kind: str
    gpus: int
    batch_images: int
    units: int = 0
    batches_per_unit: int = 1
    unit_state_bytes: int = 0
    lam_topo: float = 0.0  # PTA's weight at the reference batch size, and per batch size of the run
    pta_weights: tuple = ()  # ((batch images, weight), ...)
    pta: str = ""  # PTA's view and how it is weighed, where PTA acts

    def table(self) -> str:
        def hms(s: float) -> str:
            s = int(round(s))
            return f"{s // 3600}h{(s % 3600) // 60:02d}m{s % 60:02d}s"

        return "\n".join([
            "| quantity | estimate |", "|---|---|",
            f"| recover batches | {self.batches} of {self.batch_images} images, {self.steps_per_batch} steps each |",
            *([f"| lockstep units | {self.units} of {self.batches_per_unit} batches (PTA on each class's whole set); "
               f"{self.unit_state_bytes / 2**30:.2f} GiB of unit state per device |"] if self.batches_per_unit > 1 else []),
            *([f"| PTA | {self.pta} |"] if self.pta else []),
            *(["| PTA weight | " + ", ".join(f"{w:g} in {b}-image batches" for b, w in self.pta_weights)
               + f" (lambda_topo {self.lam_topo:g} scaled by the batch size) |"] if self.pta_weights else []),
            f"| recover step | {1e3 * self.seconds_per_step:.1f} ms |",
            f"| distill wall time on {self.gpus} device(s) | {hms(self.distill_seconds)} |",
            f"| patch pool ({self.pool_images} images, once) | {hms(self.pool_seconds)} |",
            f"| total | {hms(self.distill_seconds + self.pool_seconds)} |",
            f"| peak memory per device | {self.peak_bytes / 2**30:.2f} GiB ({self.peak_kind}) |",
        ])


def estimate(num_classes: int, ipc: int, classes_per_batch: int, items_per_batch: int, iterations: int,
             seconds_per_step: float, pool_images: int, seconds_per_pool_image: float, peak_bytes: int,
             peak_kind: str = "", gpus: int = 1, lockstep: bool = False, image_bytes: int = 0) -> Estimate:
    """The arithmetic of the model (see the module docstring), separate from the measurement.
    ``image_bytes``: one image's fp32 pixels at the largest block resolution (for the lockstep state)."""
    if min(num_classes, ipc, classes_per_batch, items_per_batch, iterations, gpus) < 1:
        raise ValueError("classes, ipc, batch shape, iterations and gpus must all be >= 1")
    groups = math.ceil(num_classes / classes_per_batch)
    per_group = math.ceil(ipc / items_per_batch)
    batches = groups * per_group
    units, per_unit = (groups, per_group) if lockstep else (batches, 1)
    distill = math.ceil(units / gpus) * per_unit * iterations * seconds_per_step
    batch_images = min(classes_per_batch, num_classes) * min(items_per_batch, ipc)
    # the unit's other batches: pixels, gradient and Adam's two moments (one batch's are in the measured peak)
    state = 4 * image_bytes * batch_images * (per_unit - 1) if lockstep else 0
    return Estimate(batches, iterations, seconds_per_step, distill, pool_images, seconds_per_pool_image,
                    pool_images * seconds_per_pool_image, int(peak_bytes) + state, peak_kind, gpus, batch_images,
                    units, per_unit, state)


def calibrate(data, teacher, cfg, device="cpu", steps: int = 5, pool_sample: int = 64, gpus: int = 1) -> Estimate:
    """Measure one batch's recover step (``steps`` timed steps after one warm-up step) and the pool's
    per-image cost, then apply :func:`estimate` to the whole job described by ``cfg``."""
    cfg.validate()
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    C, S = len(data.classes), data.size
    view, balance = cfg.pta_view_for(S), cfg.pta_balance_for(S)  # as the job resolves them (clean: two forwards)
    bc, ipb = cfg.batch_shape(C)
    res = max(cfg.block_resolutions(S))
    model = teacher.model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    n_img = min(bc, C) * min(ipb, cfg.ipc)
    x = torch.randn(n_img, 3, res, res, generator=g).to(device)
    y = torch.arange(min(bc, C), device=device).repeat(min(ipb, cfg.ipc))
    ids = torch.arange(n_img, device=device)
    kw = dict(r_bn=cfg.r_bn, first_bn_weight=cfg.first_bn_weight)
    if cfg.method in ("random-real", "rded"):
        steps_per_batch, sec_step, peak, kind = 0, 0.0, *peak_memory(device)
    else:
        if cfg.pta_active:
            with torch.no_grad():
                d = teacher_features(model, x[:2])[1].shape[1]
            m = cfg.pta_points
            real = torch.nn.functional.normalize(torch.randn(C, m, d, generator=g), dim=-1).to(device)
            # as in the job: a lockstep round makes one call per batch of the unit and refreshes once
            per_unit = math.ceil(cfg.ipc / ipb) if cfg.lockstep else 1
            crit = RETALoss(model, lam_topo=cfg.lam_topo, real_feats=real, k=cfg.k(),
                            topo_refresh=cfg.topo_refresh * per_unit, overlap=cfg.topo_overlap,
                            topo_ref_batch=cfg.loss_ref_batch, topo_balance=balance, **kw)
            # ... and PTA runs on each class's whole set (ipc points), the batch's images among them
            n_cls = min(bc, C)
            set_ids = torch.arange(n_cls * cfg.ipc)
            crit.seed_bank(torch.nn.functional.normalize(torch.randn(len(set_ids), d, generator=g), dim=-1).to(device),
                           (set_ids % n_cls).to(device), set_ids.to(device))
        else:
            crit = RETALoss(model, lam_topo=0.0, **kw)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        try:
            engine = dict(amp=cfg.amp, channels_last=cfg.channels_last, compile=cfg.compile,  # the job's engine
                          pta_view=view if cfg.pta_active else "augmented")
            warm = 3 if cfg.compile else 1  # compilation, and CUDA-graph recording after it
            rc = RecoverConfig(iterations=warm, resolutions=[res], drc=False, mean=data.mean, std=data.std, **engine)
            recover(crit, x, y, ids if cfg.pta_active else None, config=rc)  # warm-up (allocations, kernels)
            rc = RecoverConfig(iterations=steps, resolutions=[res], drc=False, mean=data.mean, std=data.std, **engine)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            recover(crit, x, y, ids if cfg.pta_active else None, config=rc)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            sec_step = (time.perf_counter() - t0) / steps
        finally:
            crit.close()
        peak, kind = peak_memory(device)
        steps_per_batch = cfg.iterations
    # pool: decode + resize a sample of real images, plus a teacher forward per image
    pool_images = 0
    sec_pool = 0.0
    if cfg.uses_pool:
        targets = dataset_targets(data.train)
        if targets is not None:
            counts = torch.bincount(torch.tensor(targets), minlength=C)
            pool_images = int(counts.clamp(max=cfg.pool_per_class).sum())
        else:
            pool_images = C * cfg.pool_per_class
        sized = SizedImages(data.train, S)
        idx = torch.randperm(len(sized), generator=g)[:pool_sample].tolist()
        t0 = time.perf_counter()
        imgs = [sized[i][0] for i in idx]
        imgs = [v for v in imgs if v is not None]
        if imgs:
            with torch.no_grad():
                teacher_features(model, (torch.stack(imgs).float() / 255).to(device))
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
        sec_pool = (time.perf_counter() - t0) / max(1, len(idx))
    est = estimate(C, cfg.ipc, bc, ipb, max(1, steps_per_batch), sec_step, pool_images, sec_pool, peak, kind, gpus,
                   lockstep=cfg.lockstep, image_bytes=3 * res * res * 4)
    if steps_per_batch == 0:
        est.steps_per_batch, est.distill_seconds = 0, 0.0
    if cfg.pta_active:
        est.pta = (f"{view} view" + (" (a second teacher forward per step)" if view == "clean" else "") + ", "
                   + (f"weight from the gradients ({balance:g} of CE's)" if balance else "fixed weight"))
    if cfg.pta_active and balance is None:  # under the balance PTA's weight comes from the gradients each step
        est.lam_topo = cfg.lam_topo
        est.pta_weights = tuple((b, topo_weight(cfg.lam_topo, cfg.loss_ref_batch, b))
                                for b in cfg.batch_sizes(C))
    return est
