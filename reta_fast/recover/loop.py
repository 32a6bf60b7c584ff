"""The recover loop (docs/method.md §2): multi-resolution blocks with residual connections, the
injected patch chosen by DRC (RETA) or fixed to the initial patch (FADRM's static anchor).

A reusable function: bring your own teacher (through :class:`reta_fast.RETALoss`), initial images
and pool. It optimises one batch of images; the caller loops over batches (classes x ipc items).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._validate import check_choice, check_int_setting, check_number_setting
from ..data.tensors import channel_stats
from ..models.features import teacher_features
from ..retrieval.inject import residual_inject
from ..retrieval.search import retrieve

__all__ = ["RecoverConfig", "recover", "augment", "check_engine", "check_connections", "PTA_VIEWS"]

PTA_VIEWS = ("augmented", "clean")  # the images PTA's synthetic features come from


@dataclass
class RecoverConfig:
    """Recover-loop parameters; defaults follow docs/method.md §2 ([pred]/[paper]) for 32 px data.

    Attributes:
        iterations: total optimisation steps B over all blocks (split evenly).
        resolutions: one resolution per block (CIFAR: 32 x 4; ImageNet: 200, 224, 200, 224).
        lr, betas: Adam (0.25, (0.5, 0.9)); cosine decay over all B steps; state re-created per block.
        jitter: maximal ``torch.roll`` shift in pixels (4 on 32-64 px data, 32 on ImageNet).
        crop_scale: RandomResizedCrop area range, parameters shared by the batch ([pred] SRe2L).
        alpha: weight of the synthetic image in the residual connection (0.5, the paper's; the pipeline's
            default is 0.3 up to 64 px, see :class:`reta_fast.stages.DistillConfig`).
        drc: choose the injected patch by retrieval (RETA) rather than the static anchor (FADRM).
        lam: retrieval's complexity weight (0.1).
        drc_margin: "do no harm" [ours]: keep an image's own anchor unless the retrieved patch scores at
            least this fraction lower (``J(o*) < (1 - margin) J(anchor)``); 0 (default): always take the
            retrieved patch, as the paper. Needs the anchors' pool indices (``recover(anchor_ids=...)``).
        drc_connections: which residual connections retrieve [ours]: connection ``b`` joins block ``b`` to
            block ``b + 1``; DRC retrieves at the listed ones (strictly increasing, 0 to ``len(resolutions)
            - 2``) and the others re-inject the static anchor, as FADRM. None (default): every connection.
        pta_from_block: PTA's schedule [ours]: the criterion's ``lam_topo`` acts from this block on and is 0
            in the blocks before it (0, default: every block, as the paper). Needs a criterion with a
            ``lam_topo`` attribute (:class:`reta_fast.RETALoss`), which is restored when the loop ends.
        pta_view: the images PTA's features come from [ours]: ``"augmented"`` (default, as the paper: the
            step's augmented view, the same forward as CE and BN) or ``"clean"`` (the images as they are,
            a second teacher forward per step; the criterion must take ``x_topo``, as RETALoss does).
        mean, std: the normalisation of the images (pixels are clamped to the normalised [0, 1]).
        amp: ``"bf16"``: the teacher's forward under ``torch.autocast`` in bfloat16 (the loss terms,
            the pixels and Adam stay fp32); ``None``: fp32. (fp16 is not offered: pixel gradients
            would need loss scaling.)
        channels_last: run the teacher and the augmented batch in channels-last memory format (the
            teacher module is converted in place; its values do not change).
        compile: ``torch.compile`` mode for the teacher's forward (``"default"``, ``"reduce-overhead"``
            = CUDA graphs on a GPU, ``"max-autotune"``, ...), through :meth:`RETALoss.compile`; ``None``:
            eager. Compilation happens once per block shape (the first steps are slow).
        amp, channels_last and compile change the images only at rounding level, but they do change
        them: the pipeline records them in the run manifest.
        history: the record of the latest :func:`recover` call with this config (emptied when a call starts).
    """

    iterations: int = 1000
    resolutions: Sequence[int] = (32, 32, 32, 32)
    lr: float = 0.25
    betas: Tuple[float, float] = (0.5, 0.9)
    jitter: int = 4
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    alpha: float = 0.5
    drc: bool = True
    lam: float = 0.1
    drc_margin: float = 0.0
    drc_connections: Optional[Sequence[int]] = None
    pta_from_block: int = 0
    pta_view: str = "augmented"
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    amp: Optional[str] = None
    channels_last: bool = False
    compile: Optional[str] = None
    history: List[dict] = field(default_factory=list, repr=False)

    def validate(self) -> None:
        if not self.resolutions or min(self.resolutions) < 4:
            raise ValueError(f"resolutions must be a non-empty list of sizes >= 4, got {self.resolutions!r}")
        check_int_setting(self.iterations, "iterations (at least one step per block)", len(self.resolutions))
        check_number_setting(self.alpha, "alpha", 0.0, 1.0)
        check_number_setting(self.drc_margin, "drc_margin", 0.0, 1.0, high_open=True)
        check_connections(self.drc_connections, len(self.resolutions), self.drc, "drc=False")
        check_int_setting(self.pta_from_block, "pta_from_block", minimum=0)
        if self.pta_from_block >= len(self.resolutions):
            raise ValueError(f"pta_from_block must name one of the {len(self.resolutions)} blocks (0 to "
                             f"{len(self.resolutions) - 1}), got {self.pta_from_block}")
        check_choice(self.pta_view, "pta_view", PTA_VIEWS)
        check_number_setting(self.jitter, "jitter")
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        check_engine(self.amp, self.compile)


AMP_MODES = (None, "bf16")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_engine(amp, compile_mode) -> None:
    """Refuse an unknown autocast or ``torch.compile`` mode by name."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}"
                         + (" (fp16 would need loss scaling of the pixel gradients)" if amp == "fp16" else ""))
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile_mode!r}")


