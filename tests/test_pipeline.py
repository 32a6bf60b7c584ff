"""The distillation pipeline end to end on tiny data: data sets, teachers, every --method, outputs,
resume, sharding, refusal of foreign folders, bad input, relabel/evaluate and the report."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

from reta_fast import cli  # noqa: E402
from reta_fast import stages as P  # noqa: E402
from reta_fast.data.sets import load_data, materialize  # noqa: E402
from reta_fast.fileio import atomic_write  # noqa: E402
from reta_fast.models import Teacher, load_teacher  # noqa: E402
from reta_fast.stages.squeeze import squeeze  # noqa: E402

TINY = dict(ipc=3, iterations=4, blocks=2, pool_per_class=8, points_per_class=6, topo_k=2)


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    old = os.environ.get("RETA_FAST_CACHE")
    os.environ["RETA_FAST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("RETA_FAST_CACHE")
    else:
        os.environ["RETA_FAST_CACHE"] = old


@pytest.fixture(scope="module")
def data():
    return load_data("digits")


@pytest.fixture(scope="module")
def teacher(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "t.pt"
    return squeeze(data, epochs=4, out=path, progress=False)


def run(data, teacher, out, **kw):
    cfg = P.DistillConfig(**{**TINY, **kw})
    return P.distill(data, [teacher], out, cfg, progress=False, pool_dir=Path(out).parent / f"pool-{teacher.name}")


def png_bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(Path(out, "images").rglob("*.png"))}


# ---------------------------------------------------------------------------------------------
# data and teachers

def make_folder(root: Path, per_class=6, classes=("a", "b", "c"), size=12, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = (rng.random((size, size + 4, 3)) * 60 + 60 * ci).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"img {i} é.png")
    return root


def test_load_data_folder_layouts_and_errors(tmp_path):
    make_folder(tmp_path / "ds" / "train")
    make_folder(tmp_path / "ds" / "val", per_class=2)
    d = load_data(str(tmp_path / "ds"))
    assert d.classes == ["a", "b", "c"] and len(d.train) == 18 and len(d.val) == 6 and d.size == 12
    flat = load_data(str(make_folder(tmp_path / "flat", per_class=10)), seed=1)
    assert len(flat.train) + len(flat.val) == 30 and len(flat.val) == 3 and flat.notes
    assert set(flat.train.indices).isdisjoint(flat.val.indices)
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        load_data(str(tmp_path / "missing"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        load_data(str(tmp_path / "file.txt"))
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(ValueError, match="without any image"):
        load_data(str(tmp_path / "flat"))
    make_folder(tmp_path / "bad" / "train")
    make_folder(tmp_path / "bad" / "val", classes=("a", "b", "x"))
    with pytest.raises(ValueError, match="class order"):
        load_data(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="size"):
        load_data("digits", size=3)


def test_corrupt_and_non_image_files_are_skipped_with_a_count(tmp_path):
    root = make_folder(tmp_path / "ds", per_class=4)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "b" / "empty.jpg").write_bytes(b"")
    (root / "c" / "notes.txt").write_text("not an image")
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "c" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated mid-stream
    d = load_data(str(root), val=str(root), size=8)
    with pytest.warns(RuntimeWarning, match="3 unreadable"):
        mem, skipped = materialize(d.train, 8)
    assert skipped == 3 and len(mem) == 12 and mem.images.shape[1:] == (3, 8, 8)


def test_teacher_checkpoint_round_trip_and_refusals(data, teacher, tmp_path):
    t2 = load_teacher(teacher.path, data)
    x = torch.randn(4, 3, data.size, data.size)
    with torch.no_grad():
        assert torch.equal(teacher.model(x), t2.model(x))
    assert t2.accuracy == pytest.approx(teacher.accuracy) and t2.classes == data.classes
    other = load_data("digits", size=20)
    with pytest.raises(ValueError, match="px"):
        load_teacher(teacher.path, other)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable or not a reta_fast teacher"):
        load_teacher(tmp_path / "junk.pt", data)
    with pytest.raises(FileNotFoundError):
        load_teacher(tmp_path / "nope.pt", data)


# ---------------------------------------------------------------------------------------------
# distill

@pytest.mark.parametrize("method", P.METHODS)
def test_every_method_writes_a_complete_imagefolder(data, teacher, tmp_path, method):
    out = tmp_path / method
    info = run(data, teacher, out, method=method)
    assert info["written"] == 30
    files = sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*"))
    expect = sorted([f"new{c:03d}" for c in range(10)]
                    + [f"new{c:03d}/class{c:03d}_id{i:03d}.png" for c in range(10) for i in range(3)])
    assert files == expect
    assert json.loads((out / "classes.json").read_text())["classes"] == data.classes
    run_manifest = json.loads((out / "run.json").read_text())
    assert run_manifest["method"] == method and run_manifest["config"]["seed"] == 0
    x, y, ids = P.load_distilled(out, data.classes, data.mean, data.std, data.size)
    assert x.shape == (30, 3, 16, 16) and torch.bincount(y).tolist() == [3] * 10
    assert not list(out.rglob("*.tmp")), "no temporary file may be left behind"
    if method in ("rded", "fadrm", "reta"):  # real-patch initialisations differ within a class
        assert len({bytes(v) for v in (x[y == 0].numpy() * 1000).astype(np.int32)}) == 3


def test_same_seed_same_images_and_resume_after_interruption(data, teacher, tmp_path):
    full = tmp_path / "full"
    run(data, teacher, full, method="reta")
    ref = png_bytes(full)

    class Stop(Exception):
        pass

    written = []

    def stop_after_12(c, i):
        written.append((c, i))
        if len(written) == 12:
            raise Stop

    part = tmp_path / "part"
    with pytest.raises(Stop):
        P.distill(data, [teacher], part, P.DistillConfig(**{**TINY, "method": "reta"}), progress=False, pool_dir=tmp_path / f"pool-{teacher.name}", on_item=stop_after_12)
    assert len(png_bytes(part)) == 12
    info = run(data, teacher, part, method="reta")
    assert info["written"] == 18
    assert png_bytes(part) == ref, "a resumed run must equal an uninterrupted one, image for image"
    again = run(data, teacher, part, method="reta")
    assert again["written"] == 0 and png_bytes(part) == ref


def test_ipc_slices_and_rank_shards_union_equals_one_run(data, teacher, tmp_path):
    kw = dict(method="reta", ipc_per_batch=1)
    run(data, teacher, tmp_path / "one", **kw)
    ref = png_bytes(tmp_path / "one")
    run(data, teacher, tmp_path / "sl", ipc_start=0, ipc_end=1, **kw)
    run(data, teacher, tmp_path / "sl", ipc_start=1, **kw)
    assert png_bytes(tmp_path / "sl") == ref
    for r in range(2):
        P.distill(data, [teacher], tmp_path / "sh", P.DistillConfig(**{**TINY, **kw}), progress=False, pool_dir=tmp_path / f"pool-{teacher.name}", rank=r, world_size=2)
    assert png_bytes(tmp_path / "sh") == ref


def test_other_configuration_is_refused_and_nothing_is_touched(data, teacher, tmp_path):
    out = tmp_path / "o"
    run(data, teacher, out, method="rded")
    before = png_bytes(out)
    with pytest.raises(P.RunMismatch, match="method"):
        run(data, teacher, out, method="reta")
    with pytest.raises(P.RunMismatch, match="iterations"):
        run(data, teacher, out, method="rded", iterations=5)
    manifest = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(dict(manifest, format=1)))  # a folder of an earlier reta_fast
    with pytest.raises(P.RunMismatch, match="run format 1"):
        run(data, teacher, out, method="rded")
    assert png_bytes(out) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(P.RunMismatch, match="not a reta output folder"):
        run(data, teacher, foreign, method="rded")
    assert (foreign / "thesis.tex").read_text() == "precious" and not (foreign / "images").exists()


def test_ipc_larger_than_the_class_is_refused(data, teacher, tmp_path):
    with pytest.raises(ValueError, match="IPC 9 is larger than"):
        run(data, teacher, tmp_path / "a", method="rded", ipc=9)
    with pytest.raises(ValueError, match="IPC 500 is larger than class"):
        run(data, teacher, tmp_path / "b", method="random-real", ipc=500)


def test_bad_config_values_are_named(data, teacher, tmp_path):
    for kw, msg in ((dict(method="magic"), "method"), (dict(ipc=0), "ipc"), (dict(ipc_start=3), "ipc_start"),
                    (dict(lr=float("nan")), "lr"), (dict(method="fadrm", drc=False), "ablations of reta")):
        with pytest.raises(ValueError, match=msg):
            run(data, teacher, tmp_path / "x", **kw)


class _NaNNet(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x) * float("nan")


def test_a_broken_teacher_stops_with_a_clear_error_and_writes_nothing(data, teacher, tmp_path):
    broken = Teacher(_NaNNet(teacher.model), "broken", data.classes, data.size, data.mean, data.std)
    with pytest.raises(FloatingPointError, match="not finite"):
        run(data, broken, tmp_path / "nan", method="sre2l")
    assert not list((tmp_path / "nan").rglob("*.png"))


def test_atomic_write_leaves_old_file_or_nothing(tmp_path):
    target = tmp_path / "f.bin"

    def boom(fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, boom)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    atomic_write(target, lambda fh: fh.write(b"v1"))
    with pytest.raises(OSError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"v1" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# ---------------------------------------------------------------------------------------------
# relabel / evaluate / report

def test_stored_soft_labels_replay_the_online_stream(data, teacher, tmp_path):
    out = tmp_path / "r"
    run(data, teacher, out, method="rded")
    ecfg = P.EvalConfig(epochs=2, batch_size=8, seeds=(0,), labels="stored")
    P.relabel_stage(data, teacher, out, ecfg, progress=False)
    from reta_fast.train.labels import StoredLogits

    stored = StoredLogits(out / "labels" / "seed0.npy").read()
    assert np.array_equal(np.load(out / "labels" / "seed0.npy"), stored.numpy())  # numpy alone reads them
    x, _, _ = P.load_distilled(out, data.classes, data.mean, data.std)
    from reta_fast.train import student_batches

    with torch.no_grad():
        online = torch.cat([teacher.model(b) for b in student_batches(x, 2, 8, flip=False, seed=0)])
    assert stored.dtype == torch.float16 and stored.shape == online.shape == (60, 10)
    torch.testing.assert_close(stored.float(), online, atol=2e-2, rtol=1e-2)
    export = torch.load(out / "export.pt", weights_only=False)
    assert export["images"].dtype == torch.uint8 and export["images"].shape == (30, 3, 16, 16)
    res = P.evaluate(data, teacher, out, ecfg, progress=False)
    assert 0 <= res["distilled"]["mean"] <= 100 and res["random_real"] is not None
    quiet = dict(progress=False)
    # every thing the stored labels depend on is checked, by name, before any training
    for cfg, match in ((P.EvalConfig(epochs=3, batch_size=8, labels="stored"), "settings .*'epochs': 2"),
                       (P.EvalConfig(epochs=2, batch_size=8, labels="stored", crop_scale=(0.5, 1.0)), "crop_scale"),
                       (P.EvalConfig(epochs=2, batch_size=8, labels="stored", cutmix=False), "cutmix")):
        with pytest.raises(ValueError, match=f"do not match this evaluation.*{match}"):
            P.evaluate(data, teacher, out, cfg, **quiet)
    other = Teacher(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)), "linear", data.classes, 16, data.mean,
                    data.std)
    with pytest.raises(ValueError, match="another teacher"):
        P.evaluate(data, other, out, ecfg, **quiet)
    import copy

    no_val = copy.copy(data)
    no_val.val = torch.utils.data.Subset(data.val, [])
    with pytest.raises(ValueError, match="evaluation split .* is empty"):  # not 0 % on nothing
        P.evaluate(no_val, teacher, out, ecfg, **quiet)
    for ext in ("npy", "json"):
        (out / "labels" / f"seed0.{ext}").rename(out / "labels" / f"seed1.{ext}")
    with pytest.raises(ValueError, match="seed 0 vs 1"):
        P.evaluate(data, teacher, out, P.EvalConfig(epochs=2, batch_size=8, seeds=(1,), labels="stored"), **quiet)
    for ext in ("npy", "json"):
        (out / "labels" / f"seed1.{ext}").rename(out / "labels" / f"seed0.{ext}")
    P.item_path(out, 3, 2).rename(P.item_path(out, 3, 7))  # the set changed since relabel
    with pytest.raises(ValueError, match="other images"):
        P.evaluate(data, teacher, out, ecfg, ipc=2, **quiet)
    P.item_path(out, 3, 7).rename(P.item_path(out, 3, 2))
    # labels of an older version are never unpickled: a clear error instead
    legacy = dict(logits=stored, epochs=2, batch_size=8, seed=0, n=30, crop_scale=[0.08, 1.0], cutmix=True)
    (out / "labels" / "seed0.npy").unlink()
    torch.save(legacy, out / "labels" / "seed0.pt")
    with pytest.raises(FileNotFoundError, match="seed0.pt was written by an older reta_fast"):
        P.evaluate(data, teacher, out, ecfg, **quiet)
    # the stored arrays are plain numpy: np.load reads them
    assert (out / "labels" / "seed0.json").is_file()


def test_evaluate_refuses_an_incomplete_set(data, teacher, tmp_path):
    out = tmp_path / "inc"
    run(data, teacher, out, method="rded")
    P.item_path(out, 4, 2).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        P.evaluate(data, teacher, out, P.EvalConfig(epochs=1), ipc=3, progress=False)
    with pytest.raises(ValueError, match="classes"):
        P.load_distilled(out, list("abcdefghij"), data.mean, data.std)


def test_betti_curves_count_components_and_loops():
    from reta_fast.topology.betti import betti_curves

    t = torch.linspace(0, 2, 101)
    ang = torch.linspace(0, 2 * np.pi, 13)[:-1]
    ring = torch.stack([torch.cos(ang), torch.sin(ang), torch.full_like(ang, 3.0)], 1)  # a loop after normalising
    curves = betti_curves(ring[None], k=2, grid=t)
    assert curves["b0"][0] == 12 and curves["b0"][-1] == 1
    assert np.all(np.diff(curves["b0"]) <= 0) and curves["b1"].max() == 1


def test_cli_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    from reta_fast.cli import main

    out = tmp_path / "demo out"
    args = ["demo", "--out", str(out), "--quiet"]  # the README's demo, full size
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "student top-1" in text and "random real" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "reta" and rep["ipc"] == 10 and rep["betti"] is not None
    assert "PTA's loss on the images as they are" in (out / "report.md").read_text()
    assert (out / "report" / "grid.png").stat().st_size > 1000 and (out / "report" / "betti.png").is_file()
    assert {s["stage"] for s in rep["stages"]} == {"squeeze", "distill", "evaluate"}
    before = png_bytes(out)
    assert main(args + ["--no-baseline"]) == 0  # resumes: nothing rewritten
    assert png_bytes(out) == before
    rec = json.loads((out / "stages" / "distill.json").read_text())  # both calls kept, not the last only
    assert [c["written"] for c in rec["calls"]] == [100, 0] and rec["written_total"] == 100
    assert all(c["threads"] == torch.get_num_threads() for c in rec["calls"])  # CPU: what bitwise repeats need
    assert all(c["cpu"] == P.records.cpu_model() for c in rec["calls"])  # ... and the CPU model
    assert rec["seconds_total"] >= rec["calls"][0]["seconds"] and "2 calls" in (out / "report.md").read_text()
    assert main(["demo", "--out", str(out), "--quiet", "--iterations", "41"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, capsys):
    from reta_fast.cli import main

    assert main(["distill", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "neither an existing folder" in capsys.readouterr().err
    assert main(["evaluate", "--data", "digits", "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "class mapping" in capsys.readouterr().err


def test_cli_refuses_bad_settings_before_reading_data_or_training_a_teacher(tmp_path, capsys, monkeypatch):
    """A bad distill or student setting is named at once: no data load, no teacher squeeze, no folder."""
    from reta_fast.cli import commands, main

    def no_data(args):
        raise AssertionError("the data was read before the settings were checked")
    monkeypatch.setattr(commands, "_data", no_data)
    out = tmp_path / "o"
    for argv, msg in ((["distill", "--drc-connections", "5"], "drc_connections must list connections"),
                      (["run", "--pta-from-block", "9"], "pta_from_block must name one of the 4 recover blocks"),
                      (["demo", "--eval-epochs", "0"], "epochs must be an integer >= 1, got 0"),
                      (["plan", "--ipc", "0"], "ipc must be an integer >= 1, got 0")):
        data = [] if argv[0] == "demo" else ["--data", "digits"]
        assert main(argv[:1] + data + (["--out", str(out)] if argv[0] != "plan" else []) + argv[1:]) == 2, argv
        assert msg in capsys.readouterr().err, argv
    assert not out.exists()


def test_teacher_without_batchnorm_needs_no_bn(data, tmp_path, capsys):
    from reta_fast.cli import main

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    path = tmp_path / "lin.pt"
    torch.save(dict(format=1, arch="convnet", arch_kwargs={}, state_dict={}, classes=data.classes, size=16,
                    mean=list(data.mean), std=list(data.std)), path)
    # a checkpoint whose architecture does not fit its weights is refused by name
    assert main(["distill", "--data", "digits", "--teacher", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "does not fit" in capsys.readouterr().err
    t = Teacher(model, "linear", data.classes, 16, data.mean, data.std)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        P.distill(data, [t], tmp_path / "o3", P.DistillConfig(**{**TINY, "method": "sre2l"}), progress=False)
    info = P.distill(data, [t], tmp_path / "o4", P.DistillConfig(**{**TINY, "method": "sre2l", "r_bn": 0.0}),
                     progress=False)
    assert info["written"] == 30


def test_cli_run_on_an_imagefolder_with_broken_files(tmp_path, capsys):
    from reta_fast.cli import main

    root = make_folder(tmp_path / "my data" / "train", per_class=8)
    make_folder(tmp_path / "my data" / "val", per_class=3, seed=1)
    (root / "a" / "zero.jpg").write_bytes(b"")
    (root / "b" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "out"
    common = ["--data", str(tmp_path / "my data"), "--arch", "convnet", "--squeeze-epochs", "2", "--quiet"]
    assert main(["squeeze"] + common[:2] + ["--arch", "convnet", "--epochs", "2", "--quiet",
                                            "--teacher-out", str(tmp_path / "t.pt")]) == 0
    assert "top-1" in capsys.readouterr().out
    assert main(["run", "--teacher", str(tmp_path / "t.pt"), "--out", str(out), "--method", "fadrm", "--ipc", "2",
                 "--iterations", "4", "--blocks", "2", "--eval-epochs", "2", "--eval-seeds", "0", "1"]
                + common) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["ipc"] == 2 and len(ev["distilled"]["runs"]) == 2 and ev["random_real"] is not None
    assert sorted(p.name for p in (out / "images").iterdir()) == ["classes.json", "new000", "new001", "new002"] \
        or sorted(p.name for p in (out / "images").iterdir()) == ["new000", "new001", "new002"]
    assert (out / "report.md").read_text().startswith("# reta_fast run: fadrm")
    assert main(["squeeze"] + common[:2] + ["--quiet", "--teacher-out", str(tmp_path / "t.pt")]) == 2
    assert "never overwritten" in capsys.readouterr().err


def test_several_teachers_take_turns(data, teacher, tmp_path):
    second = squeeze(data, epochs=2, seed=1, progress=False)
    cfg = P.DistillConfig(**{**TINY, "method": "fadrm", "ipc_per_batch": 1})
    runs = {}
    for name, teachers in (("multi", [teacher, second]), ("single", [teacher])):
        info = P.distill(data, teachers, tmp_path / name, cfg, progress=False,
                         pool_dir=tmp_path / "pool-multi")
        runs[name] = png_bytes(tmp_path / name)
    assert info["written"] == 30
    assert len(json.loads((tmp_path / "multi" / "run.json").read_text())["teachers"]) == 2
    a, b = runs["multi"], runs["single"]
    # batch 0 (ipc index 0) uses the first teacher in both runs, batch 1 the second teacher only in `multi`
    assert all(a[k] == b[k] for k in a if k.endswith("_id000.png"))
    assert any(a[k] != b[k] for k in a if k.endswith("_id001.png"))
    # PTA in lockstep: a class group's units keep one teacher (its bank holds one network's features):
    # group 0 (classes 0-4) the first teacher, group 1 the second
    cfg = P.DistillConfig(**{**TINY, "method": "reta", "ipc_per_batch": 1, "batch_classes": 5})
    for name, teachers in (("reta-multi", [teacher, second]), ("reta-single", [teacher])):
        P.distill(data, teachers, tmp_path / name, cfg, progress=False,
                  pool_dir=tmp_path / "pool-multi")
        runs[name] = png_bytes(tmp_path / name)
    a, b = runs["reta-multi"], runs["reta-single"]
    assert all(a[k] == b[k] for k in a if k.startswith(tuple(f"images/new{c:03d}" for c in range(5))))
    assert all(a[k] != b[k] for k in a if k.startswith(tuple(f"images/new{c:03d}" for c in range(5, 10))))


@pytest.mark.slow
def test_kill_9_then_rerun_equals_an_uninterrupted_run(data, teacher, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "reta_fast.cli", "distill", "--data", "digits", "--teacher", str(teacher.path),
            "--method", "reta", "--ipc", "3", "--ipc-per-batch", "1", "--iterations", "60", "--blocks", "2",
            "--batch-classes", "2", "--pool-per-class", "8", "--points-per-class", "6", "--topo-k", "2",
            "--pool", str(tmp_path / "pool"), "--quiet", "--device", "cpu"]  # 5 lockstep units of 2 classes
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ref = tmp_path / "ref"
    subprocess.run(args + ["--out", str(ref)], check=True, env=env, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    interrupted = 0
    for attempt in range(3):
        proc = subprocess.Popen(args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(list(out.rglob("*.png"))) < 10 * (attempt + 1):
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            interrupted += len(list(out.rglob("*.png"))) < 30
        proc.wait()
    assert interrupted, "the run was never killed before it finished"
    subprocess.run(args + ["--out", str(out)], check=True, env=env, capture_output=True, timeout=600)
    assert png_bytes(out) == png_bytes(ref)  # no image lost, duplicated, partial or different


def test_unaligned_slices_and_several_class_groups_equal_one_run(data, teacher, tmp_path):
    """Slices that cut a batch, and resumes/shards that start at another class group, must not change
    any image (each batch is recovered whole, and no state carries over between batches)."""
    kw = dict(method="reta", batch_classes=5)  # two class groups, each batch = 5 classes x 3 items
    run(data, teacher, tmp_path / "one", **kw)
    ref = png_bytes(tmp_path / "one")
    run(data, teacher, tmp_path / "sl", ipc_start=0, ipc_end=1, **kw)
    run(data, teacher, tmp_path / "sl", ipc_start=1, ipc_end=2, **kw)
    run(data, teacher, tmp_path / "sl", ipc_start=2, **kw)
    assert png_bytes(tmp_path / "sl") == ref
    for c in range(5):  # drop the first group: the resume starts with the second group
        for i in range(3):
            P.item_path(tmp_path / "one", c, i).unlink()
    run(data, teacher, tmp_path / "one", **kw)
    assert png_bytes(tmp_path / "one") == ref
    for r in (1, 0):  # rank 1 first
        P.distill(data, [teacher], tmp_path / "sh", P.DistillConfig(**{**TINY, **kw}), progress=False, pool_dir=tmp_path / f"pool-{teacher.name}", rank=r, world_size=2)
    assert png_bytes(tmp_path / "sh") == ref


@pytest.mark.parametrize("method", ["rded", "random-real"])
def test_real_image_methods_shard_completely(data, teacher, tmp_path, method):
    run(data, teacher, tmp_path / "one", method=method)
    for r in (0, 1):  # ranks one after the other: rank 1 sees rank 0's files
        P.distill(data, [teacher], tmp_path / "sh", P.DistillConfig(**{**TINY, "method": method}), progress=False, pool_dir=tmp_path / f"pool-{teacher.name}", rank=r, world_size=2)
    assert png_bytes(tmp_path / "sh") == png_bytes(tmp_path / "one")


def test_later_stages_use_the_recorded_teacher(data, teacher, tmp_path, capsys):
    from reta_fast.cli import main

    out = tmp_path / "rec"
    common = ["--data", "digits", "--out", str(out), "--quiet"]
    assert main(["distill", "--teacher", str(teacher.path), "--method", "rded", "--ipc", "3",
                 "--pool-per-class", "8"] + common) == 0
    assert json.loads((out / "run.json").read_text())["teacher_specs"] == [str(teacher.path)]
    assert main(["evaluate", "--eval-epochs", "1", "--no-baseline"] + common) == 0
    assert f"teacher {teacher.accuracy:.2f}%" in capsys.readouterr().out
    other = squeeze(data, epochs=1, seed=3, out=tmp_path / "other.pt", progress=False)
    os.replace(other.path, teacher.path.parent / "swapped.pt")
    run_json = json.loads((out / "run.json").read_text())
    run_json["teacher_specs"] = [str(teacher.path.parent / "swapped.pt")]
    (out / "run.json").write_text(json.dumps(run_json))
    assert main(["evaluate", "--eval-epochs", "1"] + common) == 2
    assert "not the network that distilled" in capsys.readouterr().err


class HeadFirst(nn.Module):
    """A library-style classifier that registers its head before an MLP block: its last nn.Linear
    (``mlp.2``, 8 outputs) is not the classifier (``fc``); ``aux`` is an auxiliary classifier the forward
    pass does not use (as Inception's in eval mode)."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.fc = nn.Linear(width, num_classes)
        self.aux = nn.Linear(width, num_classes)
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, x):
        f = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(f + self.mlp(f))


