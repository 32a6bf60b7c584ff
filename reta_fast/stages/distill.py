"""The distill stage (docs/method.md §1-§3): the patch pool, the initial images, and the recover batches of
every method, written as PNGs into the output folder.

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

Recovery runs by *unit* (:mod:`reta_fast.stages.shards`): one batch, or, when PTA aligns each class's
synthetic set (``pta_set="complete"``, the default for ``reta``), all batches of a class group recovered in
lockstep, so that a class's point set is its current images (docs/method.md §2.1, §4.1).

Every item ``(c, i)`` is a pure function of the run parameters and the seed: a batch's augmentation seed
derives from its index, a unit starts from the initial images alone and carries no state to the next, so a
resumed run, a run split with ``ipc_start/ipc_end`` (which recovers every unit it needs whole and writes
its slice) and a torchrun-sharded run (ranks take units) write the same images as one uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sets import random_real_images
from ..fileio import cache_dir, save_png, write_json
from ..models.features import named_feature_head, teacher_features, teacher_fingerprint
from ..recover.loop import RecoverConfig, augment, recover
from ..recover.loss import RETALoss
from ..retrieval.pool import PatchPool
from ..retrieval.search import retrieve
from ..topology.betti import betti_distance
from ..topology.pta import TopologyAlignmentLoss
from .config import DistillConfig
from .output import RUN_FORMAT, check_run, item_path, to_uint8
from .records import cpu_model, versions
from .shards import shard_items, shard_units, unit_items

__all__ = ["distill", "build_pool", "rded_ranking", "PartitionedRetriever"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# initial images and retrieval


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

    def __call__(self, q: torch.Tensor, y: torch.Tensor, ids: Optional[torch.Tensor], resolution: int) -> torch.Tensor:
        if ids is None or ids.shape != y.shape:
            raise RuntimeError("PartitionedRetriever needs the batch's item ids (c * ipc + i)")
        feats, _, cx = self.pool.retrieval_tensors(resolution, device=self.device)  # cached by the pool
        return retrieve(q, ids, feats, self.groups, cx, lam=self.lam)


def _noise(c: int, i: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + c * 10_007 + i)
    return torch.randn(3, size, size, generator=g)


# ------------------------------------------------------------------------------------------------
# diagnostics: what DRC and PTA did (docs/method.md §3-§4), in the stage record and the report


@torch.no_grad()
def set_topology(real: torch.Tensor, syn: torch.Tensor, k: int) -> dict:
    """How far the synthetic sets ``syn`` ``[C, m, D]`` are from the real ones ``real`` in topology: the
    Betti-0/1 curve distances, and PTA's own loss (a fresh one, its image grid from these features). On
    features of the images as they are, the view a student trains on, this says whether PTA moved the set's
    topology or only that of the views it was computed on."""
    return dict(betti_distance(real, syn, k), pta=float(TopologyAlignmentLoss(k=k)(syn, real)))


class _Diagnostics:
    """Collects, over the units of a distill call: per block, DRC's injections against the static anchor and
    each loss term's gradient norm; and for every class recovered whole in this call, the Betti-curve
    distance of its set to real features before and after recovery."""

    def __init__(self, teacher, pool, cfg: DistillConfig, device, ranking=None):
        self.teacher, self.cfg, self.device = teacher, cfg, device
        self.drc, self.grads, self.position = {}, {}, {}
        # each pool patch's place in its item's share (RDED rank // ipc; 0: the first, the anchor's place)
        self.share_place = None
        if ranking is not None:
            self.share_place = np.zeros(len(pool.labels), dtype=np.int64)
            for ranked in ranking:
                self.share_place[np.asarray(ranked)] = np.arange(len(ranked)) // cfg.ipc
        self.before, self.after = {}, {}
        self.real = None
        if pool is not None and cfg.uses_recover:
            m = cfg.pta_points
            self.real = _real_points(teacher, pool, m, cfg.seed, device).cpu()

    @torch.no_grad()
    def _feats(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([teacher_features(self.teacher, x[a:a + 256].to(self.device))[1].float().cpu()
                          for a in range(0, len(x), 256)])

    def unit(self, history, items, x0, x) -> None:
        for h in history:
            if "drc" in h:
                self.drc.setdefault(h["block"], []).append(h["drc"])
            if "retrieved" in h and self.share_place is not None:  # one mean per injection, as the drc rows
                self.position.setdefault(h["block"], []).append(float(self.share_place[h["retrieved"]].mean()))
            if "grads" in h:
                self.grads.setdefault(h["block"], []).append(h["grads"])
        if self.real is not None:
            for store, images in ((self.before, x0), (self.after, x)):
                f = self._feats(images)
                store.update({it: f[n] for n, it in enumerate(items)})

    def summary(self) -> dict:
        """Per block the means over this call's injections (``drc``) and units (``grads``), ``n`` of them (what
        :func:`merge_diagnostics` weighs ranks by); ``betti`` over the classes recovered whole."""
        mean = lambda rows, key: float(np.mean([r[key] for r in rows]))  # noqa: E731
        out = dict(
            drc=[dict(block=b, **{k: mean(v, k) for k in v[0]}, n=len(v),
                      **({"share_place": float(np.mean(self.position[b]))} if self.position.get(b) else {}))
                 for b, v in sorted(self.drc.items())],
            grads=[_grad_ratios(dict(block=b, **{k: mean(v, k) for k in v[0]}, n=len(v)))
                   for b, v in sorted(self.grads.items())],
            betti=None)
        ipc, m = self.cfg.ipc, self.cfg.pta_points
        whole = sorted({c for c, _ in self.after if all((c, i) in self.after for i in range(ipc))})
        if self.real is not None and whole and m >= 3:
            k = min(self.cfg.k(), m - 1)
            real = self.real[whole]
            sets = {when: torch.stack([torch.stack([store[(c, i)] for i in range(m)]) for c in whole])
                    for when, store in (("before", self.before), ("after", self.after))}
            out["betti"] = dict(classes=len(whole), k=k, points=m,
                                **{when: set_topology(real, syn, k) for when, syn in sets.items()})
        return out


def _grad_ratios(row: dict) -> dict:
    return dict(row, topo_over_ce=row["topo"] / max(row["ce"], 1e-12), topo_over_bn=row["topo"] / max(row["bn"], 1e-12))


def merge_diagnostics(parts: Sequence[Optional[dict]]) -> Optional[dict]:
    """One diagnostics record from those of several ranks (each over its own units and classes), equal to
    what one process recovering every unit records: per block the means weighted by each rank's ``n``; the
    Betti-curve distances weighted by classes. PTA's loss on the set is left out where more than one rank
    holds classes: its persistence-image grid comes from all classes scored together, so the ranks' losses
    do not add up to the whole set's."""
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return parts[0] if parts else None

    def by_block(key):
        rows = {}
        for p in parts:
            for r in p.get(key) or []:
                rows.setdefault(r["block"], []).append(r)
        out = []
        for b, rs in sorted(rows.items()):
            if len(rs) == 1:  # one rank ran this block: its row as it is
                out.append({k: v for k, v in rs[0].items() if k not in ("topo_over_ce", "topo_over_bn")})
                continue
            n = [r["n"] for r in rs]
            keys = [k for k in rs[0] if k not in ("block", "n", "topo_over_ce", "topo_over_bn")
                    and all(k in r for r in rs)]
            out.append(dict(block=b, **{k: float(np.average([r[k] for r in rs], weights=n)) for k in keys},
                            n=int(sum(n))))
        return out

    merged = dict(drc=by_block("drc"), grads=[_grad_ratios(r) for r in by_block("grads")], betti=None)
    betti = [p["betti"] for p in parts if p.get("betti")]
    if len(betti) == 1:
        merged["betti"] = betti[0]
    elif betti:
        w = [b["classes"] for b in betti]
        merged["betti"] = dict(classes=int(sum(w)), k=betti[0]["k"], points=betti[0]["points"], **{
            when: {key: float(np.average([b[when][key] for b in betti], weights=w)) for key in ("b0", "b1")}
            for when in ("before", "after")})
    return merged


