"""RETALoss: the recover objective of METHOD.md section 2, as a drop-in module.

``L = CE(T(x), y) + r_bn * sum_l s_l (||mu_l(x) - mu_l^BN||_2 + ||var_l(x) - var_l^BN||_2) + lam_topo * L_topo``

* BN-statistic matching (SRe2L): batch statistics of every BatchNorm2d input over (N, H, W), biased
  variance, unsquared L2 norms, ``s_1 = first_bn_weight`` for the first BN layer and 1 elsewhere.
* L_topo: :class:`reta_fast.TopologyAlignmentLoss` between the synthetic images' penultimate teacher
  features and real features of the same classes (class-balanced: ``n`` points per class, ``n`` =
  ``real_feats.shape[1]`` > ``k``). A recover batch holds few synthetic images per class, so the loss
  keeps a per-class bank of the latest detached feature of every synthetic image it has seen, keyed by
  the image ids passed to ``forward`` [ours, METHOD.md section 4]: a class's point set is its current
  images (with gradient) plus banked features of its *other* images, at most ``n``. All classes of a
  batch use the same number of points m (the most they all have) and the first m real points; the
  PTA term is active once m > k (so with IPC 10, use k < 10).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..topology.pta import TopologyAlignmentLoss

__all__ = ["RETALoss"]


class RETALoss(nn.Module):
    """CE + BN-statistic matching + PTA on a frozen teacher.

    Args:
        teacher: the teacher network; it is put in eval mode and its parameters are frozen
            (``requires_grad=False``): no weight gradient is ever computed.
        r_bn: weight of the BN term (METHOD.md: 0.01); 0 disables it (and allows a teacher without
            BatchNorm layers).
        first_bn_weight: ``s_1`` (METHOD.md: 10).
        lam_topo: weight of the PTA term (METHOD.md: 0.5); 0 disables it.
        real_feats: ``[C, n, D]`` real penultimate features per class (e.g. from a
            :class:`reta_fast.PatchPool`: :meth:`from_pool`), required when ``lam_topo > 0``.
        k, topo_refresh, **topo_kwargs: passed to :class:`TopologyAlignmentLoss` (``refresh_every``).

    Call: ``loss, parts = criterion(x, y, ids)`` with ``x`` ``[B, 3, H, W]`` (requires grad), ``y``
    ``[B]`` class indices and ``ids`` ``[B]`` image ids (for PTA); ``parts`` maps ``"ce"``, ``"bn"``,
    ``"topo"`` to floats (one host sync).
    Works under ``torch.autocast`` (statistics and losses are computed in fp32) and GradScaler.
    Call :meth:`close` to remove the hooks it put on the teacher; :meth:`compile` to run the teacher
    through ``torch.compile``; :meth:`terms` for the loss without a host synchronisation.
    """

    def __init__(self, teacher: nn.Module, r_bn: float = 0.01, first_bn_weight: float = 10.0,
                 lam_topo: float = 0.5, real_feats: Optional[torch.Tensor] = None, k: int = 10,
                 topo_refresh: int = 1, **topo_kwargs):
        super().__init__()
        for name, v in (("r_bn", r_bn), ("first_bn_weight", first_bn_weight), ("lam_topo", lam_topo)):
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.r_bn, self.lam_topo = float(r_bn), float(lam_topo)
        self._handles = []
        self._bn_terms = []
        bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        self._capturing = False  # hooks record only during this loss's own forward
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
        linears = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
        self._feats = None
        self.topo = None
        if self.lam_topo > 0:
            if real_feats is None:
                raise ValueError("lam_topo > 0 needs real_feats [C, n, D] (see RETALoss.from_pool)")
            if not linears:
                raise ValueError("the teacher has no nn.Linear head: cannot take penultimate features for PTA")
            if not isinstance(real_feats, torch.Tensor) or real_feats.dim() != 3 or real_feats.shape[1] <= k:
                raise ValueError(f"real_feats must be [C, n, D] with n > k={k}, got "
                                 f"{tuple(real_feats.shape) if isinstance(real_feats, torch.Tensor) else real_feats!r}")
            self.register_buffer("real_feats", real_feats.detach().float())
            self.topo = TopologyAlignmentLoss(k=k, refresh_every=topo_refresh, **topo_kwargs)
            self._handles.append(linears[-1].register_forward_hook(self._feat_hook))
            self._bank: Dict[int, Dict[int, torch.Tensor]] = {}  # class -> image id -> feature
            self._real_slices: Dict[tuple, torch.Tensor] = {}
        self._forward_teacher = self.teacher
        self.compile_mode: Optional[str] = None
        self._checked = None  # (y, y._version, ids, ids._version, classes, per-class rows, per-class ids)

    def compile(self, mode: Optional[str] = "default", **kwargs) -> "RETALoss":
        """Run the teacher's forward (with the BN-statistic and feature hooks) through
        ``torch.compile`` (``mode``: ``"default"``, ``"reduce-overhead"`` = CUDA-graph capture of the
        compiled forward and backward on a GPU, ``"max-autotune"``...); the PTA term stays eager (its
        persistence pairing runs on the host). One compilation per input shape (``dynamic=False``).
        ``mode=None`` goes back to eager. Returns ``self``."""
        if mode is None:
            self._forward_teacher, self.compile_mode = self.teacher, None
        elif mode != self.compile_mode:
            self._forward_teacher = torch.compile(self.teacher, mode=None if mode == "default" else mode,
                                                  dynamic=False, **kwargs)
            self.compile_mode = mode
        return self

    @classmethod
    def from_pool(cls, teacher: nn.Module, pool, points_per_class: int = 32, seed: int = 0, **kwargs) -> "RETALoss":
        """Build with ``points_per_class`` real features per class drawn (seeded) from a PatchPool."""
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

    def reset_bank(self) -> None:
        """Forget every banked synthetic feature (e.g. at the start of a new recover batch)."""
        if self.topo is not None:
            self._bank.clear()

    def reset(self) -> None:
        """Forget all state carried between calls: the bank, and the PTA loss's image grids (derived
        from the first real features it sees) and stored pairings. The pipeline calls it before every
        batch, so each batch's result depends on that batch alone."""
        if self.topo is not None:
            self._bank.clear()
            self.topo.reset()

    @torch.no_grad()
    def seed_bank(self, feats: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> None:
        """Put detached features ``[N, D]`` of images with classes ``y`` ``[N]`` and ids ``ids`` ``[N]``
        into the PTA bank (the pipeline seeds it with the initial images of a class's other items, so
        a batch's point set does not depend on which batches ran before it: resumed and sharded runs
        give the same images)."""
        if self.topo is None:
            return
        if feats.dim() != 2 or y.shape != (feats.shape[0],) or ids.shape != y.shape:
            raise ValueError(f"seed_bank needs feats [N, D], y [N], ids [N]; got {tuple(feats.shape)}, "
                             f"{tuple(y.shape)}, {tuple(ids.shape)}")
        for f, c, i in zip(feats.detach(), y.tolist(), ids.tolist()):
            bank = self._bank.setdefault(int(c), {})
            bank.pop(int(i), None)
            bank[int(i)] = f[None]

    def _feat_hook(self, mod, inp, out):
        if self._capturing:
            self._feats = inp[0]

    def train(self, mode: bool = True):
        """The teacher stays in eval mode whatever the mode of this module (its running statistics
        are the BN targets and must never be updated)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _bn_hook(self, weight: float):
        def hook(mod, inp, out):
            if not self._capturing:
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

    def _layout(self, y: torch.Tensor, ids: Optional[torch.Tensor], num_classes: int):
        """Check ``y`` (and ``ids``) and split the batch by class, once per pair of tensors: a
        recover loop passes the same ``y``/``ids`` every step, so the host syncs of the checks and
        of the split happen at its first step only (an in-place change of either is noticed)."""
        c = self._checked
        if (c is not None and c[0] is y and c[1] == y._version and c[2] is ids
                and c[3] == (None if ids is None else ids._version) and c[4] == num_classes):
            return c[5]
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dim() != 1:
            raise ValueError(f"y must be an integer tensor [B], got {getattr(y, 'shape', y)!r}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"y holds labels outside [0, {num_classes})")
        if ids is not None and (not isinstance(ids, torch.Tensor) or ids.shape != y.shape
                                or ids.dtype.is_floating_point):
            raise ValueError(f"ids must be an integer tensor [B] = [{y.shape[0]}]")
        split = []
        for cls in torch.unique(y).tolist():  # host loop over the classes of the batch
            sel = (y == cls).nonzero().flatten()
            split.append((cls, sel, None if ids is None else ids[sel].tolist()))
        self._checked = (y, y._version, ids, None if ids is None else ids._version, num_classes, split)
        return split

    def _topo_term(self, y: torch.Tensor, ids: Optional[torch.Tensor], split) -> torch.Tensor:
        f = self._feats.float()
        n = self.real_feats.shape[1]
        point_sets = {}
        for c, sel, cur_ids in split:
            if c >= self.real_feats.shape[0]:
                raise ValueError(f"class {c} has no real features (real_feats covers {self.real_feats.shape[0]} classes)")
            cur = f[sel]
            if ids is None:  # no identities: only the current images, never the bank
                point_sets[c] = cur[:n]
                continue
            bank = self._bank.setdefault(c, {})
            others = [v for key, v in reversed(bank.items()) if key not in set(cur_ids)]
            pts = torch.cat([cur] + others[: max(0, n - cur.shape[0])]) if others else cur
            for key, v in zip(cur_ids, cur.detach()):  # newest last
                bank.pop(key, None)
                bank[key] = v[None]
            point_sets[c] = pts[:n]
        # Class-balanced: every class of the batch contributes the same number of points, the most
        # that all of them have (at most n); PTA needs more than k of them.
        m = min((p.shape[0] for p in point_sets.values()), default=0)
        if m <= self.topo.k:
            return f.new_zeros(())
        classes = sorted(point_sets)
        syn = torch.stack([point_sets[c][:m] for c in classes])
        key = (tuple(classes), m, f.device)
        if key not in self._real_slices:  # one tensor per class set, so the loss can reuse pairings
            self._real_slices[key] = self.real_feats[classes][:, :m].to(f.device)
        return self.topo(syn, self._real_slices[key], classes=classes)

    def terms(self, x: torch.Tensor, y: torch.Tensor, ids: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` without its host synchronisation: ``(loss, parts)`` with ``parts`` a
        detached ``[3]`` tensor (ce, bn, topo) on the loss' device. A recover loop reads the parts
        once per block instead of once per step."""
        if not self._handles and (self.r_bn > 0 or self.lam_topo > 0):
            raise RuntimeError("RETALoss was closed: its teacher hooks are gone")
        if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.shape != (x.shape[0],):
            raise ValueError(f"y must be an integer tensor [B] = [{x.shape[0]}]")
        self._bn_terms.clear()
        self._feats = None
        self.teacher.eval()
        self._capturing = True
        try:
            logits = self._forward_teacher(x)
        finally:
            self._capturing = False
        split = self._layout(y, ids, logits.shape[1])
        with torch.autocast(logits.device.type, enabled=False):  # the loss terms in fp32 under autocast
            ce = F.cross_entropy(logits.float(), y)
            bn = torch.stack([b.float() for b in self._bn_terms]).sum() if self._bn_terms else ce.new_zeros(())
            topo = self._topo_term(y, ids, split) if self.topo is not None else ce.new_zeros(())
            loss = ce + self.r_bn * bn + self.lam_topo * topo
        return loss, torch.stack([ce.detach(), bn.detach(), topo.detach().float()])

    def forward(self, x: torch.Tensor, y: torch.Tensor, ids: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """``x`` ``[B, 3, H, W]``, ``y`` ``[B]`` classes, ``ids`` ``[B]`` stable ids of the synthetic
        images (e.g. ``class * ipc + index``), needed for the PTA bank; without them only the
        current batch's images of a class form its point set."""
        loss, parts = self.terms(x, y, ids)
        ce, bn, topo = parts.tolist()  # one host sync
        return loss, dict(ce=ce, bn=bn, topo=topo)
