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


@pytest.mark.slow
def test_streamed_evaluation_memory_stays_flat_as_the_data_grows():
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def peak_kib(n):
        r = subprocess.run([sys.executable, "-c", STREAM, str(n)], capture_output=True, text=True, env=env,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.strip().splitlines()[-1])

    small, big = peak_kib(1000), peak_kib(8000)
    # holding the 8,000 images would take 8000 * 3 * 64 * 64 bytes = 94 MiB as uint8 (375 MiB as float)
    assert big - small < 40 * 1024, f"peak RSS grew by {(big - small) / 1024:.0f} MiB from 1,000 to 8,000 images"


def test_materialize_switches_to_streaming_above_the_memory_limit(monkeypatch):
    from reta_fast import datasets

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
    from reta_fast import pipeline as P
    from reta_fast.datasets import load_data
    from reta_fast.teachers import build_arch, Teacher

    data = load_data("digits")
    model, _ = build_arch("convnet", 10, 16)
    t = Teacher(model, "convnet", data.classes, 16, data.mean, data.std)
    out = tmp_path / "o"
    cfg = P.DistillConfig(method="random-real", ipc=1)
    P.distill(data, [t], out, cfg, progress=False, log=lambda m: None)
    run = json.loads((out / "run.json").read_text())
    run["config"]["seed"] = 7
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(P.RunMismatch, match="seed"):
        P.distill(data, [t], out, cfg, progress=False, log=lambda m: None)


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
