"""Persistence pairings: reta_fast's batched native call against GUDHI, scipy's MST and ripser."""
from __future__ import annotations

import numpy as np
from common import graphs
from run import Case, Op

import reta_fast as rf


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _gudhi_tree(e: np.ndarray, w: np.ndarray, n: int):
    import gudhi

    st = gudhi.SimplexTree()
    st.insert_batch(np.arange(n)[None, :], np.zeros(n))
    if len(e):
        st.insert_batch(e.T, w)
    return st


def gudhi_loop(edges, weights, offsets, n, maxdim):
    """What a user writes today: one GUDHI SimplexTree per graph, in a Python loop."""
    e_all, w_all, off = edges.numpy(), weights.double().numpy(), offsets.tolist()
    out = []
    for g in range(len(off) - 1):
        st = _gudhi_tree(e_all[off[g]:off[g + 1]], w_all[off[g]:off[g + 1]], n)
        if maxdim >= 1:
            st.expansion(2)
        st.compute_persistence(homology_coeff_field=2, persistence_dim_max=maxdim >= 1)
        out.append(st.persistence_intervals_in_dimension(maxdim))
    return out


def scipy_mst_loop(mats):
    from scipy.sparse.csgraph import minimum_spanning_tree

    return [minimum_spanning_tree(m) for m in mats]


def _csr(edges, weights, offsets, n):
    from scipy.sparse import coo_matrix

    off = offsets.tolist()
    e, w = edges.numpy(), weights.double().numpy()
    return [coo_matrix((w[a:b], (e[a:b, 0], e[a:b, 1])), shape=(n, n)).tocsr() for a, b in zip(off[:-1], off[1:])]


def setup_h0(cfg: dict, device: str) -> Case:
    b, n, k, d = cfg["graphs"], cfg["n"], cfg["k"], cfg.get("d", 64)
    edges, weights, offsets = graphs(b, n, d, k)
    mats = _csr(edges, weights, offsets, n)  # prebuilt: scipy timed on its MST alone
    impls = {
        "reta_fast persistence_pairs": lambda: rf.persistence_pairs(edges, weights, n, maxdim=0, offsets=offsets),
        "scipy MST (per graph)": lambda: scipy_mst_loop(mats),
    }
    ed, wd = edges.to(device), weights.to(device)
    impls["reta_fast device H0 (Borůvka)"] = lambda: rf.persistence_pairs(ed, wd, n, maxdim=0, offsets=offsets,
                                                                          backend="device")
    if b * n <= 100_000 and _has("gudhi"):
        impls["GUDHI SimplexTree loop"] = lambda: gudhi_loop(edges, weights, offsets, n, 0)
    if b <= 100 and n <= 512 and _has("gudhi"):
        impls["reta_fast reference path"] = lambda: rf.persistence_pairs(
            edges, weights, n, maxdim=0, offsets=offsets, backend="reference")
    return Case(impls, unit="edges/s", work=edges.shape[0], note=f"{edges.shape[0]} edges")


def setup_h1(cfg: dict, device: str) -> Case:
    b, n, k, d = cfg["graphs"], cfg["n"], cfg["k"], cfg.get("d", 64)
    edges, weights, offsets = graphs(b, n, d, k)
    impls = {"reta_fast persistence_pairs": lambda: rf.persistence_pairs(edges, weights, n, maxdim=1, offsets=offsets)}
    if _has("gudhi"):
        impls["GUDHI SimplexTree loop"] = lambda: gudhi_loop(edges, weights, offsets, n, 1)
    if _has("ripser"):
        from ripser import ripser

        mats = _csr(edges, weights, offsets, n)
        impls["ripser (sparse, per graph)"] = lambda: [ripser(m, distance_matrix=True, maxdim=1) for m in mats]
    return Case(impls, unit="edges/s", work=edges.shape[0], note=f"{edges.shape[0]} edges")


OPS = {
    "h0_batch": Op(setup_h0, sweep=[dict(graphs=10, n=256, k=15), dict(graphs=100, n=256, k=15), dict(graphs=1000, n=256, k=15)], quick=[dict(graphs=20, n=256, k=15)]),
    "h0_large": Op(setup_h0, sweep=[dict(graphs=1, n=2000, k=10, d=512), dict(graphs=1, n=20_000, k=10, d=512)], quick=[dict(graphs=1, n=4000, k=10, d=128)]),
    "h1_batch": Op(setup_h1, sweep=[dict(graphs=10, n=256, k=15), dict(graphs=100, n=256, k=15)], quick=[dict(graphs=10, n=128, k=15)]),
}
