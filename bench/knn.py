"""k-NN search: reta_fast (fused Triton kernel on the GPU, tie-exact torch backend on the CPU)
against chunked ``addmm`` + ``topk`` and ``torch.cdist`` + ``topk``."""
from __future__ import annotations

import torch
from common import clustered
from run import Case, Op

import reta_fast as rf


def chunked_addmm_topk(x: torch.Tensor, k: int, chunk: int = 4096):
    sq = x.pow(2).sum(1)
    out = []
    for r0 in range(0, x.shape[0], chunk):
        d2 = torch.addmm(sq[None, :] + sq[r0:r0 + chunk, None], x[r0:r0 + chunk], x.T, alpha=-2.0)
        d2[torch.arange(d2.shape[0]), torch.arange(r0, r0 + d2.shape[0])] = float("inf")
        out.append(d2.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def cdist_topk(x: torch.Tensor, k: int):
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, dim=1, largest=False).indices


def setup(cfg: dict, device: str) -> Case:
    n, d, k = cfg["n"], cfg["d"], cfg["k"]
    x = clustered(1, n, d, device=device, seed=n)
    impls = {"reta_fast knn": lambda: rf.knn(x, k)}
    if device.startswith("cuda"):
        impls["reta_fast knn, tf32 + exact re-rank"] = lambda: rf.knn(x, k, precision="tf32")
    impls["chunked addmm+topk"] = lambda: chunked_addmm_topk(x[0], k)
    if n <= cfg.get("cdist_max", 50_000):
        impls["cdist+topk"] = lambda: cdist_topk(x[0], k)
    try:  # faiss where installed (exact flat L2 index; the query set is the data set)
        import faiss

        xf = x[0].float().cpu().numpy()

        def faiss_flat():
            index = faiss.IndexFlatL2(d)
            index.add(xf)
            return index.search(xf, k + 1)[1]  # +1: each point finds itself first

        impls["faiss IndexFlatL2 (CPU)"] = faiss_flat
    except ImportError:
        pass
    return Case(impls, unit="FLOP/s", work=2.0 * n * n * d,
                note="reta_fast knn is exact with ties broken by index; baselines are not tie-exact")


def setup_mutual(cfg: dict, device: str) -> Case:
    n, d, k = cfg["n"], cfg["d"], cfg["k"]
    x = clustered(1, n, d, device=device, seed=n)
    g = rf.mutual_knn_graph(x, k)
    edges = g.edges.shape[0]
    return Case({"reta_fast mutual_knn_graph": lambda: rf.mutual_knn_graph(x, k)},
                unit="edges/s", work=edges, note=f"{edges} mutual edges")


OPS = {
    "knn": Op(setup, sweep=[dict(n=2000, d=512, k=10), dict(n=5000, d=512, k=10), dict(n=20_000, d=512, k=10)],
              quick=[dict(n=2000, d=128, k=10)],
              gpu_sweep=[dict(n=10_000, d=512, k=10), dict(n=100_000, d=512, k=10)],
              description="exact k-NN"),
    "mutual_knn_graph": Op(setup_mutual, sweep=[dict(n=20_000, d=512, k=10)], quick=[dict(n=2000, d=128, k=10)],
                           gpu_sweep=[dict(n=100_000, d=512, k=10)]),
}
