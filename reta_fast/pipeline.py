"""The distillation pipeline (METHOD.md sections 1-2 and 6): distill (with the baselines a user
compares against), relabel and evaluate, with resumable, atomic outputs.

Output folder layout (``out``)::

    run.json                  what was asked for: method, parameters, data, teachers, versions, seed
    classes.json              class index -> class name (folder name / WNID) and image folder name
    images/new{c:03d}/class{c:03d}_id{i:03d}.png    the distilled set (an ImageFolder)
    stages/<stage>.json       wall time, peak memory and loss parts of each stage that ran
    labels/seed{s}.logits     stored soft labels (``reta relabel``), per evaluation seed (reta_fast.labels)
    export.pt                 tensor export: uint8 images, targets, classes, teacher logits
    eval.json, report.md, report.json, report/grid.png, report/betti.png

Methods (``--method``):

=============  ==============================  ========  ==================  =====
method         initialisation                  blocks    residual injection  PTA
=============  ==============================  ========  ==================  =====
random-real    random real images              --        --                  --
rded           teacher-ranked real patches     --        --                  --
sre2l          Gaussian noise                  1         none                off
fadrm          teacher-ranked real patches     ``blocks``  static anchor      off
reta           teacher-ranked real patches     ``blocks``  DRC retrieval      on
=============  ==============================  ========  ==================  =====

``reta`` with ``drc=False`` / ``pta=False`` gives the two ablations. "Teacher-ranked real patches"
are RDED's: one square crop per real image (the pool), ranked within the class by the teacher's
cross-entropy (lowest first); item ``(c, i)`` starts from the ``i``-th best patch of class ``c``.

Every item ``(c, i)`` is a pure function of the run parameters and the seed: a batch's augmentation
seed derives from its index, and the PTA bank of a batch is seeded with the *initial* images of the
class's other items (never with images other batches produced), so a resumed run, a run split with
``ipc_start/ipc_end``, and a torchrun-sharded run write the same images as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .fileio import read_json, save_png, save_torch, write_json

__all__ = ["METHODS", "DistillConfig", "EvalConfig", "distill", "build_pool", "evaluate", "relabel_stage", "item_path",
           "load_distilled", "random_real_images", "Stage", "RunMismatch", "write_stage_record"]

METHODS = ("random-real", "rded", "sre2l", "fadrm", "reta")
RUN_FORMAT = 1
#: what a reta output folder may hold (anything else means it is somebody else's folder)
OUTPUT_NAMES = {"run.json", "classes.json", "images", "stages", "labels", "export.pt", "eval.json", "report.md",
                "report.json", "report"}


ENGINE_DEFAULTS = dict(amp=None, channels_last=False, compile=None, topo_overlap=False)


class RunMismatch(ValueError):
    """The output folder belongs to a run with other parameters: refused, nothing is overwritten."""


@dataclass
class DistillConfig:
    """Parameters of ``reta distill``; defaults follow METHOD.md ([pred]/[paper]) unless noted.

    Attributes:
        method: one of :data:`METHODS`.
        ipc: images per class of the whole set; ``ipc_start``/``ipc_end``: the slice this process
            produces (``None`` = up to ``ipc``).
        iterations: recover steps per batch B, split over ``blocks`` blocks at the data's size, or over
            one block per entry of ``resolutions`` (ImageNet: 200, 224, 200, 224; the last must be the
            data's size, which the written images have).
        batch_classes: classes per recover batch; ``ipc_per_batch``: items of each class per batch (batch
            = ``batch_classes * ipc_per_batch`` images; BN statistics over the batch). Defaults [pred:
            batches of 100 images]: ``min(C, 100)`` classes and ``max(1, 100 // batch_classes)`` items
            each (ImageNet: 100 classes x 1; CIFAR-10: 10 classes x 10, so PTA sees ten synthetic
            images of each class together).
        partition: DRC retrieval searches, for item ``(c, i)``, only the class-``c`` patches whose RDED
            rank ``r`` has ``r % ipc == i`` [ours]. Without it, all images of a class tend to retrieve the
            same few low-complexity patches and, after three residual injections, collapse onto them
            (measured on digits: 1-3 distinct retrieved patches per class of 10 images).
        lr: Adam's pixel learning rate. None: 0.25 above 64 px ([pred], the ImageNet setting) and 0.05 up to
            64 px ([ours]: chosen on a validation split of CIFAR-10 training images, where 0.25 over-optimises
            the small images and falls below its own real-patch initialisation; +5 points for FADRM and
            RETA alike, bench/results/quality-*/tuning.md).
        jitter (None: 4 px up to 64 px data, 32 above), alpha, lam: see :class:`RecoverConfig`.
        r_bn, first_bn_weight, lam_topo: see :class:`RETALoss`.
        topo_k: mutual k-NN parameter of PTA (None: min(10, ipc - 1) [ours], since a class's point set
            holds ipc synthetic images and PTA needs more than k points).
        points_per_class: real points per class for PTA (synthetic side: min(ipc, this)).
        pool_per_class, pool_candidates: patch pool size per class and RDED's best-of-N crops.
        drc, pta: the RETA ablations (``reta`` only).
        seed: everything random derives from it.
        amp, channels_last, compile: the recover step's engine (see :class:`RecoverConfig`): bf16
            autocast, channels-last memory format, ``torch.compile`` mode. They change the images at
            rounding level, so a non-default choice is part of the run's identity (defaults are left
            out of it, so folders written before these options existed still resume).
        topo_overlap: PTA's pairings computed in a worker thread during the rest of the step and
            used one step later (:class:`TopologyAlignmentLoss` ``overlap``) [ours]; part of the
            identity when on (it changes the images).
    """

    method: str = "reta"
    ipc: int = 10
    ipc_start: int = 0
    ipc_end: Optional[int] = None
    iterations: int = 1000
    blocks: int = 4
    resolutions: Optional[Sequence[int]] = None
    batch_classes: Optional[int] = None
    ipc_per_batch: Optional[int] = None
    lr: Optional[float] = None
    jitter: Optional[int] = None
    alpha: float = 0.5
    lam: float = 0.1
    r_bn: float = 0.01
    first_bn_weight: float = 10.0
    lam_topo: float = 0.5
    topo_k: Optional[int] = None
    points_per_class: int = 32
    topo_refresh: int = 1
    pool_per_class: int = 300
    pool_candidates: int = 1
    drc: bool = True
    pta: bool = True
    partition: bool = True
    seed: int = 0
    amp: Optional[str] = None
    channels_last: bool = False
    compile: Optional[str] = None
    topo_overlap: bool = False

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method != "reta" and (not self.drc or not self.pta):
            raise ValueError(f"--no-drc / --no-pta are ablations of reta, not of {self.method}")
        for name in ("ipc", "iterations", "blocks", "batch_classes", "ipc_per_batch", "points_per_class",
                     "pool_per_class", "pool_candidates", "topo_refresh"):
            v = getattr(self, name)
            if v is None and name in ("batch_classes", "ipc_per_batch"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        end = self.ipc if self.ipc_end is None else self.ipc_end
        if not (0 <= self.ipc_start < end <= self.ipc):
            raise ValueError(f"need 0 <= ipc_start < ipc_end <= ipc, got ipc_start={self.ipc_start}, "
                             f"ipc_end={self.ipc_end}, ipc={self.ipc}")
        if self.uses_recover and self.iterations < self.n_blocks:
            raise ValueError(f"iterations ({self.iterations}) must be >= the number of blocks ({self.n_blocks})")
        for name in ("lr", "alpha", "lam", "r_bn", "first_bn_weight", "lam_topo"):
            v = getattr(self, name)
            if v is None and name == "lr":
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.resolutions is not None and (not self.resolutions or any(
                isinstance(r, bool) or not isinstance(r, int) or r < 8 for r in self.resolutions)):
            raise ValueError(f"resolutions must be a non-empty list of integers >= 8, got {self.resolutions!r}")
        if self.topo_k is not None and self.topo_k < 1:
            raise ValueError(f"topo_k must be >= 1, got {self.topo_k}")
        from .recover import check_engine

        check_engine(self.amp, self.compile)

    @property
    def uses_recover(self) -> bool:
        return self.method in ("sre2l", "fadrm", "reta")

    @property
    def uses_pool(self) -> bool:
        return self.method in ("rded", "fadrm", "reta")

    @property
    def n_blocks(self) -> int:
        return len(self.block_resolutions(0))

    def block_resolutions(self, size: int) -> List[int]:
        """One resolution per recover block (SRe2L: a single block at ``size``)."""
        if self.method == "sre2l":
            return [size]
        return list(self.resolutions) if self.resolutions else [size] * self.blocks

    @property
    def end(self) -> int:
        return self.ipc if self.ipc_end is None else self.ipc_end

    @property
    def pta_on(self) -> bool:
        return self.method == "reta" and self.pta and self.lam_topo > 0

    def batch_shape(self, num_classes: int):
        """``(classes per batch, items of each class per batch)``."""
        bc = self.batch_classes or min(num_classes, 100)
        ipb = self.ipc_per_batch or max(1, min(self.ipc, 100 // bc))
        return bc, ipb

    def lr_for(self, size: int) -> float:
        return self.lr if self.lr is not None else (0.25 if size > 64 else 0.05)

    def k(self) -> int:
        return self.topo_k if self.topo_k is not None else max(1, min(10, self.ipc - 1))

    def identity(self) -> dict:
        """The parameters that decide the images (all but the ipc slice): a folder written with one
        identity is refused for another."""
        d = asdict(self)
        d.pop("ipc_start"), d.pop("ipc_end")
        for name, default in ENGINE_DEFAULTS.items():
            if d[name] == default:
                d.pop(name)
        return d


@dataclass
class EvalConfig:
    """The student protocol of METHOD.md section 1 (defaults: [pred]); ``seeds``: evaluation seeds."""

    student: Optional[str] = None
    epochs: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 20.0
    crop_scale: tuple = (0.08, 1.0)
    cutmix: bool = True
    labels: str = "online"
    seeds: Sequence[int] = (0,)
    baseline: bool = True

    def validate(self) -> None:
        if self.labels not in ("online", "stored"):
            raise ValueError(f"labels must be 'online' or 'stored', got {self.labels!r}")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not (self.lr > 0 and self.temperature > 0):
            raise ValueError("lr and temperature must be > 0")
        if not self.seeds:
            raise ValueError("need at least one evaluation seed")


# ------------------------------------------------------------------------------------------------
# stage bookkeeping

class Stage:
    """Context manager timing one stage and recording its peak memory into ``out/stages/<name>.json``.

    Peak memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` during the stage; on the CPU
    the process's peak resident set size so far (``ru_maxrss``; it cannot be reset per stage).
    """

    def __init__(self, out: Optional[Path], name: str, device, log: Callable = print):
        self.out, self.name, self.device, self.log = out, name, torch.device(device), log
        self.info: dict = {}

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        seconds = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(self.device), "cuda_max_allocated"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
            kind = "process_peak_rss"
        rec = dict(stage=self.name, seconds=round(seconds, 3), peak_bytes=int(peak), peak_kind=kind,
                   ok=exc_type is None, **self.info)
        if self.out is not None and exc_type is None:
            rec = write_stage_record(self.out, self.name, rec)
        self.record = rec
        if exc_type is None:
            self.log(f"[{self.name}] done in {seconds:.1f} s, peak memory {peak / 2**20:.0f} MiB ({kind})")
        return False


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
    keep = ("seconds", "peak_bytes", "written", "skipped", "ipc_start", "ipc_end", "ranks")
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


def versions() -> dict:
    from . import __version__

    return dict(reta_fast=__version__, torch=torch.__version__, numpy=np.__version__,
                python=platform.python_version())


# ------------------------------------------------------------------------------------------------
# the distilled set on disk

def item_path(out, c: int, i: int) -> Path:
    return Path(out) / "images" / f"new{c:03d}" / f"class{c:03d}_id{i:03d}.png"


def _to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised ``[3, H, W]`` -> uint8 ``[H, W, 3]``."""
    m = torch.tensor(mean, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, device=x.device).view(3, 1, 1)
    return ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def load_distilled(out, classes: Sequence[str], mean, std, size: Optional[int] = None, raw: bool = False):
    """The distilled set of ``out`` as ``(images [N, 3, H, W], targets [N], ids [(c, i)])``: normalised
    float32, or with ``raw=True`` the uint8 pixels (a quarter of the memory: ImageNet-1K at IPC 50 is
    7.5 GB instead of 30; :func:`reta_fast.train.train_student` and ``relabel`` normalise them batch by
    batch, with the same values). Refuses a folder whose class mapping differs from ``classes``."""
    out = Path(out)
    mapping = read_json(out / "classes.json", "class mapping")
    if mapping.get("classes") != list(classes):
        raise ValueError(f"{str(out)!r} was distilled for classes {mapping.get('classes', [])[:5]}..., not "
                         f"{list(classes)[:5]}...")
    from PIL import Image

    files = []
    for c in range(len(classes)):
        folder = out / "images" / f"new{c:03d}"
        if folder.is_dir():
            files += [(c, f) for f in sorted(folder.glob(f"class{c:03d}_id*.png"))]
    if not files:
        raise ValueError(f"{str(out)!r} holds no distilled image (images/new*/class*_id*.png): run distill first")
    x, ys, ids = None, [], []
    for n, (c, f) in enumerate(files):
        try:
            with Image.open(f) as im:
                arr = np.array(im.convert("RGB"), dtype=np.uint8)
        except (OSError, SyntaxError) as exc:
            raise ValueError(f"distilled image {str(f)!r} is unreadable ({exc}): delete it and re-run distill "
                             f"to regenerate it") from None
        shape = (3,) + arr.shape[:2]
        if x is None:
            if size is not None and shape != (3, size, size):
                raise ValueError(f"distilled images in {str(out)!r} have shape {shape}, expected (3, {size}, {size})")
            x = torch.empty((len(files),) + shape, dtype=torch.uint8)  # filled in place: no second copy
        elif shape != tuple(x.shape[1:]):
            raise ValueError(f"distilled images in {str(out)!r} have shapes {tuple(x.shape[1:])} and {shape} "
                             f"({str(f)!r})")
        x[n] = torch.from_numpy(arr).permute(2, 0, 1)
        ys.append(c)
        ids.append((c, int(f.stem.split("_id")[-1])))
    if raw:
        return x, torch.tensor(ys), ids
    from .train import normalise_pixels

    return normalise_pixels(x, mean, std), torch.tensor(ys), ids


def _check_run(out: Path, manifest: dict) -> None:
    """Refuse an output folder made by another run configuration; write run.json otherwise."""
    path = out / "run.json"
    if path.exists():
        old = read_json(path, "run manifest")
        diffs = [k for k in ("method", "config", "data", "teachers")
                 if json.loads(json.dumps(old.get(k))) != json.loads(json.dumps(manifest[k]))]
        if diffs:
            detail = []
            for k in diffs:
                a, b = old.get(k), manifest[k]
                if isinstance(a, dict) and isinstance(b, dict):
                    detail += [f"{k}.{f}: {a.get(f)!r} -> {b.get(f)!r}" for f in sorted(set(a) | set(b))
                               if a.get(f) != b.get(f)]
                else:
                    detail.append(f"{k}: {a!r} -> {b!r}")
            raise RunMismatch(f"{str(out)!r} holds a run with other settings ({'; '.join(detail[:6])}): refusing to "
                              f"mix them. Use another --out, or the original settings to resume.")
        return
    foreign = [p.name for p in out.iterdir() if p.name not in OUTPUT_NAMES and not p.name.startswith(".")]
    if foreign:
        raise RunMismatch(f"{str(out)!r} is not a reta output folder (it holds {foreign[:3]}): refusing to write into it")
    write_json(path, manifest)


# ------------------------------------------------------------------------------------------------
# initial images

def random_real_images(data, ipc: int, seed: int, classes: Optional[Sequence[int]] = None,
                       start: int = 0, end: Optional[int] = None) -> Dict[tuple, torch.Tensor]:
    """Items ``(c, i) -> uint8 [3, S, S]``: per class a seeded permutation of its training images,
    item i = the i-th readable one (unreadable files are skipped deterministically)."""
    from .data import dataset_targets
    from .datasets import SizedImages

    targets = dataset_targets(data.train)
    if targets is None:
        raise ValueError("random-real needs a data set that exposes its labels (.targets)")
    end = ipc if end is None else end
    t = torch.tensor(targets)
    sized = SizedImages(data.train, data.size)
    out = {}
    for c in (range(len(data.classes)) if classes is None else classes):
        idx = (t == c).nonzero().flatten()
        if idx.numel() < ipc:
            raise ValueError(f"IPC {ipc} is larger than class {data.classes[c]!r}, which has {idx.numel()} training "
                             f"images: real-image methods cannot pick that many")
        perm = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed * 7919 + c))].tolist()
        got, pos = [], 0
        while len(got) < end and pos < len(perm):
            x, _ = sized[perm[pos]]
            pos += 1
            if x is not None:
                got.append(x)
        if len(got) < end:
            raise ValueError(f"class {data.classes[c]!r} has only {len(got)} readable images, fewer than IPC {ipc}")
        for i in range(start, end):
            out[(c, i)] = got[i]
    return out


@torch.no_grad()
def rded_ranking(pool, teacher, device, batch_size: int = 256) -> List[np.ndarray]:
    """Per class, pool indices sorted by the teacher's cross-entropy on the patch (lowest first:
    RDED's realism score), ties by index."""
    labels = np.asarray(pool.labels)
    ce = np.empty(len(labels), dtype=np.float64)
    for a in range(0, len(labels), batch_size):
        idx = np.arange(a, min(len(labels), a + batch_size))
        logits = teacher(pool.images(idx, device=device)).float()
        ce[idx] = F.cross_entropy(logits, torch.as_tensor(labels[idx], device=device), reduction="none").cpu().numpy()
    return [np.flatnonzero(labels == c)[np.lexsort((np.flatnonzero(labels == c), ce[labels == c]))]
            for c in range(len(pool.classes))]


class PartitionedRetriever:
    """DRC retrieval where item ``(c, i)`` (query group ``ids = c * ipc + i``) searches only its own
    share of the class pool (``groups`` of the pool patches); a ``retriever`` for :func:`recover`."""

    def __init__(self, pool, groups, lam: float, device):
        self.pool, self.groups, self.lam, self.device = pool, groups, lam, device
        self._tensors: Dict[int, tuple] = {}  # resolution -> (feats, complexity scaled per class)
        self.ids: Optional[torch.Tensor] = None

    def __call__(self, q: torch.Tensor, y: torch.Tensor, resolution: int) -> torch.Tensor:
        from .retrieval import retrieve

        if self.ids is None or self.ids.shape != y.shape:
            raise RuntimeError("PartitionedRetriever.ids must hold the batch's item ids")
        if resolution not in self._tensors:
            feats, _, cx = self.pool.retrieval_tensors(resolution, device=self.device)
            self._tensors[resolution] = (feats, cx)
        feats, cx = self._tensors[resolution]
        return retrieve(q, self.ids, feats, self.groups, cx, lam=self.lam)


def _noise(c: int, i: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + c * 10_007 + i)
    return torch.randn(3, size, size, generator=g)


# ------------------------------------------------------------------------------------------------
# distill

def _pool_path(data, teacher, cfg: DistillConfig, pool_dir) -> Path:
    import hashlib

    from .pool import teacher_fingerprint
    if pool_dir is not None:
        return Path(pool_dir)
    from .teachers import cache_dir

    key = f"{data.fingerprint}|{teacher_fingerprint(teacher.model)}|{cfg.pool_per_class}|{cfg.pool_candidates}|" \
          f"{data.size}|{cfg.seed}|{sorted(set(cfg.block_resolutions(data.size)))}"
    return cache_dir() / "pools" / f"pool-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _real_points(teacher, pool, m: int, seed: int, device) -> torch.Tensor:
    """``[C, m, D]`` penultimate features of ``teacher`` on m seeded pool patches per class (PTA's real side)."""
    from .pool import teacher_features

    labels = torch.tensor(np.asarray(pool.labels))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c in range(len(pool.classes)):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() < m:
            raise ValueError(f"class {pool.classes[c]!r} has {idx.numel()} pool patches, fewer than the {m} PTA points "
                             f"per class: lower --points-per-class")
        pick = idx[torch.randperm(idx.numel(), generator=g)[:m]]
        with torch.no_grad():
            rows.append(teacher_features(teacher, pool.images(pick, device=device))[1].float())
    return torch.stack(rows)


def build_pool(data, teacher, cfg: DistillConfig, device="cpu", pool_dir=None, progress: bool = True,
               log: Callable = print):
    """Build (or load) the patch pool ``distill`` uses: one crop per real image, at the data's size,
    with complexities at every block resolution; in a cache folder keyed by data, teacher and
    parameters unless ``pool_dir`` is given."""
    from .pool import PatchPool

    ppath = _pool_path(data, teacher, cfg, pool_dir)
    log(f"[distill] patch pool: {ppath}")
    return PatchPool.build(data.train, teacher.model, ppath, per_class=cfg.pool_per_class, size=data.size,
                           resolutions=sorted(set(cfg.block_resolutions(data.size))), candidates=cfg.pool_candidates,
                           mean=data.mean, std=data.std, device=device, seed=cfg.seed, classes=data.classes,
                           dataset_name=data.name, progress=progress)


def _shard_batches(cfg: DistillConfig, C: int, rank: int, world_size: int):
    """Recover methods: the batch shape, the class groups and this rank's batches ``(ipc start, group)``
    of the slice ``[cfg.ipc_start, cfg.end)``: every ``world_size``-th batch of a fixed order."""
    bc, ipb = cfg.batch_shape(C)
    groups = [list(range(a, min(C, a + bc))) for a in range(0, C, bc)]
    starts = list(range((cfg.ipc_start // ipb) * ipb, cfg.end, ipb))
    batches = [(s, gi) for s in starts for gi in range(len(groups))]
    return bc, ipb, groups, [b for n, b in enumerate(batches) if n % world_size == rank]


def _shard_items(cfg: DistillConfig, C: int, rank: int, world_size: int) -> List[tuple]:
    """The items ``(c, i)`` of the slice that rank ``rank`` of ``world_size`` produces (a fixed order:
    shards never depend on what exists)."""
    all_items = [(c, i) for i in range(cfg.ipc_start, cfg.end) for c in range(C)]
    if not cfg.uses_recover:
        return [it for n, it in enumerate(all_items) if n % world_size == rank]
    _, ipb, groups, mine = _shard_batches(cfg, C, rank, world_size)
    return [(c, i) for s, gi in mine for i in range(max(s, cfg.ipc_start), min(s + ipb, cfg.end)) for c in groups[gi]]


def distill(data, teachers, out, cfg: DistillConfig, device="cpu", pool_dir=None, progress: bool = True,
            log: Callable = print, rank: int = 0, world_size: int = 1, on_item: Optional[Callable] = None,
            teacher_specs: Optional[Sequence[str]] = None) -> dict:
    """Produce the items ``(c, i)``, ``c`` over all classes and ``i`` in ``[cfg.ipc_start, cfg.end)``,
    that are not on disk yet, as PNGs under ``out/images`` (each written atomically).

    ``teachers``: list of :class:`reta_fast.teachers.Teacher` (round-robin over batches, FADRM+); the
    first one builds the pool and serves DRC's retrieval. ``rank``/``world_size`` shard the batches
    (torchrun). ``on_item(c, i)`` is called after each image is written. Returns the stage info.
    """
    from .pool import teacher_features, teacher_fingerprint
    from .recover import RecoverConfig, recover
    from .reta_loss import RETALoss

    cfg.validate()
    cfg = replace(cfg, lr=cfg.lr_for(data.size))  # the run manifest records the lr actually used
    if not teachers:
        raise ValueError("distill needs at least one teacher")
    out = Path(out)
    for t in teachers:
        if list(t.classes) != list(data.classes) or t.size != data.size:
            raise ValueError(f"teacher {t.name} was made for other classes or another image size than {data.name}")
    manifest = dict(format=RUN_FORMAT, method=cfg.method, config=cfg.identity(),
                    data=dict(name=data.name, fingerprint=data.fingerprint, size=data.size, classes=len(data.classes),
                              mean=list(data.mean), std=list(data.std)),
                    teachers=[dict(name=t.name, fingerprint=teacher_fingerprint(t.model)) for t in teachers],
                    teacher_specs=list(teacher_specs) if teacher_specs else [str(t.path) for t in teachers if t.path],
                    versions=versions())
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, manifest)
    write_json(out / "classes.json", dict(classes=list(data.classes),
                                          folders=[f"new{c:03d}" for c in range(len(data.classes))]))
    C, S = len(data.classes), data.size
    if cfg.uses_recover and cfg.block_resolutions(S)[-1] != S:
        raise ValueError(f"the last block's resolution must be the data's size {S} (the images are written at it), "
                         f"got resolutions {cfg.block_resolutions(S)}")
    now = time.time()
    for stale in (out / "images").glob("new*/.*.tmp"):  # left by a killed run; a live writer's are seconds old
        try:
            if now - stale.stat().st_mtime > 120:
                stale.unlink()
        except OSError:
            pass
    info = dict(method=cfg.method, ipc=cfg.ipc, ipc_start=cfg.ipc_start, ipc_end=cfg.end, written=0, skipped=0)
    ipcs = list(range(cfg.ipc_start, cfg.end))
    todo_all = [(c, i) for i in ipcs for c in range(C) if not item_path(out, c, i).exists()]
    if not todo_all:
        log(f"[distill] all {C * len(ipcs)} items of ipc [{cfg.ipc_start}, {cfg.end}) already exist in {out}")
        info["skipped"] = len(_shard_items(cfg, C, rank, world_size))  # this rank's share: ranks' counts add up
        return info
    for t in teachers:
        t.model.to(device).eval()

    all_items = [(c, i) for i in ipcs for c in range(C)]  # fixed order: shards never depend on what exists
    todo_set = set(todo_all)
    if cfg.method == "random-real":
        mine = [it for it in _shard_items(cfg, C, rank, world_size) if it in todo_set]
        classes = sorted({c for c, _ in mine})
        imgs = random_real_images(data, cfg.ipc, cfg.seed, classes, cfg.ipc_start, cfg.end)
        for c, i in mine:
            save_png(item_path(out, c, i), imgs[(c, i)].permute(1, 2, 0).numpy())
            info["written"] += 1
            if on_item:
                on_item(c, i)
        info["skipped"] = len(_shard_items(cfg, C, rank, world_size)) - len(mine)
        return info

    pool = None
    if cfg.uses_pool:
        pool = build_pool(data, teachers[0], cfg, device, pool_dir, progress, log)
        counts = np.bincount(np.asarray(pool.labels), minlength=C)
        short = [(data.classes[c], int(counts[c])) for c in range(C) if counts[c] < cfg.ipc]
        if short:
            raise ValueError(f"IPC {cfg.ipc} is larger than the pool of class(es) {short[:5]} (class size or "
                             f"--pool-per-class {cfg.pool_per_class}): real-patch methods need one patch per image")
        ranking = rded_ranking(pool, teachers[0].model, device)

    def init_image(c: int, i: int) -> torch.Tensor:
        if cfg.method == "sre2l":
            return _noise(c, i, S, cfg.seed)
        return pool.images([int(ranking[c][i])])[0]

    if cfg.method == "rded":
        mine = [it for it in _shard_items(cfg, C, rank, world_size) if it in todo_set]
        for c, i in mine:
            save_png(item_path(out, c, i), _to_uint8(init_image(c, i), data.mean, data.std))
            info["written"] += 1
            if on_item:
                on_item(c, i)
        info["skipped"] = len(_shard_items(cfg, C, rank, world_size)) - len(mine)
        return info

    # recover methods ------------------------------------------------------------------------
    k = cfg.k()
    m_pts = min(cfg.ipc, cfg.points_per_class)
    if cfg.pta_on and m_pts <= k:
        log(f"[distill] warning: PTA needs more than k={k} points per class but IPC {cfg.ipc} gives {m_pts}: "
            f"the topology term stays 0 (use a larger IPC or --topo-k < {m_pts})")
    crits = []
    for t in teachers:
        kw = dict(r_bn=cfg.r_bn, first_bn_weight=cfg.first_bn_weight)
        if cfg.pta_on:
            # every class of the pool has >= ipc patches (checked above), and PTA uses min(ipc, points) points
            real = _real_points(t.model, pool, min(cfg.points_per_class, int(counts.min())), cfg.seed, device)
            crits.append(RETALoss(t.model, lam_topo=cfg.lam_topo, real_feats=real, k=k, topo_refresh=cfg.topo_refresh,
                                  overlap=cfg.topo_overlap,
                                  **kw))
        else:
            crits.append(RETALoss(t.model, lam_topo=0.0, **kw))
    jitter = cfg.jitter if cfg.jitter is not None else (4 if S <= 64 else 32)
    bc, ipb, groups, it = _shard_batches(cfg, C, rank, world_size)
    info.update(batch_classes=bc, ipc_per_batch=ipb)
    retriever = None
    if cfg.method == "reta" and cfg.drc and cfg.partition:
        labels_p = torch.tensor(np.asarray(pool.labels))  # a copy: pool arrays are read-only memory maps
        share = torch.empty(len(labels_p), dtype=torch.int64)
        for c in range(C):
            r = torch.as_tensor(ranking[c], dtype=torch.int64)
            share[r] = torch.arange(r.numel()) % cfg.ipc
        retriever = PartitionedRetriever(pool, (labels_p * cfg.ipc + share).to(device), cfg.lam, device)
    parts_log: List[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(it), desc=f"distill {cfg.method}", unit="batch")
    try:
        for s, gi in it:
            bi = (s // ipb) * len(groups) + gi  # global batch index: fixes seed and teacher
            # the whole batch, whatever slice this process makes: a batch's images depend on the batch only
            items = [(c, i) for i in range(s, min(s + ipb, cfg.ipc)) for c in groups[gi]]
            todo = [x for x in items if x in todo_set and not item_path(out, *x).exists()]
            if not todo:
                info["skipped"] += sum(x in set(all_items) for x in items)
                if bar is not None:
                    bar.update(1)
                continue
            crit = crits[bi % len(crits)]
            x0 = torch.stack([init_image(c, i) for c, i in items]).to(device)
            y = torch.tensor([c for c, _ in items], device=device)
            ids = torch.tensor([c * cfg.ipc + i for c, i in items], device=device)
            crit.reset()  # no state from earlier batches (bank, PTA grids, pairings)
            if cfg.pta_on:
                others = [(c, j) for c in groups[gi] for j in range(cfg.ipc)]
                with torch.no_grad():
                    fb = torch.cat([teacher_features(crit.teacher, torch.stack(
                        [init_image(c, j) for c, j in others[a:a + 256]]).to(device))[1] for a in range(0, len(others), 256)])
                crit.seed_bank(fb.float(), torch.tensor([c for c, _ in others], device=device),
                               torch.tensor([c * cfg.ipc + j for c, j in others], device=device))
            rc = RecoverConfig(iterations=cfg.iterations, resolutions=cfg.block_resolutions(S), lr=cfg.lr_for(S),
                               jitter=jitter,
                               alpha=cfg.alpha, drc=cfg.method == "reta" and cfg.drc, lam=cfg.lam, mean=data.mean,
                               std=data.std, amp=cfg.amp, channels_last=cfg.channels_last, compile=cfg.compile)
            if retriever is not None:
                retriever.ids = ids  # query group of item (c, i) = c * ipc + i
            x = recover(crit, x0, y, ids if cfg.pta_on else None, pool=pool if rc.drc else None, config=rc,
                        seed=cfg.seed * 1_000_003 + bi, retrieval_teacher=teachers[0].model, retriever=retriever)
            last = [h for h in rc.history if "ce" in h][-max(1, cfg.iterations // 10):]
            parts = {key: float(np.mean([h[key] for h in last])) for key in ("ce", "bn", "topo")}
            if not all(math.isfinite(v) for v in parts.values()):
                raise FloatingPointError(f"the recover loss is not finite ({parts}) at batch {bi}: a broken teacher "
                                         f"or too large lr={cfg.lr}; nothing was written for this batch")
            parts_log.append(dict(batch=bi, **parts))
            for n, (c, i) in enumerate(items):
                if (c, i) in todo_set and not item_path(out, c, i).exists():
                    save_png(item_path(out, c, i), _to_uint8(x[n], data.mean, data.std))
                    info["written"] += 1
                    if on_item:
                        on_item(c, i)
                elif cfg.ipc_start <= i < cfg.end:
                    info["skipped"] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ce=f"{parts['ce']:.3f}", bn=f"{parts['bn']:.3f}", topo=f"{parts['topo']:.4f}")
    finally:
        if bar is not None:
            bar.close()
        for crit in crits:
            crit.close()
    if parts_log:
        info["loss_parts"] = {key: float(np.mean([p[key] for p in parts_log])) for key in ("ce", "bn", "topo")}
    info["topo_k"] = k if cfg.pta_on else None
    return info


# ------------------------------------------------------------------------------------------------
# relabel / evaluate

def _student(name: Optional[str], data, teacher_name: str):
    from .teachers import build_arch, default_arch

    arch = name or (teacher_name if teacher_name == "resnet18" or teacher_name.startswith("convnet")
                    else default_arch(data))
    return build_arch(arch, len(data.classes), data.size)[0], arch


def relabel_stage(data, teacher, out, ecfg: EvalConfig, device="cpu", progress: bool = True, log=print) -> dict:
    """Stored soft labels for every evaluation seed (``labels/seed{s}.logits``: the teacher's fp16
    logits for each augmented batch the student protocol draws, streamed to disk, see
    :mod:`reta_fast.labels`) and the tensor export ``export.pt`` (uint8 images, targets, classes,
    mean/std and the teacher's logits on the un-augmented images)."""
    from .labels import write_logits
    from .pool import teacher_fingerprint
    from .train import normalise_pixels, relabel_batches

    ecfg.validate()
    out = Path(out)
    u8, y, ids = load_distilled(out, data.classes, data.mean, data.std, data.size, raw=True)
    teacher.model.to(device).eval()
    info = dict(images=len(y), seeds=list(ecfg.seeds))
    for s in ecfg.seeds:
        path = out / "labels" / f"seed{s}.logits"
        meta = dict(_label_settings(ecfg, len(y), data.flip), seed=s, ids=[list(i) for i in ids],
                    teacher=teacher_fingerprint(teacher.model))
        rows = ecfg.epochs * len(y)
        write_logits(path, relabel_batches(teacher.model, u8, epochs=ecfg.epochs, batch_size=ecfg.batch_size,
                                           crop_scale=ecfg.crop_scale, flip=data.flip, cutmix=ecfg.cutmix, seed=s,
                                           device=device, progress=progress, mean=data.mean, std=data.std),
                     rows=rows, classes=len(data.classes), meta=meta)
        log(f"[relabel] ({rows}, {len(data.classes)}) fp16 logits for seed {s} -> {path}")
    with torch.no_grad():
        plain = torch.cat([teacher.model(normalise_pixels(u8[a:a + 256], data.mean, data.std).to(device)).half().cpu()
                           for a in range(0, len(u8), 256)])
    save_torch(out / "export.pt", dict(images=u8, targets=y, classes=list(data.classes), mean=list(data.mean),
                                       std=list(data.std), soft_labels=plain, ids=ids))
    log(f"[relabel] tensor export {out / 'export.pt'}")
    return info


def _label_settings(ecfg: EvalConfig, n: int, flip: bool) -> dict:
    """What stored soft labels depend on besides the seed: the stream must be replayed exactly."""
    return dict(epochs=ecfg.epochs, batch_size=ecfg.batch_size, n=n, crop_scale=[float(v) for v in ecfg.crop_scale],
                cutmix=bool(ecfg.cutmix), flip=bool(flip))


def _stored_labels(out: Path, s: int, ecfg: EvalConfig, ids, flip: bool, classes: int, teacher):
    """The stored soft labels of seed ``s``, checked against everything they depend on: the student
    protocol's settings, the seed, the images (ids, in order), the class count and the teacher."""
    from .labels import StoredLogits
    from .pool import teacher_fingerprint

    path = out / "labels" / f"seed{s}.logits"
    legacy = out / "labels" / f"seed{s}.pt"  # written by reta_fast before the streamed format
    if not path.is_file() and legacy.is_file():
        try:
            d = torch.load(legacy, map_location="cpu", weights_only=False)
            logits, meta = d["logits"], {k: v for k, v in d.items() if k != "logits"}
            meta["crop_scale"] = [float(v) for v in meta["crop_scale"]]
            meta["ids"] = [list(i) for i in meta.get("ids", [])] or None
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"stored soft labels {str(legacy)!r} are unreadable: {exc!r}") from None
    elif not path.is_file():
        raise FileNotFoundError(f"no stored soft labels {str(path)!r}: run `reta relabel` with the same evaluation "
                                f"settings first, or use --labels online")
    else:
        logits = StoredLogits(path)
        meta = logits.meta
    n = len(ids)
    want = _label_settings(ecfg, n, flip)
    got = {k: meta.get(k) for k in want}
    problems = []
    if got != want:
        problems.append(f"settings {got} vs this evaluation's {want}")
    if meta.get("seed") != s:
        problems.append(f"seed {meta.get('seed')} vs {s}")
    if tuple(logits.shape) != (ecfg.epochs * n, classes):
        problems.append(f"shape {tuple(logits.shape)} vs {(ecfg.epochs * n, classes)}")
    if meta.get("ids") is not None and meta["ids"] != [list(i) for i in ids]:
        problems.append("other images (the set changed since relabel)")
    if meta.get("teacher") is not None and meta["teacher"] != teacher_fingerprint(teacher):
        problems.append("another teacher")
    if problems:
        raise ValueError(f"stored soft labels {str(path if path.is_file() else legacy)!r} do not match this "
                         f"evaluation ({'; '.join(problems)}): run `reta relabel` again")
    return logits


def evaluate(data, teacher, out, ecfg: EvalConfig, device="cpu", progress: bool = True, log=print,
             ipc: Optional[int] = None, seed: int = 0, workers: int = 0) -> dict:
    """Train a student from scratch on the distilled set of ``out`` for every seed of ``ecfg`` and
    report its top-1 on ``data.val``, with the teacher's top-1 and (``ecfg.baseline``) the random
    real subset at the same IPC trained with the same protocol and seeds. Writes ``eval.json``.

    In a torch.distributed process group (``torchrun ... reta evaluate``) every rank calls it: each
    student is trained with DDP and scored on a share of the validation images; rank 0 writes."""
    from .datasets import fits_in_memory, materialize
    from .train import accuracy, dist_world, train_student

    ecfg.validate()
    out = Path(out)
    x, y, ids = load_distilled(out, data.classes, data.mean, data.std, data.size, raw=True)  # uint8: 1/4 the memory
    counts = torch.bincount(y, minlength=len(data.classes))
    run = read_json(out / "run.json", "run manifest") if (out / "run.json").is_file() else {}
    ipc = ipc or (run.get("config") or {}).get("ipc") or int(counts.max())
    if int(counts.min()) < ipc:
        missing = [data.classes[c] for c in range(len(data.classes)) if counts[c] < ipc][:5]
        raise ValueError(f"the distilled set in {str(out)!r} is incomplete: classes {missing} have fewer than {ipc} "
                         f"images (finish `reta distill` first)")
    val = data.val
    if fits_in_memory(val, data.size):
        val, _ = materialize(val, data.size, progress=progress, what="val images")
    acc_kw = dict(mean=data.mean, std=data.std, device=device, size=data.size, workers=workers)
    teacher.model.to(device).eval()
    t_acc = teacher.accuracy if teacher.accuracy is not None else accuracy(teacher.model, val, **acc_kw)
    sets = {"distilled": x}
    if ecfg.baseline:
        rr = random_real_images(data, ipc, seed)
        sets["random-real"] = torch.stack([rr[(c, i)] for c in range(len(data.classes)) for i in range(ipc)])
    res: Dict[str, List[float]] = {k: [] for k in sets}
    for name, imgs in sets.items():
        for s in ecfg.seeds:
            torch.manual_seed(s)  # the student's initial weights are a function of the seed too
            student, arch = _student(ecfg.student, data, teacher.name)
            soft = None
            if ecfg.labels == "stored" and name == "distilled":
                soft = _stored_labels(out, s, ecfg, ids, data.flip, len(data.classes), teacher.model)
            student = train_student(student, None if soft is not None else teacher.model, imgs,
                                    epochs=ecfg.epochs, batch_size=ecfg.batch_size, lr=ecfg.lr,
                                    weight_decay=ecfg.weight_decay, temperature=ecfg.temperature, cutmix=ecfg.cutmix,
                                    crop_scale=ecfg.crop_scale, flip=data.flip, device=device, seed=s,
                                    progress=progress, soft_labels=soft, mean=data.mean, std=data.std)
            acc = accuracy(student, val, **acc_kw)
            res[name].append(acc)
            log(f"[evaluate] {name} (IPC {ipc}) student {arch}, seed {s}: top-1 {acc:.2f}%")

    def stat(v):
        return dict(mean=float(np.mean(v)), std=float(np.std(v)), runs=[float(a) for a in v])

    result = dict(method=run.get("method", "unknown"), ipc=ipc, student=arch, teacher=teacher.name,
                  teacher_top1=float(t_acc), distilled=stat(res["distilled"]),
                  random_real=stat(res["random-real"]) if "random-real" in res else None,
                  protocol=dict(asdict(ecfg), crop_scale=list(ecfg.crop_scale), seeds=list(ecfg.seeds), flip=data.flip),
                  val_images=len(data.val))
    rank, world = dist_world()
    if world > 1:  # students trained with DDP (see train_student)
        result["distributed"] = dict(ranks=world, batchnorm="sync" if torch.device(device).type == "cuda"
                                     else "per-rank share of each batch")
    if rank == 0:
        write_json(out / "eval.json", result)
    return result