def merge_loss_parts(parts: Sequence[Optional[dict]], units: Sequence[int]) -> Optional[dict]:
    """The ranks' final loss parts (each a mean over its units), weighted by their units."""
    got = [(p, u) for p, u in zip(parts, units) if p and u]
    if not got:
        return None
    return {k: float(np.average([p[k] for p, _ in got], weights=[u for _, u in got])) for k in ("ce", "bn", "topo")}


# ------------------------------------------------------------------------------------------------
# distill

def _pool_path(data, teacher, cfg: DistillConfig, pool_dir) -> Path:

    if pool_dir is not None:
        return Path(pool_dir)

    fp = teacher_fingerprint(teacher.model, features=True)
    key = f"{data.fingerprint}|{fp}|{cfg.pool_per_class}|{cfg.pool_candidates}|" \
          f"{data.size}|{cfg.seed}|{sorted(set(cfg.block_resolutions(data.size)))}"
    return cache_dir() / "pools" / f"pool-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _real_points(teacher, pool, m: int, seed: int, device, view=None) -> torch.Tensor:
    """``[C, m, D]`` penultimate features of ``teacher`` on m seeded pool patches per class (PTA's real side).
    ``view``: None for the patches as they are, or ``(jitter, crop_scale)`` to take each patch through the
    recover step's augmentation once (its own seeded crop, flip and roll), like the synthetic features."""
    labels = torch.tensor(np.asarray(pool.labels))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c in range(len(pool.classes)):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() < m:
            raise ValueError(f"class {pool.classes[c]!r} has {idx.numel()} pool patches, fewer than the {m} PTA points "
                             f"per class: lower --points-per-class")
        pick = idx[torch.randperm(idx.numel(), generator=g)[:m]]
        images = pool.images(pick, device=device)
        if view is not None:  # its own generator: the view changes, the patches drawn do not
            jitter, scale = view
            ga = torch.Generator().manual_seed(seed * 7919 + c + 1)
            images = torch.cat([augment(im[None], pool.size, jitter, scale, ga) for im in images])
        with torch.no_grad():
            rows.append(teacher_features(teacher, images)[1].float())
    return torch.stack(rows)


