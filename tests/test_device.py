"""Device discipline without a GPU: every hot path runs with its inputs on a device other than the host (the
stand-in of tests/device_double.py: real values, CUDA's rules on mixing devices), gives the host's answer,
and keeps its host-synchronisation budget per step.

The budgets (docs/method.md §4.8): a PTA call that refreshes its pairings makes one device-to-host transfer
of the graph, one host-to-device transfer of the pairings and one wait (for that transfer); a call that
reuses them makes no transfer and no wait; with ``overlap`` the waiting moves to the worker thread."""
import pytest
import torch
import torch.nn.functional as F

import reta_fast as rf
from conftest import assert_close
from device_double import DEVICE, DeviceDouble, Event, to_device, values
from reta_fast.topology import boundary

REFRESH = dict(syncs=1, d2h=1, h2d=1)  # a step that recomputes the pairings
REUSE = dict(syncs=0, d2h=0, h2d=0)  # a step that reuses them
OVERLAP = dict(syncs=0, d2h=1, h2d=1)  # overlapped: both transfers non-blocking, the wait in the worker


@pytest.fixture
def dd(monkeypatch):
    with DeviceDouble() as mode:
        # the stand-in copies like CUDA: non-blocking, completed by an event (whose wait is counted)
        monkeypatch.setitem(boundary.ASYNC_COPY_EVENTS, DEVICE.type, lambda device: Event(mode))
        yield mode


def clustered(c, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, 3, d, generator=g)
    idx = torch.randint(0, 3, (c, n), generator=g)
    return torch.gather(centres, 1, idx[..., None].expand(c, n, d)) + 0.3 * torch.randn(c, n, d, generator=g)


def test_the_double_catches_device_mixing_and_counts_synchronisations(dd):
    x = torch.arange(6.0).to(DEVICE)
    with pytest.raises(RuntimeError, match="same device"):
        torch.cat([x, torch.arange(3.0)])
    dd.reset()
    assert float(x.sum()) == 15.0 and x[x > 2].numel() == 3
    assert dd.counts()["syncs"] == 2


def test_mutual_knn_graph_on_the_device(dd):
    x = clustered(3, 40, 8, 0)
    ref = rf.mutual_knn_graph(x, 6, backend="torch")
    got = rf.mutual_knn_graph(to_device(x), 6)  # auto: the torch search (Triton only on CUDA)
    assert got.edges.device == DEVICE and torch.equal(values(got.edges), ref.edges)
    assert_close(values(got.lengths), ref.lengths, atol=1e-6, what="lengths")


def test_persistence_diagrams_and_images_on_the_device(dd):
    x = clustered(3, 30, 8, 1)
    ref = rf.persistence_diagrams(x, 5, essential="max")
    xd = to_device(x).requires_grad_()
    got = rf.persistence_diagrams(xd, 5, essential="max")
    assert_close(values(got.h0), ref.h0, atol=1e-6, what="H0")
    assert_close(values(got.h1), ref.h1, atol=1e-6, what="H1")
    img = rf.persistence_image(got.h1, 16, pers_range=(0, 1), birth_range=(0, 3), offsets=got.h1_offsets)
    (img.sum() + got.h0.sum()).backward()
    assert xd.grad.device == DEVICE and torch.isfinite(values(xd.grad)).all()
    xh = x.clone().requires_grad_()
    dh = rf.persistence_diagrams(xh, 5, essential="max")
    (rf.persistence_image(dh.h1, 16, pers_range=(0, 1), birth_range=(0, 3), offsets=dh.h1_offsets).sum()
     + dh.h0.sum()).backward()
    assert_close(values(xd.grad), xh.grad, atol=1e-5, what="gradient")


@pytest.mark.parametrize("engine, budget", [(dict(), [REFRESH] * 4),
                                            (dict(refresh_every=3), [REFRESH, REUSE, REUSE, REFRESH]),
                                            (dict(overlap=True), [None] + [OVERLAP] * 3)])
