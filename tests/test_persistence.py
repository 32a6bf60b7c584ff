"""Persistence pairings and diagrams against GUDHI (the oracle), ties and degenerate graphs included."""
import gudhi
import numpy as np
import pytest
import torch

import reta_fast as rf
from conftest import assert_close

BACKENDS = ["reference"] + (["native"] if rf.has_native() else [])


def gudhi_diagrams(edges, weights, n, field=2):
    """Finite (birth, death) points with death > birth, and infinite-bar counts, per dimension."""
    st = gudhi.SimplexTree()
    for v in range(n):
        st.insert([v], 0.0)
    for (a, b), w in zip(edges.tolist(), weights.tolist()):
        st.insert([a, b], w)
    st.expansion(2)
    st.compute_persistence(homology_coeff_field=field, persistence_dim_max=True, min_persistence=-1.0)
    out = {}
    for dim in (0, 1):
        iv = st.persistence_intervals_in_dimension(dim).reshape(-1, 2)
        fin = iv[np.isfinite(iv[:, 1])]
        out[dim] = (sorted(map(tuple, fin[fin[:, 1] > fin[:, 0]].round(9).tolist())), int(np.isinf(iv[:, 1]).sum()))
    return out


def our_diagrams(pairs, weights, g):
    w = weights.double()
    sl = lambda t, off: t[off[g]: off[g + 1]]  # noqa: E731
    h0 = [(0.0, float(w[e])) for e in sl(pairs.h0, pairs.h0_offsets)]
    h1 = [(float(w[a]), float(w[b])) for a, b in sl(pairs.h1, pairs.h1_offsets).tolist()]
    keep = lambda pts: sorted(tuple(round(v, 9) for v in p) for p in pts if p[1] > p[0])  # noqa: E731
    return {
        0: (keep(h0), int(pairs.components[g])),
        1: (keep(h1), len(sl(pairs.h1_essential, pairs.h1_essential_offsets))),
    }


def random_graph(rng, n, p, integer_weights):
    iu = np.array([(i, j) for i in range(n) for j in range(i + 1, n)], dtype=np.int64).reshape(-1, 2)
    keep = rng.random(len(iu)) < p
    e = iu[keep]
    e = e[rng.permutation(len(e))]  # edge order must not matter for the diagrams
    w = rng.integers(0, 4, len(e)).astype(np.float64) if integer_weights else rng.random(len(e))
    return torch.from_numpy(e), torch.from_numpy(w)


def check_batch(graphs, backend):
    edges = torch.cat([e for e, _, _ in graphs])
    weights = torch.cat([w for _, w, _ in graphs])
    offsets = np.cumsum([0] + [len(e) for e, _, _ in graphs])
    nodes = [n for _, _, n in graphs]
    pairs = rf.persistence_pairs(edges, weights, nodes, maxdim=1, offsets=offsets, backend=backend)
    for g, (e, w, n) in enumerate(graphs):
        assert our_diagrams(pairs, weights, g) == gudhi_diagrams(e, w, n), f"graph {g} (n={n})"
    return pairs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("integer_weights", [False, True])
