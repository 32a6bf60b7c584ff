"""The recover loop: shapes, clamping, cosine lr, residual wiring (DRC vs static anchor), progress."""
import pytest
import torch

import reta_fast as rf
from conftest import assert_close
from test_pool import TinySet
from test_reta_loss import teacher

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalised(x01):
    return (x01 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_recover_optimises_within_range_and_schedule():
    t = teacher(classes=4)
    crit = rf.RETALoss(t, lam_topo=0.0)
    x0 = normalised(torch.rand(4, 3, 10, 10, generator=torch.Generator().manual_seed(0)))
    y = torch.arange(4)
    cfg = rf.RecoverConfig(iterations=40, resolutions=(8, 12), drc=False, jitter=1)
    out = rf.recover(crit, x0, y, config=cfg)
    assert out.shape == (4, 3, 12, 12) and not out.requires_grad
    lo = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    steps = [h for h in cfg.history if "ce" in h]
    assert len(steps) == 40 and [h["block"] for h in steps] == [0] * 20 + [1] * 20
    assert steps[0]["lr"] == pytest.approx(0.25) and steps[20]["lr"] == pytest.approx(0.125, rel=1e-6)
    first = sum(h["ce"] for h in steps[:5]) / 5
    last = sum(h["ce"] for h in steps[-5:]) / 5
    assert last < first  # the teacher is made to recognise its classes
    # the last block optimises after the injection, so clamping is what bounds the output
    assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()


@pytest.mark.parametrize("drc", [False, True])
def test_residual_connection_injects_the_right_patch(tmp_path, drc):
    # lr ~ 0 and alpha = 0: after the block boundary x is exactly the injected patch (resized).
    t = teacher(classes=3)
    pool = rf.PatchPool.build(TinySet(per_class=(5, 4, 6)), t, tmp_path / "p", per_class=4, size=8,
                              resolutions=(8,), progress=False)
    crit = rf.RETALoss(t, lam_topo=0.0)
    x0 = normalised(torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    y = torch.arange(3)
    cfg = rf.RecoverConfig(iterations=2, resolutions=(8, 8), lr=1e-12, alpha=0.0, drc=drc, jitter=0)
    out = rf.recover(crit, x0, y, pool=pool, config=cfg)
    if drc:
        idx = next(h["retrieved"] for h in cfg.history if "retrieved" in h)
        assert [int(pool.labels[i]) for i in idx] == [0, 1, 2]  # patches of the images' own classes
        expect = pool.images(idx)
    else:
        expect = x0
    assert_close(out, expect, atol=1e-5, what="injected patch")


def test_bad_configuration():
    t = teacher(classes=2)
    crit = rf.RETALoss(t, lam_topo=0.0)
    x0 = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="needs a pool"):
        rf.recover(crit, x0, torch.arange(2), config=rf.RecoverConfig(iterations=4, resolutions=(8, 8)))
    with pytest.raises(ValueError, match="iterations"):
        rf.recover(crit, x0, torch.arange(2), config=rf.RecoverConfig(iterations=1, resolutions=(8, 8), drc=False))
    with pytest.raises(ValueError, match="x_init"):
        rf.recover(crit, torch.zeros(2, 8, 8), torch.arange(2), config=rf.RecoverConfig(drc=False))


# ---------------------------------------------------------------------------------------------
# the recover step's engine: lazy loss parts, bf16 autocast, channels-last, torch.compile

def _engine_run(tmp_path=None, iterations=6, topo_balance=None, diagnose=False, grads=None, **engine):
    import torch.nn.functional as F

    t = teacher(classes=3)
    real = F.normalize(torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    crit = rf.RETALoss(t, real_feats=real, k=2, topo_balance=topo_balance)
    y, ids = torch.arange(3).repeat(2), torch.arange(6)
    x0 = normalised(torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():  # bank: the class's other images, so PTA is active from the first step
        crit.seed_bank(torch.randn(6, 8, generator=torch.Generator().manual_seed(4)), torch.arange(3).repeat(2),
                       torch.arange(6) + 100)
    cfg = rf.RecoverConfig(iterations=iterations, resolutions=(8, 8), drc=False, jitter=1, **engine)
    seen = []
    out = rf.recover(crit, x0, y, ids, config=cfg, on_step=(lambda s, p: seen.append(p)) if tmp_path else None,
                     diagnose=diagnose)
    if grads is not None:
        grads.extend(h["grads"] for h in cfg.history if "grads" in h)
    return out, [h for h in cfg.history if "ce" in h]


def test_x_init_outside_the_normalised_range_is_refused():
    crit = rf.RETALoss(teacher(classes=3), lam_topo=0.0)
    cfg = rf.RecoverConfig(iterations=2, resolutions=(8, 8), drc=False)
    y = torch.arange(3).repeat(2)
    for bad, msg in ((torch.rand(6, 3, 8, 8) * 255, r"x_init lies in \[0(\.\d+)?, 25\d(\.\d+)?\], far outside "
                                                    r"the normalised range \[-2.12, 2.64\] of config.mean/std"),
                     (torch.full((6, 3, 8, 8), float("nan")), "x_init holds NaN or inf")):
        with pytest.raises(ValueError, match=msg):
            rf.recover(crit, bad, y, config=cfg)
    noise = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.5  # an SRe2L start: accepted
    assert torch.isfinite(rf.recover(crit, noise, y, config=cfg)).all()


def test_loss_parts_read_once_per_block_equal_the_per_step_ones(tmp_path):
    lazy_out, lazy = _engine_run()
    eager_out, eager = _engine_run(tmp_path)  # an on_step callback reads the parts every step
    assert torch.equal(lazy_out, eager_out) and lazy == eager
    assert len(lazy) == 6 and all(h["topo"] > 0 for h in lazy) and [h["step"] for h in lazy] == list(range(6))
    assert all(type(h[k]) is float for h in lazy for k in ("ce", "bn", "topo"))


def test_terms_equal_forward_and_a_label_changed_in_place_is_checked_again():
    t = teacher()
    crit = rf.RETALoss(t, lam_topo=0.0)
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    loss, parts = crit(x, y)
    loss2, p2 = crit.terms(x, y)
    assert torch.equal(loss, loss2) and p2.tolist() == [parts["ce"], parts["bn"], parts["topo"]]
    y[1] = 7  # same tensor, changed in place: the cached check must not hide it
    with pytest.raises(ValueError, match="outside"):
        crit.terms(x, y)


def test_bf16_autocast_and_channels_last_stay_close_to_fp32():
    ref, ref_h = _engine_run()
    moved = float((ref - normalised(torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3)))).abs().mean())
    # Adam moves a pixel by ~lr whatever its gradient's size, so a rounding-level change of a tiny
    # gradient's sign shows in single pixels: compare the mean difference to the mean movement
    for engine, tol in ((dict(channels_last=True), 1e-5), (dict(amp="bf16"), 0.1),
                        (dict(amp="bf16", channels_last=True), 0.1)):
        out, hist = _engine_run(**engine)
        assert torch.isfinite(out).all() and out.shape == ref.shape
        err = float((out - ref).abs().mean()) / moved
        assert err < tol, f"{engine}: mean |difference| to the fp32 run is {err:.3g} of the mean movement"
        assert abs(hist[0]["ce"] - ref_h[0]["ce"]) < 0.05 * max(1.0, abs(ref_h[0]["ce"]))
    _, hist = _engine_run(amp="bf16")  # bf16 really ran: the first step's loss is not bitwise the fp32 one
    assert hist[0]["bn"] != ref_h[0]["bn"]


def test_engine_options_are_checked_by_name():
    with pytest.raises(ValueError, match="amp must be one of .*loss scaling"):
        rf.RecoverConfig(amp="fp16").validate()
    with pytest.raises(ValueError, match="compile must be one of"):
        rf.RecoverConfig(compile="fast").validate()
    with pytest.raises(ValueError, match="compile must be one of"):
        from reta_fast.stages import DistillConfig

        DistillConfig(compile="fast").validate()


@pytest.mark.slow
@pytest.mark.parametrize("pta_view,balance", [("augmented", None), ("clean", None), ("clean", 0.1)])
def test_compiled_teacher_forward_matches_eager(pta_view, balance):
    """pta_view="clean" runs the compiled teacher twice a step, the second time with the BN hooks silenced by a
    flag the compiled graph must see (a guard, not a constant baked in at the first trace). With the balanced
    weight (the default up to 64 px) CE's gradient on the features comes from the head's weights when compiled,
    from autograd when eager: the same run."""
    ref, ref_h = _engine_run(iterations=4, pta_view=pta_view, topo_balance=balance)
    out, hist = _engine_run(iterations=4, compile="default", pta_view=pta_view, topo_balance=balance)
    assert not balance or all(h["topo"] > 0 for h in hist)
    assert float((out - ref).abs().mean()) < 1e-5 and float((out - ref).abs().max()) < 1e-3
    for a, b in zip(hist, ref_h):
        assert all(abs(a[k] - b[k]) < 1e-3 * max(1.0, abs(b[k])) for k in ("ce", "bn", "topo")), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("pta_view,balance", [("clean", 0.1)])  # the default; every view: test_reta_loss.py
def test_gradient_diagnostics_of_a_compiled_teacher_equal_the_eager_ones_and_leave_the_run_alone(pta_view, balance):
    """A compiled forward's backward runs once per step (a second pass through it gives wrong BN gradients in
    torch 2.13's inductor), so under compile each term's gradient is carried through an eager forward: the
    norms equal the eager run's, and the images are those of the compiled run without diagnostics."""
    eager_g, comp_g = [], []
    ref, _ = _engine_run(iterations=4, pta_view=pta_view, topo_balance=balance, diagnose=True, grads=eager_g)
    plain, _ = _engine_run(iterations=4, compile="default", pta_view=pta_view, topo_balance=balance)
    out, _ = _engine_run(iterations=4, compile="default", pta_view=pta_view, topo_balance=balance, diagnose=True,
                         grads=comp_g)
    assert torch.equal(out, plain)  # the diagnostics change nothing in the run
    assert float((out - ref).abs().max()) < 1e-3
    assert len(comp_g) == len(eager_g) == 2 and all(g["bn"] > 0 and g["ce"] > 0 and g["topo"] > 0 for g in comp_g)
    for a, b in zip(comp_g, eager_g):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-3 * abs(b[k]) for k in a), (a, b)