def build_pool(data, teacher, cfg: DistillConfig, device="cpu", pool_dir=None, progress: bool = True):
    """Build (or load) the patch pool ``distill`` uses: one crop per real image, at the data's size,
    with complexities at every block resolution; in a cache folder keyed by data, teacher and
    parameters unless ``pool_dir`` is given."""
    ppath = _pool_path(data, teacher, cfg, pool_dir)
    logger.info(f"[distill] patch pool: {ppath}")
    return PatchPool.build(data.train, teacher.model, ppath, per_class=cfg.pool_per_class, size=data.size,
                           resolutions=sorted(set(cfg.block_resolutions(data.size))), candidates=cfg.pool_candidates,
                           mean=data.mean, std=data.std, device=device, seed=cfg.seed, classes=data.classes,
                           dataset_name=data.name, progress=progress)


def distill(data, teachers, out, cfg: DistillConfig, device="cpu", pool_dir=None, progress: bool = True,
            rank: int = 0, world_size: int = 1, on_item: Optional[Callable] = None,
            teacher_specs: Optional[Sequence[str]] = None) -> dict:
    """Produce the items ``(c, i)``, ``c`` over all classes and ``i`` in ``[cfg.ipc_start, cfg.end)``,
    that are not on disk yet, as PNGs under ``out/images`` (each written atomically).

    ``teachers``: list of :class:`reta_fast.models.Teacher` (round-robin over batches, FADRM+); the
    first one builds the pool and serves DRC's retrieval. ``rank``/``world_size`` shard the units
    (torchrun). ``on_item(c, i)`` is called after each image is written. Returns the stage info.
    """
    cfg.validate()
    cfg = cfg.resolved(data.size)  # the manifest records what is used
    out = Path(out)
    _start_run(data, teachers, out, cfg, teacher_specs)
    C = len(data.classes)
    info = dict(method=cfg.method, ipc=cfg.ipc, ipc_start=cfg.ipc_start, ipc_end=cfg.end, written=0, skipped=0)
    mine = shard_items(cfg, C, rank, world_size)  # this rank's items of the slice: a fixed order
    todo = {it for it in mine if not item_path(out, *it).exists()}
    if not todo:
        logger.info(f"[distill] all {len(mine)} items of this process in ipc [{cfg.ipc_start}, {cfg.end}) already "
                    f"exist in {out}")
        info["skipped"] = len(mine)  # this rank's share: ranks' counts add up
        return info
    if cfg.uses_recover and len(todo) < len(mine):
        _warn_on_cpu_change(out, device)
    for t in teachers:
        t.model.to(device).eval()

    def write(c: int, i: int, image_u8) -> None:
        save_png(item_path(out, c, i), image_u8)
        info["written"] += 1
        if on_item:
            on_item(c, i)

    if cfg.method == "random-real":
        images = random_real_images(data, cfg.ipc, cfg.seed, sorted({c for c, _ in todo}), cfg.ipc_start, cfg.end)
        for c, i in (it for it in mine if it in todo):
            write(c, i, images[(c, i)].permute(1, 2, 0).numpy())
        info["skipped"] = len(mine) - len(todo)
        return info
    pool = ranking = None
    if cfg.uses_pool:
        pool = build_pool(data, teachers[0], cfg, device, pool_dir, progress)
        counts = np.bincount(np.asarray(pool.labels), minlength=C)
        short = [(data.classes[c], int(counts[c])) for c in range(C) if counts[c] < cfg.ipc]
        if short:
            raise ValueError(f"IPC {cfg.ipc} is larger than the pool of class(es) {short[:5]} (class size or "
                             f"--pool-per-class {cfg.pool_per_class}): real-patch methods need one patch per image")
        short = [(data.classes[c], int(counts[c])) for c in range(C) if counts[c] < 2 * cfg.ipc]
        if cfg.drc_exclude_anchor and short:
            raise ValueError(f"drc_exclude_anchor needs at least 2 x ipc = {2 * cfg.ipc} pool patches per class (each "
                             f"image its anchor and one other patch), but class(es) {short[:5]} have fewer (class "
                             f"size or --pool-per-class {cfg.pool_per_class}): raise it or drop --drc-exclude-anchor")
        ranking = rded_ranking(pool, teachers[0].model, device)

    def init_image(c: int, i: int) -> torch.Tensor:
        if cfg.method == "sre2l":
            return _noise(c, i, data.size, cfg.seed)
        return pool.images([int(ranking[c][i])])[0]

    if cfg.method == "rded":
        for c, i in (it for it in mine if it in todo):
            write(c, i, to_uint8(init_image(c, i), data.mean, data.std))
        info["skipped"] = len(mine) - len(todo)
        return info
    return _recover_units(data, teachers, out, cfg, device, pool, ranking, init_image, todo, write, info, rank,
                          world_size, progress)