def check_connections(connections, n_blocks: int, drc: bool, off: str) -> None:
    """Refuse a DRC schedule that is not a strictly increasing, non-empty list of residual connections
    (0 to ``n_blocks - 2``), or one given where DRC is off (``off`` says why it is)."""
    if connections is None:
        return
    if not drc:
        raise ValueError(f"drc_connections schedules DRC, which this run does not use ({off})")
    if n_blocks < 2:
        raise ValueError(f"drc_connections needs at least two recover blocks: with {n_blocks} there is no residual "
                         "connection to schedule")
    c = list(connections) if isinstance(connections, (list, tuple)) else None
    if not c or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in c):
        raise ValueError(f"drc_connections must be a non-empty list of connection indices, got {connections!r} "
                         "(for no retrieval at all use the static anchor: drc=False / --no-drc)")
    if any(b >= a for a, b in zip(c[1:], c)) or c[0] < 0 or c[-1] > n_blocks - 2:
        raise ValueError(f"drc_connections must list connections between the {n_blocks} recover blocks (0 to "
                         f"{n_blocks - 2}) once each, in increasing order, got {connections!r}")


def augment(x: torch.Tensor, res: int, jitter: int, scale, g: torch.Generator, flip: bool = True) -> torch.Tensor:
    """RandomResizedCrop to ``res`` + horizontal flip (unless ``flip=False``) + roll jitter, parameters
    shared by the batch."""
    H, W = x.shape[-2:]
    area = H * W * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=g)))
    ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(torch.rand((), generator=g)))
    h = max(1, min(H, int(round(math.sqrt(area / ratio)))))
    w = max(1, min(W, int(round(math.sqrt(area * ratio)))))
    i = int(torch.randint(0, H - h + 1, (), generator=g))
    j = int(torch.randint(0, W - w + 1, (), generator=g))
    out = F.interpolate(x[..., i:i + h, j:j + w], size=(res, res), mode="bilinear", align_corners=False)
    if float(torch.rand((), generator=g)) < 0.5 and flip:
        out = out.flip(-1)
    if jitter:
        dx, dy = (int(torch.randint(-jitter, jitter + 1, (), generator=g)) for _ in range(2))
        out = torch.roll(out, shifts=(dx, dy), dims=(2, 3))
    return out


