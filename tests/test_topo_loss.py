"""TopologyAlignmentLoss: exactness, batching, pairing reuse, gradients and that it optimises."""
import pytest
import torch

import reta_fast as rf
from conftest import assert_close

GRID = dict(h0_range=(0.0, 1.5), h1_pers_range=(0.0, 0.5), h1_birth_range=(0.0, 1.5))


def feats(c, n, d, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, 3, d, generator=g)
    idx = torch.randint(0, 3, (c, n), generator=g)
    return torch.gather(centres, 1, idx[..., None].expand(c, n, d)) + spread * 0.3 * torch.randn(c, n, d, generator=g)


def test_identical_sets_give_zero_and_different_sets_positive():
    real = feats(3, 40, 16, 0)
    loss = rf.TopologyAlignmentLoss(k=6)
    assert float(loss(real.clone(), real)) == 0.0
    assert float(loss(feats(3, 40, 16, 1, spread=3.0), real)) > 0.0


def test_batched_equals_sum_over_classes():
    syn, real = feats(4, 30, 8, 2), feats(4, 30, 8, 3)
    full = rf.TopologyAlignmentLoss(k=5, **GRID)(syn, real)
    parts = sum(rf.TopologyAlignmentLoss(k=5, **GRID)(syn[c: c + 1], real[c: c + 1]) for c in range(4))
    assert_close(full, parts, atol=1e-6, rtol=1e-5, what="batched loss")
    mean = rf.TopologyAlignmentLoss(k=5, reduction="mean", **GRID)(syn, real)
    assert_close(mean, full / 4, atol=1e-7, rtol=1e-5, what="mean reduction")


def test_set_reference_equals_passing_real():
    syn, real = feats(2, 30, 8, 4), feats(2, 30, 8, 5)
    a = rf.TopologyAlignmentLoss(k=5)
    b = rf.TopologyAlignmentLoss(k=5)
    b.set_reference(real)
    la, lb = a(syn, real), b(syn)
    assert_close(la, lb, atol=1e-7, rtol=1e-6, what="cached reference")
    assert a.grid == b.grid


def test_gradcheck_float64():
    syn = feats(2, 10, 3, 6).double().requires_grad_()
    real = feats(2, 10, 3, 7).double()
    loss = rf.TopologyAlignmentLoss(k=3, **GRID)
    assert torch.autograd.gradcheck(lambda s: loss(s, real), (syn,))


def test_pairing_reuse_skips_the_search(monkeypatch):
    from reta_fast.topology import pta as topo_loss

    calls = []
    real_fn = topo_loss.graph_plan
    monkeypatch.setattr(topo_loss, "graph_plan", lambda *a, **k: calls.append(1) or real_fn(*a, **k))
    syn, real = feats(2, 30, 8, 8), feats(2, 30, 8, 9)
    reuse = rf.TopologyAlignmentLoss(k=5, refresh_every=3, **GRID)
    fresh = rf.TopologyAlignmentLoss(k=5, **GRID)
    reuse.set_reference(real)
    fresh.set_reference(real)
    calls.clear()
    values = [reuse(syn) for _ in range(4)]
    assert len(calls) == 2  # calls 0 and 3 refresh; 1 and 2 re-gather on stored pairings
    for v in values:  # unchanged features: reusing the pairings changes nothing
        assert_close(v, fresh(syn), atol=1e-7, rtol=1e-6, what="reused pairings")
    # Moved features between refreshes: the loss follows the moved lengths on the old pairings.
    moved = syn + 0.01 * torch.randn_like(syn)
    reuse._calls = 1
    stored = reuse(moved)
    assert float(stored) != float(fresh(syn))


def test_joint_pass_with_reuse_and_real_each_step():
    syn, real = feats(3, 25, 8, 10), feats(3, 25, 8, 11)
    a = rf.TopologyAlignmentLoss(k=5, refresh_every=2, **GRID)
    b = rf.TopologyAlignmentLoss(k=5, **GRID)
    for _ in range(3):
        assert_close(a(syn, real), b(syn, real), atol=1e-7, rtol=1e-6, what="joint pass")


def test_minimising_pta_aligns_topology():
    torch.manual_seed(0)
    real = feats(2, 40, 8, 12)
    syn = (feats(2, 40, 8, 13, spread=0.2)).requires_grad_()
    loss = rf.TopologyAlignmentLoss(k=6)
    loss.set_reference(real)
    opt = torch.optim.Adam([syn], lr=0.1)
    first = float(loss(syn).detach())
    for _ in range(40):
        opt.zero_grad()
        value = loss(syn)
        value.backward()
        assert torch.isfinite(syn.grad).all()
        opt.step()
    assert float(loss(syn).detach()) < 0.2 * first


