"""Persistent Topology Alignment loss (PTA, docs/method.md §4).

``L_topo = sum_c ||I0_syn(c) - I0_real(c)||^2 + gamma * ||I1_syn(c) - I1_real(c)||^2`` where
``I0``/``I1`` are persistence images of the H0/H1 diagrams of the mutual k-NN flag complex of the
(L2-normalised) features of class ``c``. All classes of a batch, and the real and synthetic sides,
go through one batched k-NN search and one native persistence call.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_points, check_positive_int
from .knn import edge_weights, mutual_knn_edges
from .diagrams import cap_edges_of, check_essential, diagrams_from_pairs, paired_lengths
from .pairs import persistence_pairs
from .pimage import persistence_image

__all__ = ["TopologyAlignmentLoss"]

# Headroom above the largest real value when the image grid is derived from the real diagrams.
GRID_MARGIN = 1.1
# Gaussian width of the loss' images as a fraction of the axis span [ours]. One pixel (1/31) gives
# vanishing gradients for points far from the other side's mass: on a toy alignment of 2 classes x
# 40 points (tests/test_topo_loss.py), 60 Adam steps cut the loss 1.3x at 1/31, 70x at 0.05 and 80x
# at 0.1.
SIGMA_FRACTION = 0.1


class TopologyAlignmentLoss(nn.Module):
    """PTA loss between synthetic and real per-class feature sets.

    Args:
        k: mutual k-NN parameter (METHOD.md: 10-20).
        resolution: persistence-image pixels per axis (paper: 32).
        gamma: weight of the H1 term (METHOD.md: 1).
        normalize: L2-normalise features before building graphs (METHOD.md [ours]: True).
        essential: classes that never die: ``"max"`` (death at the graph's longest edge, default),
            a float, or ``None`` to drop them (see :func:`reta_fast.diagrams_from_pairs`).
        h0_range, h1_pers_range, h1_birth_range: fixed image grids ``(lo, hi)``; ``None`` derives
            each from the first real diagrams seen (``GRID_MARGIN`` x their maximum) and keeps it
            fixed afterwards, so synthetic and real images always share one grid.
        sigma: Gaussian width as a fraction of each axis' span (``SIGMA_FRACTION`` by default).
        refresh_every: recompute the synthetic graph and pairings every ``T`` calls and only
            re-gather edge lengths on the stored pairings in between (``1``: every call).
        reduction: ``"sum"`` over classes (METHOD.md) or ``"mean"``.
        knn_backend, backend: backends of the k-NN search and of the persistence pairings.
        overlap: compute each refresh's graph and pairings in a background thread while the caller
            goes on (backward, optimiser, the next augmentation and forward), and use them from the
            next call on [ours]: the pairings at call ``t + 1`` come from the features of call ``t``
            (one call of lag; the first call of a batch, or after a change of classes or shape, is
            computed synchronously). Apart from that first call, a call then waits for no host
            persistence, and the result is deterministic (each job is consumed at a fixed call). The
            real side's images are computed once per real tensor and reused.

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
    ):
        super().__init__()
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
        """Forget the derived grids, the cached reference and the stored (or pending) pairings."""
        self._drop_job()
        self.grid = dict(self._fixed)
        self._ref_images: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._pairs_cache = None
        self._cache_key = None
        self._real_cache = None  # (real tensor, its version, i0, i1): the real side's images
        self._calls = 0

    def _drop_job(self) -> None:
        job = getattr(self, "_job", None)
        self._job = None
        if job is not None:
            from concurrent.futures import wait

            wait([job[0]])  # let it finish; its result (or error) is discarded with its pairings

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def _pairings(self, x: torch.Tensor, knn_backend: Optional[str] = None):
        """Graph and pairings of detached ``x`` ``[B, n, d]``: what a refresh computes."""
        with torch.no_grad():
            edges, offsets = mutual_knn_edges(x, self.k, backend=knn_backend or self.knn_backend)
            weights = edge_weights(x, edges, offsets)
            pairs = persistence_pairs(edges, weights, x.shape[1], maxdim=1, offsets=offsets, backend=self.backend)
            caps = cap_edges_of(weights, offsets) if self.essential == "max" else None
            return edges, offsets, weights, _pairs_to(pairs, x.device), caps

    def _launch(self, xs: torch.Tensor, key) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reta-pta")
        # Triton's CPU interpreter (TRITON_INTERPRET=1, the test suite's) cannot run outside the main
        # thread; the torch search gives the same neighbours (exact ties included), so the worker uses it
        interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and not xs.is_cuda
        # a copy: the caller's optimiser may update the features' storage in place while the worker reads
        self._job = (self._pool.submit(self._pairings, xs.detach().clone(), "torch" if interpreted else None), key)

    # ----------------------------------------------------------------------------------------
    def _prep(self, x, name):
        x = check_points(x, name)
        return F.normalize(x, dim=-1) if self.normalize else x

    def _diagrams(self, x: torch.Tensor, reuse: bool):
        """Diagrams of ``[B, n, d]``; with ``reuse``, on the stored graph and pairings (only the
        paired edges' lengths are recomputed)."""
        if reuse:
            edges, offsets, weights, pairs, caps = self._pairs_cache
        else:
            edges, offsets, weights, pairs, caps = self._pairings(x.detach())
        lengths = paired_lengths(x, edges, offsets, weights, pairs, caps)
        dg = diagrams_from_pairs(lengths, offsets, pairs, self.essential, caps)
        return dg, (edges, offsets, weights, pairs, caps)

    def _set_grid(self, h0, h1) -> None:
        with torch.no_grad():
            top0 = float(h0[:, 1].max()) if h0.numel() else 0.0
            if self.grid["h0"] is None:
                self.grid["h0"] = (0.0, GRID_MARGIN * top0 if top0 > 0 else 1.0)
            pers = (h1[:, 1] - h1[:, 0]) if h1.numel() else h1.new_zeros(0)
            top_p = float(pers.max()) if pers.numel() else 0.0
            top_b = float(h1[:, 0].max()) if h1.numel() else 0.0
            if self.grid["h1p"] is None:
                self.grid["h1p"] = (0.0, GRID_MARGIN * top_p if top_p > 0 else self.grid["h0"][1])
            if self.grid["h1b"] is None:
                self.grid["h1b"] = (0.0, GRID_MARGIN * top_b if top_b > 0 else self.grid["h0"][1])

    def _images(self, dg, n: int):
        """Images as pixel masses per point: each class image sums to at most ~1 whatever n, R
        and the grid, so the loss is O(1) and lambda_topo keeps its meaning ([ours])."""
        h0, h0_off, h1, h1_off = dg
        r0, rp, rb = self.grid["h0"], self.grid["h1p"], self.grid["h1b"]
        step = lambda r: (r[1] - r[0]) / (self.resolution - 1)  # noqa: E731
        i0 = persistence_image(h0, self.resolution, pers_range=r0, birth_range=None,
                               sigma=self.sigma_frac * (r0[1] - r0[0]), offsets=h0_off)
        i1 = persistence_image(h1, self.resolution, pers_range=rp, birth_range=rb,
                               sigma=self.sigma_frac * (rp[1] - rp[0]), offsets=h1_off)
        return i0 * (step(r0) / n), i1 * (step(rp) * step(rb) / n)

    @torch.no_grad()
    def set_reference(self, real: torch.Tensor) -> None:
        """Compute and keep the real side's images ``[C, n, d]`` for later ``forward(syn)`` calls."""
        x = self._prep(real, "real")
        dg, _ = self._diagrams(x, reuse=False)
        self._set_grid(dg[0], dg[2])
        self._ref_images = self._images(dg, x.shape[1])
        self._pairs_cache = None  # a new reference: stored synthetic pairings belong to the old one

    def forward(self, syn: torch.Tensor, real: Optional[torch.Tensor] = None, classes=None) -> torch.Tensor:
        """Loss of ``syn`` ``[C, n, d]`` against ``real`` (or the reference). With
        ``refresh_every > 1``, pass ``classes`` (the ``C`` class ids of this batch) whenever the
        batch's classes can change between calls: stored pairings are only reused for the same
        classes, shape and real side."""
        xs = self._prep(syn, "syn")
        C = xs.shape[0]
        if classes is not None:
            classes = tuple(int(c) for c in torch.as_tensor(classes).reshape(-1).tolist())
            if len(classes) != C:
                raise ValueError(f"classes has {len(classes)} ids but syn has {C} classes")
        ref_key = (real.data_ptr(), real._version, tuple(real.shape)) if real is not None else id(self._ref_images)
        key = (tuple(xs.shape), classes, ref_key)
        if real is not None:
            xr = self._prep(real, "real")
            if xr.shape != xs.shape:
                raise ValueError(
                    f"real must match syn's [classes, points, dim] (class-balanced), got "
                    f"{tuple(xr.shape)} vs {tuple(xs.shape)}"
                )
            if xr.device != xs.device or xr.dtype != xs.dtype:
                raise ValueError(
                    f"real ({xr.dtype}, {xr.device}) and syn ({xs.dtype}, {xs.device}) must share "
                    "dtype and device"
                )
        elif self._ref_images is None:
            raise ValueError("real features are required (or call set_reference(real) first)")
        if self.overlap:
            return self._forward_overlapped(xs, real, key)
        reuse = (
            self._pairs_cache is not None
            and self._calls % self.refresh_every != 0
            and self._cache_key == key
        )
        self._cache_key = key
        if real is not None and not reuse:
            # One batched k-NN + one native call for both sides: [syn; real].
            both = torch.cat([xs, xr.detach()])
            dg, state = self._diagrams(both, reuse=False)
            self._cache_syn(*state, C)
            h0, h0_off, h1, h1_off = dg
            if self.grid["h0"] is None or self.grid["h1p"] is None or self.grid["h1b"] is None:
                self._set_grid(h0[h0_off[C]:].detach(), h1[h1_off[C]:].detach())
            i0, i1 = self._images(dg, xs.shape[1])
            i0s, i0r, i1s, i1r = i0[:C], i0[C:].detach(), i1[:C], i1[C:].detach()
        else:
            i0r, i1r = self._real_images(real, C, xs.shape[1])
            dgs, state = self._diagrams(xs, reuse=reuse)
            if not reuse:
                self._pairs_cache = state
            i0s, i1s = self._images(dgs, xs.shape[1])
        self._calls += 1
        return self._reduce(i0s, i0r, i1s, i1r)

    def _reduce(self, i0s, i0r, i1s, i1r) -> torch.Tensor:
        per_class = (i0s - i0r).pow(2).flatten(1).sum(1) + self.gamma * (i1s - i1r).pow(2).flatten(1).sum(1)
        return per_class.sum() if self.reduction == "sum" else per_class.mean()

    def _real_images(self, real: Optional[torch.Tensor], C: int, n: int):
        """The real side's images, computed once per real tensor (and grid)."""
        if real is None:
            i0r, i1r = self._ref_images
            if i0r.shape[0] != C:
                raise ValueError(f"syn has {C} classes but the reference has {i0r.shape[0]}")
            return i0r, i1r
        c = self._real_cache  # keyed by the tensor itself (a strong reference) and its version: a new
        # tensor at a freed one's address must not hit
        if c is None or c[0] is not real or c[1] != real._version:
            with torch.no_grad():
                dgr, _ = self._diagrams(self._prep(real, "real"), reuse=False)
                if self.grid["h0"] is None or self.grid["h1p"] is None or self.grid["h1b"] is None:
                    self._set_grid(dgr[0], dgr[2])
                self._real_cache = (real, real._version) + tuple(self._images(dgr, n))
        return self._real_cache[2], self._real_cache[3]

    def _forward_overlapped(self, xs: torch.Tensor, real: Optional[torch.Tensor], key) -> torch.Tensor:
        """``forward`` with ``overlap``; ``xs``/``real`` already checked."""
        C, n = xs.shape[0], xs.shape[1]
        if self._job is not None:  # the pairings launched at the previous refresh: consumed now, always
            future, job_key = self._job
            self._job = None
            state = future.result()
            if job_key == key:
                self._pairs_cache, self._cache_key = state, key
        i0r, i1r = self._real_images(real, C, n)  # also fixes the grids before any synthetic image
        if self._pairs_cache is None or self._cache_key != key:  # first call of a batch: synchronously
            self._pairs_cache, self._cache_key = self._pairings(xs.detach()), key
        dgs, _ = self._diagrams(xs, reuse=True)
        if self._calls % self.refresh_every == 0:
            self._launch(xs, key)  # pairings of these features, for the next call
        self._calls += 1
        i0s, i1s = self._images(dgs, n)
        return self._reduce(i0s, i0r, i1s, i1r)

    def _cache_syn(self, edges, offsets, weights, pairs, caps, C):
        """Keep the synthetic half of a joint [syn; real] graph and pairings for reuse."""
        e_end = int(offsets[C])
        sub = lambda flat, off: (flat[: int(off[C])], off[: C + 1])  # noqa: E731
        h0, h0o = sub(pairs.h0, pairs.h0_offsets)
        h1, h1o = sub(pairs.h1, pairs.h1_offsets)
        ess, esso = sub(pairs.h1_essential, pairs.h1_essential_offsets)
        syn_pairs = type(pairs)(h0, h0o, pairs.components[:C], h1, h1o, ess, esso)
        caps = None if caps is None else caps[:C]
        self._pairs_cache = (edges[:e_end], offsets[: C + 1], weights[:e_end], syn_pairs, caps)


def _pairs_to(pairs, device):
    """The index tensors a reused pairing gathers with, moved to ``device`` once (offsets stay on the
    host: they size things)."""
    if torch.device(device).type == "cpu":
        return pairs
    return pairs._replace(h0=pairs.h0.to(device), h1=pairs.h1.to(device), h1_essential=pairs.h1_essential.to(device))