def recover(criterion, x_init: torch.Tensor, y: torch.Tensor, ids: Optional[torch.Tensor] = None,
            pool=None, config: Optional[RecoverConfig] = None, seed: int = 0,
            on_step: Optional[Callable[[int, dict], None]] = None,
            retrieval_teacher: Optional[torch.nn.Module] = None,
            retriever: Optional[Callable] = None,
            micro_batches: Optional[Sequence[Sequence[int]]] = None,
            seeds: Optional[Sequence[int]] = None, device=None, anchor_ids: Optional[torch.Tensor] = None,
            diagnose: bool = False) -> torch.Tensor:
    """Optimise a set of synthetic images: one batch, or several micro-batches in lockstep.

    Args:
        criterion: a :class:`reta_fast.RETALoss` (its teacher is used for DRC features too).
        x_init: ``[B, 3, h, w]`` normalised initial images (RDED-style real patches, §2).
        y: ``[B]`` classes; ``ids``: ``[B]`` stable image ids (for the PTA bank).
        pool: a :class:`reta_fast.PatchPool` with ``config.resolutions[1:]`` among its resolutions;
            required when ``config.drc`` and there is more than one block.
        config: :class:`RecoverConfig`; ``config.history`` is emptied, then receives one dict per criterion
            call (step, block, lr, ce, bn, topo, and ``micro`` with several micro-batches) and one per
            injection (retrieved pool indices): it holds the record of the latest call.
        seed: seeds the augmentation (of the first micro-batch; see ``seeds``).
        on_step: optional callback ``(step, parts)``, once per criterion call.
        retrieval_teacher: the network whose features the pool holds (default ``criterion.teacher``;
            pass the pool's teacher when several teachers take turns).
        retriever: optional ``(query_feats [b, D] L2-normalised, y [b], ids [b] or None, resolution) -> pool
            indices [b]`` replacing the plain per-class :func:`reta_fast.retrieve` (e.g. the pipeline's
            partitioned retrieval, where each image searches its own share of the class pool).
        micro_batches: rows of ``x_init`` forming each micro-batch (default: one batch of all rows). They
            are recovered in lockstep (docs/method.md §2.1): at every step each micro-batch in turn
            takes one optimisation step with its own forward (its own BN statistics), Adam state and
            augmentation stream, so a criterion that banks the features of the other micro-batches
            (RETALoss's PTA bank) sees them at most one step old.
        seeds: the augmentation seed of each micro-batch (default ``seed + j``).
        device: where the images are optimised (default: ``x_init``'s device). Keeping a large ``x_init``
            on the host and passing the accelerator here holds only the optimised images, their
            gradients and Adam's state on the device.
        anchor_ids: ``[B]`` pool indices of the initial patches: with DRC, each injection records in
            ``config.history`` how its retrieval compares with re-injecting the anchor (``"drc"`` entries:
            share of images retrieving their own anchor, fit and complexity of retrieved vs anchor
            patches, distinct patches per class).
        diagnose: at the last step of every block, record the norm of each loss term's gradient on the
            first micro-batch's pixels (``"grads"`` entries; three extra backward passes per block, and under
            ``config.compile`` one more eager forward, two with the clean view): a criterion with a
            ``term_grad_norms(x)`` method (:meth:`RETALoss.term_grad_norms`).

    Returns:
        ``[B, 3, R, R]`` detached images at the last block's resolution ``R``, rows as in ``x_init``, on
        ``x_init``'s device.
    """
    cfg = config or RecoverConfig()
    cfg.validate()
    if not isinstance(x_init, torch.Tensor) or x_init.dim() != 4 or x_init.shape[1] != 3:
        raise ValueError(f"x_init must be [B, 3, H, W], got {getattr(x_init, 'shape', x_init)!r}")
    if cfg.drc and len(cfg.resolutions) > 1:
        if pool is None:
            raise ValueError("config.drc needs a pool (or set drc=False for the static anchor)")
        if tuple(map(float, pool.mean)) != tuple(map(float, cfg.mean)) or tuple(map(float, pool.std)) != tuple(
                map(float, cfg.std)):
            raise ValueError(f"the pool normalises with mean {pool.mean}, std {pool.std} but the config uses "
                             f"{tuple(cfg.mean)}, {tuple(cfg.std)}: injected patches would not match the images")
    B = x_init.shape[0]
    dev = x_init.device if device is None else torch.device(device)
    if micro_batches is None:
        micro = [torch.arange(B)]
    else:
        micro = [torch.as_tensor(list(mb), dtype=torch.int64) for mb in micro_batches]
        flat = torch.cat(micro) if micro else torch.zeros(0, dtype=torch.int64)
        if not micro or flat.numel() != B or not torch.equal(torch.sort(flat).values, torch.arange(B)):
            raise ValueError(f"micro_batches must partition the {B} rows of x_init (each row exactly once)")
    M = len(micro)
    seeds = [seed + j for j in range(M)] if seeds is None else [int(v) for v in seeds]
    if len(seeds) != M:
        raise ValueError(f"seeds has {len(seeds)} entries for {M} micro-batches")
    ys = [y[mb.to(y.device)] for mb in micro]  # once: every step passes the same tensors
    idss = [None if ids is None else ids[mb.to(ids.device)] for mb in micro]
    gens = [torch.Generator().manual_seed(s_) for s_ in seeds]
    m, s = channel_stats(cfg.mean, cfg.std, dev)
    lo, hi = (0 - m) / s, (1 - m) / s  # the normalised range of valid pixels
    if x_init.numel():
        x_lo, x_hi = float(x_init.min()), float(x_init.max())  # one host sync per call
        if not (math.isfinite(x_lo) and math.isfinite(x_hi)):
            raise ValueError("x_init holds NaN or inf")
        # noise starts (SRe2L) reach a few units past the range and are clamped by the first step; pixels in
        # [0, 255] (an unnormalised image) reach far beyond it
        reach = 4.0 * max(float(lo.abs().max()), float(hi.abs().max()))
        if max(-x_lo, x_hi) > reach:
            raise ValueError(f"x_init lies in [{x_lo:.3g}, {x_hi:.3g}], far outside the normalised range "
                             f"[{float(lo.min()):.3g}, {float(hi.max()):.3g}] of config.mean/std (pixels in "
                             f"[0, 255]?): pass (images_in_0_1 - mean) / std (every step clamps the pixels to that "
                             f"range)")
    blocks = list(cfg.resolutions)
    per_block = [cfg.iterations // len(blocks) + (1 if b < cfg.iterations % len(blocks) else 0) for b in range(len(blocks))]
    anchors = [x_init[mb.to(x_init.device)].detach().to(dev) for mb in micro]
    xs = [residual_inject(a, a, 1.0, size=blocks[0]) for a in anchors]  # resize only
    if cfg.drc and cfg.drc_connections is None:
        anchors = None  # only the static anchor re-injects them
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    if cfg.channels_last:
        criterion.teacher.to(memory_format=torch.channels_last)
    if cfg.compile is not None or getattr(criterion, "compile_mode", None) is not None:
        if not hasattr(criterion, "compile_teacher"):
            raise ValueError("config.compile needs a criterion with a compile_teacher(mode) method (RETALoss)")
        criterion.compile_teacher(cfg.compile)
    lazy = hasattr(criterion, "terms") and on_step is None  # parts read once per block: no per-step host sync
    lam_topo = getattr(criterion, "lam_topo", None)
    if cfg.pta_from_block and lam_topo is None:
        raise ValueError("config.pta_from_block needs a criterion with a lam_topo weight (RETALoss)")
    if cfg.pta_view != "augmented" and not _takes(criterion.terms if lazy else criterion, "x_topo"):
        raise ValueError(f"config.pta_view={cfg.pta_view!r} needs a criterion that takes x_topo (RETALoss)")
    if cfg.drc and cfg.drc_margin > 0 and anchor_ids is None and len(blocks) > 1:
        raise ValueError("config.drc_margin needs the anchors' pool indices (anchor_ids)")
    cfg.history.clear()  # the record of this call only: a config reused over many calls does not grow
    try:
        xs = _recover_blocks(criterion, xs, ys, idss, gens, micro, anchors, anchor_ids, pool, cfg, blocks, per_block,
                             lo, hi, dev, fmt, lazy, lam_topo, on_step, retrieval_teacher, retriever, diagnose)
    finally:
        if cfg.pta_from_block:
            criterion.lam_topo = lam_topo
    out = torch.empty((B,) + tuple(xs[0].shape[1:]), dtype=xs[0].dtype, device=x_init.device)
    for mb, x in zip(micro, xs):
        out[mb.to(out.device)] = x.detach().to(out.device)
    return out


def _recover_blocks(criterion, xs, ys, idss, gens, micro, anchors, anchor_ids, pool, cfg, blocks, per_block, lo, hi,
                    dev, fmt, lazy, lam_topo, on_step, retrieval_teacher, retriever, diagnose):
    """:func:`recover`'s blocks: optimise, then inject between blocks; returns the micro-batches' images."""
    M = len(xs)
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if cfg.amp == "bf16" else contextlib.nullcontext
    step = 0
    for b, res in enumerate(blocks):
        if cfg.pta_from_block:
            criterion.lam_topo = lam_topo if b >= cfg.pta_from_block else 0.0
        xs = [x.detach().requires_grad_(True) for x in xs]
        opts = [torch.optim.Adam([x], lr=cfg.lr, betas=tuple(cfg.betas)) for x in xs]  # re-created per block
        pending = []
        for _ in range(per_block[b]):
            lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / cfg.iterations))
            for j in range(M):
                x, opt = xs[j], opts[j]
                for grp in opt.param_groups:
                    grp["lr"] = lr
                opt.zero_grad(set_to_none=True)
                xa = augment(x, res, cfg.jitter, cfg.crop_scale, gens[j]).contiguous(memory_format=fmt)
                extra = {} if cfg.pta_view == "augmented" else dict(x_topo=x.contiguous(memory_format=fmt))
                with autocast():
                    if lazy:
                        loss, parts = criterion.terms(xa, ys[j], idss[j], **extra)
                    else:
                        loss, parts = criterion(xa, ys[j], idss[j], **extra)
                if diagnose and j == 0 and step == sum(per_block[:b + 1]) - 1 and hasattr(criterion,
                                                                                       "term_grad_norms"):
                    with autocast():  # a compiled teacher's terms are carried through an eager forward
                        grads = criterion.term_grad_norms(x)
                    if getattr(criterion, "topo_balance", None) is not None:  # PTA's weight, 0 where it was off
                        w = criterion.last_topo_weight
                        grads["topo_weight"] = 0.0 if w is None else float(w)
                    cfg.history.append(dict(step=step, block=b, grads=grads))
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, hi), lo))
                tag = dict(step=step, block=b, lr=lr, **({"micro": j} if M > 1 else {}))
                if lazy:
                    pending.append((tag, parts))
                else:
                    cfg.history.append(dict(tag, **parts))
                    if on_step is not None:
                        on_step(step, parts)
            step += 1
        if pending:  # one host sync for the block's loss parts
            values = torch.stack([p for _, p in pending]).cpu().tolist()
            cfg.history.extend(dict(tag, ce=v[0], bn=v[1], topo=v[2]) for (tag, _), v in zip(pending, values))
        if b + 1 < len(blocks):
            nxt = blocks[b + 1]
            with torch.no_grad():
                for j in range(M):
                    if cfg.drc and (cfg.drc_connections is None or b in cfg.drc_connections):
                        _, f = teacher_features(criterion.teacher if retrieval_teacher is None else retrieval_teacher,
                                                xs[j].detach())
                        q = F.normalize(f.float(), dim=1)
                        idx = (retriever(q, ys[j], idss[j], nxt) if retriever is not None
                               else retrieve(q, ys[j], pool, lam=cfg.lam, resolution=nxt))
                        if cfg.drc_margin > 0:  # anchor_ids checked in recover()
                            idx = _keep_anchor_unless_better(q, idx, anchor_ids[micro[j].to(anchor_ids.device)].to(
                                idx.device), pool, nxt, cfg.lam, cfg.drc_margin, dev)
                        patch = pool.images(idx.cpu(), device=dev)
                        cfg.history.append(dict(step=step, block=b, retrieved=idx.cpu().tolist(),
                                                **({"micro": j} if M > 1 else {})))
                        if anchor_ids is not None:
                            anchor = anchor_ids[micro[j].to(anchor_ids.device)].to(idx.device)
                            cfg.history.append(dict(step=step, block=b, drc=_drc_stats(
                                q, idx, anchor, ys[j], pool, nxt, dev)))
                    else:
                        patch = anchors[j]
                    xs[j] = residual_inject(xs[j].detach(), patch, cfg.alpha, size=nxt)
    return xs