def _warn_on_cpu_change(out: Path, device) -> None:
    """A CPU run resumed with another thread count or on another CPU model adds images that differ (at
    rounding level, amplified by the recover steps) from what an uninterrupted run would have made: valid,
    but not the same set. Say so."""
    if torch.device(device).type != "cpu":
        return
    try:
        calls = json.loads((out / "stages" / "distill.json").read_text()).get("calls", [])
    except (OSError, ValueError, AttributeError):
        return
    made = [c for c in calls if isinstance(c, dict) and c.get("written")]
    before = sorted({c["threads"] for c in made if "threads" in c})
    now = torch.get_num_threads()
    if before and before != [now]:
        logger.warning(f"[distill] warning: {out}'s images so far were made with {before} CPU thread(s), this call "
                       f"uses {now}: the images it adds will not be byte-identical to an uninterrupted run's (set "
                       f"OMP_NUM_THREADS={before[0]} to match)")
    cpus, here = sorted({c["cpu"] for c in made if "cpu" in c}), cpu_model()
    if cpus and cpus != [here]:
        logger.warning(f"[distill] warning: {out}'s images so far were made on {cpus}, this call runs on {here!r}: "
                       "another CPU model rounds differently, so the images it adds will not be byte-identical to "
                       "an uninterrupted run's")


