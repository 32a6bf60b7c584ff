"""Faults and hostile input across the library: bounded memory when streaming, symlink loops,
files edited by hand, disk-full writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reta_fast.fileio import atomic_write, read_json, write_json

STREAM = r"""
import resource, sys, torch
from reta_fast.models import convnet_bn
from reta_fast.train import accuracy

class OnTheFly:  # N images made on demand: nothing is held, so only the reader's own memory counts
    def __init__(self, n):
        self.n, self.targets, self.classes = n, [i % 10 for i in range(n)], [str(c) for c in range(10)]
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)), i % 10

torch.manual_seed(0)
acc = accuracy(convnet_bn(10, width=8, depth=2), OnTheFly(int(sys.argv[1])), size=64, batch_size=100)
assert 0 <= acc <= 100
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_kib(script: str, *args) -> int:
    """Peak RSS (KiB) that ``script`` prints as its last line, run in a fresh one-thread interpreter."""
    r = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streamed_evaluation_memory_stays_flat_as_the_data_grows():
    small, big = peak_kib(STREAM, 1000), peak_kib(STREAM, 8000)
    # holding the 8,000 images would take 8000 * 3 * 64 * 64 bytes = 94 MiB as uint8 (375 MiB as float)
    assert big - small < 40 * 1024, f"peak RSS grew by {(big - small) / 1024:.0f} MiB from 1,000 to 8,000 images"


def test_materialize_switches_to_streaming_above_the_memory_limit(monkeypatch):
    from reta_fast.data import sets as datasets

    class Tiny:
        targets, classes = [0, 1] * 5, ["a", "b"]

        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.full((3, 8, 8), i / 10), i % 2

    monkeypatch.setattr(datasets, "IN_MEMORY_LIMIT", 10 * 3 * 8 * 8)
    assert datasets.fits_in_memory(Tiny(), 8)
    monkeypatch.setattr(datasets, "IN_MEMORY_LIMIT", 10 * 3 * 8 * 8 - 1)
    assert not datasets.fits_in_memory(Tiny(), 8)
    got = list(datasets.iterate_batches(Tiny(), 4, 8))
    assert [b[0].shape[0] for b in got] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in got]), torch.tensor([0, 1] * 5))


def test_symlink_loops_do_not_hang_the_folder_reader(tmp_path):
    from PIL import Image

    from reta_fast.data import ImageFolder

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / c / "x.png")
    os.symlink(tmp_path, tmp_path / "a" / "loop")  # a/loop -> root -> a -> ...
    folder = ImageFolder(tmp_path)
    assert folder.classes == ["a", "b"] and len(folder) == 2


def test_hand_edited_json_is_refused_by_name(tmp_path):
    p = tmp_path / "run.json"
    write_json(p, {"a": 1})
    assert read_json(p) == {"a": 1}
    p.write_text('{"a": 1')  # truncated by an editor
    with pytest.raises(ValueError, match="run.json.*unreadable"):
        read_json(p, "run manifest")


def test_edited_run_manifest_makes_distill_refuse(tmp_path):
    pytest.importorskip("sklearn")
    from reta_fast import stages as P
    from reta_fast.data.sets import load_data
    from reta_fast.models import build_arch, Teacher

    data = load_data("digits")
    model, _ = build_arch("convnet", 10, 16)
    t = Teacher(model, "convnet", data.classes, 16, data.mean, data.std)
    out = tmp_path / "o"
    cfg = P.DistillConfig(method="random-real", ipc=1)
    P.distill(data, [t], out, cfg, progress=False)
    run = json.loads((out / "run.json").read_text())
    run["config"]["seed"] = 7
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(P.RunMismatch, match="seed"):
        P.distill(data, [t], out, cfg, progress=False)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_a_clean_error(tmp_path):
    """Writing to /dev/full fails with ENOSPC like a full disk: the error surfaces, nothing is left."""
    with open("/dev/full", "wb") as dev:
        with pytest.raises(OSError):
            dev.write(b"x" * 65536)
            dev.flush()

    def to_full(fh):
        with open("/dev/full", "wb") as dev:
            dev.write(b"x" * 65536)
            dev.flush()

    with pytest.raises(OSError):
        atomic_write(tmp_path / "f", to_full)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# stored soft labels: streamed to one file, read back by row ranges

