"""RETALoss: CE + BN matching + PTA on a frozen teacher, hooks, autocast, bad input."""
import pytest
import torch
import torch.nn.functional as F

import reta_fast as rf
from conftest import assert_close


def teacher(classes=4, seed=0):
    torch.manual_seed(seed)
    t = rf.models.convnet_bn(num_classes=classes, width=8, depth=2)
    t.train()
    with torch.no_grad():  # give the BN layers non-trivial running statistics
        for _ in range(3):
            t(torch.randn(16, 3, 8, 8) * 2 + 0.5)
    return t.eval()


def manual_bn(t, x):
    stats = []
    hooks = [m.register_forward_hook(lambda m, i, o: stats.append((i[0], m)))
             for m in t.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    t(x)
    for h in hooks:
        h.remove()
    total = 0.0
    for j, (inp, m) in enumerate(stats):
        mu, var = inp.mean((0, 2, 3)), inp.var((0, 2, 3), unbiased=False)
        total = total + (10.0 if j == 0 else 1.0) * ((mu - m.running_mean).norm() + (var - m.running_var).norm())
    return total


def test_ce_and_bn_terms_match_a_direct_computation():
    t = teacher()
    crit = rf.RETALoss(t, lam_topo=0.0)
    x = torch.randn(6, 3, 8, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    loss, parts = crit(x, y)
    ce = F.cross_entropy(t(x), y)
    bn = manual_bn(t, x)
    assert parts["ce"] == pytest.approx(float(ce.detach()), rel=1e-5)
    assert parts["bn"] == pytest.approx(float(bn.detach()), rel=1e-5)
    assert_close(loss, ce + 0.01 * bn, atol=1e-5, what="loss")
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())  # frozen teacher
    crit.close()
    assert all(not m._forward_hooks for m in t.modules())
    with pytest.raises(RuntimeError, match="closed"):
        crit(x, y)


def test_pta_joins_once_a_class_has_enough_images_and_gives_gradients():
    t = teacher()
    real = F.normalize(torch.randn(4, 6, 8), dim=-1)  # n = 6 points per class, D = 8 (ConvNet width)
    crit = rf.RETALoss(t, real_feats=real, k=3)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4 * 6, 3, 8, 8, generator=g)
    labels = torch.arange(4).repeat_interleave(6)
    ids = torch.arange(24)
    topo = []
    for step in range(6):  # one image per class per batch, as in a recover loop over ipc indices
        sel = torch.arange(4) * 6 + step
        x = images[sel].clone().requires_grad_()
        loss, parts = crit(x, labels[sel], ids[sel])
        loss.backward()
        topo.append(parts["topo"])
    assert topo[:3] == [0.0] * 3  # at most k = 3 distinct images per class so far
    assert all(v > 0 for v in topo[3:]) and torch.isfinite(x.grad).all()
    # the PTA term reaches the pixels: gradients differ from a run without it
    crit0 = rf.RETALoss(t, lam_topo=0.0)
    x0 = images[torch.arange(4) * 6 + 5].clone().requires_grad_()
    crit0(x0, labels[torch.arange(4) * 6 + 5])[0].backward()
    assert not torch.allclose(x0.grad, x.grad)


def test_pta_on_another_view_takes_its_features_there_and_leaves_ce_and_bn_on_x():
    t = teacher()
    real = F.normalize(torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 8, 8, generator=g, requires_grad=True)
    view = torch.randn(24, 3, 8, 8, generator=g, requires_grad=True)
    y = torch.arange(4).repeat_interleave(6)
    _, on_x = rf.RETALoss(t, real_feats=real, k=3)(x, y)
    _, on_view = rf.RETALoss(t, real_feats=real, k=3)(view, y)
    crit = rf.RETALoss(t, real_feats=real, k=3)
    loss, parts = crit(x, y, x_topo=view)
    assert parts["ce"] == pytest.approx(on_x["ce"], rel=1e-6) and parts["bn"] == pytest.approx(on_x["bn"], rel=1e-6)
    assert parts["topo"] == pytest.approx(on_view["topo"], rel=1e-5) and parts["topo"] != pytest.approx(on_x["topo"])
    loss.backward()
    assert view.grad is not None and view.grad.abs().sum() > 0  # PTA's gradient reaches the view's pixels
    with pytest.raises(ValueError, match="x_topo must hold the batch's 24 images, got 23"):
        crit(x, y, x_topo=view[:23])
    _, no_pta = rf.RETALoss(t, lam_topo=0.0)(x, y, x_topo=view)  # without PTA the view is not even run
    assert no_pta["ce"] == pytest.approx(on_x["ce"], rel=1e-6) and no_pta["topo"] == 0.0