def _teacher_entry(t) -> dict:
    """A teacher in the run's manifest: its weights' fingerprint, and its classifier head where one was named
    that is not its last nn.Linear (the features DRC and PTA read; later stages name it again)."""
    entry = dict(name=t.name, fingerprint=teacher_fingerprint(t.model))
    head = named_feature_head(t.model)
    return entry if head is None else dict(entry, feature_head=head)


def _start_run(data, teachers, out: Path, cfg: DistillConfig, teacher_specs) -> None:
    """Check the teachers, claim (or resume) the output folder with the run's manifest, write the class
    mapping, and remove temporaries a killed run left."""
    if not teachers:
        raise ValueError("distill needs at least one teacher")
    for t in teachers:
        if list(t.classes) != list(data.classes) or t.size != data.size:
            raise ValueError(f"teacher {t.name} was made for other classes or another image size than {data.name}")
    S = data.size
    if cfg.uses_recover and cfg.block_resolutions(S)[-1] != S:
        raise ValueError(f"the last block's resolution must be the data's size {S} (the images are written at it), "
                         f"got resolutions {cfg.block_resolutions(S)}")
    manifest = dict(format=RUN_FORMAT, method=cfg.method, config=cfg.identity(len(data.classes)),
                    data=dict(name=data.name, fingerprint=data.fingerprint, size=S, classes=len(data.classes),
                              mean=list(data.mean), std=list(data.std)),
                    teachers=[_teacher_entry(t) for t in teachers],
                    teacher_specs=list(teacher_specs) if teacher_specs else [str(t.path) for t in teachers if t.path],
                    versions=versions())
    out.mkdir(parents=True, exist_ok=True)
    check_run(out, manifest)
    write_json(out / "classes.json", dict(classes=list(data.classes),
                                          folders=[f"new{c:03d}" for c in range(len(data.classes))]))
    now = time.time()
    for stale in (out / "images").glob("new*/.*.tmp"):  # left by a killed run; a live writer's are seconds old
        try:
            if now - stale.stat().st_mtime > 120:
                stale.unlink()
        except OSError:
            pass


def _jitter(cfg: DistillConfig, size: int) -> int:
    return cfg.jitter if cfg.jitter is not None else (4 if size <= 64 else 32)


def _criteria(teachers, pool, cfg: DistillConfig, batches_per_unit: int, device) -> List[RETALoss]:
    """One loss per teacher: CE + BN, and PTA against ``m`` real pool features per class when it is on."""
    out = []
    for t in teachers:
        kw = dict(r_bn=cfg.r_bn, first_bn_weight=cfg.first_bn_weight)
        if cfg.pta_active:
            # every class of the pool has >= ipc patches (checked), and PTA uses m <= ipc points
            view = None if cfg.pta_real_view == "clean" else (_jitter(cfg, pool.size), (0.08, 1.0))
            real = _real_points(t.model, pool, cfg.pta_points, cfg.seed, device, view)
            out.append(RETALoss(t.model, lam_topo=cfg.lam_topo, real_feats=real, k=cfg.k(),
                                topo_refresh=cfg.topo_refresh * (batches_per_unit if cfg.lockstep else 1),
                                overlap=cfg.topo_overlap, topo_ref_batch=cfg.loss_ref_batch,
                                topo_balance=cfg.pta_balance, **kw))
        else:
            out.append(RETALoss(t.model, lam_topo=0.0, **kw))
    return out


