"""``reta topo-demo``: the PTA loss alone on synthetic point clouds (a collapsed set aligned to real loops)."""
from __future__ import annotations

import time

import torch

from .._ext import has_native
from .._version import __version__
from ..topology.diagrams import persistence_diagrams
from ..topology.pta import TopologyAlignmentLoss
from ..topology.samples import rings

__all__ = ["topo_demo"]


def _summary(dg, g: int) -> str:
    sl = lambda t, o: t[o[g]: o[g + 1]]  # noqa: E731
    h0 = sl(dg.h0, dg.h0_offsets).detach()
    h1 = sl(dg.h1, dg.h1_offsets).detach()
    long_loops = int(((h1[:, 1] - h1[:, 0]) > 0.1).sum()) if h1.numel() else 0
    return (f"components={int(dg.pairs.components[g])}, mean H0 death={float(h0[:, 1].mean()):.3f}, "
            f"H1 bars={h1.shape[0]} (persistence > 0.1: {long_loops})")


def topo_demo(args) -> int:
    torch.manual_seed(args.seed)
    C, n, d = args.classes, args.points, args.dim
    print(f"reta_fast {__version__} topology demo: {C} classes x {n} points in R^{d}, k={args.k}; "
          f"native extension: {'yes' if has_native() else 'no (reference path)'}")
    real = rings(C, n, d, 0.05, args.seed)
    # A "collapsed" synthetic set: the pull-to-anchor failure PTA is meant to undo.
    syn = (0.3 * rings(C, n, d, 0.02, args.seed + 1)).requires_grad_()
    kw = dict(essential="max")
    t0 = time.perf_counter()
    dr = persistence_diagrams(torch.nn.functional.normalize(real, dim=-1), args.k, **kw)
    ds = persistence_diagrams(torch.nn.functional.normalize(syn.detach(), dim=-1), args.k, **kw)
    print(f"diagrams of {2 * C} point sets in {1e3 * (time.perf_counter() - t0):.1f} ms")
    print(f"  real      class 0: {_summary(dr, 0)}")
    print(f"  synthetic class 0: {_summary(ds, 0)}")
    loss_fn = TopologyAlignmentLoss(k=args.k)
    loss_fn.set_reference(real)
    opt = torch.optim.Adam([syn], lr=args.lr)
    t0 = time.perf_counter()
    first = None
    for step in range(args.steps):
        opt.zero_grad()
        loss = loss_fn(syn)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        first = value if first is None else first
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"  step {step:4d}  PTA loss {value:.5f}")
    dt = time.perf_counter() - t0
    ds = persistence_diagrams(torch.nn.functional.normalize(syn.detach(), dim=-1), args.k, **kw)
    print(f"after {args.steps} PTA steps ({1e3 * dt / args.steps:.1f} ms/step, forward + backward, "
          f"all {C} classes batched):")
    print(f"  synthetic class 0: {_summary(ds, 0)}")
    print(f"PTA loss {first:.5f} -> {value:.5f} ({first / max(value, 1e-12):.1f}x lower)")
    return 0