def test_a_named_teacher_head_reaches_every_stage_and_the_checkpoint(data, teacher, tmp_path, capsys, monkeypatch):
    """--teacher-head names the classifier of a torchvision/timm teacher whose last nn.Linear is not it; the
    run's manifest records it for the later stages, a checkpoint keeps it, and a wrong or missing one is
    refused by name. torchvision is stood in for by a module whose get_model builds HeadFirst."""
    import sys
    import types

    from reta_fast.cli import main
    from reta_fast.models import named_feature_head, save_teacher, teacher_features, teacher_fingerprint

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(get_model=lambda name, weights=None, num_classes=1000: HeadFirst(num_classes))
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(HeadFirst().state_dict(), weights)
    out = tmp_path / "o"
    common = ["--data", "digits", "--out", str(out), "--quiet", "--teacher-weights", str(weights)]
    tiny = ["--method", "reta", "--ipc", "3", "--pool-per-class", "8", "--iterations", "2", "--blocks", "2",
            "--points-per-class", "6", "--topo-k", "2"]
    spec = ["--teacher", "torchvision:headfirst"]
    assert main(["distill"] + spec + tiny + common) == 2  # its last nn.Linear predicts 8 classes, not 10
    assert "predicts 8 classes with its last nn.Linear" in capsys.readouterr().err and not out.exists()
    assert main(["distill"] + spec + ["--teacher-head", "nope"] + tiny + common) == 2
    assert "no module named 'nope'; its nn.Linear layers: ['fc', 'aux', 'mlp.0', 'mlp.2']" in capsys.readouterr().err
    assert main(["distill"] + spec + ["--teacher-head", "fc,fc"] + tiny + common) == 2
    assert "2 heads for 1 teachers" in capsys.readouterr().err
    assert main(["distill", "--teacher-head", "fc"] + tiny + common) == 2
    assert "names a layer of a --teacher" in capsys.readouterr().err and not out.exists()
    assert main(["distill"] + spec + ["--teacher-head", "fc"] + tiny + common) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["teachers"][0]["feature_head"] == "fc" and run["teacher_specs"] == ["torchvision:headfirst"]
    # the later stages name the recorded head again (the report reads the features) ...
    assert main(["evaluate", "--eval-epochs", "1", "--no-baseline"] + common) == 0
    assert main(["report"] + common) == 0 and "| reta |" in (out / "report.md").read_text()
    capsys.readouterr()
    # ... and refuse another one
    assert main(["evaluate", "--eval-epochs", "1", "--no-baseline", "--teacher-head", "mlp.2"] + common) == 2
    assert "with its head 'mlp.2', the data set has 10" in capsys.readouterr().err
    assert main(["evaluate", "--eval-epochs", "1", "--no-baseline", "--teacher-head", "aux"] + common) == 2
    assert "distilled with the teacher's classifier head 'fc', not 'aux'" in capsys.readouterr().err
    # a run distilled before run.json recorded the head resumes, and its manifest gains the head
    del run["teachers"][0]["feature_head"]
    (out / "run.json").write_text(json.dumps(run))
    assert main(["distill"] + spec + ["--teacher-head", "fc"] + tiny + common) == 0
    assert json.loads((out / "run.json").read_text())["teachers"][0]["feature_head"] == "fc"
    # a manifest that does not name a spec for every teacher is refused
    (out / "run.json").write_text(json.dumps(dict(run, teacher_specs=["a", "b"])))
    assert main(["report"] + common) == 2 and "2 teacher spec(s) for 1 teacher(s)" in capsys.readouterr().err
    assert main(["plan", "--data", "digits", "--teacher-head", "fc", "--quiet"]) == 2
    assert "names a layer of a --teacher" in capsys.readouterr().err
    # a checkpoint of the teacher keeps its head; naming another one on loading is refused
    t = load_teacher("torchvision:headfirst", data, weights=str(weights), head="fc")
    assert named_feature_head(t.model) == "fc"
    path = save_teacher(tmp_path / "t.pt", t, {})
    t2 = load_teacher(path, data)
    assert named_feature_head(t2.model) == "fc" and load_teacher(path, data, head="fc").name == t.name
    assert teacher_fingerprint(t2.model, features=True) == teacher_fingerprint(t.model, features=True)
    x = torch.randn(4, 3, data.size, data.size)
    with torch.no_grad():
        assert torch.equal(teacher_features(t.model, x)[1], teacher_features(t2.model, x)[1])
    with pytest.raises(ValueError, match="records the classifier head 'fc', not 'mlp.2'"):
        load_teacher(path, data, head="mlp.2")
    with pytest.raises(ValueError, match="name the classifier with --teacher-head"):
        load_teacher("torchvision:headfirst", data, weights=str(weights))
    with pytest.raises(ValueError, match="1000 classes with its head 'fc'.*pretrained weights predict their own"):
        load_teacher("torchvision:headfirst", data, weights="DEFAULT", head="fc")
    # a head named where it is the default (the last nn.Linear) is not recorded: checkpoints stay as before
    last = [n for n, m in teacher.model.named_modules() if isinstance(m, nn.Linear)][-1]
    t4 = load_teacher(teacher.path, data, head=last)
    assert named_feature_head(t4.model) is None
    assert "feature_head" not in torch.load(save_teacher(tmp_path / "t4.pt", t4, {}), weights_only=True)