def _partitioned_retriever(pool, ranking, cfg: DistillConfig, C: int, device) -> PartitionedRetriever:
    """Item ``(c, i)`` searches the class-``c`` patches whose RDED rank ``r`` has ``r % ipc == i``; with
    ``drc_depth`` d only those with ``r < d * ipc`` (the first d of its share); with ``drc_exclude_anchor``
    not its anchor ``r == i``."""
    labels = torch.tensor(np.asarray(pool.labels))  # a copy: pool arrays are read-only memory maps
    share = torch.empty(len(labels), dtype=torch.int64)
    left_out = []
    for c in range(C):
        ranked = torch.as_tensor(ranking[c], dtype=torch.int64)
        share[ranked] = torch.arange(ranked.numel()) % cfg.ipc
        if cfg.drc_depth is not None:
            left_out.append(ranked[cfg.drc_depth * cfg.ipc:])  # below the first d patches of every share
        if cfg.drc_exclude_anchor:  # the pool holds >= 2 x ipc patches of every class (checked in distill)
            left_out.append(ranked[:cfg.ipc])  # item (c, i)'s initial patch is rank i, the first of its share
    groups = labels * cfg.ipc + share
    if left_out:
        groups[torch.cat(left_out)] = C * cfg.ipc  # a group no item searches
    return PartitionedRetriever(pool, groups.to(device), cfg.lam, device)


