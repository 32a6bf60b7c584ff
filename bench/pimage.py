"""Persistence images: reta_fast's separable torch evaluation (forward + backward) against GUDHI's
``PersistenceImage`` (forward only, NumPy)."""
from __future__ import annotations

import torch
from run import Case, Op

import reta_fast as rf


def setup(cfg: dict, device: str) -> Case:
    m, res = cfg["points"], cfg["resolution"]
    g = torch.Generator().manual_seed(0)
    b = torch.rand(m, generator=g)
    dg = torch.stack([b, b + torch.rand(m, generator=g)], 1).to(device)
    kw = dict(pers_range=(0.0, 1.0), birth_range=(0.0, 1.0), sigma=0.05)

    def ours():
        x = dg.detach().requires_grad_()
        rf.persistence_image(x, res, **kw).sum().backward()

    impls = {"reta_fast fwd+bwd": ours}
    try:
        from gudhi.representations import PersistenceImage

        pi = PersistenceImage(bandwidth=0.05, resolution=[res, res], im_range=[0.0, 1.0, 0.0, 1.0],
                              weight=lambda p: min(max(p[1], 0.0), 1.0))
        pi.fit([dg.cpu().numpy()])
        arr = dg.cpu().numpy()
        impls["GUDHI PersistenceImage fwd"] = lambda: pi.transform([arr])
    except ImportError:
        pass
    return Case(impls, unit="points/s", work=m)


OPS = {"persistence_image": Op(setup, sweep=[dict(points=2000, resolution=32), dict(points=20_000, resolution=32), dict(points=200_000, resolution=32)],
                               quick=[dict(points=2000, resolution=32)])}