def test_gradient_diagnostics_leave_an_eager_run_alone():
    got = []
    assert torch.equal(_engine_run(iterations=4, diagnose=True, grads=got)[0], _engine_run(iterations=4)[0])
    assert len(got) == 2 and all(set(g) == {"ce", "bn", "topo"} and min(g.values()) > 0 for g in got)


def test_bf16_autocast_with_pta_on_the_clean_view_stays_close_to_fp32():
    ref, ref_h = _engine_run(pta_view="clean")
    aug, _ = _engine_run()
    assert not torch.equal(ref, aug)  # the clean view really changes the run
    start = normalised(torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3)))
    out, hist = _engine_run(amp="bf16", pta_view="clean")
    assert torch.isfinite(out).all()
    assert float((out - ref).abs().mean()) < 0.1 * float((ref - start).abs().mean())
    assert all(h["topo"] > 0 for h in hist) and hist[0]["bn"] != ref_h[0]["bn"]


# ---------------------------------------------------------------------------------------------
# PTA on each class's whole synthetic set: lockstep micro-batches and the feature bank

def _watch(crit, log):
    """Record, for every call of ``crit.terms``, the bank's state when PTA reads it and the point sets."""
    terms = crit.terms

    def spy(x, y, ids=None):
        before = (crit.bank.step, None if crit.bank.written is None else crit.bank.written.clone())
        out = terms(x, y, ids)
        lay = crit.last_layout
        log.append(dict(step=before[0], written=before[1], rows=lay.rows.clone(), live=lay.live_mask.clone(),
                        ids=ids.clone(), m=lay.m, classes=list(lay.classes)))
        return out

    crit.terms = spy