def test_more_bad_input(data, teacher, tmp_path):
    from reta_fast.stages.report import write_report
    from reta_fast.models import load_teacher as lt

    out = tmp_path / "o"
    run(data, teacher, out, method="rded")
    for i in range(3):
        P.item_path(out, 9, i).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        write_report(out, data, teacher)
    mixed = tmp_path / "mixed"
    (mixed / "images").mkdir(parents=True)
    (mixed / "notes.txt").write_text("mine")
    with pytest.raises(P.RunMismatch, match="not a reta output folder"):
        run(data, teacher, mixed, method="rded")
    with pytest.raises(ValueError, match="teacher-weights"):
        lt("torchvision:resnet18", data)


def test_an_explicit_clean_pta_view_says_it_keeps_the_fixed_weight(data, teacher, tmp_path, caplog):
    """--pta-view clean names the default's view but not its weight: the run says so, and not where the
    weight is given too or the view is the default's."""
    run(data, teacher, tmp_path / "c", method="reta", pta_view="clean", iterations=2)
    assert "explicit --pta-view clean runs PTA at the fixed weight" in caplog.text
    caplog.clear()
    run(data, teacher, tmp_path / "b", method="reta", pta_view="clean", pta_balance=0.1, iterations=2)
    run(data, teacher, tmp_path / "d", method="reta", iterations=2)
    assert "explicit --pta-view clean" not in caplog.text


def test_multi_resolution_blocks(data, teacher, tmp_path):
    info = run(data, teacher, tmp_path / "mr", method="reta", resolutions=[12, 16, 12, 16])
    assert info["written"] == 30
    x, _, _ = P.load_distilled(tmp_path / "mr", data.classes, data.mean, data.std, data.size)
    assert x.shape[-1] == 16
    assert json.loads((tmp_path / "mr" / "run.json").read_text())["config"]["resolutions"] == [12, 16, 12, 16]
    with pytest.raises(ValueError, match="last block"):
        run(data, teacher, tmp_path / "bad", method="fadrm", resolutions=[16, 12])


