"""DRC retrieval: reta_fast's grouped fit-complexity search against batched ``bmm`` + bias +
``argmin`` (what users write: pad every class to the same pool size), and the complexity proxy."""
from __future__ import annotations

import torch
from run import Case, Op

import reta_fast as rf


def setup(cfg: dict, device: str) -> Case:
    C, Q, P, D, lam = cfg["classes"], cfg["queries"], cfg["patches"], cfg["d"], 0.1
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(C, P, D, generator=g), dim=-1).to(device)
    q = torch.nn.functional.normalize(torch.randn(C, Q, D, generator=g), dim=-1).to(device)
    c = torch.rand(C, P, generator=g).to(device)
    ql = torch.arange(C, device=device).repeat_interleave(Q)
    pl = torch.arange(C, device=device).repeat_interleave(P)
    qf, zf, cf = q.reshape(C * Q, D), z.reshape(C * P, D), c.reshape(-1)

    def bmm_argmin():
        # (1 - lam)|q - z|^2 + lam c = const(q) + (1 - lam)(|z|^2 - 2 q.z) + lam c
        s = torch.baddbmm(((1 - lam) * z.pow(2).sum(-1) + lam * c)[:, None, :], q, z.transpose(1, 2),
                          alpha=-2 * (1 - lam))
        return s.argmin(-1)

    impls = {"reta_fast retrieve": lambda: rf.retrieve(qf, ql, zf, pl, cf, lam=lam)}
    if device.startswith("cuda"):
        impls["reta_fast retrieve, tf32 tiles"] = lambda: rf.retrieve(qf, ql, zf, pl, cf, lam=lam, precision="tf32")
    impls["batched bmm + argmin (fp32)"] = bmm_argmin
    agree = float((rf.retrieve(qf, ql, zf, pl, cf, lam=lam) == (bmm_argmin() + torch.arange(C, device=device)[:, None] * P).reshape(-1)).float().mean())
    return Case(impls, unit="FLOP/s", work=2.0 * C * Q * P * D,
                note=f"bmm+argmin agrees with the exact answer on {100 * agree:.2f}% of queries")


def setup_complexity(cfg: dict, device: str) -> Case:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(cfg["images"], 3, cfg["res"], cfg["res"], generator=g).to(device)
    return Case({"reta_fast patch_complexity": lambda: rf.patch_complexity(x, sigma=1.0)},
                unit="images/s", work=cfg["images"])


OPS = {
    "retrieve": Op(setup, sweep=[dict(classes=100, queries=50, patches=300, d=512)],
                   quick=[dict(classes=10, queries=10, patches=100, d=128)],
                   gpu_sweep=[dict(classes=1000, queries=50, patches=1500, d=512)]),
    "patch_complexity": Op(setup_complexity, sweep=[dict(images=3000, res=32), dict(images=300, res=224)],
                           quick=[dict(images=300, res=32)]),
}