def _recover_units(data, teachers, out, cfg: DistillConfig, device, pool, ranking, init_image, todo, write, info,
                   rank: int, world_size: int, progress: bool) -> dict:
    """The recover methods: every unit of this rank with an item still to write is recovered whole (its
    images depend on the unit alone) and its missing items of the slice are written."""
    C, S = len(data.classes), data.size
    k, m = cfg.k(), cfg.pta_points
    if cfg.pta_on and m <= k:
        logger.warning(f"[distill] warning: PTA needs more than k={k} points per class but IPC {cfg.ipc} gives {m}: "
                       f"the topology term stays 0 (use a larger IPC or --topo-k < {m})")
    if cfg.pta_on and cfg.pta_view == "clean" and cfg.pta_balance is None \
            and replace(cfg, pta_view=None).pta_view_for(S) == "clean":
        logger.warning("[distill] note: an explicit --pta-view clean runs PTA at the fixed weight --lam-topo; the "
                       f"default at {S} px is the clean view at the gradient-balanced weight (leave --pta-view out, "
                       "or add --pta-balance 0.1)")
    classes_per_batch, items_per_batch, groups, units = shard_units(cfg, C, rank, world_size)
    batches_per_unit = len(units[0].starts) if units else 1  # lockstep: calls per round
    criteria = _criteria(teachers, pool, cfg, batches_per_unit, device)
    info.update(batch_classes=classes_per_batch, ipc_per_batch=items_per_batch, batches_per_unit=batches_per_unit)
    drc = cfg.method == "reta" and cfg.drc
    retriever = _partitioned_retriever(pool, ranking, cfg, C, device) if drc and cfg.partition else None
    recover_cfg = dict(iterations=cfg.iterations, resolutions=cfg.block_resolutions(S), lr=cfg.lr_for(S),
                       jitter=_jitter(cfg, S), alpha=cfg.alpha_for(S),
                       drc=drc, lam=cfg.lam, drc_margin=cfg.drc_margin, drc_connections=cfg.drc_connections,
                       mean=data.mean, std=data.std, amp=cfg.amp,
                       channels_last=cfg.channels_last, compile=cfg.compile,
                       pta_from_block=cfg.pta_from_block, pta_view=cfg.pta_view)  # validate() refuses both where PTA is off
    in_slice = {(c, i) for i in range(cfg.ipc_start, cfg.end) for c in range(C)}
    parts_log: List[dict] = []
    diag = _Diagnostics(teachers[0].model, pool, cfg, device, ranking if retriever is not None else None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units), desc=f"distill {cfg.method}", unit="unit" if cfg.lockstep else "batch")
    try:
        for unit in units:
            batches = unit_items(cfg, unit, items_per_batch, groups)
            items = [it for b in batches for it in b]
            if not any(it in todo and not item_path(out, *it).exists() for it in items):
                info["skipped"] += sum(it in in_slice for it in items)
                if bar is not None:
                    bar.update(1)
                continue
            batch_index = [(s // items_per_batch) * len(groups) + unit.group for s in unit.starts]  # global
            # the teacher: per batch (FADRM+ round robin); a lockstep unit keeps one teacher, so that its PTA
            # bank holds features of one network
            crit = criteria[(unit.group if cfg.lockstep else batch_index[0]) % len(criteria)]
            # a lockstep unit's initial images stay on the host: the device holds what is optimised
            x0 = torch.stack([init_image(c, i) for c, i in items])
            x0 = x0 if cfg.lockstep else x0.to(device)
            y = torch.tensor([c for c, _ in items]).to(device)
            ids = torch.tensor([c * cfg.ipc + i for c, i in items]).to(device)
            crit.reset()  # no state from earlier units (bank, PTA grids, pairings)
            if cfg.pta_active:
                # the class group's synthetic set at its initial state: the unit itself in lockstep, the batch
                # and the initial images of the class's other items otherwise
                members = items if cfg.lockstep else [(c, j) for c in groups[unit.group] for j in range(cfg.ipc)]
                with torch.no_grad():
                    feats = torch.cat([teacher_features(crit.teacher, torch.stack(
                        [init_image(c, j) for c, j in members[a:a + 256]]).to(device))[1]
                        for a in range(0, len(members), 256)])
                crit.seed_bank(feats.float(), torch.tensor([c for c, _ in members]).to(device),
                               torch.tensor([c * cfg.ipc + j for c, j in members]).to(device))
            rc = RecoverConfig(**recover_cfg)
            sizes = [len(b) for b in batches]
            micro = [list(range(sum(sizes[:n]), sum(sizes[:n + 1]))) for n in range(len(batches))]
            anchors = torch.tensor([int(ranking[c][i]) for c, i in items]) if drc else None
            x = recover(crit, x0, y, ids, pool=pool if drc else None, config=rc,
                        seeds=[cfg.seed * 1_000_003 + b for b in batch_index], micro_batches=micro,
                        retrieval_teacher=teachers[0].model, retriever=retriever, device=device, anchor_ids=anchors,
                        diagnose=True)
            diag.unit(rc.history, items, x0, x)
            last = [h for h in rc.history if "ce" in h][-max(1, cfg.iterations // 10) * len(batches):]
            parts = {key: float(np.mean([h[key] for h in last])) for key in ("ce", "bn", "topo")}
            if not all(math.isfinite(v) for v in parts.values()):
                raise FloatingPointError(f"the recover loss is not finite ({parts}) at batch {batch_index[0]}: a "
                                         f"broken teacher or too large lr={cfg.lr}; nothing was written for this unit")
            parts_log.append(dict(batch=batch_index[0], batches=len(batch_index), **parts))
            for n, (c, i) in enumerate(items):
                if (c, i) in todo and not item_path(out, c, i).exists():
                    write(c, i, to_uint8(x[n], data.mean, data.std))
                elif (c, i) in in_slice:
                    info["skipped"] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ce=f"{parts['ce']:.3f}", bn=f"{parts['bn']:.3f}", topo=f"{parts['topo']:.4f}")
    finally:
        if bar is not None:
            bar.close()
        for crit in criteria:
            crit.close()
    info["diagnostics"] = diag.summary()
    if parts_log:
        info["loss_parts"] = {key: float(np.mean([p[key] for p in parts_log])) for key in ("ce", "bn", "topo")}
        info["loss_units"] = len(parts_log)
    info["topo_k"] = k if cfg.pta_active else None
    return info


# ------------------------------------------------------------------------------------------------
# relabel / evaluate


