"""The settings of the distill and evaluate stages: one dataclass each, the single source of their
defaults (the CLI's flags are built from these fields)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import List, Optional, Sequence

from .._validate import check_choice, check_int_setting, check_number_setting
from ..recover.loop import COMPILE_MODES, PTA_VIEWS, check_connections, check_engine

__all__ = ["METHODS", "PTA_SETS", "PTA_REAL_VIEWS", "DistillConfig", "EvalConfig", "ENGINE_DEFAULTS"]


METHODS = ("random-real", "rded", "sre2l", "fadrm", "reta")


PTA_SETS = ("complete", "initial")
PTA_REAL_VIEWS = ("clean", "augmented")


def _opt(default, help: str, **cli):
    """A setting: its default, its help text and how the command line spells it (``reta_fast.cli.flags``
    builds the flags from these fields: one source for every default). ``cli``: ``flag`` (name, default the
    field's with dashes), ``choices``, ``kind`` ("ints": comma-separated, "many": space-separated list),
    ``negation`` (``(flag, value)``: a switch that sets the field to ``value``), ``const`` (an optional
    value), ``group``, ``cli=False`` (not on the command line)."""
    return field(default=default, metadata=dict(help=help, **cli)) if not isinstance(default, (list, dict)) else \
        field(default_factory=lambda: default, metadata=dict(help=help, **cli))
# Settings left out of a run's identity while at their default, so that folders written before they existed
# still resume: the recover engine's options, and settings added later.
ENGINE_DEFAULTS = dict(amp=None, channels_last=False, compile=None, topo_overlap=False, drc_margin=0.0,
                       drc_exclude_anchor=False, drc_connections=None, drc_depth=None,
                       pta_real_view="clean", pta_from_block=0, pta_view="augmented", pta_balance=None)


@dataclass
class DistillConfig:
    """Parameters of ``reta distill``; defaults follow docs/method.md ([pred]/[paper]) unless noted.

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
        drc_exclude_anchor: DRC's search leaves out each image's own initial patch (rank ``i`` of its share),
            so every connection injects another real patch [ours, a study option, docs/method.md §3.7]:
            with the anchor allowed, 58-75 % of CIFAR-10 injections re-inject it (CPU scale).
        drc_depth: DRC searches only the first ``d`` patches of the image's share, i.e. its ``d`` best RDED
            ranks (the anchor and the next ``d - 1``) [ours, a study option, docs/method.md §3.7]; None: the
            whole share.
        drc_connections: which residual connections retrieve (:class:`RecoverConfig`) [ours, a study
            option]: the others re-inject the static anchor. None: all (the paper's).
        lr: Adam's pixel learning rate. None: 0.25 above 64 px ([pred], the ImageNet setting) and 0.05 up to
            64 px ([ours]: chosen on a validation split of CIFAR-10 training images, where 0.25 over-optimises
            the small images and falls below its own real-patch initialisation; +5 points for FADRM and
            RETA alike, bench/results/quality-*/tuning.md).
        alpha: the residual weight of the synthetic image (:class:`RecoverConfig`). None: 0.5 above 64 px
            ([paper], the ImageNet setting) and 0.3 up to 64 px ([ours]: chosen on validation splits of
            CIFAR-10 training images in colour at IPC 10 and 50 and in grayscale at 28 px, where 0.3 scored
            above 0.5 for FADRM and RETA alike; docs/method.md §2.6).
        jitter (None: 4 px up to 64 px data, 32 above), lam: see :class:`RecoverConfig`.
        r_bn, first_bn_weight, lam_topo: see :class:`RETALoss`.
        topo_ref_batch: :class:`RETALoss`'s ``topo_ref_batch`` (0: None, no scaling) [ours,
            docs/method.md §4.7]: with the default batches of 100 images PTA's weight is ``lam_topo``; with
            ImageNet's batch structure on a 10-class set (10 images a batch) it is ``10 * lam_topo``. Part of
            the run identity only where it changes a batch's weight, so runs of 100-image batches written
            before the option existed still resume.
        topo_k: mutual k-NN parameter of PTA (None: :meth:`k`'s rule [ours]: ``min(10, m // 2)`` for ``m``
            points per class, so the graph is a mutual k-NN graph and not the complete graph at IPC 10).
        points_per_class: points per class on each side of PTA, ``m`` (None: the class's whole synthetic
            set, ``ipc``; the real side draws as many pool patches).
        pta_set: what a class's synthetic point set is [ours, docs/method.md §4.1]: ``"complete"`` (its
            current images: every batch of a class group is recovered in lockstep, and a banked feature is
            at most one step old) or ``"initial"`` (the batch's images plus features of the class's other
            *initial* images, fixed for the whole batch: reta_fast's earlier behaviour, kept for the
            ablation). Only "complete" aligns the synthetic set whatever the batch structure.
        pta_from_block: PTA's schedule [ours]: ``lam_topo`` acts from this recover block on (0: every
            block); see :class:`RecoverConfig`.
        pta_view: the images PTA's synthetic features come from [ours]: ``"augmented"`` (the step's
            augmented view, the paper's) or ``"clean"`` (the images as they are, one more teacher forward
            per step); see :class:`RecoverConfig`. None (default): :meth:`pta_view_for` the data's size,
            clean up to 64 px (chosen on validation splits at that size, docs/method.md §4.11) and the
            paper's augmented view above it, where it is unmeasured.
        pta_balance: PTA's weight from the gradients [ours]: each step PTA's gradient on the teacher's
            penultimate features is this fraction of CE's (:class:`RETALoss` ``topo_balance``), in place of
            ``lam_topo``; 0: the fixed weight. None (default): :meth:`pta_balance_for`, 0.1 where the view is
            left to its default and comes out clean, the fixed weight otherwise (an explicit ``pta_view``
            keeps the fixed weight). Under ``compile`` CE's gradient on the features comes from the teacher's
            head (:meth:`RETALoss._ce_feature_grad`).
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

    method: str = _opt("reta", "what to distil with: random-real (real images), rded (teacher-ranked real "
                               "patches), sre2l (from noise), fadrm (patches + static-anchor residual), reta (patches "
                               "+ DRC retrieval + PTA)", choices=METHODS)
    ipc: int = _opt(10, "images per class")
    ipc_start: int = _opt(0, "first ipc index this process makes")
    ipc_end: Optional[int] = _opt(None, "one past the last ipc index (default: --ipc)")
    iterations: int = _opt(1000, "recover steps per batch")
    blocks: int = _opt(4, "multi-resolution blocks (FADRM)")
    resolutions: Optional[Sequence[int]] = _opt(None, "one resolution per block, comma-separated (ImageNet: "
                                                "200,224,200,224); overrides --blocks", kind="ints")
    batch_classes: Optional[int] = _opt(None, "classes per batch (default: min(classes, 100))")
    ipc_per_batch: Optional[int] = _opt(None, "items of each class per batch (default: 100 images per batch)")
    lr: Optional[float] = _opt(None, "recover lr (default: 0.25 above 64 px as in SRe2L/FADRM, 0.05 up to 64 px)")
    jitter: Optional[int] = _opt(None, "roll jitter in pixels (default: 4 up to 64 px, 32 above)")
    alpha: Optional[float] = _opt(None, "residual weight of the synthetic image (default: 0.5 above 64 px as in "
                                  "FADRM/RETA, 0.3 up to 64 px; runs without an injection record 0.5)")
    lam: float = _opt(0.1, "DRC complexity weight lambda")
    drc_margin: float = _opt(0.0, "DRC 'do no harm': keep the image's own anchor unless the retrieved patch scores "
                             "this fraction lower (0: always take the retrieved patch, as the paper)")
    drc_exclude_anchor: bool = _opt(False, "DRC never re-injects an image's own initial patch: every connection injects "
                                    "the best-scoring other patch of the image's share (needs the partition; a study "
                                    "option, the converse of --drc-margin)")
    drc_depth: Optional[int] = _opt(None, "DRC searches only the best d RDED ranks of the image's share (its anchor "
                                    "and the next d-1; default: the whole share; a study option)")
    drc_connections: Optional[Sequence[int]] = _opt(None, "the residual connections where DRC retrieves, comma-"
                                                    "separated (connection b joins block b to b+1); the others "
                                                    "re-inject the static anchor (default: all, the paper's)",
                                                    kind="ints")
    r_bn: float = _opt(0.01, "BN-statistic matching weight (--no-bn: 0)", negation=("no-bn", 0.0))
    first_bn_weight: float = _opt(10.0, "weight of the first BN layer's term")
    lam_topo: float = _opt(0.5, "PTA weight lambda_topo (at batches of --topo-ref-batch images)")
    topo_ref_batch: int = _opt(100, "the batch size lambda_topo is meant for: a batch of B images weights PTA by "
                               "lambda_topo * this / B, keeping its balance with the batch-mean CE and BN terms "
                               "(--no-topo-batch-scale: lambda_topo at every batch size)",
                               negation=("no-topo-batch-scale", 0))
    topo_k: Optional[int] = _opt(None, "PTA's mutual k-NN k (default: min(10, points per class // 2))")
    points_per_class: Optional[int] = _opt(None, "PTA points per class on each side (default: IPC)")
    pta_set: str = _opt("complete", "PTA's synthetic point set: the class's current images (complete, a class "
                        "group's batches in lockstep) or the batch plus initial images (initial)", choices=PTA_SETS)
    pta_real_view: str = _opt("clean", "PTA's real features from the pool patches as they are (clean) or through "
                              "the recover step's augmentation once (augmented, like the synthetic features)",
                              choices=PTA_REAL_VIEWS)
    pta_view: Optional[str] = _opt(None, "the images PTA's synthetic features come from: the recover step's augmented "
                                   "view (augmented, the paper's: the forward CE and BN use) or the images as they "
                                   "are (clean: one more teacher forward per step); default: clean up to 64 px, "
                                   "augmented above and where PTA does not act",
                                   choices=PTA_VIEWS)
    pta_balance: Optional[float] = _opt(None, "PTA's weight from the gradients: each recover step PTA's gradient on "
                                        "the teacher's penultimate features is this fraction of CE's, in place of "
                                        "lambda_topo; 0: the fixed weight (lambda_topo scaled by the batch size; "
                                        "default: 0.1 where the view is left to its default and comes out clean, "
                                        "the fixed weight otherwise)")
    pta_from_block: int = _opt(0, "PTA's schedule: its weight acts from this recover block on, 0 before it (0: every "
                               "block, as the paper)")
    topo_refresh: int = _opt(1, "recompute PTA's graphs and pairings every T steps, re-gather lengths in between")
    pool_per_class: int = _opt(300, "patch pool images per class")
    pool_candidates: int = _opt(1, "RDED best-of-N crops per image")
    drc: bool = _opt(True, "ablation: static anchor instead of DRC retrieval", negation=("no-drc", False))
    pta: bool = _opt(True, "ablation: no topology alignment", negation=("no-pta", False))
    partition: bool = _opt(True, "study option: DRC searches the whole class pool (the paper's argmin) instead "
                           "of only the image's own share of it (the default)", negation=("no-partition", False))
    seed: int = _opt(0, "everything random derives from it", group="common")
    amp: Optional[str] = _opt(None, "teacher forward under bf16 autocast", choices=("bf16",), group="engine")
    channels_last: bool = _opt(False, "teacher and batch in channels-last format", group="engine")
    compile: Optional[str] = _opt(None, "torch.compile the teacher's forward (reduce-overhead: CUDA graphs on a GPU)",
                                  choices=tuple(m for m in COMPILE_MODES if m), const="default", group="engine")
    topo_overlap: bool = _opt(False, "compute PTA's pairings in a worker thread during the step, use them one "
                              "step later", group="engine")

    def validate(self) -> None:
        check_choice(self.method, "method", METHODS)
        if self.method != "reta" and (not self.drc or not self.pta):
            raise ValueError(f"--no-drc / --no-pta are ablations of reta, not of {self.method}")
        for name in ("ipc", "iterations", "blocks", "batch_classes", "ipc_per_batch", "points_per_class",
                     "pool_per_class", "pool_candidates", "topo_refresh"):
            v = getattr(self, name)
            if not (v is None and name in ("batch_classes", "ipc_per_batch", "points_per_class")):
                check_int_setting(v, name)
        end = self.ipc if self.ipc_end is None else self.ipc_end
        if not (0 <= self.ipc_start < end <= self.ipc):
            raise ValueError(f"need 0 <= ipc_start < ipc_end <= ipc, got ipc_start={self.ipc_start}, "
                             f"ipc_end={self.ipc_end}, ipc={self.ipc}")
        if self.uses_recover and self.iterations < self.n_blocks:
            raise ValueError(f"iterations ({self.iterations}) must be >= the number of blocks ({self.n_blocks})")
        check_number_setting(self.drc_margin, "drc_margin", 0.0, 1.0, high_open=True)
        if self.drc_exclude_anchor:
            if not (self.method == "reta" and self.drc and self.partition):
                raise ValueError("drc_exclude_anchor changes DRC's partitioned search, which this run does not use "
                                 "(it needs method reta with DRC and the partition on)")
            if self.drc_margin > 0:
                raise ValueError("drc_exclude_anchor and drc_margin contradict each other: the margin keeps the "
                                 "image's own anchor, the exclusion never injects it")
            if self.drc_connections is not None:
                raise ValueError("drc_exclude_anchor and drc_connections contradict each other: the connections "
                                 "without DRC re-inject the image's own anchor, the exclusion never injects it")
        if self.drc_depth is not None:
            if not (self.method == "reta" and self.drc and self.partition):
                raise ValueError("drc_depth limits DRC's partitioned search, which this run does not use (it needs "
                                 "method reta with DRC and the partition on)")
            if self.drc_depth == 1 and not isinstance(self.drc_depth, bool):
                raise ValueError("drc_depth 1 leaves each image only its own anchor: that is the static anchor "
                                 "(--no-drc); use 2 or more")
            check_int_setting(self.drc_depth, "drc_depth", minimum=2)
            if self.drc_depth * self.ipc >= self.pool_per_class:
                raise ValueError(f"drc_depth {self.drc_depth} x ipc {self.ipc} covers the whole pool of "
                                 f"{self.pool_per_class} patches per class: every share is searched whole, as "
                                 f"without it; use a depth below {-(-self.pool_per_class // self.ipc)} or leave it out")
        if self.drc_connections is not None:
            check_connections(self.drc_connections, self.n_blocks, self.method == "reta" and self.drc,
                              "it needs method reta with DRC on")
        for name in ("lr", "lam", "r_bn", "first_bn_weight", "lam_topo"):
            v = getattr(self, name)
            if not (v is None and name == "lr"):
                check_number_setting(v, name)
        if self.alpha is not None:
            check_number_setting(self.alpha, "alpha", 0.0, 1.0)
        if self.resolutions is not None and (not self.resolutions or any(
                isinstance(r, bool) or not isinstance(r, int) or r < 8 for r in self.resolutions)):
            raise ValueError(f"resolutions must be a non-empty list of integers >= 8, got {self.resolutions!r}")
        if self.topo_k is not None:
            check_int_setting(self.topo_k, "topo_k")
        check_int_setting(self.topo_ref_batch, "topo_ref_batch", minimum=0)
        check_choice(self.pta_real_view, "pta_real_view", PTA_REAL_VIEWS)
        check_choice(self.pta_set, "pta_set", PTA_SETS)
        if self.pta_view is not None:
            check_choice(self.pta_view, "pta_view", PTA_VIEWS)
        if self.pta_view not in (None, "augmented") and not self.pta_on:
            raise ValueError("pta_view chooses PTA's images, which this run does not use (it needs method reta with "
                             "PTA on and lam_topo > 0)")
        if self.pta_balance is not None:
            try:
                check_number_setting(self.pta_balance, "pta_balance")
            except ValueError as exc:
                raise ValueError(f"{exc} (0: PTA's fixed weight; unset: the default for the image size)") from None
        if self.pta_balance:  # 0: the fixed weight, as without the option
            if not self.pta_on:
                raise ValueError("pta_balance weights PTA, which this run does not use (it needs method reta with "
                                 "PTA on and lam_topo > 0)")
        check_int_setting(self.pta_from_block, "pta_from_block", minimum=0)
        if self.pta_from_block and not self.pta_on:
            raise ValueError("pta_from_block schedules PTA, which this run does not use (it needs method reta with "
                             "PTA on and lam_topo > 0)")
        if self.uses_recover and self.pta_from_block >= self.n_blocks:
            raise ValueError(f"pta_from_block must name one of the {self.n_blocks} recover blocks (0 to "
                             f"{self.n_blocks - 1}), got {self.pta_from_block}")

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

    def alpha_for(self, size: int) -> float:
        """The residual weight used at ``size``; 0.5 (the value runs recorded before the size rule) where no
        residual injection happens (no recover, or a single block), so such runs keep their identity."""
        if self.alpha is not None:
            return self.alpha
        if not self.uses_recover or self.n_blocks < 2:
            return 0.5
        return 0.5 if size > 64 else 0.3

    def pta_view_for(self, size: int) -> str:
        """PTA's synthetic view at ``size``: ``pta_view``, or by default the clean view up to 64 px (chosen on
        the validation split of CIFAR-10, CIFAR-10 in grayscale and digits at that size) and the paper's
        augmented view above 64 px (unmeasured there) and where PTA does not act (the view is then not part of
        the run). ``compile`` once gave the augmented view too: its folders from then resume with
        ``pta_view="augmented"``."""
        if self.pta_view is not None:
            return self.pta_view
        return "clean" if self.pta_active and size <= 64 else "augmented"

    def pta_balance_for(self, size: int) -> Optional[float]:
        """PTA's gradient balance at ``size`` (None: the fixed weight): ``pta_balance`` (0: None), or by default
        0.1 where the default view is the clean one (``pta_view`` unset, PTA active, up to 64 px),
        the fixed weight elsewhere: an explicit ``pta_view`` keeps the fixed weight it always had."""
        if self.pta_balance is not None:
            return float(self.pta_balance) or None
        return 0.1 if self.pta_view is None and self.pta_view_for(size) == "clean" else None

    def resolved(self, size: int) -> "DistillConfig":
        """This config with every size-dependent default resolved for images of ``size`` px: what a run records
        and what :meth:`identity` needs."""
        return replace(self, lr=self.lr_for(size), alpha=self.alpha_for(size), pta_view=self.pta_view_for(size),
                       pta_balance=self.pta_balance_for(size))

    @property
    def pta_active(self) -> bool:
        """PTA on and with more points per class than ``k`` (otherwise its term is 0: IPC 1, ...)."""
        return self.pta_on and self.pta_points > self.k()

    @property
    def lockstep(self) -> bool:
        """Whether a class group's batches are recovered together (PTA on the complete synthetic set)."""
        return self.pta_active and self.pta_set == "complete"

    @property
    def pta_points(self) -> int:
        """``m``: points per class on each side of PTA."""
        return min(self.ipc, self.points_per_class or self.ipc)

    def k(self) -> int:
        """PTA's mutual k-NN parameter: ``topo_k``, or ``min(10, m // 2)`` (at least 1)."""
        return self.topo_k if self.topo_k is not None else max(1, min(10, self.pta_points // 2))

    def batch_sizes(self, num_classes: int) -> List[int]:
        """Every batch size a recover run over ``num_classes`` classes has (the last class group and the
        last items of a class may make smaller batches)."""
        bc, ipb = self.batch_shape(num_classes)  # as stages.shards cuts them
        groups = {min(bc, num_classes - a) for a in range(0, num_classes, bc)}
        items = {min(ipb, self.ipc - s) for s in range(0, self.ipc, ipb)}
        return sorted({g * n for g in groups for n in items})

    @property
    def loss_ref_batch(self) -> Optional[int]:
        """:class:`RETALoss`'s ``topo_ref_batch`` (None: no scaling)."""
        return self.topo_ref_batch or None

    def topo_scaled(self, num_classes: int) -> bool:
        """Whether ``topo_ref_batch`` moves PTA's weight away from ``lam_topo`` for some batch of the run (never
        under ``pta_balance``, whose weight comes from the gradients)."""
        return (self.uses_recover and self.pta_active and self.topo_ref_batch > 0 and not self.pta_balance
                and any(b != self.topo_ref_batch for b in self.batch_sizes(num_classes)))

    def identity(self, num_classes: int) -> dict:
        """The parameters that decide the images (all but the ipc slice) of a run over ``num_classes``
        classes: a folder written with one identity is refused for another. Needs a :meth:`resolved` config
        (the size-dependent defaults decide the images too)."""
        if self.lr is None or self.alpha is None or self.pta_view is None:
            raise ValueError("DistillConfig.identity() needs the size-dependent defaults resolved: call "
                             ".resolved(image size) first")
        d = asdict(self)
        d.pop("ipc_start"), d.pop("ipc_end")
        if not self.topo_scaled(num_classes):
            d.pop("topo_ref_batch")  # the weight is lam_topo everywhere: the images of runs made before it
        if self.drc_connections is not None:  # every connection listed: the default's images
            listed = [int(b) for b in self.drc_connections]
            d["drc_connections"] = None if listed == list(range(self.n_blocks - 1)) else listed
        for name, default in ENGINE_DEFAULTS.items():
            if d[name] == default:
                d.pop(name)
        return d


@dataclass
class EvalConfig:
    """The student protocol of docs/method.md §5 (defaults: [pred]); ``seeds``: evaluation seeds."""

    student: Optional[str] = _opt(None, "student architecture (default: the teacher's)",
                                  choices=("convnet", "resnet18"), flag="student")
    epochs: int = _opt(300, "student training epochs", flag="eval-epochs")
    batch_size: int = _opt(64, "student batch size", flag="eval-batch")
    lr: float = _opt(1e-3, "student AdamW lr", flag="eval-lr")
    weight_decay: float = _opt(0.01, "student AdamW weight decay", flag="eval-wd")
    temperature: float = _opt(20.0, "KL temperature of the soft labels")
    crop_scale: tuple = _opt((0.08, 1.0), "RandomResizedCrop area range", cli=False)
    cutmix: bool = _opt(True, "CutMix (--no-cutmix: off)", negation=("no-cutmix", False))
    labels: str = _opt("online", "soft labels from the teacher during training, or stored by `reta relabel`",
                       choices=("online", "stored"))
    seeds: Sequence[int] = _opt((0,), "evaluation seeds (one student each)", flag="eval-seeds", kind="many")
    baseline: bool = _opt(True, "skip the random-real baseline", negation=("no-baseline", False))

    def validate(self) -> None:
        check_choice(self.labels, "labels", ("online", "stored"))
        for name in ("epochs", "batch_size"):
            check_int_setting(getattr(self, name), name)
        if not (self.lr > 0 and self.temperature > 0):
            raise ValueError("lr and temperature must be > 0")
        if not self.seeds:
            raise ValueError("need at least one evaluation seed")
