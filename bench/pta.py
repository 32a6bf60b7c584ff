"""The PTA loss step (forward + backward, all classes) against a straightforward per-class loop (cdist,
mutual k-NN mask, scipy MST, H0 image), and against the ResNet-18 recover step it is added to (target:
<= 5% of it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from common import clustered
from run import Case, Op

import reta_fast as rf


def _h0_image(x: torch.Tensor, k: int, res: int, hi: float) -> torch.Tensor:
    """One class, the way it is usually written: cdist, mutual kNN mask, scipy MST on the host,
    gather the MST edge lengths, 1-D persistence image (H0 only)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import minimum_spanning_tree

    d = torch.cdist(x, x)
    nbr = d.detach().clone().fill_diagonal_(float("inf")).topk(k, largest=False).indices
    adj = torch.zeros_like(d, dtype=torch.bool).scatter_(1, nbr, True)
    mutual = adj & adj.T
    i, j = torch.triu(mutual, 1).nonzero(as_tuple=True)
    w = d[i, j]
    n = x.shape[0]
    mst = minimum_spanning_tree(coo_matrix((w.detach().cpu().double().numpy() + 1e-12,
                                            (i.cpu().numpy(), j.cpu().numpy())), shape=(n, n))).tocoo()
    key = {(int(a), int(b)): e for e, (a, b) in enumerate(zip(i.tolist(), j.tolist()))}
    sel = torch.tensor([key[(min(a, b), max(a, b))] for a, b in zip(mst.row, mst.col)], dtype=torch.long)
    deaths = w[sel.to(x.device)]
    dg = torch.stack([torch.zeros_like(deaths), deaths], 1)
    return rf.persistence_image(dg, res, pers_range=(0.0, hi), birth_range=None, sigma=0.1 * hi)


def straightforward_pta(syn: torch.Tensor, real_images, k: int, res: int) -> torch.Tensor:
    loss = syn.new_zeros(())
    for c in range(syn.shape[0]):
        loss = loss + (_h0_image(F.normalize(syn[c], dim=-1), k, res, 2.0) - real_images[c]).pow(2).sum()
    return loss


def _real_h0_images(real: torch.Tensor, k: int, res: int):
    with torch.no_grad():  # computed once, as a straightforward loop would too
        return [_h0_image(F.normalize(real[c], dim=-1), k, res, 2.0) for c in range(real.shape[0])]


def setup(cfg: dict, device: str) -> Case:
    """The PTA term as the recover loop calls it: the same real tensor every step (its side is computed
    once and kept) and a new synthetic side each step, H0 + H1, pairings refreshed every step. Labelled
    variants: pairings reused, overlapped, and the real side recomputed every call (what reta_fast did
    before the real side was cached)."""
    C, n, d, k = cfg["classes"], cfg["n"], cfg["d"], cfg["k"]
    real = clustered(C, n, d, device=device, seed=1)
    syn0 = clustered(C, n, d, device=device, seed=2)

    def step(loss_fn, fresh_real=False):
        def run():
            s = syn0.detach().requires_grad_()
            loss_fn(s, real.clone() if fresh_real else real).backward()
        return run

    real_h0 = _real_h0_images(real, k, 32)
    impls = {
        "reta_fast PTA (H0+H1), as the recover loop runs it": step(rf.TopologyAlignmentLoss(k=k)),
        "reta_fast PTA, pairings reused T=10": step(rf.TopologyAlignmentLoss(k=k, refresh_every=10)),
        "reta_fast PTA, overlapped pairings": step(rf.TopologyAlignmentLoss(k=k, overlap=True)),
        "reta_fast PTA, real side recomputed every call": step(rf.TopologyAlignmentLoss(k=k), fresh_real=True),
        "per-class loop (H0 only, scipy MST, real side kept)": step(
            lambda s, r: straightforward_pta(s, real_h0, k, 32)),
    }
    return Case(impls, unit="classes/s", work=C)


def setup_vs_step(cfg: dict, device: str) -> Case:
    """The PTA step next to the recover step it rides on (same batch of ``classes`` images)."""
    C, res, k = cfg["classes"], cfg["res"], cfg["k"]
    teacher = rf.models.resnet18(num_classes=C, cifar_stem=res <= 64).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats = []

    def hook(mod, inp, out):
        x = inp[0]
        mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        stats.append(torch.norm(mu - mod.running_mean, 2) + torch.norm(var - mod.running_var, 2))

    for m in bns:
        m.register_forward_hook(hook)
    x = torch.randn(C, 3, res, res, device=device, requires_grad=True)
    y = torch.arange(C, device=device)
    opt = torch.optim.Adam([x], lr=0.25, betas=(0.5, 0.9))

    def recover_step():
        stats.clear()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(teacher(x), y) + 0.01 * sum(stats)
        loss.backward()
        opt.step()

    n = cfg["n"]
    real = clustered(C, n, 512, device=device, seed=1)
    syn0 = clustered(C, n, 512, device=device, seed=2)
    pta = rf.TopologyAlignmentLoss(k=k)

    def pta_step():  # as the recover loop calls it: the same real tensor, a new synthetic side
        s = syn0.detach().requires_grad_()
        pta(s, real).backward()

    return Case({"reta_fast PTA step": pta_step, f"ResNet-18 recover step {res}px": recover_step},
                note="target: PTA step <= 5% of the recover step, i.e. ours >= 20x faster")


OPS = {
    "pta_loss": Op(setup, sweep=[dict(classes=10, n=64, d=512, k=10), dict(classes=100, n=64, d=512, k=10)],
                   quick=[dict(classes=10, n=64, d=128, k=10)]),
    "pta_vs_recover_step": Op(setup_vs_step, sweep=[dict(classes=100, res=32, n=64, k=10)],
                              quick=[dict(classes=10, res=32, n=32, k=10)],
                              gpu_sweep=[dict(classes=100, res=224, n=64, k=10)]),
}