def test_every_pta_point_is_a_current_synthetic_image_at_imagenet_batch_shape():
    """100 classes, IPC 10, one image per class per micro-batch (ImageNet's batch structure): at every call
    each class's point set is all 10 of its images; each point is a live feature of this call or a banked
    feature at most one lockstep round (10 calls) old, and never a feature of an initial image once every
    micro-batch has had its first step."""
    C, ipc = 100, 10
    torch.manual_seed(0)
    t = rf.models.convnet_bn(num_classes=C, width=8, depth=2)
    t.train()
    with torch.no_grad():
        t(torch.randn(64, 3, 8, 8))
    t.eval()
    g = torch.Generator().manual_seed(1)
    real = torch.nn.functional.normalize(torch.randn(C, ipc, 8, generator=g), dim=-1)
    crit = rf.RETALoss(t, real_feats=real, k=4, topo_refresh=ipc)  # pairings once per round
    y = torch.arange(C).repeat(ipc)  # micro-batch j = images (c, j) of every class c
    ids = torch.arange(C).repeat(ipc) * ipc + torch.arange(ipc).repeat_interleave(C)
    x0 = torch.rand(C * ipc, 3, 8, 8, generator=g)
    with torch.no_grad():
        crit.seed_bank(rf.models.teacher_features(t, x0)[1], y, ids)
    log = []
    _watch(crit, log)
    cfg = rf.RecoverConfig(iterations=4, resolutions=(8, 8), drc=False, lr=0.05, jitter=1)
    rf.recover(crit, x0, y, ids, config=cfg, micro_batches=[list(range(j * C, (j + 1) * C)) for j in range(ipc)])
    assert len(log) == 4 * ipc
    for n, rec in enumerate(log):
        assert rec["m"] == ipc and rec["classes"] == list(range(C))
        point_ids = torch.tensor(crit.bank.ids)[rec["rows"]]  # [C, ipc]
        for c in (0, 57, 99):  # the class's whole set, each image once
            assert sorted(point_ids[c].tolist()) == list(range(c * ipc, (c + 1) * ipc))
        live_ids = set(rec["ids"].tolist())
        assert set(point_ids[rec["live"]].tolist()) == live_ids and int(rec["live"].sum()) == C
        banked = rec["written"][rec["rows"][~rec["live"]]]
        assert bool((banked >= rec["step"] - ipc).all())  # at most one round old
        if n >= ipc:
            assert bool((banked >= 0).all())  # written by a live forward of the current image, not seeded
    assert all(h["topo"] > 0 for h in cfg.history if "topo" in h)