def test_random_graphs_match_gudhi(backend, integer_weights, rng):
    graphs = []
    for _ in range(25):
        n = int(rng.integers(1, 23))
        e, w = random_graph(rng, n, float(rng.uniform(0.1, 0.9)), integer_weights)
        graphs.append((e, w, n))
    check_batch(graphs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_point_clouds_match_gudhi(backend, rng):
    graphs = []
    for n, d, k in [(31, 3, 4), (64, 8, 10), (50, 2, 6), (17, 5, 16), (40, 3, 39)]:
        x = torch.from_numpy(rng.normal(size=(n, d)))
        x[5] = x[6]  # a duplicate point: a zero-length edge
        gr = rf.mutual_knn_graph(x, k)
        graphs.append((gr.edges, gr.lengths.detach(), n))
    check_batch(graphs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_made_graphs(backend):
    # A square with a diagonal: the loop 0-1-2-3 is born at 1.0 (last side), killed at 1.5.
    sq = torch.tensor([[0, 1], [1, 2], [2, 3], [0, 3], [0, 2]])
    p = rf.persistence_pairs(sq, torch.tensor([0.1, 0.2, 0.3, 1.0, 1.5]), 4, backend=backend)
    assert p.h0.tolist() == [0, 1, 2] and p.components.tolist() == [1]
    assert p.h1.tolist() == [[3, 4]] and p.h1_essential.tolist() == []
    # A 4-cycle without a diagonal never dies; an isolated vertex is its own component.
    p = rf.persistence_pairs(sq[:4], torch.tensor([0.1, 0.2, 0.3, 1.0]), 5, backend=backend)
    assert p.h1.tolist() == [] and p.h1_essential.tolist() == [3] and p.components.tolist() == [2]
    # No edges at all.
    p = rf.persistence_pairs(torch.zeros((0, 2), dtype=torch.int64), torch.zeros(0), 3, backend=backend)
    assert p.h0.numel() == 0 and p.components.tolist() == [3]


def test_native_h0_equals_reference_exactly(rng):
    if not rf.has_native():
        pytest.skip("native extension not built")
    graphs = [random_graph(rng, int(rng.integers(2, 40)), 0.3, True) + (0,) for _ in range(20)]
    edges = torch.cat([g[0] for g in graphs])
    weights = torch.cat([g[1] for g in graphs])
    offsets = np.cumsum([0] + [len(g[0]) for g in graphs])
    nodes = [int(g[0].max()) + 1 if len(g[0]) else 1 for g in graphs]
    a = rf.persistence_pairs(edges, weights, nodes, maxdim=0, offsets=offsets, backend="native")
    b = rf.persistence_pairs(edges, weights, nodes, maxdim=0, offsets=offsets, backend="reference")
    # Same tie rule (weight, edge index) on both sides: identical indices, not just values.
    assert torch.equal(a.h0, b.h0) and torch.equal(a.h0_offsets, b.h0_offsets)
    assert torch.equal(a.components, b.components)


def test_diagrams_gradcheck_float64():
    torch.manual_seed(1)
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)

    def fn(pts):
        dg = rf.persistence_diagrams(pts, 3, essential="max")
        return dg.h0[:, 1], dg.h1

    assert torch.autograd.gradcheck(fn, (x,))


def test_diagram_values_are_exact_lengths_of_the_paired_edges():
    torch.manual_seed(2)
    x = torch.randn(40, 5, requires_grad=True)
    dg = rf.persistence_diagrams(x, 6)
    xd = x.detach().double()
    exact = lambda e: (xd[dg.graph.edges[e, 0]] - xd[dg.graph.edges[e, 1]]).norm(dim=-1)  # noqa: E731
    assert_close(dg.h0[:, 1], exact(dg.pairs.h0), atol=1e-6, what="H0 deaths")
    assert (dg.h0[:, 0] == 0).all()
    assert_close(dg.h1, exact(dg.pairs.h1), atol=1e-6, what="H1 points")
    up = torch.randn_like(dg.h0[:, 1])
    (dg.h0[:, 1] * up).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _torsion_graph():
    """The 125th graph of a seeded stream whose flag complex has 2-torsion in H1 (found in review):
    its H1 diagram over Z/11 differs from the one over Z/2."""
    rng = np.random.default_rng(1)
    for t in range(125):
        n = int(rng.integers(2, 70))
        iu = np.array([(i, j) for i in range(n) for j in range(i + 1, n)]).reshape(-1, 2)
        e = iu[rng.random(len(iu)) < rng.uniform(0.05, 0.9)]
        e = e[rng.permutation(len(e))]
        if rng.random() < 0.5:
            e = e[:, ::-1].copy()
        w = (rng.integers(0, 6, len(e)).astype(float) if t % 3 == 0
             else (rng.random(len(e)) if t % 3 == 1 else np.round(rng.random(len(e)), 2)))
    return torch.from_numpy(e), torch.from_numpy(w), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_coefficients_are_z2_on_a_graph_with_torsion(backend):
    e, w, n = _torsion_graph()
    z2, z11 = gudhi_diagrams(e, w, n, field=2), gudhi_diagrams(e, w, n, field=11)
    assert z2[1] != z11[1], "the fixture lost its 2-torsion (numpy stream changed?): this test would prove nothing"
    pairs = rf.persistence_pairs(e, w, n, backend=backend)
    assert our_diagrams(pairs, w, 0) == z2


def test_essential_handling():
    torch.manual_seed(3)
    x = torch.randn(3, 30, 4)
    base = rf.persistence_diagrams(x, 3)
    mx = rf.persistence_diagrams(x, 3, essential="max")
    fixed = rf.persistence_diagrams(x, 3, essential=10.0)
    for g in range(3):
        c = int(base.pairs.components[g])
        n_ess1 = int(base.pairs.h1_essential_offsets[g + 1] - base.pairs.h1_essential_offsets[g])
        assert int(mx.h0_offsets[g + 1] - mx.h0_offsets[g]) == int(base.h0_offsets[g + 1] - base.h0_offsets[g]) + c
        assert int(mx.h1_offsets[g + 1] - mx.h1_offsets[g]) == int(base.h1_offsets[g + 1] - base.h1_offsets[g]) + n_ess1
        longest = float(base.graph.lengths[base.graph.offsets[g]: base.graph.offsets[g + 1]].max())
        seg = mx.h0[mx.h0_offsets[g]: mx.h0_offsets[g + 1], 1]
        assert float(seg[-1]) == pytest.approx(longest)
        assert float(fixed.h0[fixed.h0_offsets[g + 1] - 1, 1]) == 10.0
    with pytest.raises(ValueError, match="essential"):
        rf.persistence_diagrams(x, 3, essential="min")


def test_point_cloud_diagrams_match_gudhi_on_exact_lengths(rng):
    # persistence_diagrams orders edges by the cheap Gram weights and gathers exact lengths: the
    # diagrams must equal GUDHI's on the exact lengths up to that rounding.
    x = torch.from_numpy(rng.normal(size=(3, 60, 16))).float()
    dg = rf.persistence_diagrams(x, 8)
    exact = rf.mutual_knn_graph(x, 8)
    for g in range(3):
        sl = slice(int(exact.offsets[g]), int(exact.offsets[g + 1]))
        ref = gudhi_diagrams(exact.edges[sl], exact.lengths.detach()[sl].double(), 60)
        h0 = dg.h0[dg.h0_offsets[g]: dg.h0_offsets[g + 1]].detach().double()
        h1 = dg.h1[dg.h1_offsets[g]: dg.h1_offsets[g + 1]].detach().double()
        h1 = h1[h1[:, 1] > h1[:, 0]]
        assert_close(torch.sort(h0[:, 1]).values, torch.tensor([d for _, d in ref[0][0]]), atol=1e-5, what="H0")
        ours1 = sorted(map(tuple, h1.tolist()))
        assert len(ours1) == len(ref[1][0])
        assert_close(torch.tensor(ours1).reshape(-1, 2), torch.tensor(ref[1][0]).reshape(-1, 2), atol=1e-5, what="H1")
        assert int(dg.pairs.components[g]) == ref[0][1]


@pytest.mark.parametrize("integer_weights", [False, True])
def test_device_h0_equals_the_union_find(integer_weights):
    """Borůvka on tensors (the GPU path) = Kruskal + union-find, death edges and order included."""
    rng = np.random.default_rng(11 + integer_weights)
    graphs = []
    for n in (1, 2, 5, 17, 40, 64, 3, 0):
        e, w = random_graph(rng, n, p=0.25 if n > 20 else 0.6, integer_weights=integer_weights)
        graphs.append((e, w, n))
    graphs.append((torch.zeros((0, 2), dtype=torch.int64), torch.zeros(0, dtype=torch.float64), 9))  # no edges
    edges = torch.cat([e for e, _, _ in graphs])
    weights = torch.cat([w for _, w, _ in graphs])
    offsets = np.cumsum([0] + [len(e) for e, _, _ in graphs])
    nodes = [n for _, _, n in graphs]
    ref = rf.persistence_pairs(edges, weights, nodes, maxdim=0, offsets=offsets, backend=BACKENDS[-1])
    dev = rf.persistence_pairs(edges, weights, nodes, maxdim=0, offsets=offsets, backend="device")
    assert torch.equal(dev.h0, ref.h0) and torch.equal(dev.h0_offsets, ref.h0_offsets)
    assert torch.equal(dev.components, ref.components)
    with pytest.raises(ValueError, match="H0 only"):
        rf.persistence_pairs(edges, weights, nodes, maxdim=1, offsets=offsets, backend="device")


def test_device_h0_on_knn_graphs_of_point_clouds():
    g = torch.Generator().manual_seed(3)
    pts = torch.randn(6, 80, 16, generator=g)
    pts[2, 40:] = pts[2, :40]  # duplicates: zero-length edges and ties
    kg = rf.mutual_knn_graph(pts, k=5)
    w = kg.lengths.detach()
    ref = rf.persistence_pairs(kg.edges, w, kg.num_nodes, maxdim=0, offsets=kg.offsets, backend=BACKENDS[-1])
    dev = rf.persistence_pairs(kg.edges, w, kg.num_nodes, maxdim=0, offsets=kg.offsets, backend="device")
    assert torch.equal(dev.h0, ref.h0) and torch.equal(dev.components, ref.components)