def test_bad_input():
    loss = rf.TopologyAlignmentLoss(k=5)
    syn = feats(2, 20, 4, 0)
    with pytest.raises(ValueError, match="real features are required"):
        loss(syn)
    with pytest.raises(ValueError, match="class-balanced"):
        loss(syn, feats(3, 20, 4, 1))
    with pytest.raises(ValueError, match="dtype and device"):
        loss(syn, feats(2, 20, 4, 1).double())
    with pytest.raises(ValueError, match="syn contains"):
        bad = syn.clone()
        bad[0, 0, 0] = float("nan")
        loss(bad, syn)
    with pytest.raises(ValueError, match="reduction"):
        rf.TopologyAlignmentLoss(reduction="max")
    with pytest.raises(ValueError, match="k must be"):
        rf.TopologyAlignmentLoss(k=0)
    ref = rf.TopologyAlignmentLoss(k=5)
    ref.set_reference(syn)
    with pytest.raises(ValueError, match="classes"):
        ref(feats(3, 20, 4, 2))


def test_pairing_cache_follows_classes_and_reference():
    syn_a, syn_b, real = feats(2, 30, 8, 20), feats(2, 30, 8, 21, spread=2.0), feats(2, 30, 8, 22)
    fresh = rf.TopologyAlignmentLoss(k=5, **GRID)
    fresh.set_reference(real)
    cached = rf.TopologyAlignmentLoss(k=5, refresh_every=100, **GRID)
    cached.set_reference(real)
    cached(syn_a, classes=[0, 1])
    # other classes, same shape: the stored pairings of classes 0, 1 must not be reused
    assert_close(cached(syn_b, classes=[2, 3]), fresh(syn_b), atol=1e-7, rtol=1e-6, what="new classes")
    # a new reference invalidates the cache too
    cached.set_reference(real)
    assert_close(cached(syn_a, classes=[2, 3]), fresh(syn_a), atol=1e-7, rtol=1e-6, what="new reference")
    with pytest.raises(ValueError, match="classes has 3 ids"):
        cached(syn_a, classes=[1, 2, 3])


def test_far_from_origin_features_keep_their_topology():
    # unnormalised features with a large offset: the graph must be the one of the centred set
    x = feats(1, 60, 16, 23)
    near = rf.persistence_diagrams(x, 8)
    far = rf.persistence_diagrams(x + 1000.0, 8)
    assert torch.equal(near.graph.edges, far.graph.edges)
    assert_close(far.h0, near.h0, atol=2e-3, what="H0 shifted")


# ---------------------------------------------------------------------------------------------
# overlap: each refresh's pairings computed in a worker thread, used from the next call on

def _value_and_grad(loss, x, real, **kw):
    x = x.clone().requires_grad_()
    v = loss(x, real, **kw)
    (g,) = torch.autograd.grad(v, x)
    return v.detach(), g


def test_overlap_uses_the_previous_calls_pairings_exactly():
    real = feats(3, 24, 8, 10)
    xs = [feats(3, 24, 8, 20 + t, spread=1.0 + 0.3 * t) for t in range(5)]
    over = rf.TopologyAlignmentLoss(k=4, overlap=True)
    got = [_value_and_grad(over, x, real) for x in xs]
    # call 0 is synchronous; call t >= 1 uses the pairings of call t - 1's features: a sync loss that
    # saw x_{t-1} and then reuses its pairings (refresh_every large) gives the same value and gradient
    want = [_value_and_grad(rf.TopologyAlignmentLoss(k=4), xs[0], real)]
    for t in range(1, 5):
        ref = rf.TopologyAlignmentLoss(k=4, refresh_every=1000)
        ref(xs[t - 1], real)
        want.append(_value_and_grad(ref, xs[t], real))
    for t, ((v, g), (wv, wg)) in enumerate(zip(got, want)):
        assert_close(v, wv, atol=1e-6, rtol=1e-5, what=f"loss at call {t}")
        assert_close(g, wg, atol=1e-6, rtol=1e-5, what=f"gradient at call {t}")
    # and the lag matters: call 2 differs from a synchronous refresh on its own features
    assert float((got[2][0] - _value_and_grad(rf.TopologyAlignmentLoss(k=4), xs[2], real)[0]).abs()) > 0
    again = rf.TopologyAlignmentLoss(k=4, overlap=True)  # deterministic: each job is consumed at a fixed call
    assert all(torch.equal(_value_and_grad(again, x, real)[0], v) for x, (v, _) in zip(xs, got))


def test_overlap_equals_sync_on_constant_features_and_restarts_on_a_new_batch():
    real, x = feats(2, 20, 8, 30), feats(2, 20, 8, 31, spread=2.0)
    over, sync = rf.TopologyAlignmentLoss(k=4, overlap=True, refresh_every=2), rf.TopologyAlignmentLoss(k=4)
    for _ in range(4):
        assert torch.equal(over(x, real), sync(x, real))
    other, other_real = feats(3, 20, 8, 32), feats(3, 20, 8, 33)  # other classes/shape: computed synchronously
    assert_close(over(other, other_real, classes=[0, 1, 2]), rf.TopologyAlignmentLoss(
        k=4, **{k: over.grid[v] for k, v in (("h0_range", "h0"), ("h1_pers_range", "h1p"),
                                                ("h1_birth_range", "h1b"))})(other, other_real), atol=1e-6, rtol=1e-5)
    over.reset()  # a pending job is waited for and dropped
    assert over._job is None and over._plan is None
    assert torch.isfinite(over(x, real))