def test_the_initial_image_bank_of_the_earlier_design_fails_that_check():
    """One micro-batch recovered alone with the rest of the class from initial images (pta_set="initial"):
    its banked points stay seeded (-1) for the whole batch."""
    C, ipc = 4, 5
    t = teacher(classes=C)
    g = torch.Generator().manual_seed(2)
    real = torch.nn.functional.normalize(torch.randn(C, ipc, 8, generator=g), dim=-1)
    crit = rf.RETALoss(t, real_feats=real, k=2)
    y = torch.arange(C).repeat(ipc)
    ids = torch.arange(C).repeat(ipc) * ipc + torch.arange(ipc).repeat_interleave(C)
    x0 = normalised(torch.rand(C * ipc, 3, 8, 8, generator=g))
    with torch.no_grad():
        crit.seed_bank(rf.models.teacher_features(t, x0)[1], y, ids)
    log = []
    _watch(crit, log)
    cfg = rf.RecoverConfig(iterations=3, resolutions=(8,), drc=False, lr=0.05, jitter=1)
    rf.recover(crit, x0[:C], y[:C], ids[:C], config=cfg)  # micro-batch 0 only
    assert all(bool((rec["written"][rec["rows"][~rec["live"]]] == -1).all()) for rec in log)


@pytest.mark.parametrize("margin", [0.0, 0.3, 0.99])
def test_do_no_harm_keeps_the_anchor_unless_the_retrieved_patch_is_clearly_better(tmp_path, margin):
    """drc_margin: the retrieved patch replaces the image's own anchor only where its score is lower by more
    than the margin; the injection diagnostics record how often the anchor came back."""
    t = teacher(classes=3)
    pool = rf.PatchPool.build(TinySet(per_class=(5, 4, 6)), t, tmp_path / "p", per_class=4, size=8,
                              resolutions=(8,), progress=False)
    crit = rf.RETALoss(t, lam_topo=0.0)
    anchors = torch.tensor([1, 5, 10])  # one pool patch of each image's class
    x0 = pool.images(anchors)
    y = torch.tensor([int(pool.labels[i]) for i in anchors])
    cfg = rf.RecoverConfig(iterations=2, resolutions=(8, 8), lr=1e-12, alpha=0.0, jitter=0, drc_margin=margin)
    out = rf.recover(crit, x0, y, pool=pool, config=cfg, anchor_ids=anchors)
    injected = next(h["retrieved"] for h in cfg.history if "retrieved" in h)
    plain = rf.RecoverConfig(iterations=2, resolutions=(8, 8), lr=1e-12, alpha=0.0, jitter=0)
    rf.recover(crit, x0, y, pool=pool, config=plain, anchor_ids=anchors)
    best = next(h["retrieved"] for h in plain.history if "retrieved" in h)
    feats, _, cx = pool.retrieval_tensors(8)
    q = torch.nn.functional.normalize(rf.models.teacher_features(t, x0)[1], dim=1)
    score = lambda i: float(0.9 * (q[n] - feats[i]).pow(2).sum() + 0.1 * cx[i])  # noqa: E731
    for n in range(3):
        better = score(best[n]) < (1 - margin) * score(int(anchors[n]))
        assert injected[n] == (best[n] if better else int(anchors[n]))
    assert_close(out, pool.images(injected), atol=1e-5, what="injected patch")
    drc = next(h["drc"] for h in cfg.history if "drc" in h)
    assert drc["own_anchor"] == pytest.approx(sum(i == int(a) for i, a in zip(injected, anchors)) / 3)
    if margin == 0.99:
        assert injected == anchors.tolist()
    with pytest.raises(ValueError, match="anchor_ids"):
        rf.recover(crit, x0, y, pool=pool, config=rf.RecoverConfig(iterations=2, resolutions=(8, 8), drc_margin=0.5))