def test_pta_weight_scales_with_the_batch_size_as_a_larger_lam_topo():
    t = teacher()
    real = F.normalize(torch.randn(4, 6, 8), dim=-1)
    crit = rf.RETALoss(t, real_feats=real, k=2)  # lam_topo 0.5 at batches of 100 images
    assert crit.topo_weight(100) == 0.5 and crit.topo_weight(10) == 5.0 and crit.topo_weight(200) == 0.25
    assert rf.RETALoss(t, real_feats=real, k=2, topo_ref_batch=None).topo_weight(10) == 0.5
    by_hand = rf.RETALoss(t, real_feats=real, k=2, lam_topo=0.5 * (100 / 12), topo_ref_batch=None)
    x = torch.randn(12, 3, 8, 8)
    y = torch.arange(4).repeat_interleave(3)
    grads = []
    for c in (crit, by_hand):
        xi = x.clone().requires_grad_()
        loss, parts = c(xi, y)
        loss.backward()
        assert parts["topo"] > 0
        assert float(c.last_terms["topo"].detach()) == pytest.approx(c.topo_weight(12) * parts["topo"], rel=1e-6)
        grads.append((loss.detach(), xi.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    with pytest.raises(ValueError, match="topo_ref_batch must be an integer >= 1, got 0"):
        rf.RETALoss(t, real_feats=real, k=2, topo_ref_batch=0)


@pytest.mark.parametrize("view", [False, True])
def test_topo_balance_sets_pta_weight_from_the_feature_gradients(view):
    """Under topo_balance PTA's weight is rho * ||dCE/df|| / ||dL_topo/df||: the loss and the pixel gradient are
    those of the fixed-weight loss with that weight, and PTA's gradient on the features is rho times CE's."""
    t = teacher()
    real = F.normalize(torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(12, 3, 8, 8, generator=g)
    v0 = torch.randn(12, 3, 8, 8, generator=g) if view else None
    y = torch.arange(4).repeat_interleave(3)
    rho = 0.3
    crit = rf.RETALoss(t, real_feats=real, k=2, topo_balance=rho)
    x = x0.clone().requires_grad_()
    v = None if v0 is None else v0.clone().requires_grad_()
    loss, parts = crit(x, y, x_topo=v)
    w = float(crit.last_topo_weight)
    # the weight by hand: gradients of CE and of L_topo on their penultimate features
    feats = []
    h = [m for m in t.modules() if isinstance(m, torch.nn.Linear)][-1].register_forward_hook(
        lambda m, i, o: feats.append(i[0]))
    xr = x0.clone().requires_grad_()
    ce = F.cross_entropy(t(xr), y)
    probe = rf.RETALoss(t, real_feats=real, k=2, lam_topo=1.0, topo_ref_batch=None)
    _, p_parts = probe(xr, y, x_topo=None if v0 is None else v0.clone().requires_grad_())
    h.remove()
    (g_ce,) = torch.autograd.grad(ce, feats[0], retain_graph=True)
    pf = probe._feats
    (g_topo,) = torch.autograd.grad(probe.last_terms["topo"], pf)
    assert w == pytest.approx(rho * float(g_ce.norm()) / float(g_topo.norm()), rel=1e-4)
    assert parts["topo"] == pytest.approx(p_parts["topo"], rel=1e-6) and parts["topo"] > 0
    # the same loss and pixel gradients as the fixed weight w (PTA's backward is not run twice)
    fixed = rf.RETALoss(t, real_feats=real, k=2, lam_topo=w, topo_ref_batch=None)
    xf = x0.clone().requires_grad_()
    vf = None if v0 is None else v0.clone().requires_grad_()
    loss_f, _ = fixed(xf, y, x_topo=vf)
    assert float(loss.detach()) == pytest.approx(float(loss_f.detach()), rel=1e-5)
    loss.backward()
    loss_f.backward()
    assert_close(x.grad, xf.grad, atol=1e-6, what="pixel gradient")
    if view:
        assert_close(v.grad, vf.grad, atol=1e-6, what="view gradient")
    # lam_topo 0 (the loop's PTA schedule) still switches PTA off, and the last call's weight is forgotten
    crit.lam_topo = 0.0
    crit(x0.clone().requires_grad_(), y)
    assert float(crit.last_terms["topo"].detach()) == 0.0 and crit.last_topo_weight is None
    for bad in (0, -1.0, True, "0.1", float("inf"), float("nan")):
        with pytest.raises(ValueError, match="topo_balance must be a finite number > 0 or None"):
            rf.RETALoss(t, real_feats=real, k=2, topo_balance=bad)
    with pytest.raises(ValueError, match="topo_balance weights PTA, which lam_topo=0 switches off"):
        rf.RETALoss(t, lam_topo=0.0, topo_balance=rho)


def test_ces_feature_gradient_from_the_head_equals_autograds_and_refuses_a_head_with_something_after():
    """A compiled teacher's forward is one graph node: under topo_balance CE's gradient on the penultimate features
    is computed from the last nn.Linear's weights, (softmax(z) - onehot(y)) W / B; it must be autograd's."""
    t = teacher()
    real = F.normalize(torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    crit = rf.RETALoss(t, real_feats=real, k=2, topo_balance=0.3)
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([2, 0, 1, 3, 3, 1, 0, 2, 1, 1, 0, 3])
    feats = []
    head = [m for m in t.modules() if isinstance(m, torch.nn.Linear)][-1]
    h = head.register_forward_hook(lambda m, i, o: feats.append(i[0]))
    logits = t(x.requires_grad_())
    h.remove()
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y), feats[0])
    assert_close(crit._ce_feature_grad(logits, y, feats[0]), g, atol=1e-7, what="dCE/df from the head")
    assert crit._head_checked
    with pytest.raises(ValueError, match=r"the teacher's logits are not that layer's output \(something follows "
                                         r"the head\): keep the teacher eager"):
        rf.RETALoss(t, real_feats=real, k=2, topo_balance=0.3)._ce_feature_grad(2 * logits, y, feats[0])
    with pytest.raises(ValueError, match=r"needs logits \[B, C\] = the teacher's head \(nn.Linear\)"):
        crit._ce_feature_grad(logits, y, feats[0][:, :, None])
    crit.compile_teacher("default")  # a new compiled forward is checked again on its first balanced call
    assert not crit._head_checked and crit.compile_mode == "default"


@pytest.mark.slow
@pytest.mark.parametrize("view,balance,amp", [("augmented", None, False), ("clean", None, False),
                                              ("clean", 0.3, False), ("clean", 0.3, True)])
def test_term_grad_norms_of_a_compiled_teacher_equal_the_eager_ones(view, balance, amp):
    """One call, the same inputs: each weighted term's gradient on the pixels, taken on the compiled forward's
    outputs and carried through an eager forward, is autograd's on the eager teacher; the call's own backward
    is untouched by it, and the eager forward's graph and recordings are gone afterwards."""
    real = F.normalize(torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    x0 = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y, ids = torch.arange(4).repeat_interleave(3), None  # PTA on the call's own 3 images a class
    got = []
    for mode in (None, "default"):
        crit = rf.RETALoss(teacher(), real_feats=real, k=2, topo_balance=balance).compile_teacher(mode)
        with pytest.raises(RuntimeError, match=r"call terms\(\) first"):
            crit.term_grad_norms(x0)
        x = x0.clone().requires_grad_(True)
        xa = torch.flip(x, dims=(3,)) * 1.1  # an "augmented view" computed from the pixels
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _ = crit.terms(xa, y, ids, **({"x_topo": x} if view == "clean" else {}))
            norms = crit.term_grad_norms(x)
        assert crit._feats is None and not crit._bn_terms or mode is None
        loss.backward()
        got.append((norms, x.grad.clone()))
    (eager, g_eager), (comp, g_comp) = got
    assert set(comp) == {"ce", "bn", "topo"} and min(comp.values()) > 0
    tol = 2e-2 if amp else 1e-5
    for k in comp:
        assert comp[k] == pytest.approx(eager[k], rel=tol), (k, comp, eager)
    assert_close(g_comp, g_eager, atol=tol * float(g_eager.abs().max()), what="the step's own pixel gradient")


def test_a_class_with_too_few_points_is_left_out_of_pta_with_a_warning_not_the_whole_call():
    """A drop-in loop's class-unbalanced batch: class 2 has 2 images, k = 2. It is left out of PTA (a warning,
    once); the other classes keep theirs, exactly as in the batch without class 2. Before, class 2 set every
    class's point count to 2 and PTA was silently 0 for the whole call."""
    import warnings

    real = F.normalize(torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 0, 1, 3, 1, 0, 2, 1, 3, 3, 3])
    keep = y != 2
    for use_ids in (False, True):
        crit = rf.RETALoss(teacher(), real_feats=real, k=2)
        ref = rf.RETALoss(teacher(), real_feats=real, k=2)
        ids = torch.arange(12) if use_ids else None
        if use_ids:  # each image registered with its initial features: the class's points are its own images
            with torch.no_grad():
                f0 = rf.models.teacher_features(crit.teacher, x)[1]
            crit.seed_bank(f0, y, ids)
            ref.seed_bank(f0[keep], y[keep], ids[keep])
        with pytest.warns(UserWarning, match=r"PTA leaves out 1 of the call's 4 classes \(e.g. class 2: 2 "
                                             r"point\(s\)\): a class needs more than k=2 points"):
            _, parts = crit(x, y, ids)
        assert crit.last_layout.classes == [0, 1, 3] and crit.last_layout.m == 3
        _, want = ref(x[keep], y[keep], None if ids is None else ids[keep])
        assert parts["topo"] > 0 and parts["topo"] == pytest.approx(want["topo"], rel=1e-6)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per RETALoss
            crit(x, y + 0, ids)
    # no class with more than k points: PTA is 0 (no error), on either path
    for use_ids in (False, True):
        crit = rf.RETALoss(teacher(), real_feats=real, k=2)
        with pytest.warns(UserWarning, match="PTA leaves out 4 of the call's 4 classes"):
            _, parts = crit(x[:8], torch.arange(4).repeat(2), torch.arange(8) if use_ids else None)
        assert parts["topo"] == 0.0 and crit.last_layout.classes == []


def test_topo_balance_weight_is_zero_where_pta_has_no_gradient_on_the_call():
    """A call none of whose images is among its classes' first m points: PTA has a graph but no gradient on
    the features; its weight is 0 (not rho * |CE| / 0), and the pixel gradient is CE's and BN's alone."""
    t = teacher()
    real = F.normalize(torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1)), dim=-1)  # m = 3 points
    g = torch.Generator().manual_seed(0)
    images = torch.randn(24, 3, 8, 8, generator=g)
    y_all = torch.arange(4).repeat_interleave(6)
    ids_all = torch.arange(24)
    crit = rf.RETALoss(t, real_feats=real, k=2, topo_balance=1e6)
    plain = rf.RETALoss(t, lam_topo=0.0)
    with torch.no_grad():
        feats = []
        h = [m for m in t.modules() if isinstance(m, torch.nn.Linear)][-1].register_forward_hook(
            lambda m, i, o: feats.append(i[0]))
        t(images)
        h.remove()
    crit.seed_bank(feats[0], y_all, ids_all)
    late = (ids_all % 6) >= 3  # the last three images of each class: not among its first m = 3 members
    x = images[late].clone().requires_grad_()
    loss, parts = crit(x, y_all[late], ids_all[late])
    assert parts["topo"] > 0 and float(crit.last_topo_weight) == 0.0
    loss.backward()
    x0 = images[late].clone().requires_grad_()
    plain(x0, y_all[late])[0].backward()
    assert torch.isfinite(x.grad).all()
    assert_close(x.grad, x0.grad, atol=1e-7, what="pixel gradient without PTA's")