def test_pta_on_the_device_keeps_its_budget_and_the_hosts_answer(dd, engine, budget):
    syn, real = clustered(3, 24, 8, 2), clustered(3, 24, 8, 3)
    host = rf.TopologyAlignmentLoss(k=4, **engine)
    dev = rf.TopologyAlignmentLoss(k=4, **engine)
    s, r = to_device(syn).requires_grad_(), to_device(real)
    sh = syn.clone().requires_grad_()
    dev(s, r)  # the first call also computes the real side (once per real tensor)
    host(sh, real)
    for step, want in enumerate(budget[1:], 1):
        with torch.no_grad():  # moved features, as an optimiser step would
            s.add_(0.01 * step)
            sh.add_(0.01 * step)
        s.grad = sh.grad = None
        dd.reset()
        loss = dev(s, r)
        loss.backward()
        assert dd.counts() == want, f"step {step}: {dd.events}"
        lh = host(sh, real)
        lh.backward()
        assert_close(values(loss), lh, atol=1e-6, rtol=1e-5, what=f"loss at step {step}")
        assert_close(values(s.grad), sh.grad, atol=1e-6, rtol=1e-5, what=f"gradient at step {step}")
    # (a worker touching a device tensor would raise: the double's dispatch is the entering thread's)


def test_a_non_finite_input_raises_at_the_next_refresh_without_a_per_step_check(dd):
    real, syn = clustered(2, 20, 8, 4), clustered(2, 20, 8, 5)
    loss = rf.TopologyAlignmentLoss(k=4, refresh_every=2)
    s, r = to_device(syn), to_device(real)
    loss(s, r)
    bad = s.clone()
    bad[0, 0, 0] = float("nan")
    dd.reset()
    loss(bad, r)  # a reuse step: no synchronisation, the verdict is kept on the device
    assert dd.counts() == REUSE
    with pytest.raises(ValueError, match="syn contains NaN"):
        loss(s, r)  # the refresh transfers it


def _teacher(classes=4):
    torch.manual_seed(0)
    t = rf.models.convnet_bn(num_classes=classes, width=8, depth=2)
    t.train()
    with torch.no_grad():
        for _ in range(3):
            t(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    return t.eval()


def _group(classes=4, ipc=8, seed=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(classes * ipc, 3, 8, 8, generator=g)
    y = torch.arange(classes).repeat(ipc)
    ids = torch.arange(classes).repeat(ipc) * ipc + torch.arange(ipc).repeat_interleave(classes)
    return x, y, ids


@pytest.mark.parametrize("refresh", [1, 4])
def test_reta_loss_terms_on_the_device(dd, refresh):
    """CE + BN + PTA on a class group's micro-batch (one image per class), the rest of each class from the
    bank: the host's values, and per call the PTA budget (the layout's host work happens once)."""
    x, y, ids = _group()
    real = F.normalize(torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(7)), dim=-1)
    crits = []
    for place in (lambda t: t, to_device):
        t = _teacher()
        crit = rf.RETALoss(place(t), real_feats=place(real), k=3, topo_refresh=refresh)
        with torch.no_grad():
            crit.seed_bank(rf.models.teacher_features(crit.teacher, place(x))[1], place(y), place(ids))
        crits.append(crit)
    host, dev = crits
    micro = [torch.arange(4) + 4 * j for j in range(8)]
    xd, yd, idsd = to_device((x, y, ids))
    batches_h = [(y[m], ids[m]) for m in micro]
    batches_d = [(yd[m.to(DEVICE)], idsd[m.to(DEVICE)]) for m in micro]
    for step in range(12):
        j = step % 8
        xh = x[micro[j]].clone().requires_grad_()
        xdd = xd[micro[j].to(DEVICE)].clone().requires_grad_()
        dd.reset()
        loss, parts = dev.terms(xdd, *batches_d[j])
        loss.backward()
        counts = dd.counts()
        lh, ph = host.terms(xh, *batches_h[j])
        lh.backward()
        assert_close(values(parts), ph, atol=1e-5, rtol=1e-4, what=f"loss parts at call {step}")
        assert_close(values(xdd.grad), xh.grad, atol=1e-5, rtol=1e-4, what=f"pixel gradient at call {step}")
        if step >= 8:  # every micro-batch's layout is built: steady state
            assert counts == (REFRESH if step % refresh == 0 else REUSE), f"call {step}: {dd.events}"
    assert float(values(ph[2])) > 0


def test_retrieval_and_injection_on_the_device(dd):
    g = torch.Generator().manual_seed(8)
    C, Q, P, D = 5, 7, 40, 16
    z = F.normalize(torch.randn(C * P, D, generator=g), dim=1)
    q = F.normalize(torch.randn(C * Q, D, generator=g), dim=1)
    c = torch.rand(C * P, generator=g)
    ql = torch.arange(C).repeat_interleave(Q)
    pl = torch.arange(C).repeat_interleave(P)[torch.randperm(C * P, generator=g)]
    got = rf.retrieve(*to_device((q, ql, z, pl, c)), backend="torch")
    assert got.device == DEVICE and torch.equal(values(got), rf.retrieve_ref(q, ql, z, pl, c))
    xs, ps = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 12, 12, generator=g)
    out = rf.residual_inject(*to_device((xs, ps)), alpha=0.5, size=6)
    assert_close(values(out), rf.residual_inject(xs, ps, alpha=0.5, size=6), atol=1e-6, what="injection")