def test_stored_logits_round_trip_and_refusals(tmp_path):
    from reta_fast.train.labels import StoredLogits, sidecar, write_logits

    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 7, generator=g) * 5 for n in (3, 8, 1, 8)]
    path = write_logits(tmp_path / "s.npy", iter(parts), rows=20, classes=7, meta=dict(seed=3, ids=[[0, 1]]))
    st = StoredLogits(path)
    full = torch.cat(parts).half()
    assert st.shape == (20, 7) and len(st) == 20 and st.meta["seed"] == 3 and st.meta["ids"] == [[0, 1]]
    assert torch.equal(st.read(), full) and torch.equal(st[5:13], full[5:13]) and st[19:40].shape == (1, 7)
    assert st[7:7].shape == (0, 7)
    assert np.array_equal(np.load(path), full.numpy())  # a plain .npy file
    with pytest.raises(TypeError, match="row ranges"):
        st[3]
    before, side = path.read_bytes(), sidecar(path).read_bytes()
    # a wrong row count, a batch of another width or a NaN stores nothing and keeps the old files
    for batches, rows, match in (([torch.zeros(4, 7)], 5, "4 rows, 5 were announced"),
                                 ([torch.zeros(6, 7)], 5, "6 rows, 5 were announced"),
                                 ([torch.zeros(4, 6)], 4, r"expected \[\*, 7\]"),
                                 ([torch.full((2, 7), float("nan"))], 2, "non-finite")):
        with pytest.raises(ValueError, match=match):
            write_logits(path, iter(batches), rows=rows, classes=7)
        assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]
        sidecar(path).write_bytes(side)  # (the sidecar is withdrawn before an array is replaced)
    # truncated, padded, foreign or empty arrays, and arrays without or against their sidecar, are refused
    for name, data in (("trunc", before[:-3]), ("long", before + b"\0\0"), ("foreign", b"PK\x03\x04" + before[4:]),
                       ("empty", b"")):
        (tmp_path / f"{name}.npy").write_bytes(data)
        (tmp_path / f"{name}.json").write_bytes(side)
        with pytest.raises(ValueError, match=name):
            StoredLogits(tmp_path / f"{name}.npy")
    (tmp_path / "alone.npy").write_bytes(before)
    with pytest.raises(ValueError, match="sidecar alone.json is missing"):
        StoredLogits(tmp_path / "alone.npy")
    (tmp_path / "other.npy").write_bytes(before)
    (tmp_path / "other.json").write_text('{"rows": 21, "classes": 7, "dtype": "float16"}')
    with pytest.raises(ValueError, match="altered"):
        StoredLogits(tmp_path / "other.npy")
    with pytest.raises(FileNotFoundError):
        StoredLogits(tmp_path / "missing.npy")


def test_student_trains_the_same_from_stored_logits_on_disk_or_in_memory(tmp_path):
    from reta_fast.train.labels import StoredLogits, write_logits
    from reta_fast.models import convnet_bn
    from reta_fast.train import relabel, relabel_batches, train_student

    torch.manual_seed(0)
    teacher = convnet_bn(4, width=8, depth=2).eval()
    images = torch.randn(12, 3, 16, 16)
    kw = dict(epochs=2, batch_size=5, seed=4)
    mem = relabel(teacher, images, **kw)
    assert torch.is_grad_enabled()
    path = write_logits(tmp_path / "l", relabel_batches(teacher, images, **kw), rows=24, classes=4)
    disk = StoredLogits(path)
    assert torch.equal(disk.read(), mem)

    def student_from(labels):
        torch.manual_seed(1)
        s = convnet_bn(4, width=8, depth=2)
        return train_student(s, None, images, soft_labels=labels, **kw).state_dict()

    a, b = student_from(mem), student_from(disk)
    assert all(torch.equal(a[k], b[k]) for k in a)


LABELS = r"""
import resource, sys, torch
from reta_fast.train.labels import StoredLogits, write_logits

rows, k = int(sys.argv[1]), 1000
def batches():  # 1,000-class logits made on demand, 2,000 rows at a time
    for a in range(0, rows, 2000):
        yield torch.randn(min(2000, rows - a), k, generator=torch.Generator().manual_seed(a))
path = write_logits(sys.argv[2], batches(), rows=rows, classes=k)
st, total = StoredLogits(path), 0.0
for a in range(0, rows, 2000):
    total += float(st[a:a + 2000].float().sum())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_stored_labels_memory_stays_flat_as_the_rows_grow(tmp_path):
    small, big = (peak_kib(LABELS, rows, tmp_path / f"l{rows}") for rows in (10_000, 80_000))
    assert (tmp_path / "l80000").stat().st_size > 80_000 * 2000
    # holding 80,000 x 1,000 fp16 logits would take 153 MiB (fp32 during a cat: 305 MiB more)
    assert big - small < 40 * 1024, f"peak RSS grew by {(big - small) / 1024:.0f} MiB from 10k to 80k rows"


POOL = r"""
import resource, sys, torch
from reta_fast.models import convnet_bn
from reta_fast.retrieval import PatchPool

class OnTheFly:  # no .targets: the builder must decode every image it visits to learn its class
    def __init__(self, n):
        self.n = n
    def __len__(self):
        return self.n
    def __getitem__(self, i):  # class 9 only on the last 20 images: filling it visits the whole set
        return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)), (9 if i >= self.n - 20 else i % 9)

torch.manual_seed(0)
n = int(sys.argv[1])
pool = PatchPool.build(OnTheFly(n), convnet_bn(10, width=8, depth=2).eval(), sys.argv[2], per_class=20, size=64,
                       resolutions=[32, 64], classes=[str(c) for c in range(10)], progress=False)
assert len(pool) == 200 and pool.manifest["dataset_size"] == n
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_pool_building_memory_stays_flat_as_the_data_grows(tmp_path):
    small, big = (peak_kib(POOL, n, tmp_path / f"pool{n}") for n in (1000, 8000))
    # the 8,000 decoded images would take 375 MiB as float (94 MiB as uint8)
    assert big - small < 40 * 1024, f"peak RSS grew by {(big - small) / 1024:.0f} MiB from 1,000 to 8,000 images"
