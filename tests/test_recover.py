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
