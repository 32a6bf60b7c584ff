"""RETALoss: the recover objective of docs/method.md §2, as a drop-in module.

``L = CE(T(x), y) + r_bn * sum_l s_l (||mu_l(x) - mu_l^BN||_2 + ||var_l(x) - var_l^BN||_2) + lam_topo * (100 / B) * L_topo``

for a batch of ``B`` images (``topo_ref_batch = 100``: the paper's ``lam_topo`` goes with 100-image batches;
docs/method.md §4.7).

* BN-statistic matching (SRe2L): batch statistics of every BatchNorm2d input over (N, H, W), biased
  variance, unsquared L2 norms, ``s_1 = first_bn_weight`` for the first BN layer and 1 elsewhere.
* L_topo: :class:`reta_fast.TopologyAlignmentLoss` between the synthetic images' penultimate teacher
  features and real features of the same classes (class-balanced: ``m`` points on each side). A class's
  point set is its synthetic *set* (docs/method.md §4.1): the images of this call (live features, with
  gradient) and the latest banked features of the class's other images (:class:`FeatureBank`, keyed by the
  image ids passed to ``forward``). Register a whole set up front with :meth:`RETALoss.seed_bank`, and
  recover its micro-batches in lockstep (:func:`reta_fast.recover` with ``micro_batches``) so every banked
  feature is at most one round old. All classes of a call use the same number of points m (the most they all
  have, at most ``real_feats.shape[1]``) and the first m real points; the term is active once m > k.
"""
from __future__ import annotations

import contextlib
import warnings
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_int_setting, check_positive_number
from ..models.features import check_head_output, feature_head, teacher_fingerprint
from ..topology.pta import TopologyAlignmentLoss
from .bank import FeatureBank

__all__ = ["RETALoss", "topo_weight"]

# Batch layouts kept (one per micro-batch of a lockstep unit; ImageNet IPC 50 with one image per class per
# batch needs 50).
MAX_LAYOUTS = 256
_LAYOUT_SERIALS = itertools.count()


def _grad_norm(outputs: List[torch.Tensor], wrt: torch.Tensor, grads: Optional[List[torch.Tensor]]) -> float:
    """``||d(outputs)/d(wrt)||`` (vector-Jacobian product with ``grads``), the graph kept; 0 where unused."""
    if not any(o.requires_grad for o in outputs):
        return 0.0
    (g,) = torch.autograd.grad(outputs, wrt, grad_outputs=grads, retain_graph=True, allow_unused=True)
    return 0.0 if g is None else float(g.norm())


