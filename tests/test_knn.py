"""Mutual k-NN: every backend against the float64 brute-force reference, ties included."""
import pytest
import torch

import reta_fast as rf
from conftest import HAS_TRITON, assert_close, needs_triton

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
# (batch, n, d, k): odd and non-power-of-two shapes, k = n - 2, one class, d = 1.
SHAPES = [(1, 2, 3, 1), (3, 50, 8, 5), (2, 37, 5, 7), (1, 130, 17, 10), (4, 9, 1, 7), (1, 64, 33, 1)]


def _clustered(b, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 4, d, generator=g) * 3
    assign = torch.randint(0, 4, (b, n), generator=g)
    return torch.gather(centres, 1, assign[..., None].expand(b, n, d)) + torch.randn(b, n, d, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,n,d,k", SHAPES)
def test_knn_matches_reference(backend, b, n, d, k):
    x = _clustered(b, n, d, seed=n * 31 + d)
    assert torch.equal(rf.knn(x, k, backend=backend), rf.knn_ref(x, k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_knn_ties_follow_index_rule(backend, k):
    # Integer coordinates: every squared distance is exact in fp32, so ties are real ties and the
    # documented rule (smaller index first) decides; duplicates give zero distances.
    g = torch.Generator().manual_seed(k)
    x = torch.randint(0, 3, (2, 41, 3), generator=g).float()
    assert torch.equal(rf.knn(x, k, backend=backend), rf.knn_ref(x, k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,n,d,k", SHAPES)
def test_mutual_graph_matches_brute_force(backend, b, n, d, k):
    x = _clustered(b, n, d, seed=7 * n + k)
    g = rf.mutual_knn_graph(x, k, backend=backend)
    expected = rf.mutual_knn_ref(x, k)
    assert g.offsets.tolist()[0] == 0 and g.offsets.numel() == b + 1
    for i in range(b):
        e = g.edges[g.offsets[i]: g.offsets[i + 1]]
        assert (e[:, 0] < e[:, 1]).all()
        assert e.tolist() == sorted(e.tolist()), "edges must be sorted by (i, j)"
        assert set(map(tuple, e.tolist())) == expected[i]
    xi = x.double()
    gid = torch.repeat_interleave(torch.arange(b), g.offsets.diff())
    exact = (xi[gid, g.edges[:, 0]] - xi[gid, g.edges[:, 1]]).norm(dim=1)
    assert_close(g.lengths, exact, atol=1e-5, rtol=1e-6, what="edge lengths")


def test_k_at_least_n_minus_1_is_complete_graph():
    x = torch.randn(2, 6, 3)
    for k in (5, 6, 100):
        g = rf.mutual_knn_graph(x, k)
        assert g.offsets.tolist() == [0, 15, 30]
        assert set(map(tuple, g.edges[:15].tolist())) == {(i, j) for i in range(6) for j in range(i + 1, 6)}


def test_duplicate_points_give_zero_length_edges_and_finite_grads():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [5.0, 5.0]], requires_grad=True)
    g = rf.mutual_knn_graph(x, 1)
    assert (0, 1) in set(map(tuple, g.edges.tolist())) and (2, 3) in set(map(tuple, g.edges.tolist()))
    assert (g.lengths.detach() == 0).sum() == 2
    g.lengths.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_edge_lengths_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    g = rf.mutual_knn_graph(x, 3)
    fn = lambda pts: rf.edge_lengths(pts, g.edges, g.offsets)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    # Non-unit upstream gradient against autograd through the plain formula.
    up = torch.randn(g.edges.shape[0], dtype=torch.float64)
    (ga,) = torch.autograd.grad((fn(x) * up).sum(), x)
    gid = torch.repeat_interleave(torch.arange(2), g.offsets.diff())
    plain = (x[gid, g.edges[:, 0]] - x[gid, g.edges[:, 1]]).norm(dim=1)
    (gb,) = torch.autograd.grad((plain * up).sum(), x)
    assert_close(ga, gb, atol=1e-12, what="edge-length gradient")


@needs_triton
def test_triton_half_precision_inputs():
    # bf16/fp16 points: the kernel casts tiles to fp32; neighbours equal the reference on the
    # same (rounded) points.
    x = _clustered(1, 45, 6, seed=3)
    for dt in (torch.float16, torch.bfloat16):
        xr = x.to(dt)
        assert torch.equal(rf.knn(xr, 4, backend="triton"), rf.knn_ref(xr.float(), 4))


@needs_triton
def test_triton_rejects_what_it_cannot_do():
    x = torch.randn(1, 100, 4)
    with pytest.raises(ValueError, match="k <= 64"):
        rf.knn(x, 70, backend="triton")
    assert rf.knn(x, 70, backend="auto").shape == (1, 100, 70)  # auto falls back to torch


@pytest.mark.parametrize("noise,expect_fallback", [(1e-7, False), (0.05, True)])
def test_rerank_certified_recovers_exact_neighbours(noise, expect_fallback):
    # Simulate a low-precision search: candidate distances off by up to `noise` of the bound's
    # scale; the exact re-rank plus certificate must still give the reference neighbours, and
    # rows it cannot certify must be recomputed rather than returned wrong.
    x = _clustered(2, 300, 16, seed=11)
    k, kc = 5, 9
    xd = x.double()
    d2 = (xd.unsqueeze(2) - xd.unsqueeze(1)).pow(2).sum(-1)
    sq = xd.pow(2).sum(-1)
    scale = sq[..., None] + sq.amax(1)[:, None, None]
    g = torch.Generator().manual_seed(0)
    approx = d2 + noise * scale * (2 * torch.rand(d2.shape, generator=g, dtype=torch.float64) - 1)
    approx.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    order = torch.sort(approx, dim=-1, stable=True).indices[..., :kc]
    cand_d2 = torch.gather(approx, 2, order).float()
    idx, n_fixed = rf.rerank_certified(x, cand_d2, order, k, rel_err=noise * 1.01)
    assert torch.equal(idx, rf.knn_ref(x, k))
    assert (int(n_fixed) > 0) == expect_fallback


@needs_triton
def test_triton_tf32_path_matches_reference():
    x = _clustered(2, 70, 12, seed=5)
    assert torch.equal(rf.knn(x, 6, backend="triton", precision="tf32"), rf.knn_ref(x, 6))
    with pytest.raises(ValueError, match="precision"):
        rf.knn(x, 6, precision="fp8")
