"""Property-based checks (hypothesis): native pairings and the k-NN backends against the references
on arbitrary small inputs, ties and degenerate graphs included."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reta_fast as rf
from conftest import HAS_TRITON

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def weighted_graphs(draw):
    n = draw(st.integers(1, 14))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=len(pairs))) if pairs else []
    weights = draw(st.lists(st.integers(0, 5), min_size=len(chosen), max_size=len(chosen)))
    flip = draw(st.lists(st.booleans(), min_size=len(chosen), max_size=len(chosen)))
    edges = [(j, i) if f else (i, j) for (i, j), f in zip(chosen, flip)]
    return n, edges, [float(w) for w in weights]


def batch_of(graphs):
    """(edges, weights, offsets, num_nodes) of a list of drawn graphs, concatenated."""
    edges = torch.tensor([e for _, es, _ in graphs for e in es], dtype=torch.int64).reshape(-1, 2)
    weights = torch.tensor([w for _, _, ws in graphs for w in ws], dtype=torch.float64)
    return edges, weights, np.cumsum([0] + [len(es) for _, es, _ in graphs]), [n for n, _, _ in graphs]


@pytest.mark.parametrize("backend", [
    pytest.param("native", marks=pytest.mark.skipif(not rf.has_native(), reason="native extension not built")),
    "device",  # Borůvka with tensor ops (H0 only)
])
@SETTINGS
@given(graphs=st.lists(weighted_graphs(), min_size=1, max_size=4))
def test_h0_backends_equal_reference_union_find(backend, graphs):
    edges, weights, offsets, nodes = batch_of(graphs)
    maxdim = 1 if backend == "native" else 0
    a = rf.persistence_pairs(edges, weights, nodes, maxdim=maxdim, offsets=offsets, backend=backend)
    b = rf.persistence_pairs(edges, weights, nodes, maxdim=maxdim, offsets=offsets, backend="reference")
    assert torch.equal(a.h0, b.h0) and torch.equal(a.h0_offsets, b.h0_offsets)
    assert torch.equal(a.components, b.components)
    if maxdim == 0:
        return
    # H1 by value (GUDHI may choose other, equally valid edges among equal weights).
    for g in range(len(graphs)):
        va = sorted((float(weights[p]), float(weights[q])) for p, q in a.h1[a.h1_offsets[g]: a.h1_offsets[g + 1]].tolist())
        vb = sorted((float(weights[p]), float(weights[q])) for p, q in b.h1[b.h1_offsets[g]: b.h1_offsets[g + 1]].tolist())
        assert [v for v in va if v[1] > v[0]] == [v for v in vb if v[1] > v[0]]
        na = int(a.h1_essential_offsets[g + 1] - a.h1_essential_offsets[g])
        nb = int(b.h1_essential_offsets[g + 1] - b.h1_essential_offsets[g])
        assert na == nb


@SETTINGS
@given(st.integers(2, 30), st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1),
       st.sampled_from(["torch"] + (["triton"] if HAS_TRITON else [])))
def test_knn_backends_equal_reference_on_integer_points(n, d, k, seed, backend):
    k = min(k, n - 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (1, n, d), generator=g).float()  # exact distances, many ties
    assert torch.equal(rf.knn(x, k, backend=backend), rf.knn_ref(x, k))
