"""Teacher training, accuracy and the student protocol on the embedded digits data set."""
import pytest
import torch

import reta_fast as rf
from reta_fast import train as T

pytest.importorskip("sklearn")
NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def digits():
    return T.digits_dataset("train", size=16), T.digits_dataset("test", size=16)


@pytest.fixture(scope="module")
def teacher(digits):
    tr, _ = digits
    model = rf.models.convnet_bn(num_classes=10, width=32, depth=2)
    return T.train_classifier(model, tr, epochs=12, batch_size=64, lr=0.05, flip=False, **NORM)


def test_digits_split_is_stratified_and_disjoint(digits):
    tr, te = digits
    assert len(tr) + len(te) == 1797 and len(te) == pytest.approx(0.2 * 1797, abs=10)
    assert tr.images.shape[1:] == (3, 16, 16) and float(tr.images.max()) <= 1.0
    counts = torch.bincount(torch.tensor(te.targets), minlength=10)
    assert counts.min() >= 33  # every class in the test split
    with pytest.raises(ValueError, match="split"):
        T.digits_dataset("val")


def test_teacher_learns_digits(digits, teacher):
    _, te = digits
    assert T.accuracy(teacher, te, **NORM) > 85.0


def test_accuracy_on_an_empty_set_is_an_error_not_zero(digits, teacher):
    _, te = digits
    empty = torch.utils.data.Subset(te, [])
    with pytest.raises(ValueError, match="evaluation set is empty"):
        T.accuracy(teacher, empty, size=16, **NORM)


def test_student_on_a_small_real_subset_beats_chance_and_an_untrained_net(digits, teacher):
    tr, te = digits
    x, y = tr.tensors()
    idx = torch.cat([(y == c).nonzero().flatten()[:10] for c in range(10)])  # 10 images per class
    images = (x[idx] - 0.5) / 0.25
    untrained = rf.models.convnet_bn(num_classes=10, width=32, depth=2)
    base = T.accuracy(untrained, te, **NORM)
    student = T.train_student(rf.models.convnet_bn(num_classes=10, width=32, depth=2), teacher, images,
                              epochs=150, batch_size=50, lr=1e-2, crop_scale=(0.5, 1.0), flip=False)
    acc = T.accuracy(student, te, **NORM)
    assert acc > 50.0 and acc > base + 20


DDP_SCRIPT = r"""
import sys, torch
import torch.distributed as dist
from torch import nn
from reta_fast.train import TensorImageDataset, accuracy, train_student, relabel

if len(sys.argv) > 2:
    dist.init_process_group("gloo")
torch.manual_seed(0)
def net():  # no BatchNorm: with it, CPU ranks would normalise with their own share's statistics
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))
teacher = net().eval()
g = torch.Generator().manual_seed(1)
images = torch.randn(16, 3, 12, 12, generator=g)  # batches of 5 (shares of 2 and 3) and a last one of 1 < world
kw = dict(epochs=3, batch_size=5, lr=1e-2, seed=2)
torch.manual_seed(3)
online = train_student(net(), teacher, images, **kw)
torch.manual_seed(3)
stored = train_student(net(), None, images, soft_labels=relabel(teacher, images, epochs=3, batch_size=5, seed=2), **kw)
val = TensorImageDataset(torch.rand(37, 3, 12, 12, generator=g), [i % 5 for i in range(37)], list("abcde"))
acc = accuracy(online, val, size=12)
torch.manual_seed(4)  # with BatchNorm: every rank must end with the same statistics (it scores with them)
bn = train_student(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, 5)), teacher, images[:15], **kw)  # last batch shared
rank = dist.get_rank() if dist.is_initialized() else 0
torch.save(bn.state_dict(), sys.argv[1] + f".bn{rank}")
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save(dict(online=online.state_dict(), stored=stored.state_dict(), acc=acc), sys.argv[1])
if dist.is_initialized():  # leave together: a rank tearing gloo down while another still uses it aborts
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_student_on_two_gloo_ranks_equals_one_process(tmp_path):
    """train_student under torchrun (2 CPU ranks, gloo, DDP): each rank takes its share of every batch,
    the averaged gradient is the whole batch's, so the student equals the one-process student; the
    sharded validation accuracy equals the one-process accuracy."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path / "two.pt"), "ddp"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 and "terminate called without an active exception" in r.stderr:
        # gloo's teardown on 2 busy cores once aborted a rank (std::terminate in its background thread) after the
        # barrier that ends the script: torch's shutdown, not this code. Run once more, from scratch; a second
        # failure, or any other, fails the test.
        for f in tmp_path.glob("two.pt*"):
            f.unlink()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for which in ("online", "stored"):
        for k, v in one[which].items():
            torch.testing.assert_close(two[which][k], v, atol=2e-5, rtol=1e-4, msg=f"{which} {k}")
    assert two["acc"] == one["acc"]
    r0, r1 = (torch.load(tmp_path / f"two.pt.bn{r}") for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # the ranks score one and the same student


def test_distributed_true_without_a_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="process group"):
        T.dist_world(True)
    assert T.dist_world() == (0, 1) and T.dist_world(False) == (0, 1)


def test_uint8_images_train_the_same_student_as_normalised_floats():
    """evaluate/relabel keep the distilled set as uint8 (a quarter of the memory) and normalise batch by
    batch: the same batches, labels and student, bit for bit, as normalising the whole set first."""
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (11, 3, 10, 10), generator=g, dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    x = T.normalise_pixels(u8, mean, std)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x[3, 1], (u8[3, 1].float() / 255 - 0.5) / 0.25)
    kw = dict(epochs=2, batch_size=4, seed=5)
    a = list(T.student_batches(x, **kw))
    b = list(T.student_batches(u8, mean=mean, std=std, **kw))
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and len(a) == len(b) == 6
    with pytest.raises(ValueError, match="mean and std"):
        next(T.student_batches(u8, **kw))

    def student(images, **extra):
        torch.manual_seed(1)
        teacher = rf.models.convnet_bn(3, width=8, depth=2).eval()
        torch.manual_seed(2)
        return T.train_student(rf.models.convnet_bn(3, width=8, depth=2), teacher, images, **kw, **extra).state_dict()

    s1, s2 = student(x), student(u8, mean=mean, std=std)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
