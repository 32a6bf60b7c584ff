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


class _Synthetic:
    """An in-memory data set of random uint8 images (the pool build's data loading is not measured
    separately: images/s here is crop + teacher forward + complexity + writing)."""

    def __init__(self, n, classes, res):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8)
        self.targets = (torch.arange(n) % classes).tolist()
        self.classes = [str(i) for i in range(classes)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def setup_pool(cfg: dict, device: str) -> Case:
    import shutil
    import tempfile

    ds = _Synthetic(cfg["images"], cfg["classes"], cfg["res"])
    teacher = rf.models.resnet18(num_classes=cfg["classes"], cifar_stem=cfg["res"] <= 64).to(device).eval()
    root = tempfile.mkdtemp(prefix="reta-bench-pool-")
    counter = iter(range(10**6))

    def build():
        out = f"{root}/p{next(counter)}"
        rf.PatchPool.build(ds, teacher, out, per_class=cfg["images"] // cfg["classes"], size=cfg["res"],
                           resolutions=(cfg["res"],), device=device, progress=False, batch_size=256)
        shutil.rmtree(out)

    return Case({"reta_fast PatchPool.build": build}, unit="images/s", work=cfg["images"],
                note="ResNet-18 teacher; in-memory uint8 images")


OPS = {
    "retrieve": Op(setup, sweep=[dict(classes=10, queries=50, patches=300, d=512), dict(classes=100, queries=50, patches=300, d=512)],
                   quick=[dict(classes=10, queries=10, patches=100, d=128)],
                   gpu_sweep=[dict(classes=1000, queries=50, patches=1500, d=512)]),
    "pool_build": Op(setup_pool, sweep=[dict(images=2000, classes=10, res=32)],
                     quick=[dict(images=200, classes=10, res=32)],
                     gpu_sweep=[dict(images=20000, classes=100, res=32)]),
    "patch_complexity": Op(setup_complexity, sweep=[dict(images=3000, res=32), dict(images=300, res=224)],
                           quick=[dict(images=300, res=32)]),
}