def test_quality_experiment_runs_and_resumes(tmp_path):
    import subprocess
    import sys

    make_folder(tmp_path / "ds" / "train", per_class=6, size=16)
    make_folder(tmp_path / "ds" / "test", per_class=2, size=16, seed=1)
    script = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
    cmd = [sys.executable, str(script), "--data", str(tmp_path / "ds"), "--scale", "smoke", "--ipcs", "2",
           "--methods", "random-real", "fadrm", "reta", "--seeds", "0", "1", "--distill-seeds", "0",
           "--work", str(tmp_path / "w"),
           "--results", str(tmp_path / "res"), "--device", "cpu"]
    env = dict(os.environ, RETA_FAST_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(cmd + ["--distill-only"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[evaluate]" not in r.stdout and not (tmp_path / "res").exists()  # sets only: nothing scored
    assert len(list((tmp_path / "w").rglob("reta-ipc2-seed0/images/*/*.png"))) == 2 * 3  # IPC 2 x 3 classes
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("already exist") == 3  # the sets distilled above are resumed, not made again
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert [(x["name"], x["ipc"]) for x in res["rows"]] == [("random-real", 2), ("fadrm", 2), ("reta", 2)]
    assert all(len(x["top1"]["runs"]) == 1 and len(x["seeds"]["0"]["top1"]["runs"]) == 2 for x in res["rows"])
    table = (tmp_path / "res" / "table.md").read_text()
    assert "| reta | " in table and "No parameter tuned on the test split" in table
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)  # resumes: reuses everything
    assert r2.returncode == 0 and "[evaluate]" not in r2.stdout
    assert json.loads((tmp_path / "res" / "results.json").read_text())["rows"] == res["rows"]
    # other student seeds: only the students not trained yet are trained, each seed's score in its own file,
    # the earlier files kept
    i = cmd.index("--seeds")
    other = cmd[:i + 1] + ["1", "2"] + cmd[i + 3:] + ["--results", str(tmp_path / "res1")]
    r4 = subprocess.run(other, capture_output=True, text=True, env=env, timeout=600)
    assert r4.returncode == 0, r4.stderr[-2000:]
    assert r4.stdout.count("seed 2: top-1") == 3 and "seed 1: top-1" not in r4.stdout  # 3 sets, seed 2 only
    reta = next((tmp_path / "w").rglob("reta-ipc2-seed0"))
    first = json.loads((reta / "eval-test-seeds0_1.json").read_text())
    both = json.loads((reta / "eval-test-seeds1_2.json").read_text())
    assert (reta / "eval-test-seeds2.json").is_file() and both["reused_seeds"] == [1]
    assert both["distilled"]["runs"][0] == first["distilled"]["runs"][1] and both["protocol"]["seeds"] == [1, 2]
    for f in reta.glob("eval-test*.json"):  # a student depends on its own seed only: seed 1 alone is the same
        f.rename(f.with_suffix(".kept"))
    alone = cmd[:i + 1] + ["1"] + cmd[i + 3:] + ["--methods", "reta", "--results", str(tmp_path / "res2")]
    r9 = subprocess.run(alone, capture_output=True, text=True, env=env, timeout=600)
    assert r9.returncode == 0 and r9.stdout.count("seed 1: top-1") == 1, r9.stderr[-2000:]
    assert json.loads((reta / "eval-test-seeds1.json").read_text())["distilled"]["runs"] == [both["distilled"]["runs"][0]]
    for f in reta.glob("eval-test*.kept"):
        f.rename(f.with_suffix(".json"))
    r5 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r5.returncode == 0 and "[evaluate]" not in r5.stdout
    # --merge keeps the rows this invocation does not recompute ...
    i = cmd.index("--methods")
    one = cmd[:i + 1] + ["fadrm"] + cmd[i + 4:] + ["--merge"]
    r7 = subprocess.run(one, capture_output=True, text=True, env=env, timeout=600)
    assert r7.returncode == 0, r7.stderr[-2000:]
    assert json.loads((tmp_path / "res" / "results.json").read_text())["rows"] == res["rows"]
    # ... and refuses rows of another teacher (the same command on another CPU model trains another one) before
    # distilling anything, instead of dropping the old rows
    saved = json.loads((tmp_path / "res" / "results.json").read_text())
    saved["meta"]["teacher"]["top1"] += 0.5
    saved["meta"]["machine"] = "cpu-elsewhere"
    (tmp_path / "res" / "results.json").write_text(json.dumps(saved))
    r8 = subprocess.run(one, capture_output=True, text=True, env=env, timeout=600)
    assert r8.returncode == 2 and "another teacher" in r8.stderr and "cpu-elsewhere" in r8.stderr, r8.stderr[-2000:]
    assert "Traceback" not in r8.stderr and "[distill]" not in r8.stdout
    assert json.loads((tmp_path / "res" / "results.json").read_text()) == saved
    # the finished sets' topology, scored anew from their images (bench/set_topology.py)
    work = next(p for p in (tmp_path / "w").iterdir() if p.is_dir())
    topo = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "set_topology.py"),
                           "--work", str(work), "--ipc", "2", "--seeds", "0", "--sets", "fadrm", "reta", "nothing"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert topo.returncode == 0, topo.stderr[-2000:]
    assert "reta-ipc2-seed0: Betti-0" in topo.stdout and "nothing-ipc2-seed0: missing" in topo.stdout
    assert "fadrm: b0" in topo.stdout and "(1 seeds)" in topo.stdout
    run_json = next((tmp_path / "w").rglob("reta-ipc2-seed0/run.json"))
    made = json.loads(run_json.read_text())
    run_json.write_text(json.dumps(dict(made, config=dict(made["config"], lam_topo=2.0))))  # an earlier variant
    r3 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r3.returncode == 2 and "reta IPC 2 seed 0" in r3.stderr and "move " in r3.stderr
    assert "Traceback" not in r3.stderr
    # --split val where the pool holds every training image: refused by name, not scored 0 % on nothing
    r6 = subprocess.run(cmd + ["--split", "val", "--methods", "fadrm"], capture_output=True, text=True, env=env,
                        timeout=600)
    assert r6.returncode == 2 and "no training image outside the patch pool" in r6.stderr, r6.stderr[-2000:]
    assert "Traceback" not in r6.stderr


def test_quality_table_marks_rows_measured_at_the_earlier_residual_weight():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", Path(__file__).resolve().parents[1] / "bench" / "quality.py")
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    meta = dict(data="d", classes=10, train=100, test=10, scale="cpu", teacher=dict(top1=70.0), distill_seeds=[0],
                seeds=[0], machine="m", torch="t", git="g", date="today", split="test",
                settings=dict(arch="a", teacher_epochs=1, iterations=4, eval={"10": dict(epochs=1, batch_size=2, lr=0.1)}))
    row = dict(ipc=10, top1=dict(mean=50.0, std=0.0, runs=[50.0]), distill_seconds=1.0, distill_peak_bytes=2**20,
               peak_kind="rss")
    table = q.render(meta, [dict(row, name="reta"), dict(row, name="reta alpha 0.5"), dict(row, name="reta k 5"),
                            dict(row, name="reta paper-pta"), dict(row, name="reta --no-pta")])
    assert "| reta | " in table and "| reta alpha 0.5 ‡ | " in table and "| reta k 5 † ‡ | " in table
    assert "| reta paper-pta | " in table and "| reta --no-pta | " in table  # the name says it / no PTA to view
    assert "† measured at the residual weight α 0.5" in table and "‡ measured with PTA as it was before" in table
    assert "| reta pta-view clean ‡ |" in q.render(meta, [dict(row, name="reta pta-view clean")])  # fixed weight
    assert not {"†", "‡"} & set(q.render(meta, [dict(row, name="reta"), dict(row, name="reta paper-pta")]))
    # the rows measured before the view's size rule keep their sets' identity: the paper's PTA
    for name in ("reta k 5", "reta drc-connections 2", "reta pta-balance 0.1", "reta --no-drc alpha 0.5"):
        assert P.DistillConfig(**q.VARIANTS[name]).pta_view_for(32) == "augmented", name
    cfg = P.DistillConfig(**q.VARIANTS["reta pta-view clean"])
    assert (cfg.pta_view_for(32), cfg.pta_balance_for(32)) == ("clean", None)
    for name in ("reta lam 0.3", "reta lam 0.03", "reta imagenet-batch alpha 0.3",
                 "reta --no-drc imagenet-batch alpha 0.3",
                 "reta drc-depth 3 imagenet-batch alpha 0.3"):  # added after the rule: unmarked
        cfg = P.DistillConfig(**q.VARIANTS[name])
        assert (cfg.pta_view_for(32), cfg.pta_balance_for(32)) == ("clean", 0.1), name
        assert f"| {name} | " in q.render(meta, [dict(row, name=name)])
    for name in ("reta imagenet-batch alpha 0.3", "reta --no-drc imagenet-batch alpha 0.3",
                 "reta --no-pta imagenet-batch alpha 0.3", "reta drc-depth 3 imagenet-batch alpha 0.3"):
        assert q.fadrm_partner(name, list(q.VARIANTS)) == "fadrm imagenet-batch alpha 0.3", name
    assert "| reta --no-pta imagenet-batch alpha 0.3 | " in q.render(
        meta, [dict(row, name="reta --no-pta imagenet-batch alpha 0.3")])
    assert "Paired with FADRM" not in table  # no FADRM row, nothing to pair with

    def seeded(name, *means):
        return dict(row, name=name, seeds={str(k): dict(top1=dict(mean=m)) for k, m in enumerate(means)})

    rows = [seeded("fadrm", 50.0, 48.0, 49.0), seeded("reta", 51.0, 47.5, 49.25),
            seeded("reta --no-drc", 50.0, 48.5), seeded("fadrm alpha 0.5", 40.0, 40.0, 40.0),
            seeded("reta k 5", 41.0, 39.0, 42.0), seeded("reta alpha 0.5", 40.0, 41.0), seeded("reta lam 0", 50.0),
            seeded("fadrm imagenet-batch", 30.0, 30.0), seeded("reta pta-unscaled imagenet-batch", 31.0, 29.0)]
    table = q.render(meta, rows)
    assert "| reta pta-unscaled imagenet-batch − fadrm imagenet-batch | +0.00 (ahead on 1 of 2; +1.0, -1.0) |" in table
    assert "| reta − fadrm | +0.25 (ahead on 2 of 3; +1.0, -0.5, +0.2) |" in table
    assert "| reta --no-drc − fadrm | +0.25 (ahead on 1 of 2; +0.0, +0.5) |" in table  # only the seeds both hold
    assert "| reta k 5 − fadrm alpha 0.5 | +0.67 (ahead on 2 of 3; +1.0, -1.0, +2.0) |" in table  # same alpha
    assert "| reta alpha 0.5 − fadrm alpha 0.5 |" in table
    assert "reta lam 0 −" not in table  # one common seed pairs nothing
    assert "RETA against its ablations" in table  # the ablation RETA has, paired seed by seed; not the others
    assert "| reta − reta --no-drc | +0.00 (ahead on 1 of 2; +1.0, -1.0) |" in table and "− reta --no-pta" not in table
    assert "RETA against its ablations" not in q.render(meta, rows[:1] + rows[2:3])  # no RETA row: no such table
    assert "over each row's distillation seeds (in parentheses, in order: [0] for the fewest, [0, 1, 2]" in table
    assert "over distillation seeds [0, 1, 2] " in q.render(meta, rows[:2])  # merged rows of one seed list
    q.cpu_model = lambda: "Intel(R) Xeon(R) Processor @ 2.10GHz"  # the results folder's name: no odd characters
    if not torch.cuda.is_available():
        assert q.machine() == f"cpu-intel-xeon-processor-{os.cpu_count()}core"


def test_quality_readme_rows_select_the_readmes_table(tmp_path):
    """--readme-rows puts only the named methods, in that order, between the README's markers and says where every
    row is; the table file keeps them all; a name the results do not hold is refused before anything is written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", Path(__file__).resolve().parents[1] / "bench" / "quality.py")
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    meta = dict(data="d", classes=10, train=100, test=10, scale="cpu", teacher=dict(top1=70.0), distill_seeds=[0],
                seeds=[0], machine="m", torch="t", git="g", date="today", split="val", val_per_class=3, val_images=30,
                settings=dict(arch="a", teacher_epochs=1, iterations=4, eval={"10": dict(epochs=1, batch_size=2, lr=0.1)}))
    row = dict(ipc=10, top1=dict(mean=50.0, std=0.0, runs=[50.0]), distill_seconds=1.0, distill_peak_bytes=2**20,
               peak_kind="rss")
    rows = [dict(row, name=n) for n in ("fadrm", "reta", "reta k 5", "rded")]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- validation:begin -->\nold\n<!-- validation:end -->\nafter\n")
    res = tmp_path / "res"
    q._publish(res, "validation.json", meta, rows, str(readme), "val", ["rded", "reta", "fadrm"])
    text = readme.read_text()
    assert text.startswith("intro\n<!-- validation:begin -->\n") and text.endswith("<!-- validation:end -->\nafter\n")
    assert "old" not in text and "reta k 5" not in text
    assert text.index("| rded |") < text.index("| reta |") < text.index("| fadrm |")
    assert "3 of the 4 methods measured; every row in `res/validation.md`." in text
    full = (res / "validation.md").read_text()
    assert "| reta k 5 † ‡ |" in full and "methods measured" not in full
    before = text
    with pytest.raises(SystemExit, match=r"--readme-rows: \['reta --no-pta'\] not in"):
        q._publish(res, "validation.json", meta, rows[:2], str(readme), "val", ["reta --no-pta", "reta"])
    assert readme.read_text() == before and (res / "validation.md").read_text() == full
    q._publish(res, "validation.json", meta, rows[:2], str(readme), "val", ["reta", "fadrm"])  # all of them: no note
    assert "methods measured" not in readme.read_text()


def test_paired_study_pairs_seeds_across_splits_and_correlates_the_diagnostics(tmp_path):
    """bench/paired_study.py: each seed's difference on both splits beside A's diagnostics, and Pearson r of the
    validation difference with each (exactly +1 / -1 where the columns are built to follow it); a seed one split
    lacks is shown as –; unknown methods and folders without results are refused by name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("paired_study",
                                                  Path(__file__).resolve().parents[1] / "bench" / "paired_study.py")
    ps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ps)
    lead = {"0": 1.0, "1": -0.5, "2": 2.0, "3": 0.25}

    def row(name, split, seeds):
        base = 50.0 if split == "val" else 48.0
        top = {k: base + (lead[k] * (1 if split == "val" else 2) if name == "a" else 0.0) for k in seeds}
        diag = {k: dict(drc=[dict(own_anchor=0.5 - 0.1 * lead[k], fit_retrieved=1.0, fit_anchor=2.0,
                                  complexity_retrieved=1.0, complexity_anchor=0.0)],
                        betti=dict(after=dict(pta=0.01 * lead[k] + 0.1))) for k in seeds}
        return dict(name=name, ipc=10, seeds={k: dict(top1=dict(mean=v)) for k, v in top.items()}, diagnostics=diag)

    res = tmp_path / "res"
    res.mkdir()
    (res / "validation.json").write_text(json.dumps(dict(rows=[row(n, "val", list(lead)) for n in "ab"])))
    (res / "results.json").write_text(json.dumps(dict(rows=[row(n, "test", ["0", "1", "2"]) for n in "ab"])))
    text = ps.study(ps.load(res), "a", "b")
    assert "| 3 | +0.25 | – | 0.475 | 0.5 | – | 0.1025 | 0.1025 | 50 |" in text  # complexity anchor 0: no ratio
    assert "- test difference: +1.00 (3 seeds)" in text and "- DRC own anchor: -1.00" in text
    assert "- PTA loss after: +1.00" in text and "- fit retrieved / anchor: –" in text  # constant: no r
    with pytest.raises(SystemExit, match=r"no row 'c' in these results \(rows: a, b\)"):
        ps.study(ps.load(res), "a", "c")
    with pytest.raises(SystemExit, match="holds neither validation.json nor results.json"):
        ps.load(tmp_path)
    with pytest.raises(SystemExit, match="is not a folder"):
        ps.load(tmp_path / "missing")
    (res / "results.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a bench/quality.py results file"):
        ps.load(res)


