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
