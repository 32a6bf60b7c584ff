"""Persistent Topology Alignment loss (PTA, docs/method.md §4).

``L_topo = sum_c ||I0_syn(c) - I0_real(c)||^2 + gamma * ||I1_syn(c) - I1_real(c)||^2`` where
``I0``/``I1`` are persistence images of the H0/H1 diagrams of the mutual k-NN flag complex of the
(L2-normalised) features of class ``c``. All classes of a call go through one batched k-NN search and
one native persistence call; the real side is computed once per real tensor and kept.

Host synchronisation (docs/method.md §4.8): a call that recomputes the synthetic side's pairings makes
one device-to-host transfer of the graphs and one host-to-device transfer of the pairings
(:mod:`reta_fast.topology.boundary`); a call that reuses them (``refresh_every > 1``, or every call
with ``overlap=True`` but the first of a batch) makes none. The synthetic features are checked for
NaN/inf on the device and the verdict travels with the next graph transfer: a non-finite input raises
at that refresh (at most ``refresh_every`` calls later; one call later with ``overlap``).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_points, check_positive_int
from .boundary import DevicePlan, device_graph, graph_plan, host_plan, plan_diagrams, start_host_copy, upload
from .diagrams import check_essential
from .pimage import batched_images

__all__ = ["TopologyAlignmentLoss", "GRID_MARGIN", "SIGMA_FRACTION"]

# Headroom above the largest real value when the image grid is derived from the real diagrams.
GRID_MARGIN = 1.1
# Gaussian width of the loss' images as a fraction of the axis span [ours]. One pixel (1/31) gives
# vanishing gradients for points far from the other side's mass: on a toy alignment of 2 classes x
# 40 points (tests/test_topo_loss.py), 60 Adam steps cut the loss 1.3x at 1/31, 70x at 0.05 and 80x
# at 0.1.
SIGMA_FRACTION = 0.1


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TopologyAlignmentLoss(nn.Module):
    """PTA loss between synthetic and real per-class feature sets.

    Args:
        k: mutual k-NN parameter (docs/method.md §4.2: 10-20 in the paper; ``k >= n - 1`` is the
            complete graph).
        resolution: persistence-image pixels per axis (paper: 32).
        gamma: weight of the H1 term (1).
        normalize: L2-normalise features before building graphs ([ours]: True).
        essential: classes that never die: ``"max"`` (death at the graph's longest edge, default),
            a float, or ``None`` to drop them (see :func:`reta_fast.diagrams_from_pairs`).
        h0_range, h1_pers_range, h1_birth_range: fixed image grids ``(lo, hi)``; ``None`` derives
            each from the diagrams (see ``grid``). Synthetic and real images always share one grid.
        grid: how a derived grid is chosen [ours]: ``"union"`` (default) starts from the first real
            diagrams (``GRID_MARGIN`` x their maximum) and grows whenever a refresh finds synthetic
            diagrams beyond it (never shrinks), so both sides always lie on the grid: a synthetic point
            far outside a real-only grid would get no gradient at all (a noise-initialised set did: loss
            0.54, gradient 0). ``"real"``: fixed by the first real diagrams (the earlier behaviour).
        sigma: Gaussian width as a fraction of the persistence axis' span, used on both axes of the H1
            image (``SIGMA_FRACTION`` by default); it follows the grid when the grid grows.
        refresh_every: recompute the synthetic graph and pairings every ``T`` calls and only
            re-gather edge lengths on the stored pairings in between (``1``: every call).
        reduction: ``"sum"`` over classes (docs/method.md §4.7) or ``"mean"``.
        knn_backend, backend: backends of the k-NN search and of the persistence pairings.
        overlap: compute each refresh's pairings while the caller goes on (backward, optimiser, the
            next augmentation and forward), and use them from the next call on [ours]: the pairings at
            call ``t + 1`` come from the features of call ``t`` (one call of lag; the first call of a
            batch, or after a change of classes or shape, is computed synchronously). On an accelerator
            the graph is built on the device at call ``t`` and only the host work (pairing, planning)
            runs in a worker thread; on the CPU the whole refresh does. Deterministic: each job is
            consumed at a fixed call.

    Shapes: ``forward(syn, real=None)`` with ``syn`` ``[C, n, d]`` (requires grad) and ``real``
    ``[C, n, d]`` (constant, class-balanced: same ``C`` and ``n``); ``real`` may be omitted after
    :meth:`set_reference`. Returns a scalar tensor.
    """

    def __init__(
        self,
        k: int = 10,
        resolution: int = 32,
        gamma: float = 1.0,
        normalize: bool = True,
        essential: Union[None, str, float] = "max",
        h0_range: Optional[Tuple[float, float]] = None,
        h1_pers_range: Optional[Tuple[float, float]] = None,
        h1_birth_range: Optional[Tuple[float, float]] = None,
        sigma: Optional[float] = None,
        refresh_every: int = 1,
        reduction: str = "sum",
        knn_backend: str = "auto",
        backend: str = "auto",
        overlap: bool = False,
        grid: str = "union",
    ):
        super().__init__()
        if grid not in ("union", "real"):
            raise ValueError(f"grid must be 'union' or 'real', got {grid!r}")
        self.grid_mode = grid
        self.overlap = bool(overlap)
        self._pool = None  # one worker thread, created on first use
        self._job = None  # (future, key) of the pairings being computed for the next call
        self.k = check_positive_int(k, "k")
        self.resolution = check_positive_int(resolution, "resolution", 2)
        self.refresh_every = check_positive_int(refresh_every, "refresh_every")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        check_essential(essential)
        self.gamma, self.normalize, self.essential = float(gamma), bool(normalize), essential
        self.sigma_frac = SIGMA_FRACTION if sigma is None else float(sigma)
        if not self.sigma_frac > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        self.reduction, self.knn_backend, self.backend = reduction, knn_backend, backend
        self._fixed = {"h0": h0_range, "h1p": h1_pers_range, "h1b": h1_birth_range}
        self.reset()

    def reset(self) -> None:
        """Forget the derived grids, the reference, the real side's images and the stored (or pending)
        pairings."""
        self._drop_job()
        self.grid = dict(self._fixed)
        self._grid_version = 0
        self._ref = None  # (h0, h1, plan) of the real side given to set_reference
        self._plan: Optional[DevicePlan] = None
        self._plan_key = None
        self._real_cache = None  # (real tensor, its version, h0, h1, plan): the real side's diagrams
        self._real_images = None  # (real token, grid version, i0, i1)
        self._nonfinite: Optional[torch.Tensor] = None  # device flag: a NaN/inf seen since the last refresh
        self._real_token = 0  # changes whenever the real side does: stored pairings belong to one real side
        self._calls = 0

    def _drop_job(self) -> None:
        job = getattr(self, "_job", None)
        self._job = None
        if job is not None:
            wait([job[0]])  # let it finish; its result (or error) is discarded with its pairings

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    # ----------------------------------------------------------------------------------------
    # pairings: the host boundary

    def _take_nonfinite(self) -> Optional[torch.Tensor]:
        flag, self._nonfinite = self._nonfinite, None
        return flag

    def _note_finite(self, xs: torch.Tensor) -> None:
        """Fold this call's NaN/inf check into the flag the next refresh transfers (device op, no sync)."""
        bad = ~torch.isfinite(xs.detach()).all()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad

    @staticmethod
    def _checked(plan, name: str):
        if not plan.finite:
            raise ValueError(f"{name} contains NaN or infinite values (in this call's features or in one since "
                             f"the last pairing refresh)")
        return plan

    def _refresh(self, xs: torch.Tensor) -> DevicePlan:
        """Graph, pairings and diagram plan of the detached ``xs``, on this thread (one transfer each way)."""
        plan = graph_plan(xs.detach(), self.k, self.essential, 1, self.knn_backend, self.backend,
                          self._take_nonfinite())
        return upload(self._checked(plan, "syn"), xs.device)

    def _launch(self, xs: torch.Tensor, key) -> None:
        """Start the refresh of ``xs``'s pairings, to be consumed by the next call."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reta-pta")
        x, flag = xs.detach(), self._take_nonfinite()
        if x.device.type == "cpu":  # no device to keep busy: the whole refresh runs in the worker
            # Triton's CPU interpreter (TRITON_INTERPRET=1) cannot run outside the main thread; the torch
            # search gives the same neighbours (exact ties included)
            knn_backend = "torch" if _interpreted() else self.knn_backend
            x = x.clone()  # the caller's optimiser may update the features' storage in place meanwhile

            def job():
                return graph_plan(x, self.k, self.essential, 1, knn_backend, self.backend, flag)
        else:  # the graph now, on the device (asynchronous launches); pairing and planning on the host
            packed, shape = device_graph(x, self.k, self.knn_backend, flag)
            host, done = start_host_copy(packed)

            def job():
                if done is not None:
                    done()  # waits for this copy only, in the worker thread
                return host_plan(host, shape, self.essential, 1, self.backend)
        self._job = (self._pool.submit(job), key)

    # ----------------------------------------------------------------------------------------
    def _prep(self, x, name, finite_check: bool):
        x = check_points(x, name, finite=finite_check)
        return F.normalize(x, dim=-1) if self.normalize else x

    def _set_grid(self, h0: torch.Tensor, h1: torch.Tensor) -> None:
        """Image grids from real diagrams (``h0`` deaths ``[P0]``, ``h1`` ``[P1, 2]``); a few host reads,
        once per real tensor."""
        with torch.no_grad():
            top0 = float(h0.max()) if h0.numel() else 0.0
            if self.grid["h0"] is None:
                self.grid["h0"] = (0.0, GRID_MARGIN * top0 if top0 > 0 else 1.0)
            top_p = float((h1[:, 1] - h1[:, 0]).max()) if h1.numel() else 0.0
            top_b = float(h1[:, 0].max()) if h1.numel() else 0.0
            if self.grid["h1p"] is None:
                self.grid["h1p"] = (0.0, GRID_MARGIN * top_p if top_p > 0 else self.grid["h0"][1])
            if self.grid["h1b"] is None:
                self.grid["h1b"] = (0.0, GRID_MARGIN * top_b if top_b > 0 else self.grid["h0"][1])

    def _images(self, h0: torch.Tensor, h1: torch.Tensor, plan: DevicePlan, n: int):
        """Images as pixel masses per point: each class image sums to at most ~1 whatever n, R
        and the grid, so the loss is O(1) and lambda_topo keeps its meaning ([ours])."""
        r0, rp, rb = self.grid["h0"], self.grid["h1p"], self.grid["h1b"]
        R = self.resolution
        step = lambda r: (r[1] - r[0]) / (R - 1)  # noqa: E731
        d0 = torch.stack([torch.zeros_like(h0), h0], dim=1)
        i0 = batched_images(d0, plan.h0_set, None, plan.B, 0, R, r0, None, self.sigma_frac * (r0[1] - r0[0]), r0[1])
        i1 = batched_images(h1, plan.h1_set, plan.h1_pos, plan.B, plan.h1_width, R, rp, rb,
                            self.sigma_frac * (rp[1] - rp[0]), rp[1])
        return i0 * (step(r0) / n), i1 * (step(rp) * step(rb) / n)

    def _side(self, x: torch.Tensor):
        """Diagrams ``(h0, h1, plan)`` of the constant (real) side ``x`` ``[C, n, d]`` (prepared): its own
        pairings, once; fixes the grids if they are not yet."""
        with torch.no_grad():
            plan = upload(self._checked(graph_plan(x, self.k, self.essential, 1, self.knn_backend, self.backend),
                                        "real"), x.device)
            h0, h1 = plan_diagrams(x, plan)
            if self.grid["h0"] is None or self.grid["h1p"] is None or self.grid["h1b"] is None:
                self._set_grid(h0, h1)
            self._grow(plan.extent)  # a later real side may reach beyond the grid the first one set
            return h0, h1, plan

    def _grow(self, extent) -> None:
        """Widen the derived grids to ``GRID_MARGIN`` x a refresh's synthetic ``extent`` (max H0 death, H1
        persistence, H1 birth; host values) where they do not reach it (``grid="union"``)."""
        if self.grid_mode != "union":
            return
        for name, top in zip(("h0", "h1p", "h1b"), extent):
            if self._fixed[name] is None and GRID_MARGIN * top > self.grid[name][1]:
                self.grid[name] = (self.grid[name][0], GRID_MARGIN * top)
                self._grid_version += 1

    @torch.no_grad()
    def set_reference(self, real: torch.Tensor) -> None:
        """Compute and keep the real side ``[C, n, d]`` for later ``forward(syn)`` calls."""
        self._ref = self._side(self._prep(real, "real", True))
        self._real_token += 1  # stored synthetic pairings belong to the old reference

    def _real_side(self, real: Optional[torch.Tensor], C: int):
        """The real side's diagrams, computed once per real tensor (keyed by the tensor itself, a strong
        reference, and its version: a new tensor at a freed one's address must not hit)."""
        if real is None:
            if self._ref[2].B != C:
                raise ValueError(f"syn has {C} classes but the reference has {self._ref[2].B}")
            return self._ref
        c = self._real_cache
        if c is None or c[0] is not real or c[1] != real._version:
            self._real_cache = (real, real._version) + self._side(self._prep(real, "real", True))
            self._real_token += 1
        return self._real_cache[2:]

    def _real_images_on_grid(self, h0, h1, plan, n: int):
        """The real side's images on the current grid (recomputed when the grid grew)."""
        c = self._real_images
        if c is None or c[0] != self._real_token or c[1] != self._grid_version:
            with torch.no_grad():
                self._real_images = (self._real_token, self._grid_version) + tuple(self._images(h0, h1, plan, n))
        return self._real_images[2], self._real_images[3]

    def forward(self, syn: torch.Tensor, real: Optional[torch.Tensor] = None, classes=None,
                group=None) -> torch.Tensor:
        """Loss of ``syn`` ``[C, n, d]`` against ``real`` (or the reference). With
        ``refresh_every > 1`` or ``overlap``, pass ``classes`` (the ``C`` class ids of this call, a
        sequence of ints) whenever the classes can change between calls, and ``group`` (any hashable) when
        calls of the same classes and shape can hold other points (e.g. several batches): stored pairings
        are only reused for the same classes, group, shape and real side."""
        xs = self._prep(syn, "syn", False)  # its NaN/inf check rides with the next graph transfer
        C, n = xs.shape[0], xs.shape[1]
        if classes is not None:
            if isinstance(classes, torch.Tensor):
                classes = classes.cpu().tolist()  # host synchronisation if it lives on a device: pass a list
            classes = tuple(int(c) for c in classes)
            if len(classes) != C:
                raise ValueError(f"classes has {len(classes)} ids but syn has {C} classes")
        if real is not None:
            if not isinstance(real, torch.Tensor) or tuple(real.shape[-3:] if real.dim() == 3 else
                                                           (1, *real.shape[-2:])) != tuple(xs.shape):
                raise ValueError(
                    f"real must match syn's [classes, points, dim] (class-balanced), got "
                    f"{tuple(getattr(real, 'shape', ()))} vs {tuple(xs.shape)}"
                )
            if real.device != xs.device or real.dtype != xs.dtype:
                raise ValueError(
                    f"real ({real.dtype}, {real.device}) and syn ({xs.dtype}, {xs.device}) must share "
                    "dtype and device"
                )
        elif self._ref is None:
            raise ValueError("real features are required (or call set_reference(real) first)")
        h0r, h1r, plan_r = self._real_side(real, C)  # also fixes the grids before any synthetic image
        key = (tuple(xs.shape), xs.device, classes, group, self._real_token)
        if self.overlap and self._job is not None:  # the pairings launched at the previous refresh
            future, job_key = self._job
            self._job = None
            plan = self._checked(future.result(), "syn")
            if job_key == key:
                self._plan, self._plan_key = upload(plan, xs.device), key
                self._grow(plan.extent)
        stale = self._plan is None or self._plan_key != key
        if stale or (not self.overlap and self._calls % self.refresh_every == 0):
            self._plan, self._plan_key = self._refresh(xs), key
            self._grow(self._plan.extent)
        else:
            self._note_finite(xs)
        i0r, i1r = self._real_images_on_grid(h0r, h1r, plan_r, n)
        if self.overlap and self._calls % self.refresh_every == 0:
            self._launch(xs, key)  # pairings of these features, for the next call
        self._calls += 1
        h0, h1 = plan_diagrams(xs, self._plan)
        i0s, i1s = self._images(h0, h1, self._plan, n)
        return self._reduce(i0s, i0r, i1s, i1r)

    def _reduce(self, i0s, i0r, i1s, i1r) -> torch.Tensor:
        per_class = (i0s - i0r).pow(2).flatten(1).sum(1) + self.gamma * (i1s - i1r).pow(2).flatten(1).sum(1)
        return per_class.sum() if self.reduction == "sum" else per_class.mean()