def test_drc_connections_retrieve_only_where_listed_and_reinject_the_anchor_elsewhere(tmp_path):
    """drc_connections: DRC retrieves at the listed residual connections only; the others re-inject the
    image's static anchor (alpha 0 and a vanishing lr: each block's image is exactly what was injected)."""
    t = teacher(classes=3)
    pool = rf.PatchPool.build(TinySet(per_class=(5, 4, 6)), t, tmp_path / "p", per_class=4, size=8,
                              resolutions=(8,), progress=False)
    crit = rf.RETALoss(t, lam_topo=0.0)
    anchors = torch.tensor([1, 5, 10])
    x0, y = pool.images(anchors), torch.tensor([int(pool.labels[i]) for i in anchors])
    x0 = x0 + 0.01  # an anchor that no pool patch equals: re-injecting it is told apart from retrieving it

    def go(connections):
        cfg = rf.RecoverConfig(iterations=4, resolutions=(8,) * 4, lr=1e-12, alpha=0.0, jitter=0,
                               drc_connections=connections)
        out = rf.recover(crit, x0, y, pool=pool, config=cfg, anchor_ids=anchors)
        got = {h["block"]: h["retrieved"] for h in cfg.history if "retrieved" in h}
        assert sorted(h["block"] for h in cfg.history if "drc" in h) == sorted(got)  # diagnostics where it ran
        return out, got

    out, got = go([1])
    assert sorted(got) == [1] and torch.equal(out, x0)  # the last connection re-injected the anchor
    out, got = go([0, 2])
    assert sorted(got) == [0, 2] and torch.equal(out, pool.images(got[2]))
    every, got_all = go(None)
    listed, got_listed = go([0, 1, 2])
    assert sorted(got_all) == [0, 1, 2] and got_listed == got_all and torch.equal(listed, every)
    for bad, msg in (([], "non-empty list"), ([1, 1], "once each, in increasing order"), ([2, 0], "increasing"),
                     ([3], r"\(0 to 2\)"), ([-1], r"\(0 to 2\)"), ((True,), "non-empty list of connection indices")):
        with pytest.raises(ValueError, match=msg):
            rf.RecoverConfig(iterations=4, resolutions=(8,) * 4, drc_connections=bad).validate()
    with pytest.raises(ValueError, match=r"drc_connections schedules DRC, which this run does not use \(drc=False\)"):
        rf.RecoverConfig(iterations=4, resolutions=(8,) * 4, drc=False, drc_connections=[0]).validate()
    with pytest.raises(ValueError, match="with 1 there is no residual connection"):
        rf.RecoverConfig(iterations=4, resolutions=(8,), drc_connections=[0]).validate()


class _WeightRecorder:
    """A criterion with a ``lam_topo`` weight that records the weight each call sees."""

    def __init__(self, fail_at=None):
        self.lam_topo, self.seen, self.fail_at = 0.5, [], fail_at

    def __call__(self, x, y, ids=None):
        if len(self.seen) == self.fail_at:
            raise RuntimeError("criterion failed")
        self.seen.append(self.lam_topo)
        return x.pow(2).mean(), dict(ce=0.0, bn=0.0, topo=0.0)