def _no_autocast(device_type: str):
    """Autocast switched off for the loss terms; a device type without autocast has nothing to switch off."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


@dataclass
class _Layout:
    """How one batch (``y``, ``ids``) maps onto PTA point sets: host work done once per batch."""

    classes: List[int]
    m: int  # points per class
    rows: Optional[torch.Tensor]  # [G, m] bank rows of the points (None: points from the batch alone)
    batch_rows: Optional[torch.Tensor]  # [G, m] batch rows of the points when there is no bank
    live_flat: Optional[torch.Tensor]  # [L] positions in the flattened [G * m] points that are live
    live_src: Optional[torch.Tensor]  # [L] batch rows of those live points
    live_mask: Optional[torch.Tensor]  # [G, m] bool (diagnostics)
    write_rows: Optional[torch.Tensor]  # [B] bank rows of the batch's images
    real: Optional[torch.Tensor] = None  # [G, m, D] the real side, one tensor per layout (pairings reuse it)
    serial: int = field(default_factory=lambda: next(_LAYOUT_SERIALS))  # which batch: PTA's pairings without ids


def topo_weight(lam_topo: float, ref_batch: Optional[int], batch_size: int) -> float:
    """PTA's weight in a batch of ``batch_size`` images: ``lam_topo * ref_batch / batch_size``, exactly
    ``lam_topo`` at the reference size or without one (``ref_batch=None``) [ours, docs/method.md §4.7]."""
    if ref_batch is None or batch_size == ref_batch:
        return float(lam_topo)
    return float(lam_topo) * (ref_batch / batch_size)


class RETALoss(nn.Module):
    """CE + BN-statistic matching + PTA on a frozen teacher.

    Args:
        teacher: the teacher network; it is put in eval mode and its parameters are frozen
            (``requires_grad=False``): no weight gradient is ever computed.
        r_bn: weight of the BN term (docs/method.md: 0.01); 0 disables it (and allows a teacher without
            BatchNorm layers).
        first_bn_weight: ``s_1`` (docs/method.md: 10).
        lam_topo: weight of the PTA term at a batch of ``topo_ref_batch`` images (docs/method.md: 0.5);
            0 disables it.
        topo_ref_batch: the batch size ``lam_topo`` is meant for [ours, docs/method.md §4.7: the paper's
            100-image batches]. CE and BN are batch means, so an image's share of them is ``1/B``, while its
            share of ``L_topo`` (a sum over classes) does not depend on ``B``; a call with ``B`` images
            weights PTA by ``lam_topo * topo_ref_batch / B`` to keep the balance. ``None``: ``lam_topo`` at
            every batch size (what reta_fast 0.1.0 did).
        real_feats: ``[C, n, D]`` real penultimate features per class (e.g. from a
            :class:`reta_fast.PatchPool`: :meth:`from_pool`), required when ``lam_topo > 0``; ``n``
            bounds the points per class.
        topo_balance: PTA's weight set each call from the gradients instead [ours, docs/method.md §4.7]:
            ``topo_balance * ||dCE/df|| / ||dL_topo/df||`` on the penultimate features ``f``, so PTA's
            gradient there is this fraction of CE's whatever their scales (which drift by orders of magnitude
            over a recovery); replaces ``lam_topo * topo_ref_batch / B`` (``lam_topo`` 0 still switches
            PTA off). ``None`` (default): the fixed weight.
        k, topo_refresh, **topo_kwargs: passed to :class:`TopologyAlignmentLoss` (``refresh_every``: in
            calls; with ``m`` micro-batches in lockstep, ``m`` calls make one round).

    Call: ``loss, parts = criterion(x, y, ids)`` with ``x`` ``[B, 3, H, W]`` (requires grad), ``y``
    ``[B]`` class indices and ``ids`` ``[B]`` image ids (for PTA); ``parts`` maps ``"ce"``, ``"bn"``,
    ``"topo"`` to floats (one host sync).
    Works under ``torch.autocast`` (statistics and losses are computed in fp32) and GradScaler.
    Call :meth:`close` to remove the hooks it put on the teacher; :meth:`compile_teacher` to run the
    teacher through ``torch.compile``; :meth:`terms` for the loss without a host synchronisation.
    """

    def __init__(self, teacher: nn.Module, r_bn: float = 0.01, first_bn_weight: float = 10.0,
                 lam_topo: float = 0.5, real_feats: Optional[torch.Tensor] = None, k: int = 10,
                 topo_refresh: int = 1, topo_ref_batch: Optional[int] = 100,
                 topo_balance: Optional[float] = None, **topo_kwargs):
        super().__init__()
        if topo_balance is not None:
            check_positive_number(topo_balance, "topo_balance", " or None")
            if not lam_topo:
                raise ValueError("topo_balance weights PTA, which lam_topo=0 switches off")
        self.topo_balance = None if topo_balance is None else float(topo_balance)
        for name, v in (("r_bn", r_bn), ("first_bn_weight", first_bn_weight), ("lam_topo", lam_topo)):
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if topo_ref_batch is not None:
            check_int_setting(topo_ref_batch, "topo_ref_batch")
        self.topo_ref_batch = topo_ref_batch
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.r_bn, self.lam_topo = float(r_bn), float(lam_topo)
        self._handles = []
        self._bn_terms = []
        bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        self._capturing = False  # hooks record only during this loss's own forward
        self._bn_off = False  # a forward for PTA's features only: the BN hooks stay silent
        if self.r_bn > 0:
            if not bns:
                raise ValueError("the teacher has no BatchNorm2d layers, so BN-statistic matching is impossible: "
                                 "pass r_bn=0 to recover without it")
            if any(m.running_mean is None or m.running_var is None for m in bns):
                raise ValueError("a BatchNorm2d layer of the teacher tracks no running statistics "
                                 "(track_running_stats=False): nothing to match; pass r_bn=0")
            for i, m in enumerate(bns):
                w = float(first_bn_weight) if i == 0 else 1.0
                self._handles.append(m.register_forward_hook(self._bn_hook(w)))
        self._feats = None
        self._head_out = None  # the head's output in the last forward (checked once against the logits)
        self._head_shape_ok = False
        self.topo = None
        if self.lam_topo > 0:
            if real_feats is None:
                raise ValueError("lam_topo > 0 needs real_feats [C, n, D] (see RETALoss.from_pool)")
            head = feature_head(teacher)
            if not isinstance(real_feats, torch.Tensor) or real_feats.dim() != 3 or real_feats.shape[1] <= k:
                raise ValueError(f"real_feats must be [C, n, D] with n > k={k}, got "
                                 f"{tuple(real_feats.shape) if isinstance(real_feats, torch.Tensor) else real_feats!r}")
            self.register_buffer("real_feats", real_feats.detach().float())
            self.topo = TopologyAlignmentLoss(k=k, refresh_every=topo_refresh, **topo_kwargs)
            self._head = head  # its input: PTA's features; its weights: CE's gradient there when compiled
            self._handles.append(head.register_forward_hook(self._feat_hook))
        self.bank = FeatureBank()
        self._real_slices: Dict[tuple, torch.Tensor] = {}
        self._forward_teacher = self.teacher
        self.compile_mode: Optional[str] = None
        self._head_checked = False  # whether the compiled teacher's logits were checked to be its head's output
        self._warned_sparse = False  # PTA left classes with too few points out of a call (warned once)
        self._warned_cut = False  # PTA's point count left some of a class's images out (warned once)
        self._layouts: Dict[tuple, tuple] = {}  # (id(y), id(ids), classes) -> (y, version, ids, version, layout)
        self.last_layout: Optional[_Layout] = None  # the point sets of the last call (diagnostics, tests)
        # PTA's weight in the last call under topo_balance (None where that call did not weigh PTA: PTA off or
        # inactive)
        self.last_topo_weight: Optional[torch.Tensor] = None
        # the weighted terms of the last completed call, graphs attached, and the teacher's inputs and outputs they
        # were computed from (term_grad_norms)
        self.last_terms: Optional[Dict[str, torch.Tensor]] = None
        self._last_io = None

    def compile(self, mode: Optional[str] = "default", **kwargs) -> "RETALoss":
        """Deprecated alias of :meth:`compile_teacher` (it compiles the teacher only, unlike
        ``nn.Module.compile``)."""
        warnings.warn("RETALoss.compile is deprecated: use compile_teacher (it compiles the teacher's forward)",
                      DeprecationWarning, stacklevel=2)
        return self.compile_teacher(mode, **kwargs)

    def compile_teacher(self, mode: Optional[str] = "default", **kwargs) -> "RETALoss":
        """Run the teacher's forward (with the BN-statistic and feature hooks) through
        ``torch.compile`` (``mode``: ``"default"``, ``"reduce-overhead"`` = CUDA-graph capture of the
        compiled forward and backward on a GPU, ``"max-autotune"``...); the PTA term stays eager (its
        persistence pairing runs on the host). One compilation per input shape (``dynamic=False``).
        ``mode=None`` goes back to eager. Returns ``self``.

        Under ``topo_balance`` the compiled forward is one graph node, through which CE's gradient on the
        penultimate features cannot be taken; it is then computed from the head instead (:meth:`_ce_feature_grad`),
        which needs the teacher's logits to be its head (``nn.Linear``) applied to those features (checked on the
        first balanced call)."""
        if mode is None:
            self._forward_teacher, self.compile_mode = self.teacher, None
        elif mode != self.compile_mode:
            self._forward_teacher = torch.compile(self.teacher, mode=None if mode == "default" else mode,
                                                  dynamic=False, **kwargs)
            self.compile_mode = mode
            self._head_checked = False
        return self

    @classmethod
    def from_pool(cls, teacher: nn.Module, pool, points_per_class: int = 32, seed: int = 0, **kwargs) -> "RETALoss":
        """Build with ``points_per_class`` real features per class drawn (seeded) from a PatchPool (give it as
        many as the synthetic set has images per class: PTA takes at most that many points a class). The pool
        must have been built with this teacher: its features are PTA's real side."""
        built_for = getattr(pool, "manifest", {}).get("teacher")
        fp = teacher_fingerprint(teacher, features=True)
        if built_for is not None and fp != built_for:
            raise ValueError(f"the pool was built for teacher {built_for}, not for this teacher ({fp}): its features "
                             f"are another network's; build a pool with this teacher (PatchPool.build)")
        feats, labels, _ = pool.retrieval_tensors()
        g = torch.Generator().manual_seed(seed)
        rows = []
        for c in range(len(pool.classes)):
            idx = (labels == c).nonzero().flatten()
            if idx.numel() < points_per_class:
                raise ValueError(f"class {c} has {idx.numel()} pool patches, fewer than points_per_class="
                                 f"{points_per_class}")
            rows.append(feats[idx[torch.randperm(idx.numel(), generator=g)[:points_per_class]]])
        return cls(teacher, real_feats=torch.stack(rows), **kwargs)

    def reset(self) -> None:
        """Forget all state carried between calls: the bank, and the PTA loss's image grids (derived
        from the first real features it sees) and stored pairings. The pipeline calls it before every
        unit, so each unit's result depends on that unit alone."""
        self.bank.clear()
        self._layouts.clear()
        self.last_layout = None
        if self.topo is not None:
            self.topo.reset()

    @torch.no_grad()
    def seed_bank(self, feats: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> None:
        """Register a synthetic set in the PTA bank: detached features ``[N, D]`` of its images, their
        classes ``y`` ``[N]`` and ids ``ids`` ``[N]`` (the pipeline passes the features of every image of the
        class group it recovers, at their initial state; later calls overwrite them with live features).
        A class's point set is then all of its registered images."""
        if self.topo is None:
            return
        if feats.dim() != 2 or y.shape != (feats.shape[0],) or ids.shape != y.shape:
            raise ValueError(f"seed_bank needs feats [N, D], y [N], ids [N]; got {tuple(feats.shape)}, "
                             f"{tuple(y.shape)}, {tuple(ids.shape)}")
        ids_l = [int(i) for i in ids.cpu().tolist()]
        if len(set(ids_l)) != len(ids_l):
            raise ValueError("seed_bank: ids must be distinct")
        self.bank.seed(feats, y.cpu().tolist(), ids_l)
        self._layouts.clear()  # layouts list the bank's members: rebuild them

    def _feat_hook(self, mod, inp, out):
        if self._capturing:
            self._feats = inp[0]
            self._head_out = out  # unconditional: a compiled forward is not re-traced when the check is done

    def train(self, mode: bool = True):
        """The teacher stays in eval mode whatever the mode of this module (its running statistics
        are the BN targets and must never be updated)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _bn_hook(self, weight: float):
        def hook(mod, inp, out):
            if not self._capturing or self._bn_off:
                return
            x = inp[0].float()
            var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)  # one pass over the activations
            self._bn_terms.append(weight * (torch.norm(mean - mod.running_mean.float(), 2)
                                            + torch.norm(var - mod.running_var.float(), 2)))
        return hook

    def close(self) -> None:
        """Remove every hook this loss put on the teacher."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _check_labels(self, y: torch.Tensor, ids: Optional[torch.Tensor], num_classes: int):
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dim() != 1:
            raise ValueError(f"y must be an integer tensor [B], got {getattr(y, 'shape', y)!r}")
        if y.dtype != torch.int64:  # cross_entropy's targets
            raise ValueError(f"y must hold int64 (torch.long) class indices, got {y.dtype}: pass y.long()")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"y holds labels outside [0, {num_classes})")
        if ids is not None and (not isinstance(ids, torch.Tensor) or ids.shape != y.shape
                                or ids.dtype.is_floating_point):
            raise ValueError(f"ids must be an integer tensor [B] = [{y.shape[0]}]")

    def _layout(self, y: torch.Tensor, ids: Optional[torch.Tensor], num_classes: int, feats: torch.Tensor):
        """Check ``y`` (and ``ids``) and lay the batch out as PTA point sets, once per pair of tensors: a
        recover loop passes the same ``y``/``ids`` every step (one pair per micro-batch), so the host work
        (and its synchronisations) happens at their first step only (an in-place change is noticed)."""
        key = (id(y), id(ids), num_classes)
        c = self._layouts.get(key)
        if (c is not None and c[0] is y and c[1] == y._version and c[2] is ids
                and c[3] == (None if ids is None else ids._version)):
            return c[4]
        self._check_labels(y, ids, num_classes)
        # host synchronisation (once per batch layout): the labels and ids on the host
        lay = self._build_layout(y.cpu().tolist(), None if ids is None else ids.cpu().tolist(), feats) if self.topo else None
        if len(self._layouts) >= MAX_LAYOUTS:  # a loop making new label tensors every step: do not hoard them
            self._layouts.clear()
        self._layouts[key] = (y, y._version, ids, None if ids is None else ids._version, lay)
        return lay

    def _build_layout(self, ys: List[int], ids: Optional[List[int]], feats: torch.Tensor) -> _Layout:
        dev = feats.device
        n_real = self.real_feats.shape[0]
        classes = sorted(set(ys))
        missing = [c for c in classes if c >= n_real]
        if missing:
            raise ValueError(f"class {missing[0]} has no real features (real_feats covers {n_real} classes)")
        n = self.real_feats.shape[1]
        live = {c: [r for r, k in enumerate(ys) if k == c] for c in classes}  # batch rows per class
        tensor = lambda v: torch.tensor(v, dtype=torch.int64).to(dev)  # noqa: E731  (once per layout)
        if ids is None:  # no identities: only the batch's images, never the bank
            classes, m = self._pta_classes(live, n, "images in the call",
                                           "images in the call (no ids: the bank is not used)")
            return _Layout(classes, m, None, tensor([live[c][:m] for c in classes]).view(len(classes), m), None,
                           None, None, None)
        if len(set(ids)) != len(ids):
            raise ValueError("ids must be distinct within a batch (one id per image)")
        if self.bank.register(ids, ys, feats.shape[1], dev):
            self._layouts.clear()  # cached layouts list the members as they were: rebuild them
        slot = self.bank.slot
        # Every call sees a class's points in one canonical order, its members' registration order: the
        # pairings a refresh computes on one call's points are gathered on the next call's (another
        # micro-batch of the same set) and must index the same images. A call's images take their own
        # places in that order, with gradient.
        sets = {c: self.bank.members(c) for c in classes}
        classes, m = self._pta_classes(sets, n, "registered images",
                                       "registered images (seed_bank registers a whole set)")
        rows, live_flat, live_src, mask = [], [], [], []
        for g, c in enumerate(classes):
            members = sets[c][:m]  # with m below the set's size: the same first m images for every call
            place = {row: p for p, row in enumerate(members)}
            flags = [False] * m
            for r in live[c]:
                p = place.get(slot[ids[r]])
                if p is not None:
                    live_flat.append(g * m + p)
                    live_src.append(r)
                    flags[p] = True
            rows.append(members)
            mask.append(flags)
        return _Layout(classes, m, tensor(rows).view(len(classes), m), None, tensor(live_flat), tensor(live_src),
                       torch.tensor(mask, dtype=torch.bool).to(dev).view(len(classes), m),
                       tensor([slot[i] for i in ids]))

    def _pta_classes(self, points: Dict[int, list], n: int, noun: str, what: str) -> Tuple[List[int], int]:
        """The classes of a call PTA can act on, those with more than ``k`` points (a mutual k-NN graph needs
        them), and the points each of them takes (the fewest among them, at most ``n``: the real side's). The
        others are left out of PTA for the call, with a warning the first time."""
        k = self.topo.k
        kept = [c for c in sorted(points) if min(len(points[c]), n) > k]
        if len(kept) < len(points) and not self._warned_sparse:
            self._warned_sparse = True
            short = [c for c in sorted(points) if c not in kept]
            warnings.warn(f"PTA leaves out {len(short)} of the call's {len(points)} classes (e.g. class {short[0]}: "
                          f"{min(len(points[short[0]]), n)} point(s)): a class needs more than k={k} points, counting "
                          f"its {what}. Pass ids and seed_bank the whole synthetic set, or batch more images of each "
                          f"class (warned once per RETALoss)", stacklevel=5)
        m = min(min(len(points[c]), n) for c in kept) if kept else 0
        over = [c for c in kept if len(points[c]) > m]
        if over and not self._warned_cut:
            self._warned_cut = True
            c = max(over, key=lambda c: len(points[c]))
            warnings.warn(f"PTA takes m={m} points a class (the fewest among the call's classes, at most the {n} real "
                          f"points real_feats holds a class), but class {c} has {len(points[c])} {noun}: "
                          f"its images past the first {m} get no PTA gradient. Give real_feats as many points a "
                          f"class as the synthetic set has images (RETALoss.from_pool(points_per_class=IPC)) "
                          f"(warned once per RETALoss)", stacklevel=5)
        return kept, m

    def _real_for(self, lay: _Layout, device) -> torch.Tensor:
        key = (tuple(lay.classes), lay.m, device)
        if key not in self._real_slices:  # one tensor per class set, so the loss can reuse pairings
            rows = torch.tensor(lay.classes, dtype=torch.int64).to(self.real_feats.device)
            self._real_slices[key] = self.real_feats.index_select(0, rows)[:, :lay.m].to(device)
        return self._real_slices[key]

    def _topo_term(self, lay: _Layout) -> torch.Tensor:
        """PTA over the layout's point sets; writes this call's features into the bank (device ops only)."""
        f = self._feats.float()
        self.last_layout = lay
        if lay.m <= self.topo.k:  # no class with enough points (_pta_classes)
            out = f.new_zeros(())
        else:
            if lay.rows is None:
                pts = f[lay.batch_rows]  # [G, m, D]
            else:
                G, m = lay.rows.shape
                banked = self.bank.feats[lay.rows].reshape(G * m, -1)
                pts = banked.index_put((lay.live_flat,), f[lay.live_src]).view(G, m, -1)  # live points carry grad
            # without ids a call's points are its own images: stored pairings serve only the same batch
            out = self.topo(pts, self._real_for(lay, f.device), classes=lay.classes,
                            group=lay.serial if lay.rows is None else None)
        if lay.write_rows is not None:
            self.bank.write(lay.write_rows, f)
            self.bank.tick()
        return out

    def topo_weight(self, batch_size: int) -> float:
        """PTA's weight for a call with ``batch_size`` images (:func:`topo_weight`)."""
        return topo_weight(self.lam_topo, self.topo_ref_batch, batch_size)

    def _ce_feature_grad(self, logits: torch.Tensor, y: torch.Tensor, f_ce: torch.Tensor) -> torch.Tensor:
        """``dCE/df`` on the head's input ``f`` without autograd: ``(softmax(z) - onehot(y)) W / B`` for logits
        ``z = f W^T + b`` of the teacher's head (:func:`reta_fast.models.feature_head`; CE the batch mean). What a compiled teacher needs,
        whose forward is a single graph node; refused with a clear error where the logits are not that layer's
        output (checked on the first call after each compile)."""
        z = logits.detach().float()
        f = f_ce.detach().float()
        w = self._head.weight.detach().float()
        if f.dim() != 2 or f.shape[0] != z.shape[0] or z.shape[1] != w.shape[0]:
            raise ValueError(f"topo_balance under compile_teacher needs logits [B, C] = the teacher's head (nn.Linear) "
                             f"of its [B, D] input; got features {tuple(f.shape)}, logits {tuple(z.shape)}, head "
                             f"weight {tuple(w.shape)} (keep the teacher eager: compile_teacher(None))")
        if not self._head_checked:
            b = self._head.bias
            head_z = F.linear(f, w, None if b is None else b.detach().float())
            tol = 2e-2 * (1.0 + float(z.abs().max()))  # bf16 autocast rounds the compiled head
            if not bool(((head_z - z).abs() <= tol).all()):
                raise ValueError("topo_balance under compile_teacher takes CE's gradient on the penultimate features "
                                 "from the teacher's head (nn.Linear), but the teacher's logits are not that layer's "
                                 "output (something follows the head): keep the teacher eager (compile_teacher(None)) "
                                 "or drop topo_balance")
            self._head_checked = True
        p = torch.softmax(z, dim=1)
        p[torch.arange(z.shape[0], device=z.device), y] -= 1.0
        return (p / z.shape[0]) @ w

    def _balanced_topo(self, ce: torch.Tensor, f_ce: torch.Tensor, topo: torch.Tensor, logits: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
        """PTA weighted by ``topo_balance * ||dCE/df_ce|| / ||dL_topo/df||``: a term whose value is the
        weighted ``L_topo`` and whose gradient is the weight times ``dL_topo/df``, taken here once, so the
        loop's backward does not run PTA's backward a second time. ``dCE/df_ce`` by autograd on the eager
        teacher (any head), from the head's weights on a compiled one."""
        f = self._feats
        (g_topo,) = torch.autograd.grad(topo, f)  # PTA's graph ends here: the surrogate below carries it
        if f_ce is None:
            raise RuntimeError("topo_balance: the teacher's forward did not reach its head (nn.Linear)")
        if self.compile_mode is not None:
            g_ce = self._ce_feature_grad(logits, y, f_ce)
        else:
            (g_ce,) = torch.autograd.grad(ce, f_ce, retain_graph=True, allow_unused=True)
        if g_ce is None:
            raise RuntimeError("topo_balance: the teacher's CE does not depend on its penultimate features")
        g_topo = g_topo.float()
        n_topo = g_topo.norm()
        w = self.topo_balance * g_ce.float().norm() / torch.where(n_topo > 0, n_topo, 1.0)
        # no PTA gradient on the features (none of the call's images among its classes' points): weight 0, not
        # a huge one; and a ratio beyond float range likewise
        w = torch.where((n_topo > 0) & torch.isfinite(w), w, 0.0)
        self.last_topo_weight = w  # the weight of this call (a 0-dim tensor; diagnostics, tests)
        surrogate = (f.float() * g_topo).sum()
        return w * (topo.detach() + surrogate - surrogate.detach())

    def _teacher_outputs(self, forward, x: torch.Tensor, x_topo: Optional[torch.Tensor]):
        """Run ``forward`` (the teacher, compiled or not) with the hooks recording: ``(logits, CE's features,
        PTA's features, *the BN-statistic terms)``; PTA's come from a second forward of ``x_topo`` when given
        (BN hooks silent), else they are CE's and that entry is None. Leaves ``self._feats`` = PTA's
        features, ``self._bn_terms`` = the BN terms."""
        self._bn_terms.clear()
        self._feats = None
        self.teacher.eval()
        self._capturing = True
        try:
            logits = forward(x)
            f_ce = self._feats  # CE's features (a second forward below replaces self._feats with PTA's)
            f_topo = None
            if x_topo is not None and self.topo is not None:
                self._bn_off = True  # a second forward: PTA's features only (CE and BN keep x's)
                forward(x_topo)
                f_topo = self._feats
        finally:
            self._capturing = self._bn_off = False
        return (logits, f_ce, f_topo, *self._bn_terms)

    def term_grad_norms(self, wrt: torch.Tensor) -> Dict[str, float]:
        """The norm of the gradient of each weighted term of the last call (``last_terms``) on ``wrt``, a tensor
        that call's inputs were computed from (the recover loop: the pixels, before augmentation); the call's
        graph is kept for its own backward. Call it after :meth:`terms` and before that call's backward, under
        the same autocast. On a compiled teacher each term's gradient is taken on the compiled forward's outputs
        and carried to ``wrt`` through an eager forward of the same inputs (two with ``x_topo``; their graph is
        freed before this returns, so the peak is about an eager step's): a compiled forward's backward is taken
        once per step (a second pass through it, even with ``retain_graph`` and donated buffers off, gave wrong
        BN gradients with torch 2.13's inductor on the CPU; under CUDA graphs it is not proven)."""
        if self.last_terms is None:
            raise RuntimeError("term_grad_norms reads the terms of the last completed call: call terms() first")
        out = {}
        if self.compile_mode is None:
            for name, t in self.last_terms.items():
                out[name] = _grad_norm([t], wrt, None)
            return out
        x, x_topo, outs = self._last_io
        try:
            with torch.enable_grad():
                eager = self._teacher_outputs(self.teacher, x, x_topo)  # the same tensors as outs, eagerly
            if len(eager) != len(outs):
                raise RuntimeError(f"the eager teacher recorded {len(eager) - 3} BN terms, the compiled one "
                                   f"{len(outs) - 3}")
            live = [n for n, o in enumerate(outs) if o is not None and o.requires_grad]
            for name, t in self.last_terms.items():
                if not t.requires_grad:
                    out[name] = 0.0
                    continue
                gs = torch.autograd.grad(t, [outs[n] for n in live], retain_graph=True, allow_unused=True)
                used = [(eager[n], g) for n, g in zip(live, gs) if g is not None]
                out[name] = _grad_norm([e for e, _ in used], wrt, [g for _, g in used]) if used else 0.0
        finally:  # the eager forward's graph goes now, before the step's own backward
            eager = None
            self._feats = self._head_out = None
            self._bn_terms.clear()
        return out

    def terms(self, x: torch.Tensor, y: torch.Tensor, ids: Optional[torch.Tensor] = None,
              x_topo: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` without its host synchronisation: ``(loss, parts)`` with ``parts`` a
        detached ``[3]`` tensor (ce, bn, topo) on the loss' device. A recover loop reads the parts
        once per block instead of once per step. ``x_topo``: see :meth:`forward`."""
        if not self._handles and (self.r_bn > 0 or self.lam_topo > 0):
            raise RuntimeError("RETALoss was closed: its teacher hooks are gone")
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.shape != (x.shape[0],):
            raise ValueError(f"y must be an integer tensor [B] = [{x.shape[0]}]")
        if x_topo is not None and self.topo is not None and x_topo.shape[0] != x.shape[0]:
            raise ValueError(f"x_topo must hold the batch's {x.shape[0]} images, got {x_topo.shape[0]}")
        self.last_topo_weight = None  # set again below where this call weighs PTA by topo_balance
        outs = self._teacher_outputs(self._forward_teacher, x, x_topo)
        logits, f_ce = outs[0], outs[1]
        head_out, self._head_out = self._head_out, None
        if self.topo is not None and not self._head_shape_ok:  # once: the hooked layer is the classifier
            check_head_output(self.teacher, head_out, logits)
            self._head_shape_ok = True
        lay = self._layout(y, ids, logits.shape[1], self._feats if self._feats is not None else logits)
        with _no_autocast(logits.device.type):  # the loss terms in fp32 under autocast
            ce = F.cross_entropy(logits.float(), y)
            bn = torch.stack([b.float() for b in self._bn_terms]).sum() if self._bn_terms else ce.new_zeros(())
            topo = self._topo_term(lay) if self.topo is not None else ce.new_zeros(())
            lam_topo = self.topo_weight(x.shape[0])
            if self.topo_balance is not None and lam_topo > 0 and topo.requires_grad:
                weighted = self._balanced_topo(ce, f_ce, topo, logits, y)
            else:
                weighted = lam_topo * topo
            loss = ce + self.r_bn * bn + weighted
        # the weighted terms, graphs attached, until the next call (the recover loop's gradient diagnostics)
        self.last_terms = dict(ce=ce, bn=self.r_bn * bn, topo=weighted)
        self._last_io = (x, x_topo, outs)  # what they came from (term_grad_norms)
        return loss, torch.stack([ce.detach(), bn.detach(), topo.detach().float()])

    def forward(self, x: torch.Tensor, y: torch.Tensor, ids: Optional[torch.Tensor] = None,
                x_topo: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
        """``x`` ``[B, 3, H, W]``, ``y`` ``[B]`` classes, ``ids`` ``[B]`` stable ids of the synthetic
        images (e.g. ``class * ipc + index``), needed for the PTA bank; without them only the
        current batch's images of a class form its point set. ``x_topo`` ``[B, ...]`` [ours]: PTA's
        features from these images instead of ``x`` (e.g. the un-augmented images while ``x`` is their
        augmented view), one more teacher forward; CE and BN stay on ``x``."""
        loss, parts = self.terms(x, y, ids, x_topo)
        ce, bn, topo = parts.cpu().tolist()  # one host sync
        return loss, dict(ce=ce, bn=bn, topo=topo)
