"""PatchPool: build, disk round trip, reuse, refusal of foreign pools, corrupt input, retrieval."""
import os
import warnings

import numpy as np
import pytest
import torch

import reta_fast as rf
from conftest import assert_close


class TinySet:
    """A torchvision-style data set of random tensor images of varying size."""

    def __init__(self, per_class=(5, 3, 7), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.targets = [c for c, n in enumerate(per_class) for _ in range(n)]
        self.images = [torch.rand(3, 10 + (i % 5), 12, generator=g) for i in range(len(self.targets))]
        self.classes = [f"c{c}" for c in range(len(per_class))]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def teacher(seed=0, classes=3):
    torch.manual_seed(seed)
    return rf.models.convnet_bn(num_classes=classes, width=8, depth=2).eval()


def test_build_round_trip_and_contents(tmp_path):
    ds, t = TinySet(), teacher()
    pool = rf.PatchPool.build(ds, t, tmp_path / "p", per_class=4, size=8, resolutions=(8, 6), batch_size=3, progress=False)
    assert len(pool) == 4 + 3 + 4  # class 1 has only 3 images
    assert np.bincount(pool.labels).tolist() == [4, 3, 4]
    assert pool.patches.shape == (11, 8, 8, 3) and pool.patches.dtype == np.uint8
    assert pool.complexity.shape == (11, 2)
    assert [ds.targets[i] for i in pool.source_index] == pool.labels.tolist()
    assert (np.diff(pool.labels) >= 0).all()  # stored class-sorted
    # features and complexity describe exactly the stored uint8 patches
    x = pool.images(range(len(pool)))
    with torch.no_grad():
        f = torch.nn.functional.normalize(t.features(x), dim=1)
    assert_close(torch.tensor(np.asarray(pool.feats)), f, atol=1e-5, what="features")
    raw = pool.images(range(len(pool)), normalize=False)
    assert_close(torch.tensor(np.asarray(pool.complexity[:, 0])), rf.patch_complexity(raw), atol=1e-6, rtol=1e-5,
                 what="complexity")
    again = rf.PatchPool.load(tmp_path / "p", teacher=t, classes=ds.classes)
    assert np.array_equal(again.feats, pool.feats) and again.manifest["teacher"] == pool.manifest["teacher"]
    assert pool.manifest["images_per_second"] > 0
    assert not any(n.startswith(".p.tmp") for n in os.listdir(tmp_path))


def test_build_reuses_an_existing_pool_and_refuses_other_folders(tmp_path):
    ds, t = TinySet(), teacher()
    kw = dict(per_class=2, size=8, resolutions=(8,), progress=False)
    a = rf.PatchPool.build(ds, t, tmp_path / "p", **kw)
    mtime = os.path.getmtime(tmp_path / "p" / "feats.npy")
    b = rf.PatchPool.build(ds, t, tmp_path / "p", **kw)
    assert os.path.getmtime(tmp_path / "p" / "feats.npy") == mtime and np.array_equal(a.feats, b.feats)
    with pytest.raises(ValueError, match="other parameters"):
        rf.PatchPool.build(ds, t, tmp_path / "p", **{**kw, "per_class": 3})
    with pytest.raises(ValueError, match="built for teacher"):
        rf.PatchPool.build(ds, teacher(seed=1), tmp_path / "p", **kw)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a patch pool"):
        rf.PatchPool.build(ds, t, tmp_path / "mine", **kw)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_load_refuses_foreign_or_damaged_pools(tmp_path):
    ds, t = TinySet(), teacher()
    rf.PatchPool.build(ds, t, tmp_path / "p", per_class=3, size=8, resolutions=(8,), progress=False)
    with pytest.raises(ValueError, match="built for teacher"):
        rf.PatchPool.load(tmp_path / "p", teacher=teacher(seed=2))
    with pytest.raises(ValueError, match="class order"):
        rf.PatchPool.load(tmp_path / "p", classes=["c1", "c0", "c2"])
    with pytest.raises(FileNotFoundError, match="not a patch pool"):
        rf.PatchPool.load(tmp_path)
    # a truncated array
    f = tmp_path / "p" / "feats.npy"
    data = f.read_bytes()
    f.write_bytes(data[:-7])
    with pytest.raises(ValueError, match="truncated or modified"):
        rf.PatchPool.load(tmp_path / "p")
    f.write_bytes(data)
    # an edited label (same size): the checksum catches it
    lab = np.load(tmp_path / "p" / "labels.npy")
    lab[0] = (lab[0] + 1) % 3
    np.save(tmp_path / "p" / "labels.npy", lab)
    with pytest.raises(ValueError, match="checksum"):
        rf.PatchPool.load(tmp_path / "p")
    # a manifest edited into nonsense
    (tmp_path / "p" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        rf.PatchPool.load(tmp_path / "p")


def test_best_of_n_crops_are_deterministic_and_retrieval_accepts_a_pool(tmp_path):
    ds, t = TinySet(), teacher()
    kw = dict(per_class=3, size=8, resolutions=(8,), candidates=4, seed=3, progress=False)
    a = rf.PatchPool.build(ds, t, tmp_path / "a", **kw)
    b = rf.PatchPool.build(ds, t, tmp_path / "b", **kw)
    assert np.array_equal(a.patches, b.patches)
    feats, labels, comp = a.retrieval_tensors()
    assert float(comp.min()) >= 0 and float(comp.max()) <= 1
    q = torch.nn.functional.normalize(torch.randn(5, feats.shape[1]), dim=1)
    ql = torch.tensor([0, 1, 2, 0, 1])
    got = rf.retrieve(q, ql, a)
    assert torch.equal(got, rf.retrieve_ref(q, ql, feats, labels, comp))
    with pytest.raises(ValueError, match="resolution 16 not in"):
        a.retrieval_tensors(16)
    # raw (unnormalised) features against the pool's unit-norm ones: the fit term would swamp lam's
    with pytest.raises(ValueError, match=r"query_feats are not L2-normalised \(\|‖q‖² − 1\| up to [0-9.e+]+\) "
                                         r"while the PatchPool's features are"):
        rf.retrieve(q * 7, ql, a)


def test_image_folder_with_a_corrupt_file(tmp_path):
    from PIL import Image

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("n01", "n02"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "n02" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "n01" / "readme.txt").write_text("ignored: not an image")
    t = teacher(classes=2)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        pool = rf.PatchPool.build(str(root), t, tmp_path / "p", per_class=5, size=8, resolutions=(8,), progress=False)
    assert pool.classes == ["n01", "n02"] and np.bincount(pool.labels).tolist() == [3, 3]
    assert pool.manifest["skipped_images"] == 1
    # a broken file is replaced by another image of its class when one is left
    for seed in range(4):
        with warnings.catch_warnings():  # whether the broken file is met at all depends on the seed
            warnings.simplefilter("ignore", RuntimeWarning)
            p = rf.PatchPool.build(str(root), t, tmp_path / f"s{seed}", per_class=3, size=8, resolutions=(8,),
                                   seed=seed, progress=False)
        assert np.bincount(p.labels).tolist() == [3, 3]
    with pytest.raises(ValueError, match="built from data set"):
        rf.PatchPool.build(TinySet(per_class=(2, 2)), t, tmp_path / "p", per_class=5, size=8, resolutions=(8,),
                           progress=False, classes=["n01", "n02"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rf.ImageFolder(tmp_path / "nowhere")


def test_build_bad_arguments(tmp_path):
    ds, t = TinySet(), teacher()
    with pytest.raises(ValueError, match="per_class"):
        rf.PatchPool.build(ds, t, tmp_path / "p", per_class=0, progress=False)
    with pytest.raises(ValueError, match="resolutions"):
        rf.PatchPool.build(ds, t, tmp_path / "p", resolutions=(), progress=False)
    with pytest.raises(ValueError, match="no nn.Linear head"):
        rf.PatchPool.build(ds, torch.nn.Conv2d(3, 3, 1), tmp_path / "p", progress=False)

    class Rgba(TinySet):
        def __getitem__(self, i):
            return torch.rand(4, 9, 9), self.targets[i]

    with pytest.raises(ValueError, match="dataset item .*1 or 3 channels"):
        rf.PatchPool.build(Rgba(), t, tmp_path / "p", progress=False)
    assert os.listdir(tmp_path) == []  # nothing left behind, not even a temporary folder


def test_float_images_outside_0_1_are_refused_by_name():
    """An already normalised (ToTensor + Normalize) or a [0, 255] float image would be clamped to [0, 1] and
    normalised again: wrong patches, features and complexities without a word. Refused instead."""
    from reta_fast.data import to_image_tensor

    ok = torch.rand(3, 8, 8)
    assert torch.equal(to_image_tensor(ok), ok)
    assert to_image_tensor(torch.full((8, 8), 255, dtype=torch.uint8)).max() == 1
    for bad in ((ok - 0.5) / 0.25, ok * 255):
        with pytest.raises(ValueError, match=r"a float image has values in \[.*\]: images must be in \[0, 1\]"):
            to_image_tensor(bad)
