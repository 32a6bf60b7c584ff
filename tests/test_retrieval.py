"""DRC retrieval: complexity proxy vs SciPy, retrieve vs brute force (exactly), residual injection."""
import numpy as np
import pytest
import torch

import reta_fast as rf
from conftest import HAS_TRITON, assert_close

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
# (classes, queries, pool, D): odd sizes, one-patch classes, more queries than candidates.
SHAPES = [(3, 17, 40, 8), (1, 5, 1, 3), (7, 30, 23, 33), (4, 9, 150, 16), (2, 70, 6, 5)]


def make(classes, B, P, D, seed, integer=False):
    g = torch.Generator().manual_seed(seed)
    pl = torch.cat([torch.arange(classes), torch.randint(0, classes, (max(0, P - classes),), generator=g)])[:P]
    pl = pl[torch.randperm(P, generator=g)]
    present = torch.unique(pl)
    ql = present[torch.randint(0, present.numel(), (B,), generator=g)]
    if integer:  # exact arithmetic: real ties
        z = torch.randint(-2, 3, (P, D), generator=g).float()
        q = torch.randint(-2, 3, (B, D), generator=g).float()
        c = torch.randint(0, 3, (P,), generator=g).float()
    else:
        z = torch.nn.functional.normalize(torch.randn(P, D, generator=g), dim=1)
        q = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
        c = torch.rand(P, generator=g)
    return q, ql, z, pl, c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("classes,B,P,D", SHAPES)
@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
def test_retrieve_equals_brute_force(backend, classes, B, P, D, lam):
    q, ql, z, pl, c = make(classes, B, P, D, seed=B + P + D)
    got = rf.retrieve(q, ql, z, pl, c, lam=lam, backend=backend)
    assert torch.equal(got, rf.retrieve_ref(q, ql, z, pl, c, lam=lam))
    assert (pl[got] == ql).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_retrieve_ties_take_the_smaller_pool_index(backend, seed):
    q, ql, z, pl, c = make(3, 40, 60, 4, seed=seed, integer=True)
    got = rf.retrieve(q, ql, z, pl, c, lam=0.5, backend=backend)
    assert torch.equal(got, rf.retrieve_ref(q, ql, z, pl, c, lam=0.5))
    # Duplicated pool rows: the first copy must win.
    z2, pl2, c2 = torch.cat([z, z]), torch.cat([pl, pl]), torch.cat([c, c])
    assert torch.equal(rf.retrieve(q, ql, z2, pl2, c2, lam=0.5, backend=backend), got)


def test_fallback_when_the_certificate_fails(monkeypatch):
    # Force the fp32 candidate list to look untrustworthy: every query must then be recomputed by
    # brute force and the answer stay exact.
    from reta_fast.retrieval import search as retrieval

    monkeypatch.setattr(retrieval, "_FP32_REL", lambda d: 10.0)
    q, ql, z, pl, c = make(3, 25, 90, 8, seed=3)
    assert torch.equal(rf.retrieve(q, ql, z, pl, c, backend="torch"), rf.retrieve_ref(q, ql, z, pl, c))


def test_exclusive_gives_distinct_patches_greedily():
    q, ql, z, pl, c = make(3, 12, 40, 8, seed=5)
    got = rf.retrieve(q, ql, z, pl, c, exclusive=True)
    assert torch.equal(got, rf.retrieve_ref(q, ql, z, pl, c, exclusive=True))
    assert got.unique().numel() == got.numel() and (pl[got] == ql).all()
    # The first query of each class gets its unconstrained best.
    free = rf.retrieve(q, ql, z, pl, c)
    for cls in ql.unique():
        first = int((ql == cls).nonzero()[0])
        assert got[first] == free[first]
    with pytest.raises(ValueError, match="patches for"):
        few = torch.cat([torch.zeros(5, dtype=torch.int64), torch.ones(35, dtype=torch.int64)])
        rf.retrieve(q, torch.zeros_like(ql), z, few, c, exclusive=True)


def test_retrieve_bad_input():
    q, ql, z, pl, c = make(3, 10, 30, 8, seed=0)
    cases = [
        (dict(query_labels=ql + 5), ValueError, "no patches in the pool"),
        (dict(pool_feats=z[:, :4]), ValueError, "feature dimensions differ"),
        (dict(query_feats=torch.where(q > 0.5, float("nan"), q)), ValueError, "query_feats contains"),
        (dict(pool_feats=z[:0], pool_labels=pl[:0], pool_complexity=c[:0]), ValueError, "pool is empty"),
        (dict(query_labels=ql.float()), TypeError, "query_labels must be an integer"),
        (dict(query_labels=ql - 10), ValueError, "negative label"),
        (dict(pool_labels=pl[:5]), ValueError, r"pool_labels must have shape \[30\]"),
        (dict(pool_complexity=-c), ValueError, "pool_complexity must be >= 0"),
        (dict(lam=1.5), ValueError, "lam must be"),
        (dict(pool_complexity=c.to("meta")), ValueError, "pool_complexity is on meta"),
    ]
    base = dict(query_feats=q, query_labels=ql, pool_feats=z, pool_labels=pl, pool_complexity=c)
    for override, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            rf.retrieve(**{**base, **override})
    with pytest.raises(ValueError, match="required"):
        rf.retrieve(q, ql, z)
    assert rf.retrieve(q[:0], ql[:0], z, pl, c).numel() == 0