def test_pta_view_clean_passes_the_images_as_they_are_to_the_criterion():
    x0 = normalised(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    y = torch.arange(2)
    seen = []

    def crit(x, y, ids=None, x_topo=None):
        seen.append(None if x_topo is None else x_topo.detach().clone())
        return x.pow(2).mean() + (0.0 if x_topo is None else x_topo.pow(2).mean()), dict(ce=0.0, bn=0.0, topo=0.0)

    rf.recover(crit, x0, y, config=rf.RecoverConfig(iterations=4, resolutions=(8,) * 4, drc=False))
    assert seen == [None] * 4  # the default: PTA on the augmented view, no second input
    seen.clear()
    out = rf.recover(crit, x0, y, config=rf.RecoverConfig(iterations=4, resolutions=(8,) * 4, drc=False,
                                                          pta_view="clean"))
    assert len(seen) == 4 and all(v.shape == x0.shape for v in seen)
    assert torch.equal(seen[0], x0)  # the first step sees the initial images themselves, not a crop of them
    assert not torch.equal(out, x0)
    with pytest.raises(ValueError, match="pta_view"):
        rf.RecoverConfig(iterations=4, resolutions=(8,) * 4, pta_view="cropped").validate()
    with pytest.raises(ValueError, match="pta_view='clean' needs a criterion that takes x_topo"):
        rf.recover(lambda x, y, ids=None: (x.pow(2).mean(), dict(ce=0.0, bn=0.0, topo=0.0)), x0, y,
                   config=rf.RecoverConfig(iterations=4, resolutions=(8,) * 4, drc=False, pta_view="clean"))


def test_pta_schedule_weighs_pta_only_from_its_block_on_and_restores_the_weight():
    x0 = normalised(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    y = torch.arange(2)
    crit = _WeightRecorder()
    rf.recover(crit, x0, y, config=rf.RecoverConfig(iterations=8, resolutions=(8,) * 4, drc=False, pta_from_block=2))
    assert crit.seen == [0.0] * 4 + [0.5] * 4 and crit.lam_topo == 0.5
    crit = _WeightRecorder()
    rf.recover(crit, x0, y, config=rf.RecoverConfig(iterations=8, resolutions=(8,) * 4, drc=False))
    assert crit.seen == [0.5] * 8  # the default: every block
    crit = _WeightRecorder(fail_at=1)
    with pytest.raises(RuntimeError, match="criterion failed"):
        rf.recover(crit, x0, y, config=rf.RecoverConfig(iterations=8, resolutions=(8,) * 4, drc=False,
                                                        pta_from_block=3))
    assert crit.lam_topo == 0.5  # restored when the loop fails too
    with pytest.raises(ValueError, match=r"pta_from_block must name one of the 4 blocks \(0 to 3\), got 4"):
        rf.RecoverConfig(iterations=8, resolutions=(8,) * 4, pta_from_block=4).validate()
    with pytest.raises(ValueError, match="pta_from_block needs a criterion with a lam_topo weight"):
        rf.recover(lambda x, y, ids=None: (x.pow(2).mean(), dict(ce=0.0, bn=0.0, topo=0.0)), x0, y,
                   config=rf.RecoverConfig(iterations=8, resolutions=(8,) * 4, drc=False, pta_from_block=1))


def test_the_history_holds_the_latest_call_and_a_reused_criterion_keeps_its_bank_until_reset():
    """Successive recover() calls may continue one set (the bank's other members are its images as they are now),
    so nothing is dropped between them; reset() forgets it, and a new set that reuses ids is refused by name."""
    t = teacher(classes=4)
    real = torch.nn.functional.normalize(torch.randn(4, 6, 8), dim=-1)
    crit = rf.RETALoss(t, real_feats=real, k=2)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(3)
    cfg = rf.RecoverConfig(iterations=2, resolutions=(8,), drc=False, jitter=1)
    rf.recover(crit, normalised(torch.rand(12, 3, 8, 8, generator=g)), y, torch.arange(12), config=cfg)
    assert len([h for h in cfg.history if "ce" in h]) == 2
    rf.recover(crit, normalised(torch.rand(12, 3, 8, 8, generator=g)), y, torch.arange(12, 24), config=cfg)
    assert len([h for h in cfg.history if "ce" in h]) == 2  # the latest call's record, not both
    assert sorted(crit.bank.ids) == list(range(24))  # the first call's images stay among their classes' points
    with pytest.raises(ValueError, match="call reset\\(\\) on the RETALoss first"):  # same ids, other classes
        rf.recover(crit, normalised(torch.rand(12, 3, 8, 8, generator=g)), y.roll(1), torch.arange(12), config=cfg)
    crit.reset()
    assert len(crit.bank) == 0
    rf.recover(crit, normalised(torch.rand(12, 3, 8, 8, generator=g)), y.roll(1), torch.arange(12), config=cfg)
    assert sorted(crit.bank.ids) == list(range(12))