def test_quality_refuses_to_measure_another_checkouts_code(tmp_path, monkeypatch, capsys):
    """An editable install of another checkout (or git worktree), or an install of other code, would make the sets
    with that code under this checkout's variant names: refused by name before anything is read. An install of
    this very code (CI's ``pip install .``) is accepted."""
    import importlib.util
    import shutil

    import reta_fast

    spec = importlib.util.spec_from_file_location("quality", Path(__file__).resolve().parents[1] / "bench" / "quality.py")
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    import reta_fast.kernels

    installed = tmp_path / "site" / "reta_fast"  # as pip installs it: kernels/ inside the package
    shutil.copytree(q.ROOT / "reta_fast", installed, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copytree(q.ROOT / "kernels", installed / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(reta_fast, "__file__", str(installed / "__init__.py"))
    monkeypatch.setattr(reta_fast.kernels, "__file__", str(installed / "kernels" / "__init__.py"))
    assert q.foreign_checkout() is None  # the same code installed elsewhere
    (installed / "kernels" / "knn.py").write_text("# another version\n")
    assert q.foreign_checkout().endswith("(1 files, e.g. kernels/knn.py)")
    (installed / "stages" / "config.py").write_text("# another version\n")
    assert q.foreign_checkout().endswith("(2 files, e.g. reta_fast/stages/config.py)")
    assert q.main(["--data", str(tmp_path / "nothing"), "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert f"imported from {installed.resolve()}, whose code differs" in err and f"PYTHONPATH={q.ROOT}" in err
    assert not (tmp_path / "w").exists()
    monkeypatch.setattr(reta_fast, "__file__", str(q.ROOT / "reta_fast" / "__init__.py"))  # this checkout's
    monkeypatch.setattr(reta_fast.kernels, "__file__", str(q.ROOT / "kernels" / "__init__.py"))
    assert q.foreign_checkout() is None


def test_quality_reuses_only_students_of_the_same_protocol(tmp_path):
    import importlib.util
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality", script)
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    want = dict(epochs=150, lr=0.01, seeds=[0, 1, 2, 3], flip=True)
    (tmp_path / "images" / "c0").mkdir(parents=True)
    png = tmp_path / "images" / "c0" / "0.png"
    png.write_bytes(b"x")
    os.utime(png, ns=(10**18, 10**18))

    def rec(name, runs, val_images=300, **proto):
        (tmp_path / name).write_text(json.dumps(dict(distilled=dict(runs=runs), random_real=None,
                                                     val_images=val_images, protocol=dict(want, **proto))))
        os.utime(tmp_path / name, ns=(2 * 10**18, 2 * 10**18))  # written after the images

    rec("eval-val.json", [50.0, 51.0, 52.0], seeds=[0, 1, 2])
    rec("eval-val-seeds3_4.json", [53.0, 54.0], seeds=[3, 4], epochs=300)  # another protocol: not reused
    rec("eval-val-seeds4.json", [54.5], seeds=[4])
    rec("eval-val-seeds5.json", [55.0], seeds=[5], val_images=100)  # another validation split size
    rec("eval-test-seeds3.json", [60.0], seeds=[3])  # another split
    (tmp_path / "eval-val-seeds6.json").write_text('{"protocol": {"seeds": [6]}, "distilled": {"runs": [null]}}')
    (tmp_path / "eval-val-seeds7.json").write_text("{not json")  # unreadable: skipped, not fatal
    found, records = q.trained_students(tmp_path, "val", want, 300)
    assert found == {0: 50.0, 1: 51.0, 2: 52.0, 4: 54.5} and sorted(records) == ["eval-val-seeds4.json", "eval-val.json"]
    assert q.trained_students(tmp_path, "val", dict(want, lr=0.1), 300) == ({}, {})
    os.utime(png, ns=(3 * 10**18, 3 * 10**18))  # the set re-distilled after its scores: none is reused
    assert q.trained_students(tmp_path, "val", want, 300) == ({}, {})
    r = subprocess.run([sys.executable, str(script), "--data", "digits"], capture_output=True, text=True,
                       env=dict(os.environ, WORLD_SIZE="2"), timeout=120)  # one process only: refused by name
    assert r.returncode == 2 and "not under torchrun" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_equal_one_process(teacher, tmp_path):
    import subprocess
    import sys

    base = ["distill", "--data", "digits", "--teacher", str(teacher.path), "--method", "reta", "--ipc", "3",
            "--ipc-per-batch", "1", "--batch-classes", "5", "--iterations", "6", "--blocks", "2", "--pool-per-class",
            "8", "--points-per-class", "6", "--topo-k", "2", "--quiet", "--device", "cpu"]  # 2 lockstep units
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "reta_fast.cli"] + base + ["--out", str(one), "--pool", str(tmp_path / "p1")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                        "reta_fast.cli"] + base + ["--out", str(two), "--pool", str(tmp_path / "p2")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert png_bytes(two) == png_bytes(one)
    rec = json.loads((two / "stages" / "distill.json").read_text())
    assert rec["ranks"] == 2 and rec["written"] == 30
    ranks = [json.loads((two / "stages" / f"distill-rank{i}.json").read_text()) for i in range(2)]
    assert all(x["written"] > 0 for x in ranks)  # both ranks did work
    # the merged record's diagnostics and loss parts are those of every unit, as one process records them
    solo = json.loads((one / "stages" / "distill.json").read_text())
    assert rec["diagnostics"]["betti"]["classes"] == solo["diagnostics"]["betti"]["classes"] == 10
    assert all(x["diagnostics"]["betti"]["classes"] == 5 for x in ranks)
    assert _nested_close(rec["diagnostics"], solo["diagnostics"], skip=("/betti/before", "/betti/after"))
    for when in ("before", "after"):  # PTA's loss takes its image grid from every class: not one rank's to add
        assert rec["diagnostics"]["betti"][when] == pytest.approx(
            {k: v for k, v in solo["diagnostics"]["betti"][when].items() if k != "pta"}, rel=1e-5)
    assert rec["loss_parts"] == pytest.approx(solo["loss_parts"], rel=1e-5) and rec["loss_units"] == 2


def _nested_close(a, b, rel=1e-5, where="", skip=()):
    """Equal structure, numbers within ``rel`` (pytest.approx compares flat containers only); paths in ``skip``
    not compared."""
    if where in skip:
        return True
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
        return all(_nested_close(a[k], b[k], rel, f"{where}/{k}", skip) for k in a)
    if isinstance(a, list):
        assert len(a) == len(b), where
        return all(_nested_close(x, y, rel, f"{where}[{i}]", skip) for i, (x, y) in enumerate(zip(a, b)))
    assert a == pytest.approx(b, rel=rel, abs=1e-9), (where, a, b)
    return True


def test_merged_rank_diagnostics_weigh_each_rank_by_its_injections_and_classes(tmp_path):
    """merge_diagnostics: per-block means weighted by n, Betti distances by classes, PTA's loss on the set left
    out where two ranks hold classes (its grid is the whole set's); a rank without work (or one rank) leaves the other's record as it is; merge_rank_records writes it."""
    from reta_fast.stages.distill import merge_diagnostics
    from reta_fast.stages.ranks import merge_rank_records, write_rank_record

    drc = lambda own, n: dict(block=0, own_anchor=own, fit_retrieved=0.1, fit_anchor=0.2,  # noqa: E731
                              complexity_retrieved=0.1, complexity_anchor=0.2, distinct_per_class=1.0,
                              share_place=own * 10, n=n)
    grads = lambda ce, topo, n: dict(block=1, ce=ce, bn=1.0, topo=topo, n=n,  # noqa: E731
                                     topo_over_ce=topo / ce, topo_over_bn=topo)
    betti = lambda c, b0, pta: dict(classes=c, k=2, points=6, before=dict(b0=b0, b1=0.0, pta=pta),  # noqa: E731
                                    after=dict(b0=b0 / 2, b1=0.1, pta=pta / 2))
    a = dict(drc=[drc(0.5, 3)], grads=[grads(1.0, 0.5, 1)], betti=betti(3, 0.3, 0.9))
    b = dict(drc=[drc(0.1, 1)], grads=[grads(3.0, 0.1, 3)], betti=betti(1, 0.1, 0.1))
    m = merge_diagnostics([a, b])
    assert m["drc"][0]["own_anchor"] == pytest.approx(0.4) and m["drc"][0]["n"] == 4
    assert m["drc"][0]["share_place"] == pytest.approx(4.0)
    g = m["grads"][0]
    assert (g["ce"], g["topo"], g["n"]) == (pytest.approx(2.5), pytest.approx(0.2), 4)
    assert g["topo_over_ce"] == pytest.approx(0.2 / 2.5)  # of the merged means, as one process computes it
    assert m["betti"]["classes"] == 4 and m["betti"]["before"]["b0"] == pytest.approx(0.25)
    assert m["betti"]["after"]["b1"] == pytest.approx(0.1) and "pta" not in m["betti"]["after"]
    idle = dict(drc=[], grads=[], betti=None)
    assert merge_diagnostics([a, None]) == a and merge_diagnostics([None]) is None
    assert merge_diagnostics([a, idle])["drc"] == [dict(a["drc"][0])]
    assert merge_diagnostics([a, idle])["betti"] == a["betti"]  # one rank's classes: its PTA loss stands
    for r, (d, lp, u) in enumerate(((a, dict(ce=1.0, bn=1.0, topo=1.0), 1), (b, dict(ce=3.0, bn=1.0, topo=0.0), 3))):
        write_rank_record(tmp_path, "distill", r, dict(seconds=1.0 + r, peak_bytes=10, written=u, skipped=0,
                                                       diagnostics=d, loss_parts=lp, loss_units=u))
    merge_rank_records(tmp_path, "distill", 2)
    rec = json.loads((tmp_path / "stages" / "distill.json").read_text())
    assert rec["diagnostics"]["drc"][0]["own_anchor"] == pytest.approx(0.4) and rec["written"] == 4
    assert rec["loss_parts"] == pytest.approx(dict(ce=2.5, bn=1.0, topo=0.25)) and rec["loss_units"] == 4


def _children(pid):
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _rank_pid(root_pid, rank):
    """The pid of the torchrun worker with RANK=rank among the descendants of root_pid (Linux /proc)."""
    todo, seen = [root_pid], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_WORLD_SIZE=2" in env and pid != root_pid:
            return pid
        todo += _children(pid)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the torchrun workers through /proc")
def test_kill_9_of_one_torchrun_rank_then_restarts_equal_one_process(teacher, tmp_path):
    """kill -9 one rank of a 2-rank torchrun mid-run (torchrun then stops the other), restart each rank
    alone (RANK/WORLD_SIZE, no process group), then the whole torchrun command again: the set equals a
    1-process run image for image, and the last run finds nothing left to do."""
    import signal
    import subprocess
    import sys
    import time

    base = ["distill", "--data", "digits", "--teacher", str(teacher.path), "--method", "reta", "--ipc", "4",
            "--ipc-per-batch", "1", "--batch-classes", "2", "--iterations", "40", "--blocks", "2",
            "--pool-per-class", "8", "--points-per-class", "6", "--topo-k", "2", "--quiet", "--device", "cpu"]
    # 5 lockstep units of 2 classes x 4 images: ranks take units 0, 2, 4 and 1, 3
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    one, two = tmp_path / "one", tmp_path / "two"
    cli = [sys.executable, "-m", "reta_fast.cli"]
    r = subprocess.run(cli + base + ["--out", str(one), "--pool", str(tmp_path / "p1")], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    dist = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "reta_fast.cli"] + base + ["--out", str(two), "--pool", str(tmp_path / "p2")]
    proc = subprocess.Popen(dist, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        if len(list(two.rglob("*.png"))) >= 10:
            killed = _rank_pid(proc.pid, 1)
            if killed:
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.02)
    assert proc.wait(timeout=300) != 0 and killed, "rank 1 was not killed while the run was going"
    done = len(list(two.rglob("*.png")))
    assert 10 <= done < 40, f"{done} images after the kill: not interrupted mid-run"
    for rank in (1, 0):  # each rank restarted alone
        r = subprocess.run(cli + base + ["--out", str(two), "--pool", str(tmp_path / "p2")], capture_output=True,
                           text=True, env=dict(env, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0"), timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    assert png_bytes(two) == png_bytes(one)  # nothing lost, duplicated, partial or different
    # a temporary left by the kill is a hidden dot-file (no image loader lists it), removed by a later run
    assert all(p.name.startswith(".") for p in two.rglob("*.tmp"))
    r = subprocess.run(dist, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((two / "stages" / "distill.json").read_text())
    assert rec["ranks"] == 2 and rec["written"] == 0 and rec["skipped"] == 40
    assert png_bytes(two) == png_bytes(one)


def test_cost_model_arithmetic():
    from reta_fast.stages.plan import estimate

    e = estimate(1000, 50, 100, 1, 1000, 0.01, 300_000, 0.002, 2 << 30, "cuda_max_allocated", gpus=8)
    assert e.batches == 500 and e.batch_images == 100
    assert e.distill_seconds == pytest.approx(63 * 1000 * 0.01)  # ceil(500 / 8) batches on the busiest device
    assert e.pool_seconds == pytest.approx(600.0)
    e1 = estimate(10, 10, 10, 10, 300, 0.05, 3000, 0.001, 1, gpus=1)
    assert e1.batches == 1 and e1.distill_seconds == pytest.approx(15.0)
    with pytest.raises(ValueError):
        estimate(10, 0, 10, 1, 1, 0.1, 1, 0.1, 1)
    assert "distill wall time on 8 device(s)" in e.table()
    # PTA on each class's whole set: a class group's 50 batches are one unit (ImageNet-1K, IPC 50, 224 px)
    lock = estimate(1000, 50, 100, 1, 1000, 0.01, 300_000, 0.002, 2 << 30, "cuda_max_allocated", gpus=8,
                    lockstep=True, image_bytes=3 * 224 * 224 * 4)
    assert lock.units == 10 and lock.batches_per_unit == 50
    assert lock.distill_seconds == pytest.approx(2 * 50 * 1000 * 0.01)  # ceil(10 units / 8 devices) = 2
    assert lock.unit_state_bytes == 4 * 3 * 224 * 224 * 4 * 100 * 49  # 11.8 GB beside one batch's step
    assert lock.peak_bytes == (2 << 30) + lock.unit_state_bytes and "lockstep units" in lock.table()


def test_reta_plan_calibrates(data, teacher, capsys, monkeypatch):
    from reta_fast.cli import main

    assert main(["plan", "--data", "digits", "--teacher", str(teacher.path), "--ipc", "20", "--iterations", "100",
                 "--calibration-steps", "2", "--gpus", "2", "--quiet", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "recover batches | 2 of 100 images, 100 steps each" in text and "2 device(s)" in text
    # the default PTA at digits' size: the clean view (timed with its second forward), weight from the gradients
    assert "| PTA | clean view (a second teacher forward per step), weight from the gradients (0.1 of CE's) |" in text
    assert "PTA weight" not in text
    assert main(["plan", "--data", "digits", "--teacher", str(teacher.path), "--ipc", "20", "--iterations", "100",
                 "--calibration-steps", "2", "--quiet", "--device", "cpu", "--pta-view", "augmented"]) == 0
    text = capsys.readouterr().out
    assert "| PTA | augmented view, fixed weight |" in text
    assert "| PTA weight | 0.5 in 100-image batches (lambda_topo 0.5 scaled by the batch size) |" in text
    from reta_fast.stages.plan import calibrate

    est = calibrate(data, teacher, P.DistillConfig(**{**TINY, "method": "reta", "pta_view": "augmented"}), steps=2)
    assert est.seconds_per_step > 0 and est.pool_images == 80 and est.seconds_per_pool_image > 0
    assert est.peak_bytes > 0
    assert est.pta_weights == ((30, 0.5 * (100 / 30)),)  # TINY: 10 classes x 3 items a batch
    import reta_fast.stages.plan as R  # the module that calls recover()

    views, real_recover = [], R.recover  # the default's clean view and balance are what gets timed
    monkeypatch.setattr(R, "recover", lambda crit, *a, config, **k: (
        views.append((config.pta_view, crit.topo_balance)), real_recover(crit, *a, config=config, **k))[1])
    assert calibrate(data, teacher, P.DistillConfig(**{**TINY, "method": "reta"}), steps=2).pta_weights == ()
    assert views == [("clean", 0.1)] * 2
    monkeypatch.setattr(R, "recover", real_recover)
    # the job's engine is what gets timed
    seen, real_recover = [], R.recover
    monkeypatch.setattr(R, "recover", lambda crit, *a, config, **k: (
        seen.append((config.amp, config.channels_last, crit.topo.overlap)), real_recover(crit, *a, config=config, **k))[1])
    eng = calibrate(data, teacher, P.DistillConfig(**{**TINY, "method": "reta", "amp": "bf16", "channels_last": True,
                                                       "topo_overlap": True}), steps=2)
    assert eng.seconds_per_step > 0 and seen == [("bf16", True, True)] * 2
    # PTA is timed on each class's whole set, refreshed as often as the job refreshes it: a lockstep unit of
    # 3 batches (one item of each class each) makes 3 calls per round and refreshes once per round
    crits = []
    monkeypatch.setattr(R, "recover", lambda crit, *a, config, **k: (crits.append(crit), real_recover(
        crit, *a, config=config, **k))[1])
    cfg = P.DistillConfig(**{**TINY, "method": "reta", "ipc_per_batch": 1})
    assert cfg.lockstep and cfg.pta_active
    calibrate(data, teacher, cfg, steps=2)
    C = len(data.classes)
    assert len(crits[0].bank) == C * cfg.ipc and crits[0].topo.refresh_every == 3 * cfg.topo_refresh


def test_recover_lr_default_depends_on_the_image_size_and_is_recorded(data, teacher, tmp_path):
    assert P.DistillConfig().lr_for(32) == 0.05 and P.DistillConfig().lr_for(224) == 0.25
    assert P.DistillConfig(lr=0.1).lr_for(224) == 0.1
    run(data, teacher, tmp_path / "lr", method="fadrm")
    assert json.loads((tmp_path / "lr" / "run.json").read_text())["config"]["lr"] == 0.05
    run(data, teacher, tmp_path / "lr", method="fadrm", lr=0.05)  # the same run, spelled out: accepted
    with pytest.raises(P.RunMismatch, match="lr"):
        run(data, teacher, tmp_path / "lr", method="fadrm", lr=0.25)


def test_residual_weight_default_depends_on_the_image_size_and_is_recorded(data, teacher, tmp_path):
    assert P.DistillConfig().alpha_for(32) == 0.3 and P.DistillConfig().alpha_for(224) == 0.5
    assert P.DistillConfig(alpha=0.5).alpha_for(32) == 0.5
    for no_injection in (dict(method="rded"), dict(method="sre2l"), dict(method="fadrm", blocks=1)):
        assert P.DistillConfig(**no_injection).alpha_for(32) == 0.5  # alpha changes nothing: identity kept
    run(data, teacher, tmp_path / "a", method="fadrm")
    assert json.loads((tmp_path / "a" / "run.json").read_text())["config"]["alpha"] == 0.3
    run(data, teacher, tmp_path / "a", method="fadrm", alpha=0.3)  # the same run, spelled out: accepted
    with pytest.raises(P.RunMismatch, match=r"alpha: 0.3 -> 0.5"):
        run(data, teacher, tmp_path / "a", method="fadrm", alpha=0.5)
    run(data, teacher, tmp_path / "old", method="fadrm", alpha=0.5)  # a run made before the size rule
    with pytest.raises(P.RunMismatch, match=r"changed from 0.5 to 0.3: --alpha 0.5 resumes"):
        run(data, teacher, tmp_path / "old", method="fadrm")
    with pytest.raises(ValueError, match=r"alpha must be a finite number in \[0.0, 1.0\], got 1.5"):
        P.DistillConfig(alpha=1.5).validate()


@pytest.mark.parametrize("method", ["random-real", "rded", "reta"])
def test_rank_shards_partition_every_slice(method):
    from reta_fast.stages.shards import shard_items

    for ipc, start, end, per_batch, world in [(5, 0, None, 2, 2), (7, 2, 6, 3, 3), (4, 1, 2, 1, 4), (3, 0, None, 0, 5)]:
        cfg = P.DistillConfig(method=method, ipc=ipc, ipc_start=start, ipc_end=end, ipc_per_batch=per_batch,
                              batch_classes=4)
        shards = [shard_items(cfg, 10, r, world) for r in range(world)]
        flat = [it for sh in shards for it in sh]
        assert len(flat) == len(set(flat)) == 10 * (cfg.end - start)  # disjoint and complete
        assert set(flat) == {(c, i) for c in range(10) for i in range(start, cfg.end)}


def _can_mount_tmpfs() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -Urm` and tmpfs mounts (a real small filesystem)")
def test_a_real_disk_filling_up_mid_run_is_a_clean_error_then_resumes(teacher, tmp_path):
    """distill onto a 64 KiB tmpfs (in a private mount namespace) that fills up part-way: a clean
    'No space left' error, every file on it complete (no partial PNG, no temporary left), then the
    same command after the filesystem grows finishes the set equal to a run on a roomy disk."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "reta_fast.cli", "distill", "--data", "digits", "--teacher", str(teacher.path),
            "--method", "rded", "--ipc", "6", "--pool-per-class", "8", "--pool", str(tmp_path / "pool"),
            "--quiet", "--device", "cpu"]
    ref = tmp_path / "ref"
    r = subprocess.run(args + ["--out", str(ref)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    small, copy = tmp_path / "small", tmp_path / "copy"
    small.mkdir()
    q = " ".join(f"'{a}'" for a in args + ["--out", str(small / "out")])
    script = f"""
mount -t tmpfs -o size=64k tmpfs '{small}' || exit 90
{q} 2> '{tmp_path}/err1'; echo $? > '{tmp_path}/rc1'
cp -a '{small}/out' '{tmp_path}/after-full'
mount -o remount,size=4m '{small}' || exit 91
{q} 2> '{tmp_path}/err2'; echo $? > '{tmp_path}/rc2'
cp -a '{small}/out' '{copy}'
"""
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    err1 = (tmp_path / "err1").read_text()
    assert (tmp_path / "rc1").read_text().strip() != "0" and "No space left on device" in err1, err1[-2000:]
    assert "Traceback" not in err1
    full = tmp_path / "after-full"
    pngs = {p.relative_to(full): p.read_bytes() for p in full.rglob("*.png")}
    want = png_bytes(ref)
    assert 0 < len(pngs) < len(want), "the filesystem did not fill up part-way"
    assert all(want[str(k)] == v for k, v in pngs.items())  # each image on the full disk is complete and right
    assert not [p for p in full.rglob("*") if p.name.endswith(".tmp")]  # no temporary left behind
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()[-2000:]
    assert png_bytes(copy) == want


def test_recover_engine_choices_are_part_of_the_run_identity(data, teacher, tmp_path):
    out = tmp_path / "e"
    run(data, teacher, out, method="fadrm", ipc=1, channels_last=True, amp="bf16")
    cfg = json.loads((out / "run.json").read_text())["config"]
    assert cfg["amp"] == "bf16" and cfg["channels_last"] is True and "compile" not in cfg  # defaults left out
    assert len(png_bytes(out)) == 10
    with pytest.raises(P.RunMismatch, match="amp"):  # resuming with another engine would mix two numerics
        run(data, teacher, out, method="fadrm", ipc=1, channels_last=True)
    plain = tmp_path / "plain"
    run(data, teacher, plain, method="fadrm", ipc=1)
    ident = json.loads((plain / "run.json").read_text())["config"]
    assert not {"amp", "channels_last", "compile"} & set(ident)  # folders from before these options still resume
    ns = cli.build_parser().parse_args(["distill", "--data", "digits", "--out", "o", "--amp", "bf16", "--channels-last",
                                        "--topo-refresh", "5", "--compile"])
    assert (ns.amp, ns.channels_last, ns.compile, ns.topo_refresh) == ("bf16", True, "default", 5)


def test_resuming_with_another_cpu_thread_count_is_flagged(data, teacher, tmp_path, caplog):
    out = tmp_path / "t"
    run(data, teacher, out, method="fadrm", ipc_end=1)
    (out / "stages").mkdir(exist_ok=True)
    other = torch.get_num_threads() + 1  # the first call's record, as P.Stage writes it, from another machine
    (out / "stages" / "distill.json").write_text(json.dumps(dict(calls=[dict(written=10, threads=other)])))
    with caplog.at_level("WARNING", logger="reta_fast"):
        run(data, teacher, out, method="fadrm")
    assert f"made with [{other}] CPU thread(s), this call uses {torch.get_num_threads()}" in caplog.text
    caplog.clear()
    (out / "stages" / "distill.json").write_text(json.dumps(dict(calls=[dict(written=10, threads=other)])))
    with caplog.at_level("WARNING", logger="reta_fast"):
        run(data, teacher, out, method="fadrm")  # nothing left to make: nothing to warn about
    assert "thread" not in caplog.text
    # another CPU model (the same thread count): flagged as well
    from reta_fast.stages.records import cpu_model

    (tmp_path / "removed").mkdir()
    for png in sorted(out.rglob("images/*/*.png"))[-3:]:  # three items to make again
        png.rename(tmp_path / "removed" / f"{png.parent.name}-{png.name}")
    (out / "stages" / "distill.json").write_text(json.dumps(dict(calls=[dict(written=10, cpu="Another CPU 9000",
                                                                             threads=torch.get_num_threads())])))
    caplog.clear()
    with caplog.at_level("WARNING", logger="reta_fast"):
        run(data, teacher, out, method="fadrm")
    assert "made on ['Another CPU 9000'], this call runs on" in caplog.text and "thread" not in caplog.text
    assert f"this call runs on {cpu_model()!r}" in caplog.text


def test_pta_weight_follows_the_batch_size_and_is_in_the_identity_only_where_it_acts(data, teacher, tmp_path):
    # TINY: 10 classes x 3 items = 30-image batches, so PTA's fixed weight (the paper's PTA; the default at
    # digits' size sets it from the gradients instead) is lam_topo * 100 / 30
    paper = dict(method="reta", pta_view="augmented")
    auto = tmp_path / "auto"
    run(data, teacher, auto, **paper)
    assert json.loads((auto / "run.json").read_text())["config"]["topo_ref_batch"] == 100
    by_hand = tmp_path / "by-hand"
    run(data, teacher, by_hand, **paper, topo_ref_batch=0, lam_topo=0.5 * (100 / 30))
    assert png_bytes(auto) == png_bytes(by_hand)  # the scaling is exactly a larger lam_topo, nothing else
    plain = tmp_path / "plain"
    run(data, teacher, plain, **paper, topo_ref_batch=0)  # lam_topo at every batch size: 0.1.0's images
    assert "topo_ref_batch" not in json.loads((plain / "run.json").read_text())["config"]
    assert png_bytes(plain) != png_bytes(auto)
    with pytest.raises(P.RunMismatch, match="topo_ref_batch"):  # a folder from before the option: not mixed
        run(data, teacher, plain, **paper)
    bal = tmp_path / "balanced"  # under the default's balanced weight the batch scaling does not act: not recorded
    run(data, teacher, bal, method="reta")
    assert "topo_ref_batch" not in json.loads((bal / "run.json").read_text())["config"]
    ns = cli.build_parser().parse_args(["distill", "--data", "digits", "--out", "o", "--no-topo-batch-scale"])
    assert ns.topo_ref_batch == 0


@pytest.mark.slow
def test_torchrun_evaluate_trains_each_student_with_ddp(data, teacher, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "set"
    run(data, teacher, out, method="rded", ipc=3)
    base = ["evaluate", "--data", "digits", "--teacher", str(teacher.path), "--out", str(out), "--eval-epochs", "3",
            "--eval-batch", "8", "--eval-seeds", "0", "1", "--no-baseline", "--quiet", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                        "reta_fast.cli"] + base, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())
    assert res["distributed"]["ranks"] == 2 and len(res["distilled"]["runs"]) == 2
    assert all(0 <= a <= 100 for a in res["distilled"]["runs"])
    assert r.stdout.count("student top-1") == 1  # one rank reports
    assert json.loads((out / "stages" / "evaluate.json").read_text())["ranks"] == 2
    # WORLD_SIZE > 1 without torchrun's process group: refused by name, not a hang
    r = subprocess.run([sys.executable, "-m", "reta_fast.cli"] + base, capture_output=True, text=True,
                       env=dict(env, RANK="1", WORLD_SIZE="2"), timeout=600)
    assert r.returncode != 0 and "needs torchrun" in r.stderr


def test_overlapped_pta_is_deterministic_and_recorded(data, teacher, tmp_path, monkeypatch):
    from reta_fast.topology.pta import TopologyAlignmentLoss

    launched = []
    launch = TopologyAlignmentLoss._launch
    monkeypatch.setattr(TopologyAlignmentLoss, "_launch", lambda self, xs, key: (launched.append(1), launch(self, xs, key)))
    a, b, sync = tmp_path / "a", tmp_path / "b", tmp_path / "sync"
    for out in (a, b):
        run(data, teacher, out, method="reta", topo_overlap=True, iterations=16)
    assert launched  # the pairings really were computed in the worker
    assert png_bytes(a) == png_bytes(b)  # each worker result is consumed at a fixed step
    n = len(launched)
    run(data, teacher, sync, method="reta", iterations=16)
    assert len(launched) == n  # not without the option
    assert json.loads((a / "run.json").read_text())["config"]["topo_overlap"] is True
    assert "topo_overlap" not in json.loads((sync / "run.json").read_text())["config"]


def _option_changes_images_and_identity(data, teacher, tmp_path, name: str, value):
    """A RETA run with setting ``name = value`` against one at the default: both write every image, some
    images differ, and the setting is in the run identity only where it was set. Returns both infos."""
    default = run(data, teacher, tmp_path / "default", method="reta", ipc_per_batch=3)
    other = run(data, teacher, tmp_path / "other", method="reta", ipc_per_batch=3, **{name: value})
    assert default["written"] == other["written"] == 30
    a, b = png_bytes(tmp_path / "default"), png_bytes(tmp_path / "other")
    assert a.keys() == b.keys() and any(a[k] != b[k] for k in a)
    assert json.loads((tmp_path / "other" / "run.json").read_text())["config"][name] == value
    assert name not in json.loads((tmp_path / "default" / "run.json").read_text())["config"]
    return default, other


def test_pta_real_view_augmented_changes_only_the_real_side(data, teacher, tmp_path):
    _option_changes_images_and_identity(data, teacher, tmp_path, "pta_real_view", "augmented")
    with pytest.raises(ValueError, match="pta_real_view"):
        P.DistillConfig(pta_real_view="blurred").validate()


def test_squeeze_refuses_an_empty_validation_split_before_training(data, tmp_path):
    import copy

    no_val = copy.copy(data)
    no_val.val = torch.utils.data.Subset(data.val, [])
    with pytest.raises(ValueError, match=r"evaluation split \(data.val\) is empty"):
        squeeze(no_val, epochs=50, out=tmp_path / "t.pt", progress=False)
    assert not (tmp_path / "t.pt").exists()


def test_pta_schedule_changes_the_images_and_is_recorded_only_when_set(data, teacher, tmp_path):
    _option_changes_images_and_identity(data, teacher, tmp_path, "pta_from_block", 1)
    with pytest.raises(ValueError, match=r"pta_from_block must name one of the 4 recover blocks \(0 to 3\), got 4"):
        P.DistillConfig(pta_from_block=4).validate()
    for no_pta in (dict(method="fadrm"), dict(pta=False), dict(lam_topo=0.0)):  # nothing to schedule: refused
        with pytest.raises(ValueError, match="pta_from_block schedules PTA, which this run does not use"):
            P.DistillConfig(pta_from_block=1, **no_pta).validate()


def test_pta_default_is_the_clean_view_at_a_balanced_weight_up_to_64_px_and_the_papers_above():
    cfg = P.DistillConfig()
    assert (cfg.pta_view_for(32), cfg.pta_balance_for(32)) == ("clean", 0.1)
    assert (cfg.pta_view_for(64), cfg.pta_view_for(65), cfg.pta_balance_for(224)) == ("clean", "augmented", None)
    # the paper's PTA where PTA does not act (nothing to record); a compiled teacher gets the default
    c = P.DistillConfig(compile="default")
    c.validate()
    assert (c.pta_view_for(32), c.pta_balance_for(32)) == ("clean", 0.1)
    for paper in (dict(method="fadrm"), dict(pta=False), dict(lam_topo=0.0), dict(ipc=1)):
        c = P.DistillConfig(**paper)
        c.validate()
        assert (c.pta_view_for(32), c.pta_balance_for(32)) == ("augmented", None), paper
    assert P.DistillConfig(pta_view="augmented").pta_balance_for(32) is None  # the paper's PTA: one flag
    # an explicit view keeps the fixed weight it had before the size rule (its folders resume)
    assert P.DistillConfig(pta_view="clean").pta_balance_for(32) is None
    assert P.DistillConfig(pta_view="clean").pta_balance_for(224) is None
    assert P.DistillConfig(pta_balance=0).pta_balance_for(32) is None  # 0: the fixed weight
    assert P.DistillConfig(pta_balance=0).pta_view_for(32) == "clean"
    r = P.DistillConfig().resolved(32)
    assert (r.lr, r.alpha, r.pta_view, r.pta_balance) == (0.05, 0.3, "clean", 0.1)
    r = P.DistillConfig().resolved(224)
    assert (r.lr, r.alpha, r.pta_view, r.pta_balance) == (0.25, 0.5, "augmented", None)
    with pytest.raises(ValueError, match=r"identity\(\) needs the size-dependent defaults resolved"):
        P.DistillConfig().identity(10)
    assert (P.DistillConfig(pta_balance=0.3).pta_view_for(224), P.DistillConfig(pta_balance=0.3).pta_balance_for(224)) \
        == ("augmented", 0.3)
    assert P.DistillConfig(pta_view="clean", compile="default").pta_balance_for(32) is None
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match=r"pta_balance must be a finite number >= 0.0, got .* \(0: PTA's fixed "
                                             r"weight; unset: the default for the image size\)"):
            P.DistillConfig(pta_balance=bad).validate()


def test_pta_view_changes_the_images_is_recorded_and_old_runs_resume_with_the_papers_view(data, teacher, tmp_path):
    """The default (clean view, balanced weight at digits' size) is recorded; --pta-view augmented is the paper's
    PTA, whose identity is that of every run made before the default changed."""
    default = run(data, teacher, tmp_path / "default", method="reta", ipc_per_batch=3)
    paper = run(data, teacher, tmp_path / "paper", method="reta", ipc_per_batch=3, pta_view="augmented")
    a, b = png_bytes(tmp_path / "default"), png_bytes(tmp_path / "paper")
    assert default["written"] == paper["written"] == 30 and a.keys() == b.keys() and any(a[k] != b[k] for k in a)
    got = json.loads((tmp_path / "default" / "run.json").read_text())["config"]
    assert (got["pta_view"], got["pta_balance"]) == ("clean", 0.1)
    assert not {"pta_view", "pta_balance"} & set(json.loads((tmp_path / "paper" / "run.json").read_text())["config"])
    for info in (default, paper):  # the diagnostics score PTA's loss on the images as they are, before and after
        bb = info["diagnostics"]["betti"]
        assert all(np.isfinite(bb[w]["pta"]) and bb[w]["pta"] >= 0 for w in ("before", "after"))
    assert default["diagnostics"]["betti"]["before"]["pta"] == paper["diagnostics"]["betti"]["before"]["pta"]
    run(data, teacher, tmp_path / "paper", method="reta", ipc_per_batch=3, pta_view="augmented", pta_balance=0)
    with pytest.raises(P.RunMismatch, match=r"clean view at a gradient-balanced weight: --pta-view augmented resumes"):
        run(data, teacher, tmp_path / "paper", method="reta", ipc_per_batch=3)  # a folder made before the change
    run(data, teacher, tmp_path / "default", method="reta", ipc_per_batch=3, pta_view="clean", pta_balance=0.1)
    # a folder of --pta-view clean from before the size rule (the clean view at the fixed weight) resumes with
    # the same flag; the default is refused there with the flag that resumes it
    run(data, teacher, tmp_path / "clean", method="reta", ipc_per_batch=3, pta_view="clean")
    clean_cfg = json.loads((tmp_path / "clean" / "run.json").read_text())["config"]
    assert clean_cfg["pta_view"] == "clean" and "pta_balance" not in clean_cfg
    with pytest.raises(P.RunMismatch, match=r"pta_balance: None -> 0.1.*--pta-balance 0 resumes"):
        run(data, teacher, tmp_path / "clean", method="reta", ipc_per_batch=3)
    run(data, teacher, tmp_path / "clean", method="reta", ipc_per_batch=3, pta_balance=0)  # the same images
    with pytest.raises(ValueError, match="pta_view"):
        P.DistillConfig(pta_view="cropped").validate()
    for no_pta in (dict(method="fadrm"), dict(pta=False), dict(lam_topo=0.0)):  # no PTA to point elsewhere: refused
        with pytest.raises(ValueError, match="pta_view chooses PTA's images, which this run does not use"):
            P.DistillConfig(pta_view="clean", **no_pta).validate()
        P.DistillConfig(pta_view="augmented", **no_pta).validate()  # what such a run records anyway


@pytest.mark.slow
def test_a_compiled_run_records_the_gradient_diagnostics_of_the_eager_one(data, teacher, tmp_path):
    """--compile once left the gradient table out of the record; now it is there, equal to the eager run's."""
    eager = run(data, teacher, tmp_path / "eager", method="reta", ipc_per_batch=3)["diagnostics"]["grads"]
    comp = run(data, teacher, tmp_path / "comp", method="reta", ipc_per_batch=3, compile="default")
    comp = comp["diagnostics"]["grads"]
    assert [r["block"] for r in comp] == [r["block"] for r in eager] and len(comp) >= 2
    for a, b in zip(comp, eager):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-2 * max(abs(b[k]), 1e-6) for k in a), (a, b)


def test_pta_balance_changes_the_images_records_its_weight_and_is_refused_without_pta(data, teacher, tmp_path):
    bal = run(data, teacher, tmp_path / "bal", method="reta", ipc_per_batch=3)  # the default: 0.1 on the clean view
    fixed = run(data, teacher, tmp_path / "fixed", method="reta", ipc_per_batch=3, pta_balance=0)
    a, b = png_bytes(tmp_path / "bal"), png_bytes(tmp_path / "fixed")
    assert a.keys() == b.keys() and any(a[k] != b[k] for k in a)
    got = json.loads((tmp_path / "fixed" / "run.json").read_text())["config"]
    assert got["pta_view"] == "clean" and "pta_balance" not in got  # 0 is the fixed weight: not recorded
    grads = bal["diagnostics"]["grads"]  # PTA's weight, set each step, in the gradient table of every block
    assert grads and all(np.isfinite(r["topo_weight"]) and r["topo_weight"] > 0 for r in grads)
    # rho bounds PTA's gradient against CE's on the features; on the pixels the two are of that order too
    assert all(0 < r["topo_over_ce"] < 3 for r in grads)
    assert all("topo_weight" not in r for r in fixed["diagnostics"]["grads"])
    for bad in (-0.1, float("nan"), "0.3", True):
        with pytest.raises(ValueError, match="pta_balance must be a finite number >= 0"):
            P.DistillConfig(pta_balance=bad).validate()
    for no_pta in (dict(method="fadrm"), dict(pta=False), dict(lam_topo=0.0)):
        with pytest.raises(ValueError, match="pta_balance weights PTA, which this run does not use"):
            P.DistillConfig(pta_balance=0.3, **no_pta).validate()
        P.DistillConfig(pta_balance=0, **no_pta).validate()  # the fixed weight: what such a run has anyway
    P.DistillConfig(pta_balance=0.3, compile="default").validate()  # CE's feature gradient from the head


def test_report_shows_pta_weight_column_only_under_pta_balance():
    from reta_fast.stages.report import _diagnostics_markdown

    row = dict(block=0, ce=0.1, bn=0.01, topo=0.03, topo_over_ce=0.3, topo_over_bn=3.0)
    fixed = "\n".join(_diagnostics_markdown(dict(grads=[row])))
    balanced = "\n".join(_diagnostics_markdown(dict(grads=[dict(row, topo_weight=0.0123)])))
    assert "PTA weight" not in fixed and "| 0 | 0.1 | 0.01 | 0.03 | 0.300 | 3.000 |" in fixed
    assert "| PTA / BN | PTA weight |" in balanced and "| 0 | 0.1 | 0.01 | 0.03 | 0.300 | 3.000 | 0.0123 |" in balanced


def test_drc_depth_searches_only_the_best_ranks_of_each_share_and_the_record_says_where_drc_picked(
        data, teacher, tmp_path):
    """--drc-depth d: each image's search holds only the first d patches of its share (the anchor and the next
    d - 1 RDED ranks); every DRC record gives the retrieved patches' mean place in the share, and the report
    shows it (records made before it existed: a dash)."""
    base = run(data, teacher, tmp_path / "base", method="reta", ipc_per_batch=1)
    deep = run(data, teacher, tmp_path / "deep", method="reta", ipc_per_batch=1, drc_depth=2)
    assert deep["written"] == 30
    # TINY: 8 patches per class at IPC 3, so the shares hold 3, 3 and 2 patches (places 0..2)
    assert all(0 <= d["share_place"] <= 2 for d in base["diagnostics"]["drc"])
    assert all(0 <= d["share_place"] <= 1 for d in deep["diagnostics"]["drc"])
    whole = run(data, teacher, tmp_path / "whole", method="reta", ipc_per_batch=1, partition=False)
    assert whole["diagnostics"]["drc"] and all("share_place" not in d for d in whole["diagnostics"]["drc"])
    assert json.loads((tmp_path / "deep" / "run.json").read_text())["config"]["drc_depth"] == 2
    assert "drc_depth" not in json.loads((tmp_path / "base" / "run.json").read_text())["config"]
    from reta_fast.stages.distill import _partitioned_retriever
    from reta_fast.stages.report import _diagnostics_markdown

    class Pool:
        labels = np.repeat(np.arange(2), 6)
    ranking = [np.array([5, 3, 1, 0, 2, 4]), np.array([11, 6, 9, 7, 8, 10])]
    groups = _partitioned_retriever(Pool, ranking, P.DistillConfig(ipc=2, drc_depth=2), 2, "cpu").groups.tolist()
    # class 0: item 0 owns ranks 0, 2, 4 (patches 5, 1, 2), item 1 ranks 1, 3, 5 (3, 0, 4); depth 2 keeps ranks < 4
    assert [groups[p] for p in (5, 1, 3, 0)] == [0, 0, 1, 1] and [groups[p] for p in (2, 4, 8, 10)] == [4] * 4
    assert [groups[p] for p in (11, 9, 6, 7)] == [2, 2, 3, 3]
    both = _partitioned_retriever(Pool, ranking, P.DistillConfig(ipc=2, drc_depth=2, drc_exclude_anchor=True), 2,
                                  "cpu").groups.tolist()
    assert [both[p] for p in (1, 0, 9, 7)] == [0, 1, 2, 3] and both.count(4) == 8  # one candidate per item
    row = dict(block=1, own_anchor=0.5, fit_retrieved=0.1, fit_anchor=0.2, complexity_retrieved=0.1,
               complexity_anchor=0.2, distinct_per_class=1.0)
    assert "| 1 | 50% | 0.1000 / 0.2000 | 0.100 / 0.200 | 1.00 | 4.2 |" in "\n".join(
        _diagnostics_markdown(dict(drc=[dict(row, share_place=4.2)])))
    assert "| 1.00 | – |" in "\n".join(_diagnostics_markdown(dict(drc=[row])))
    for bad, msg in ((dict(method="fadrm"), "which this run does not use"), (dict(drc=False), "does not use"),
                     (dict(partition=False), "does not use"), (dict(drc_depth=1), r"static anchor \(--no-drc\)"),
                     (dict(drc_depth=0), "drc_depth must be an integer >= 2"),
                     (dict(drc_depth=2.5), "drc_depth must be an integer >= 2"),
                     (dict(drc_depth=3, ipc=10, pool_per_class=30), "covers the whole pool of 30 patches per class: "
                                                                    r".* a depth below 3 ")):
        with pytest.raises(ValueError, match=msg):
            P.DistillConfig(**dict(dict(drc_depth=2), **bad)).validate()


def test_every_reta_ablation_runs_with_the_partitioned_retrieval(data, teacher, tmp_path):
    """DRC's partition needs the item ids whether or not PTA is on (a --no-pta run once lost them)."""
    for name, kw in (("nopta", dict(pta=False)), ("nodrc", dict(drc=False)), ("initial", dict(pta_set="initial")),
                     ("margin", dict(drc_margin=0.2))):
        info = run(data, teacher, tmp_path / name, method="reta", ipc_per_batch=1, **kw)
        assert info["written"] == 30, name
        drc = info["diagnostics"]["drc"]
        assert (not drc) == (name == "nodrc")


def test_drc_connections_change_the_images_and_record_diagnostics_only_where_drc_ran(data, teacher, tmp_path):
    """Three blocks (two connections): DRC at the second only re-injects the static anchor at the first; the
    images differ from every-connection DRC, and the schedule is in the run identity only when set."""
    every = run(data, teacher, tmp_path / "every", method="reta", ipc_per_batch=3, blocks=3)
    late = run(data, teacher, tmp_path / "late", method="reta", ipc_per_batch=3, blocks=3, drc_connections=[1])
    assert every["written"] == late["written"] == 30
    assert [d["block"] for d in every["diagnostics"]["drc"]] == [0, 1]
    assert [d["block"] for d in late["diagnostics"]["drc"]] == [1]
    a, b = png_bytes(tmp_path / "every"), png_bytes(tmp_path / "late")
    assert a.keys() == b.keys() and any(a[k] != b[k] for k in a)
    assert json.loads((tmp_path / "late" / "run.json").read_text())["config"]["drc_connections"] == [1]
    assert "drc_connections" not in json.loads((tmp_path / "every" / "run.json").read_text())["config"]
    for bad, msg in ((dict(method="fadrm"), "drc_connections schedules DRC, which this run does not use"),
                     (dict(drc=False), "does not use"), (dict(drc_connections=[3]), r"4 recover blocks \(0 to 2\)"),
                     (dict(blocks=1), "no residual connection"),
                     (dict(drc_exclude_anchor=True), "drc_exclude_anchor and drc_connections contradict each other")):
        with pytest.raises(ValueError, match=msg):
            P.DistillConfig(**dict(dict(drc_connections=[0]), **bad)).validate()
    # every connection listed is the default's run; numpy indices are plain integers in the identity
    assert "drc_connections" not in P.DistillConfig(drc_connections=(0, 1, 2)).resolved(32).identity(10)
    cfg = P.DistillConfig(drc_connections=list(np.arange(2)))
    cfg.validate()
    assert json.loads(json.dumps(cfg.resolved(32).identity(10)))["drc_connections"] == [0, 1]


def test_drc_exclude_anchor_never_reinjects_the_initial_patch(data, teacher, tmp_path):
    """--drc-exclude-anchor: every injection is another patch of the image's own share, never its anchor (the
    default re-injects the anchor at a share of them); bad combinations and too small a pool are refused."""
    base = run(data, teacher, tmp_path / "base", method="reta", ipc_per_batch=1)
    info = run(data, teacher, tmp_path / "excl", method="reta", ipc_per_batch=1, drc_exclude_anchor=True)
    assert info["written"] == 30
    drc = info["diagnostics"]["drc"]
    assert drc and all(d["own_anchor"] == 0.0 for d in drc)
    assert any(d["own_anchor"] > 0 for d in base["diagnostics"]["drc"])  # the default does re-inject it here
    assert png_bytes(tmp_path / "excl") != png_bytes(tmp_path / "base")
    # the retriever itself: each item's candidates are its share without rank i
    from reta_fast.stages.distill import _partitioned_retriever

    class Pool:
        labels = np.repeat(np.arange(2), 6)
    ranking = [np.array([5, 3, 1, 0, 2, 4]), np.array([11, 6, 9, 7, 8, 10])]
    cfg = P.DistillConfig(ipc=2, drc_exclude_anchor=True)
    groups = _partitioned_retriever(Pool, ranking, cfg, 2, "cpu").groups.tolist()
    # class 0: ranks 0..5 = patches 5,3,1,0,2,4; item 0 owns ranks 0,2,4 (5,1,2), item 1 ranks 1,3,5 (3,0,4)
    assert [groups[p] for p in (1, 2)] == [0, 0] and [groups[p] for p in (0, 4)] == [1, 1]
    assert [groups[p] for p in (5, 3, 11, 6)] == [4, 4, 4, 4]  # the anchors: no item's group
    assert [groups[p] for p in (9, 8)] == [2, 2] and [groups[p] for p in (7, 10)] == [3, 3]  # 11,9,8 / 6,7,10
    with pytest.raises(ValueError, match=r"drc_exclude_anchor needs at least 2 x ipc = 6 pool patches per class .*"
                                         r"class\(es\) \[\('\w+', 5\)"):  # named, before any image is written
        run(data, teacher, tmp_path / "small" / "out", method="reta", ipc_per_batch=1, drc_exclude_anchor=True,
            pool_per_class=5)
    assert not (tmp_path / "small" / "out" / "images").exists() or not png_bytes(tmp_path / "small" / "out")
    for bad, msg in ((dict(method="fadrm"), "which this run does not use"), (dict(drc=False), "does not use"),
                     (dict(partition=False), "does not use"), (dict(drc_margin=0.1), "contradict each other")):
        with pytest.raises(ValueError, match=msg):
            P.DistillConfig(drc_exclude_anchor=True, **bad).validate()