@pytest.mark.parametrize("sigma", [0.0, 0.7, 1.0, 2.5])
@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (2, 1, 9, 13), (1, 3, 2, 2)])
def test_complexity_matches_scipy(sigma, shape):
    from scipy.ndimage import gaussian_filter

    g = torch.Generator().manual_seed(int(sigma * 10) + shape[2])
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    ours = rf.patch_complexity(x, sigma=sigma)
    ref = []
    for img in x.numpy():
        sm = gaussian_filter(img, sigma=(0, sigma, sigma), mode="nearest", truncate=4.0) if sigma > 0 else img
        gy, gx = np.gradient(sm, axis=(1, 2))
        ref.append(((gx**2 + gy**2).sum(0)).var())
    assert_close(ours, torch.tensor(ref), atol=1e-12, rtol=1e-9, what="complexity")
    assert_close(rf.patch_complexity(x.float(), sigma=sigma), torch.tensor(ref), atol=1e-6, rtol=1e-4, what="fp32")


def test_complexity_orders_textures_and_scales_per_class():
    flat = torch.full((1, 3, 32, 32), 0.5)
    stripes = torch.zeros(1, 3, 32, 32)
    stripes[..., ::4, :] = 1.0
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    c = rf.patch_complexity(torch.cat([flat, stripes, noise]), sigma=1.0)
    assert float(c[0]) < 1e-12 and c[1] > 1e-6 and c[2] > 1e-6  # a flat image has no texture
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    s = rf.patch_complexity(x, labels=labels)
    for cls in (0, 1):
        v = s[labels == cls]
        assert float(v.min()) == 0.0 and float(v.max()) == pytest.approx(1.0)
    assert float(s[5]) == 0.0  # a one-image class
    with pytest.raises(ValueError, match="sigma"):
        rf.patch_complexity(x, sigma=-1)
    with pytest.raises(ValueError, match="images contains"):
        rf.patch_complexity(torch.full((1, 1, 4, 4), float("inf")))
    with pytest.raises(ValueError, match="labels must have shape"):
        rf.patch_complexity(x, labels=labels[:3])


def test_residual_inject():
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    p = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = rf.residual_inject(x, p, alpha=0.5)
    expect = 0.5 * x + 0.5 * torch.nn.functional.interpolate(p, size=(16, 16), mode="bilinear", antialias=True)
    assert_close(out, expect, atol=1e-6, what="inject")
    up = rf.residual_inject(x, p, alpha=0.25, size=24)
    assert up.shape == (2, 3, 24, 24)
    same = rf.residual_inject(x, x, alpha=0.3)
    assert_close(same, x, atol=1e-6, what="x with itself")
    up.sum().backward()
    assert x.grad is not None and p.grad is not None
    with pytest.raises(ValueError, match="alpha"):
        rf.residual_inject(x, p, alpha=2)
    with pytest.raises(ValueError, match="agree"):
        rf.residual_inject(x, p[:1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_certificate_catches_candidates_fp32_cannot_rank(backend):
    # Patches on the coordinate axes at radii 1 - k 1e-10 (float64), the closest to the origin at the
    # highest index. In fp32 every radius rounds to 1.0: a perfect tie, so the fp32 search keeps the
    # first indices as candidates and their fp32 score (1.0) is above every exact score. Only a
    # certificate with a real error bound sends the queries to the brute-force fallback.
    P, D = 80, 16
    z = torch.zeros(P, D, dtype=torch.float64)
    z[torch.arange(P), torch.arange(P) % D] = 1.0 - 1e-10 * torch.arange(1, P + 1, dtype=torch.float64)
    q = torch.zeros(3, D, dtype=torch.float64)
    args = (q, torch.zeros(3, dtype=torch.int64), z, torch.zeros(P, dtype=torch.int64), torch.zeros(P, dtype=torch.float64))
    assert rf.retrieve(*args, lam=0.0, backend=backend).tolist() == [P - 1] * 3
    assert rf.retrieve_ref(*args, lam=0.0).tolist() == [P - 1] * 3


def test_certificate_is_what_makes_it_exact(monkeypatch):
    # The same case with the error bound removed must go wrong: the test above can fail.
    from reta_fast.retrieval import search as retrieval

    monkeypatch.setattr(retrieval, "_FP32_REL", lambda d: 0.0)
    P, D = 80, 16
    z = torch.zeros(P, D, dtype=torch.float64)
    z[torch.arange(P), torch.arange(P) % D] = 1.0 - 1e-10 * torch.arange(1, P + 1, dtype=torch.float64)
    got = rf.retrieve(torch.zeros(1, D, dtype=torch.float64), torch.zeros(1, dtype=torch.int64), z,
                      torch.zeros(P, dtype=torch.int64), torch.zeros(P, dtype=torch.float64), lam=0.0, backend="torch")
    assert got.tolist() != [P - 1]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_overflow(backend):
    q, ql, z, pl, c = make(4, 20, 60, 16, seed=9)
    ref = rf.retrieve_ref(q.bfloat16().float(), ql, z, pl, c)
    assert torch.equal(rf.retrieve(q.bfloat16(), ql, z, pl, c, backend=backend), ref)  # bf16 queries, fp32 pool
    big = rf.retrieve(q.double() * 1e20, ql, z.double() * 1e20, pl, c, backend=backend)  # fp32 overflows
    assert torch.equal(big, rf.retrieve_ref(q.double() * 1e20, ql, z.double() * 1e20, pl, c))


def test_sparse_class_ids_cost_nothing_extra():
    q, ql, z, pl, c = make(3, 12, 30, 8, seed=4)
    big_q, big_p = ql * 10_000_019 + 7, pl * 10_000_019 + 7  # ids up to ~2e7
    assert torch.equal(rf.retrieve(q, big_q, z, big_p, c), rf.retrieve(q, ql, z, pl, c))