def test_autocast_and_grad_scaler_on_cpu():
    t = teacher()
    crit = rf.RETALoss(t, lam_topo=0.0)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = crit(x, torch.tensor([0, 1, 2, 3]))
    assert loss.dtype == torch.float32 and all(isinstance(v, float) for v in parts.values())
    scaler.scale(loss).backward()
    assert torch.isfinite(x.grad).all()


def test_bad_input():
    t = teacher()
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no BatchNorm2d layers"):
        rf.RETALoss(plain, lam_topo=0.0)
    rf.RETALoss(plain, r_bn=0.0, lam_topo=0.0)  # explicit opt-out works
    with pytest.raises(ValueError, match="needs real_feats"):
        rf.RETALoss(t)
    with pytest.raises(ValueError, match="n > k"):
        rf.RETALoss(t, real_feats=torch.randn(4, 5, 8), k=10)
    crit = rf.RETALoss(t, lam_topo=0.0)
    with pytest.raises(ValueError, match="outside"):
        crit(torch.randn(2, 3, 8, 8), torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="y must be"):
        crit(torch.randn(2, 3, 8, 8), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="r_bn"):
        rf.RETALoss(t, r_bn=-1)


def test_from_pool(tmp_path):
    from test_pool import TinySet

    t = teacher(classes=3)
    pool = rf.PatchPool.build(TinySet(per_class=(5, 4, 6)), t, tmp_path / "p", per_class=4, size=8,
                              resolutions=(8,), progress=False)
    crit = rf.RETALoss.from_pool(t, pool, points_per_class=4, k=2)
    assert crit.real_feats.shape == (3, 4, 8)
    feats, labels, _ = pool.retrieval_tensors()
    for c in range(3):  # each class's real points are its own pool features
        own = feats[labels == c]
        assert all(any(torch.equal(r, o) for o in own) for r in crit.real_feats[c])
    with pytest.raises(ValueError, match="fewer than points_per_class"):
        rf.RETALoss.from_pool(t, pool, points_per_class=5, k=2)