def _takes(fn, name: str) -> bool:
    """Whether ``fn`` accepts the keyword argument ``name``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read: let the call itself decide
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@torch.no_grad()
def _drc_stats(q: torch.Tensor, idx: torch.Tensor, anchor: torch.Tensor, y: torch.Tensor, pool, res: int, dev) -> dict:
    """How one injection's retrieved patches compare with the images' own anchors: the share retrieving
    their anchor, the fit ``|q - z|^2`` and the (per-class scaled) complexity of both, and the number of
    distinct retrieved patches per class over the class's images."""
    feats, _, cx = pool.retrieval_tensors(res, device=dev)
    fit = lambda i: (q - feats[i.to(dev)]).pow(2).sum(1).mean()  # noqa: E731
    yc = y.cpu()
    idc = idx.cpu()
    spread = [len(set(idc[yc == c].tolist())) / int((yc == c).sum()) for c in yc.unique().tolist()]
    return dict(own_anchor=float((idx == anchor).float().mean()), fit_retrieved=float(fit(idx)),
                fit_anchor=float(fit(anchor)), complexity_retrieved=float(cx[idx.to(dev)].mean()),
                complexity_anchor=float(cx[anchor.to(dev)].mean()), distinct_per_class=float(sum(spread) / len(spread)))


@torch.no_grad()
def _keep_anchor_unless_better(q, idx, anchor, pool, res: int, lam: float, margin: float, dev) -> torch.Tensor:
    """DRC's "do no harm" rule: the retrieved patch replaces the image's own anchor only where its score is
    lower by more than ``margin`` of the anchor's (the score of docs/method.md §3, in float64)."""
    feats, _, cx = pool.retrieval_tensors(res, device=dev)

    def score(i):
        i = i.to(dev)
        return (1 - lam) * (q.double() - feats[i].double()).pow(2).sum(1) + lam * cx[i].double()

    better = score(idx) < (1.0 - margin) * score(anchor)
    return torch.where(better, idx, anchor.to(idx.device))