def test_minimising_with_overlap_aligns_topology_too():
    real = feats(2, 30, 8, 40)
    x = feats(2, 30, 8, 41, spread=3.0).requires_grad_()
    loss = rf.TopologyAlignmentLoss(k=5, overlap=True)
    opt = torch.optim.Adam([x], lr=0.02)
    first = None
    for _ in range(40):
        opt.zero_grad()
        v = loss(x, real)
        first = float(v.detach()) if first is None else first
        v.backward()
        opt.step()
    assert float(loss(x.detach(), real)) < 0.5 * first


@pytest.mark.parametrize("overlap", [False, True])
def test_a_new_real_tensor_is_never_mistaken_for_a_freed_one(overlap):
    """The real side's images are cached per real tensor: a fresh temporary each call (often allocated
    at a freed one's address, version 0, same shape) must be recomputed, never served from the cache."""
    x = feats(2, 20, 8, 51)
    reals = [feats(2, 20, 8, 60 + t, spread=0.5 + 0.4 * t) for t in range(8)]  # other point sets each call
    want = [rf.TopologyAlignmentLoss(k=4, **GRID)(x, r) for r in reals]
    assert len({round(float(w), 6) for w in want}) == 8
    loss = rf.TopologyAlignmentLoss(k=4, overlap=overlap, refresh_every=2, **GRID)
    for t, (r, w) in enumerate(zip(reals, want)):
        assert_close(loss(x, r.clone()), w, atol=1e-6, rtol=1e-5, what=f"loss at call {t}")


def test_a_noise_initialised_set_gets_a_gradient():
    """Synthetic features far from the real ones (noise initialisation): with the grid fixed by the real
    diagrams their images fall off it and the gradient vanishes while the loss does not; the union grid
    (default) keeps both sides on the grid."""
    from reta_fast.topology.samples import clustered

    real = clustered(4, 32, 64, seed=1, clusters=2, spread=0.05)  # tight clusters: short H0 bars
    syn = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(2))  # spread out: long ones
    grads = {}
    for grid in ("real", "union"):
        s = syn.clone().requires_grad_()
        loss = rf.TopologyAlignmentLoss(k=6, grid=grid)(s, real)
        loss.backward()
        grads[grid] = (float(loss), float(s.grad.norm()))
    assert grads["real"][0] > 0.1 and grads["real"][1] == 0.0  # the failure being fixed
    assert grads["union"][0] > 0.1 and grads["union"][1] > 1e-3 * grads["union"][0]
    # ... and following it reduces the loss
    s = syn.clone().requires_grad_()
    pta = rf.TopologyAlignmentLoss(k=6)
    opt = torch.optim.Adam([s], lr=0.05)
    first = None
    for _ in range(30):
        opt.zero_grad()
        value = pta(s, real)
        value.backward()
        opt.step()
        first = float(value) if first is None else first
    assert float(pta(s, real)) < 0.5 * first


def _loops(seed):
    from reta_fast.topology.samples import rings

    return rings(2, 12, 3, noise=0.05, seed=seed, loops=2, dtype=torch.float64, evenly=True)


def test_h1_gradients_float64():
    """Several finite H1 pairs on both sides (two loops per set, complete graph): gradcheck of the
    diagrams' values and of the whole loss (grids fixed, so each evaluation compares on one grid)."""
    syn, real = _loops(0), _loops(10)
    for x in (syn, real):
        dg = rf.persistence_diagrams(x, 11, essential="max")
        finite = dg.h1[:, 1] - dg.h1[:, 0]
        assert [int(v) for v in dg.h1_offsets.diff()] == [2, 2] and float(finite.min()) > 0.05
    s = syn.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: rf.persistence_diagrams(p, 11, essential="max").h1, (s,))
    grid = dict(h0_range=(0.0, 3.0), h1_pers_range=(0.0, 2.0), h1_birth_range=(0.0, 3.0))
    loss = rf.TopologyAlignmentLoss(k=11, normalize=False, gamma=2.0, **grid)
    assert torch.autograd.gradcheck(lambda p: loss(p, real), (s,))
    h1_only = rf.TopologyAlignmentLoss(k=11, normalize=False, **grid)
    s.grad = None
    (h1_only(s, real) - rf.TopologyAlignmentLoss(k=11, normalize=False, gamma=0.0, **grid)(s, real)).backward()
    assert float(s.grad.abs().max()) > 0  # the H1 term alone moves the points