def _recover(dd, iterations, refresh):
    x, y, ids = _group(ipc=4)
    real = F.normalize(torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(9)), dim=-1)
    crit = rf.RETALoss(to_device(_teacher()), real_feats=to_device(real), k=2, topo_refresh=refresh)
    xd, yd, idsd = to_device((x, y, ids))
    with torch.no_grad():
        crit.seed_bank(rf.models.teacher_features(crit.teacher, xd)[1], yd, idsd)
    cfg = rf.RecoverConfig(iterations=iterations, resolutions=(8,), drc=False, lr=0.05, jitter=1)
    dd.reset()
    out = rf.recover(crit, xd, yd, idsd, config=cfg, micro_batches=[list(range(8)), list(range(8, 16))])
    assert out.device == DEVICE and len(cfg.history) == 2 * iterations
    return dd.counts(), cfg.history


@pytest.mark.parametrize("refresh, per_step", [(10_000, REUSE), (1, dict(syncs=2, d2h=2, h2d=2))])
def test_a_recover_step_on_the_device_costs_only_its_budget(dd, refresh, per_step):
    """Two lockstep micro-batches per step: the extra steps of a longer run cost exactly the per-step budget
    (nothing with reused pairings; one refresh per micro-batch call otherwise)."""
    short, _ = _recover(dd, 3, refresh)
    long, hist = _recover(dd, 7, refresh)
    assert {k: long[k] - short[k] for k in long} == {k: 4 * v for k, v in per_step.items()}
    assert all(h["topo"] > 0 for h in hist)


def test_device_h0_never_copies_the_graph_to_the_host(dd):
    x = clustered(4, 30, 8, 10)
    g = rf.mutual_knn_graph(x, 5, backend="torch")
    ref = rf.persistence_pairs(g.edges, g.lengths.detach(), 30, maxdim=0, offsets=g.offsets)
    e, w = to_device((g.edges, g.lengths.detach()))
    dd.reset()
    got = rf.persistence_pairs(e, w, 30, maxdim=0, offsets=g.offsets, backend="device")
    assert torch.equal(got.h0, ref.h0) and torch.equal(got.components, ref.components)
    E = g.edges.shape[0]
    copies = [what for kind, what, _ in dd.events if kind == "d2h"]
    assert not [c for c in copies if f"({E}" in c], copies  # the checks read flags, the output its edges
    with pytest.raises(ValueError, match="self-loop"):
        bad = e.clone()
        bad[3, 1] = bad[3, 0]
        rf.persistence_pairs(bad, w, 30, maxdim=0, offsets=g.offsets, backend="device")
