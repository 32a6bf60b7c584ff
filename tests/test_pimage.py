"""Persistence images: separable evaluation against the direct [m, R, R] sum and against GUDHI."""
import numpy as np
import pytest
import torch

import reta_fast as rf
from conftest import assert_close


def _diagram(m, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    b = torch.rand(m, generator=g, dtype=dtype) * 0.8
    return torch.stack([b, b + torch.rand(m, generator=g, dtype=dtype) * 0.7], 1)


@pytest.mark.parametrize("m,res", [(1, 2), (17, 9), (200, 32)])
@pytest.mark.parametrize("birth", [(0.0, 1.0), None])
def test_matches_direct_evaluation(m, res, birth):
    d = _diagram(m, m)
    kw = dict(resolution=res, pers_range=(0.0, 0.9), birth_range=birth, sigma=0.07, p_max=0.6)
    assert_close(rf.persistence_image(d, **kw), rf.persistence_image_ref(d, **kw), atol=1e-10, what="image")
    ours32 = rf.persistence_image(d.float(), **kw)
    assert ours32.dtype == torch.float32
    assert_close(ours32, rf.persistence_image_ref(d, **kw), atol=1e-4, rtol=1e-4, what="fp32 image")


def test_matches_gudhi_persistence_image():
    from gudhi.representations import PersistenceImage

    d = _diagram(50, 0)
    res, sigma, pmax = 16, 0.05, 0.5
    pi = PersistenceImage(
        bandwidth=sigma, resolution=[res, res], im_range=[0.0, 1.0, 0.0, 0.9],
        weight=lambda p: min(max(p[1] / pmax, 0.0), 1.0),
    )
    theirs = pi.fit_transform([d.numpy()])[0].reshape(res, res)
    ours = rf.persistence_image(d, res, pers_range=(0.0, 0.9), birth_range=(0.0, 1.0), sigma=sigma, p_max=pmax)
    assert_close(ours, torch.from_numpy(theirs), atol=1e-9, rtol=1e-9, what="vs GUDHI")


def test_batched_equals_one_by_one_and_empty_diagrams():
    ds = [_diagram(m, m + 1) for m in (5, 0, 12)]
    off = torch.tensor(np.cumsum([0] + [len(d) for d in ds]))
    flat = torch.cat(ds)
    for birth in ((0.0, 1.0), None):
        batch = rf.persistence_image(flat, 8, birth_range=birth, offsets=off)
        for i, d in enumerate(ds):
            assert_close(batch[i], rf.persistence_image(d, 8, birth_range=birth), atol=1e-12, what=f"diagram {i}")
    assert batch[1].abs().sum() == 0


def test_gradcheck_float64():
    d = _diagram(6, 9).requires_grad_()
    fn = lambda x: rf.persistence_image(x, 5, pers_range=(0.0, 0.9), sigma=0.2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (d,))
    off = torch.tensor([0, 2, 6])
    fnb = lambda x: rf.persistence_image(x, 5, pers_range=(0.0, 0.9), sigma=0.2, offsets=off)  # noqa: E731
    assert torch.autograd.gradcheck(fnb, (d,))


def test_bad_arguments():
    d = _diagram(4, 0)
    with pytest.raises(ValueError, match="diagram"):
        rf.persistence_image(d[:, :1])
    with pytest.raises(TypeError, match="diagram"):
        rf.persistence_image(d.long())
    with pytest.raises(ValueError, match="NaN"):
        rf.persistence_image(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match="pers_range"):
        rf.persistence_image(d, pers_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="resolution"):
        rf.persistence_image(d, resolution=1)
    with pytest.raises(ValueError, match="sigma"):
        rf.persistence_image(d, sigma=0.0)