def test_hooks_only_record_the_loss_own_forward_and_teacher_stays_eval():
    t = teacher()
    crit = rf.RETALoss(t, lam_topo=0.0)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    for _ in range(3):
        t(x)  # someone else runs the teacher: nothing may accumulate
    assert crit._bn_terms == []
    crit.train()
    assert not t.training
    before = [m.running_mean.clone() for m in t.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    crit(x, torch.tensor([0, 1, 2, 3]))[0].backward()
    after = [m.running_mean for m in t.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the BN targets never move
    no_stats = rf.models.convnet_bn(num_classes=4, width=8, depth=1)
    no_stats.body[1] = torch.nn.BatchNorm2d(8, track_running_stats=False)
    with pytest.raises(ValueError, match="no running statistics"):
        rf.RETALoss(no_stats, lam_topo=0.0)


def test_pta_without_ids_uses_only_the_batch_and_unknown_classes_raise():
    t = teacher()
    crit = rf.RETALoss(t, real_feats=F.normalize(torch.randn(2, 6, 8), dim=-1), k=3)  # real for 2 of 4 classes
    y = torch.tensor([0] * 5 + [1] * 5)
    _, parts = crit(torch.randn(10, 3, 8, 8), y)  # 5 > k points per class from the batch alone
    assert parts["topo"] > 0 and len(crit.bank) == 0
    with pytest.raises(ValueError, match="no real features"):
        crit(torch.randn(10, 3, 8, 8), torch.tensor([0] * 5 + [3] * 5))


def test_topo_refresh_reuses_pairings_across_steps():
    t = teacher()
    crit = rf.RETALoss(t, real_feats=F.normalize(torch.randn(2, 6, 8), dim=-1), k=3, topo_refresh=3)
    y = torch.tensor([0] * 5 + [1] * 5)
    x = torch.randn(10, 3, 8, 8)
    crit(x, y)
    key, plan = crit.topo._plan_key, crit.topo._plan
    crit(x + 0.01, y)
    assert crit.topo._plan_key == key and crit.topo._plan is plan  # same classes and real tensor: reused


def test_without_ids_stored_pairings_serve_only_the_batch_they_were_computed_on():
    """Two batches of the same classes and size, called in turn without ids: with topo_refresh > 1 each batch
    keeps its own pairings' reuse; before, batch B's PTA was computed with batch A's pairings."""
    real = F.normalize(torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(10, 3, 8, 8, generator=g), torch.randn(10, 3, 8, 8, generator=g)
    ya, yb = torch.tensor([0] * 5 + [1] * 5), torch.tensor([0] * 5 + [1] * 5)
    fresh = rf.RETALoss(teacher(), real_feats=real, k=3)
    want = fresh(xb, yb)[1]["topo"]
    crit = rf.RETALoss(teacher(), real_feats=real, k=3, topo_refresh=4)
    crit(xa, ya)
    assert crit(xb, yb)[1]["topo"] == pytest.approx(want, rel=1e-6)  # B's own pairings, not A's
    plan = crit.topo._plan
    crit(xb + 0.01, yb)
    assert crit.topo._plan is plan  # the same batch (its label tensor) still reuses them


def test_bad_input_to_the_drop_in_loss_is_named():
    t = teacher(classes=3)
    real = F.normalize(torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    with pytest.raises(ValueError, match=r"y must hold int64 \(torch.long\) class indices, got torch.int32"):
        rf.RETALoss(t, real_feats=real, k=2)(torch.randn(6, 3, 8, 8), torch.arange(3, dtype=torch.int32).repeat(2))
    # a set larger than PTA's point count: the images past it get no PTA gradient, and the user is told
    crit = rf.RETALoss(t, real_feats=real, k=2)
    y, ids = torch.arange(3).repeat(6), torch.arange(18)
    x = torch.randn(18, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        crit.seed_bank(rf.models.teacher_features(t, x)[1], y, ids)
    with pytest.warns(UserWarning, match=r"PTA takes m=4 points a class \(the fewest among the call's classes, at "
                                         r"most the 4 real points real_feats holds a class\), but class \d has 6 "
                                         r"registered images: its images past the first 4 get no PTA gradient"):
        crit(x[:3], y[:3], ids[:3])


def test_from_pool_refuses_a_pool_built_for_another_teacher(tmp_path):
    from test_pool import TinySet

    t = teacher(classes=3)
    pool = rf.PatchPool.build(TinySet(per_class=(5, 4, 6)), t, tmp_path / "p", per_class=4, size=8,
                              resolutions=(8,), progress=False)
    with pytest.raises(ValueError, match="the pool was built for teacher [0-9a-f]{16}, not for this teacher"):
        rf.RETALoss.from_pool(teacher(classes=3, seed=1), pool, points_per_class=4, k=2)


def test_under_autocast_only_the_teacher_runs_in_bf16():
    import torch.nn.functional as F

    t = teacher()
    crit = rf.RETALoss(t, real_feats=F.normalize(torch.randn(4, 6, 8), dim=-1), k=3)
    seen = []
    forward = crit.topo.forward

    def spy(syn, real=None, classes=None, group=None):
        seen.append((torch.is_autocast_enabled("cpu"), syn.dtype))
        return forward(syn, real, classes=classes, group=group)

    crit.topo.forward = spy
    crit.seed_bank(torch.randn(16, 8), torch.arange(4).repeat(4), torch.arange(16) + 100)  # PTA active
    x = torch.randn(8, 3, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = crit.terms(x, torch.arange(4).repeat(2), torch.arange(8))
    assert seen == [(False, torch.float32)]  # PTA's k-NN and images in fp32
    assert loss.dtype == parts.dtype == torch.float32 and parts[2] > 0


@pytest.mark.parametrize("overlap", [False, True])
def test_micro_batches_of_one_set_share_its_pairings_on_the_same_points(overlap):
    """The micro-batches of a class group see each class's points in one order, so pairings refreshed on one
    call and reused on the next micro-batch's call index the same images: with unchanged images every call
    gives the loss a fresh pairing would (a regression: each call once put its own images first)."""
    t = teacher()
    g = torch.Generator().manual_seed(3)
    real = F.normalize(torch.randn(4, 8, 8, generator=g), dim=-1)
    x = torch.randn(4 * 8, 3, 8, 8, generator=g)
    y = torch.arange(4).repeat(8)  # micro-batch j holds images (c, 2j) and (c, 2j + 1) of every class
    ids = torch.arange(4).repeat(8) * 8 + torch.arange(8).repeat_interleave(4)
    micro = [torch.arange(8 * j, 8 * (j + 1)) for j in range(4)]
    grid = dict(h0_range=(0.0, 2.0), h1_pers_range=(0.0, 1.0), h1_birth_range=(0.0, 2.0))
    values = {}
    for refresh in (1, 4):
        crit = rf.RETALoss(t, real_feats=real, k=3, topo_refresh=refresh, overlap=overlap and refresh > 1, **grid)
        with torch.no_grad():
            crit.seed_bank(rf.models.teacher_features(t, x)[1], y, ids)
        values[refresh] = [float(crit.terms(x[m], y[m], ids[m])[1][2]) for _ in range(2) for m in micro]
    assert values[1][0] > 0 and len(set(round(v, 6) for v in values[1])) == 1
    assert values[4] == pytest.approx(values[1], rel=1e-5, abs=1e-7)


class HeadFirst(torch.nn.Module):
    """A classifier that registers its head before an MLP block: its last nn.Linear is not the head."""

    def __init__(self, classes=4, width=8):
        super().__init__()
        self.fc = torch.nn.Linear(width, classes)
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.ReLU(),
                                       torch.nn.Linear(2 * width, width))

    def forward(self, x):
        f = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(f + self.mlp(f))


def test_a_head_that_is_not_the_last_linear_is_refused_until_named():
    torch.manual_seed(0)
    t = HeadFirst().eval()
    x = torch.randn(8, 3, 6, 6)
    y = torch.arange(4).repeat(2)
    real = F.normalize(torch.randn(4, 6, 8), dim=-1)
    with pytest.raises(ValueError, match="'mlp.2'.*set_feature_head"):
        rf.models.teacher_features(t, x)
    crit = rf.RETALoss(t, real_feats=real, k=3)
    with pytest.raises(ValueError, match="'mlp.2'.*not the logits"):
        crit(x, y, torch.arange(8))
    crit.close()
    before = rf.models.teacher_fingerprint(t, features=True)
    weights = rf.models.teacher_fingerprint(t)
    assert rf.models.set_feature_head(t, "fc") is t
    assert rf.models.feature_head(t) is t.fc and rf.models.teacher_fingerprint(t, features=True) != before
    assert rf.models.teacher_fingerprint(t) == weights  # the same network (run records, soft labels)
    wrapped = torch.compile(t)  # a compiled wrapper (never run here) names its layers "_orig_mod.*"
    assert rf.models.feature_head(wrapped) is t.fc and rf.models.set_feature_head(wrapped, "fc") is wrapped
    assert rf.models.teacher_fingerprint(wrapped, features=True) == rf.models.teacher_fingerprint(t, features=True)
    seen = {}
    h = t.fc.register_forward_hook(lambda m, inp, out: seen.__setitem__("f", inp[0]))
    logits, feats = rf.models.teacher_features(t, x)
    h.remove()
    assert torch.equal(feats, seen["f"]) and logits.shape == (8, 4)
    crit = rf.RETALoss(t, real_feats=real, k=3)
    crit(x, y, torch.arange(8))  # accepted now; PTA's points are the head's input
    assert_close(crit.bank.feats[[crit.bank.slot[i] for i in range(8)]], seen["f"], atol=1e-6, what="PTA's points")
    crit.close()
    rf.models.set_feature_head(t, t.mlp[0])  # a module given itself is found by name
    assert rf.models.feature_head(t) is t.mlp[0]
    rf.models.set_feature_head(t, t.mlp[2])  # naming the default head changes no fingerprint
    assert rf.models.teacher_fingerprint(t, features=True) == before
    for bad, match in (("nope", "no module named 'nope'"), ("bn", "must be an nn.Linear.*BatchNorm2d"),
                       (torch.nn.Linear(2, 2), "not a module of the teacher"), (3, "nn.Linear of the teacher or")):
        with pytest.raises(ValueError, match=match):
            rf.models.set_feature_head(t, bad)
