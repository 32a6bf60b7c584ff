"""Distilled-set quality: RETA vs its baselines and ablations on a real data set, side by side.

    python bench/quality.py --data path/to/cifar10.tar.gz --scale cpu --ipcs 10 50

For each IPC, method and *distillation* seed (``--distill-seeds``: the seed of the pool, the initial patches
and the augmentation streams) it distils with the same teacher and evaluates the set with the same student
protocol and student seeds (``--seeds``). A method's score is the mean ± std over distillation seeds of the
per-seed mean over student seeds (each seed's value is kept). ``results.json`` + ``table.md`` go to
``--results``.

``--split test`` (default) scores on the data set's test split; ``--split val`` on a validation split carved
from the *training* images outside the patch pool (``--val-per-class`` per class, fixed): choose settings
there, never on the test split.

Scales (stated in the table):

* ``cpu``: ConvNet-BN width 32 teacher and student: teacher 15 epochs on all training images; 300 recover
  steps per batch; students 300 epochs (IPC 10) / 150 (IPC 50) at AdamW lr 1e-2, batch 50 / 100.
* ``gpu``: the full protocol of docs/method.md §5: ResNet-18 (CIFAR stem) teacher (60 epochs) and
  student, 1000 recover steps, 300 student epochs at lr 1e-3, batch 64.
* ``gpu-short``: the same with a 15-epoch teacher and 500 recover steps, for a short GPU session.

``--data`` is an ImageFolder root with ``train/`` and ``test/`` (or ``val/``), or the ``.tar.gz`` of one
(unpacked once into ``$RETA_FAST_CACHE/data``, never into the repository). Work folders go to ``--work``
(default ``bench/out/quality``, git-ignored); a re-run resumes: finished sets and evaluations are reused
when their settings match (a set's scores are kept per split and student seeds, so ``--seeds 0 1 … 9`` adds
a better-resolved score without discarding the default one, and trains only seeds 3 … 9: a student depends
on its own seed, so the ones already trained on a set under the same protocol are reused; scores older than
the set's images are not). One process: under torchrun use ``reta`` itself. ``--merge`` keeps the rows of an existing
results.json it does not recompute.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import cpu_model  # noqa: E402

# The batch structure of ImageNet-1K runs (one image per class per batch) on a 10-class data set.
IMAGENET_BATCH = dict(batch_classes=10, ipc_per_batch=1)

ALPHA_05 = dict(alpha=0.5)  # the paper's residual weight (docs/method.md §2.6)
PAPER_PTA = dict(pta_view="augmented")  # the paper's PTA: the augmented view at the fixed weight (docs/method.md §4.10)
VARIANTS = {  # name -> DistillConfig overrides (everything else: the defaults of this version)
    "random-real": dict(method="random-real"),
    "rded": dict(method="rded"),
    "sre2l": dict(method="sre2l"),
    "fadrm": dict(method="fadrm"),
    "reta": dict(method="reta"),
    "reta --no-drc": dict(method="reta", drc=False),
    "reta --no-pta": dict(method="reta", pta=False),
    # RETA and its DRC ablation with the paper's PTA, the default up to 64 px before the clean view at a balanced
    # weight (DistillConfig.pta_view, chosen on the validation split against these rows). Every RETA variant
    # below that does not choose PTA's view was measured then and keeps the paper's (see the loop after this
    # table): its sets resume, and its row compares with these.
    "reta paper-pta": dict(method="reta", **PAPER_PTA),
    "reta --no-drc paper-pta": dict(method="reta", drc=False, **PAPER_PTA),
    # The four recover methods at the paper's residual weight, the default before the size rule of
    # DistillConfig.alpha (0.3 up to 64 px, chosen on the validation split against these rows). Every variant
    # below that sets ALPHA_05 was measured then and keeps it: its sets resume, and its row compares with these.
    "fadrm alpha 0.5": dict(method="fadrm", **ALPHA_05),
    "reta alpha 0.5": dict(method="reta", **ALPHA_05),
    "reta --no-drc alpha 0.5": dict(method="reta", drc=False, **ALPHA_05),
    "reta --no-pta alpha 0.5": dict(method="reta", pta=False, **ALPHA_05),
    # PTA's point set as reta_fast built it before: the batch's images plus fixed features of the class's
    # other *initial* images (no lockstep)
    "reta pta-initial": dict(method="reta", **ALPHA_05, pta_set="initial"),
    # With 10-image batches PTA weighs lam_topo * 100 / 10 by default (DistillConfig.topo_ref_batch): CE and
    # BN are batch means, so an image's share of them grows with 1 / batch size while its share of PTA (a
    # per-class sum) does not. The same images as --lam-topo 5 --no-topo-batch-scale.
    "fadrm imagenet-batch": dict(method="fadrm", **ALPHA_05, **IMAGENET_BATCH),
    "reta imagenet-batch": dict(method="reta", **ALPHA_05, **IMAGENET_BATCH),
    "reta --no-drc imagenet-batch": dict(method="reta", **ALPHA_05, drc=False, **IMAGENET_BATCH),
    "reta --no-pta imagenet-batch": dict(method="reta", **ALPHA_05, pta=False, **IMAGENET_BATCH),
    # PTA at lam_topo whatever the batch size (reta_fast 0.1.0 with class-complete PTA)
    "reta pta-unscaled imagenet-batch": dict(method="reta", **ALPHA_05, topo_ref_batch=0, **IMAGENET_BATCH),
    # reta_fast's PTA before class-complete point sets and the batch scaling
    "reta pta-initial imagenet-batch": dict(method="reta", **ALPHA_05, pta_set="initial", topo_ref_batch=0,
                                            **IMAGENET_BATCH),
    # the converse: with a class's images together, a tenth of PTA's weight (what one-image-per-class
    # batches of 10 images give it)
    "reta lam_topo 0.05": dict(method="reta", **ALPHA_05, lam_topo=0.05),
    # PTA's graph: k of the mutual k-NN graph (the default is min(10, IPC // 2); IPC - 1 is the complete graph)
    "reta k 2": dict(method="reta", **ALPHA_05, topo_k=2),
    "reta k 9": dict(method="reta", **ALPHA_05, topo_k=9),
    "reta k 2 imagenet-batch": dict(method="reta", **ALPHA_05, topo_k=2, **IMAGENET_BATCH),
    "reta k 9 imagenet-batch": dict(method="reta", **ALPHA_05, topo_k=9, **IMAGENET_BATCH),
    "reta k 5": dict(method="reta", **ALPHA_05, topo_k=5),
    "reta k 25": dict(method="reta", **ALPHA_05, topo_k=25),
    "reta k 49": dict(method="reta", **ALPHA_05, topo_k=49),
    # DRC: what the retrieval should weigh and when it should replace the anchor
    "reta lam 0": dict(method="reta", **ALPHA_05, lam=0.0),
    "reta drc-margin 0.1": dict(method="reta", **ALPHA_05, drc_margin=0.1),
    "reta drc-margin 0.2": dict(method="reta", **ALPHA_05, drc_margin=0.2),
    "reta lam_topo 2": dict(method="reta", **ALPHA_05, lam_topo=2.0),
    # DRC's choice at IPC 50: the default 300-patch pool leaves each image 6 candidates of its share (30 at
    # IPC 10). A 1500-patch pool gives it 30 at IPC 50 (and FADRM a larger pool to pick its anchors from).
    # --split val draws its images outside the pool, so these rows score on another 3,000 images than the
    # 300-patch rows: compare them with each other, seed by seed.
    "fadrm pool 1500": dict(method="fadrm", **ALPHA_05, pool_per_class=1500),
    "reta pool 1500": dict(method="reta", **ALPHA_05, pool_per_class=1500),
    # DRC's search: the whole class pool (the paper's argmin) instead of the image's share of it
    "reta --no-partition": dict(method="reta", **ALPHA_05, partition=False),
    # Recovery length: at the cpu scale a block has 75 steps; do DRC and PTA need more to act (IPC 50)?
    "fadrm 600 steps": dict(method="fadrm", **ALPHA_05, iterations=600),
    "reta 600 steps": dict(method="reta", **ALPHA_05, iterations=600),
    # PTA's views: real features through the same augmentation as the synthetic ones
    "reta pta-real-augmented": dict(method="reta", **ALPHA_05, pta_real_view="augmented"),
    # PTA's schedule: only in the last two of the four blocks (the set's topology once its images have formed)
    "reta pta-from-block 2": dict(method="reta", pta_from_block=2),
    # Below the default residual weight: alpha -> 0 tends to RDED's plain real patches, so there is an optimum
    "fadrm alpha 0.2": dict(method="fadrm", alpha=0.2),
    "reta alpha 0.2": dict(method="reta", alpha=0.2),
    # DRC's "do no harm" margin and PTA's k 2, the best two at alpha 0.5, again at the default alpha (0.3 here)
    "reta drc-margin 0.1 alpha 0.3": dict(method="reta", drc_margin=0.1),
    "reta k 2 alpha 0.3": dict(method="reta", topo_k=2),
    # PTA's features from the images as they are instead of the step's augmented view (one more forward per
    # step): at IPC 50 PTA on the augmented view leaves the clean set's topology where FADRM's is
    "reta pta-view clean": dict(method="reta", pta_view="clean"),
    # ... and at four times PTA's weight: does a set PTA really aligns (clean view) train a better student once
    # the alignment is a larger share of the objective?
    "reta pta-view clean lam_topo 2": dict(method="reta", pta_view="clean", lam_topo=2.0),
    # PTA's weight from the gradients: CE's gradient on the pixels grows 14-40x from the first block to the last
    # while PTA's changes less, so a fixed weight is 0.3-3x CE's early and 1-3 % late at IPC 50; these hold
    # PTA's gradient on the features at a fixed fraction of CE's in every step instead
    "reta pta-balance 0.1": dict(method="reta", pta_balance=0.1),
    "reta pta-balance 0.3": dict(method="reta", pta_balance=0.3),
    # ... on the clean view, where PTA aligns the set itself at IPC 50 (the augmented view's crops do not)
    "reta pta-view clean pta-balance 0.1": dict(method="reta", pta_view="clean", pta_balance=0.1),
    # ... and three times that share (the default's view and rule at a stronger PTA)
    "reta pta-view clean pta-balance 0.3": dict(method="reta", pta_view="clean", pta_balance=0.3),
    # ... and half the default's share (ρ 0.3 lost to ρ 0.1 on every seed: is the optimum below 0.1?)
    "reta pta-view clean pta-balance 0.05": dict(method="reta", pta_view="clean", pta_balance=0.05),
    # DRC's departure from the anchor: with the anchor allowed, 58-75 % of the injections re-inject it, and keeping
    # it more (drc-margin 0.1) scored below the default at alpha 0.3; here it is never re-injected
    "reta drc-exclude-anchor": dict(method="reta", drc_exclude_anchor=True),
    # ... where each image's share holds two patches (its anchor and one other), as the 100-patch digits pool at
    # IPC 50 gives, on CIFAR-10 at IPC 10: a 20-patch pool (another validation split: compare these three only)
    "fadrm pool 20": dict(method="fadrm", pool_per_class=20),
    "reta pool 20": dict(method="reta", pool_per_class=20),
    "reta drc-exclude-anchor pool 20": dict(method="reta", drc_exclude_anchor=True, pool_per_class=20),
    # Which connections retrieve (the others re-inject the static anchor): the last injection weighs most in the
    # written image (1 - alpha of it, then one block of steps), the first least
    "reta drc-connections 2": dict(method="reta", drc_connections=[2]),
    "reta drc-connections 0,1": dict(method="reta", drc_connections=[0, 1]),
}
for _name, _over in VARIANTS.items():  # the variants measured before the size rule of DistillConfig.pta_view
    if _name not in ("reta", "reta --no-drc") and _over.get("method") == "reta":
        # (an explicit view keeps the fixed weight unless pta_balance is set; where PTA is off the view is not
        # part of the run)
        _over.setdefault("pta_view", PAPER_PTA["pta_view"])
# Measured under this version's PTA (the clean view at a balanced weight up to 64 px): set after the loop above
VARIANTS.update({
    # DRC's complexity weight: three times and a third of the paper's lambda (lambda 0 was level at alpha 0.5)
    "reta lam 0.3": dict(method="reta", lam=0.3),
    "reta lam 0.03": dict(method="reta", lam=0.03),
    # ImageNet-1K's batch structure (one image per class per batch, lockstep) with this version's defaults (alpha
    # 0.3 and the clean view at a balanced weight up to 64 px): what a Tiny-ImageNet-sized run (64 px, many
    # classes, class-balanced micro-batches) gets
    "fadrm imagenet-batch alpha 0.3": dict(method="fadrm", **IMAGENET_BATCH),
    "reta imagenet-batch alpha 0.3": dict(method="reta", **IMAGENET_BATCH),
    "reta imagenet-batch alpha 0.3 paper-pta": dict(method="reta", **IMAGENET_BATCH, **PAPER_PTA),
    # ... and RETA's two ablations there: which part (if either) carries RETA's IPC 10 lead of the 100-image
    # batches into ImageNet-1K's structure
    "reta --no-drc imagenet-batch alpha 0.3": dict(method="reta", drc=False, **IMAGENET_BATCH),
    "reta --no-pta imagenet-batch alpha 0.3": dict(method="reta", pta=False, **IMAGENET_BATCH),
    # DRC alone is below the static anchor there on every seed, and its retrieved patches sit on average at place
    # 3-6 of the image's 30-patch share (half of them at place 0, the anchor): DRC searching only the three best
    # RDED ranks of the share (the anchor and the next two)
    "reta drc-depth 3 imagenet-batch alpha 0.3": dict(method="reta", drc_depth=3, **IMAGENET_BATCH),
    "reta drc-depth 3": dict(method="reta", drc_depth=3),  # ... and in 100-image batches
})
STUDENT_SEEDS = [0, 1, 2]  # the default; its scores live in eval-<split>.json (older work folders too)
DEFAULT_METHODS = ["random-real", "rded", "fadrm", "reta", "reta --no-drc", "reta --no-pta"]

SCALES = {
    "cpu": dict(arch="convnet-w32", teacher_epochs=15, iterations=300,
                eval={10: dict(epochs=300, batch_size=50, lr=1e-2), 50: dict(epochs=150, batch_size=100, lr=1e-2)}),
    "gpu": dict(arch="resnet18", teacher_epochs=60, iterations=1000,
                eval={10: dict(epochs=300, batch_size=64, lr=1e-3), 50: dict(epochs=300, batch_size=64, lr=1e-3)}),
    # a GPU data point that fits a short device session (~5 min on an H100 for IPC 10 and the five
    # shipped methods): a shorter-trained ResNet-18 teacher and half the recover steps, the full student
    "gpu-short": dict(arch="resnet18", teacher_epochs=15, iterations=500,
                      eval={10: dict(epochs=300, batch_size=64, lr=1e-3), 50: dict(epochs=300, batch_size=64, lr=1e-3)}),
    "smoke": dict(arch="convnet-w8", teacher_epochs=1, iterations=4,  # the test suite's: checks the plumbing only
                  eval={10: dict(epochs=2, batch_size=8, lr=1e-2)}),
}


def _pool_name(cfg) -> str:
    """One pool folder per seed and pool size (a pool is refused for other parameters)."""
    name = "pool" if cfg.seed == 0 else f"pool-seed{cfg.seed}"
    return name if cfg.pool_per_class == 300 else f"{name}-pc{cfg.pool_per_class}"


def unpack(archive: Path) -> Path:
    """Unpack a ``.tar.gz`` ImageFolder once into the cache (atomically: temp folder + rename)."""
    from reta_fast.fileio import cache_dir

    dest = cache_dir() / "data" / archive.name.replace(".tar.gz", "").replace(".tgz", "")
    if not dest.is_dir():
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        print(f"unpacking {archive} -> {dest}", flush=True)
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data") if sys.version_info >= (3, 12) else tf.extractall(tmp)
        os.rename(tmp, dest)
    subs = [p for p in dest.iterdir() if p.is_dir()]
    return subs[0] if len(subs) == 1 and not (dest / "train").is_dir() else dest


def data_label(args, src: Path, data) -> str:
    """The data set as the tables name it (with the grayscale and size options that change its images)."""
    return str(src.name) + (" in grayscale" if args.grayscale else "") + (f" at {data.size} px" if args.size else "")


def merge_conflict(old: dict, new: dict):
    """Why rows measured under ``new`` (a results meta) must not join a table measured under ``old``, or None.
    A different teacher (e.g. the same command on another CPU model: other rounding, another teacher) makes
    every row, and the paired RETA - FADRM differences, incomparable."""
    for key in ("data", "scale", "split"):
        if key in old and old[key] != new[key]:
            return f"its rows are {key} {old[key]!r}, this run's {new[key]!r}"
    a, b = old.get("teacher", {}).get("top1"), new["teacher"]["top1"]
    if a != b:
        return (f"its rows come from another teacher (top-1 {a}% on {old.get('machine', 'an unnamed machine')}, "
                f"here {b}% on {new.get('machine')}), so they do not compare with this run's")
    return None


def _merge_refused(path: Path, meta: dict, kept: Optional[Path] = None) -> bool:
    """Say why (on stderr) and return True when rows under ``meta`` must not be merged into ``path``."""
    if not path.is_file():
        return False
    why = merge_conflict(json.loads(path.read_text())["meta"], meta)
    if why:  # never drop the old rows silently
        print(f"quality: --merge into {path}: {why}; nothing written" + (
            f" (the sets are kept under {kept}: re-run with another --results to tabulate them)" if kept else ""),
            file=sys.stderr)
    return why is not None


def machine() -> str:
    """A folder-safe tag of this machine: the GPU's name, or ``cpu-<first three words of the CPU model>-<N>core``
    (letters and digits only: "Intel(R) Xeon(R) Processor" -> ``cpu-intel-xeon-processor-2core``)."""
    if torch.cuda.is_available():
        return "-".join(re.findall(r"[a-z0-9]+", torch.cuda.get_device_name(0).lower()))
    words = re.findall(r"[a-z0-9]+", re.sub(r"\((r|tm)\)", "", cpu_model().lower()))
    return f"cpu-{'-'.join(words[:3])}-{os.cpu_count()}core"


class Grayscale:
    """A data set's items in grayscale (ITU-R 601 luma, replicated to 3 channels); labels and classes kept."""

    def __init__(self, dataset):
        from reta_fast.data import dataset_targets

        self.dataset = dataset
        self.targets = dataset_targets(dataset)
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        from reta_fast.data import to_image_tensor

        img, label = self.dataset[i]
        x = to_image_tensor(img)
        y = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).clamp(0, 1)
        return y.expand(3, -1, -1).contiguous(), label


def _slug(name: str) -> str:
    return name.replace(" --", "-").replace(" ", "")


def validation_split(data, pool, per_class: int, seed: int = 1234):
    """Training images outside the patch pool, ``per_class`` per class (fixed by ``seed``)."""
    from reta_fast.data.sets import Subset

    used = set(np.asarray(pool.source_index).tolist())
    targets = np.asarray(data.train.targets)
    rng = np.random.default_rng(seed)
    idx = []
    for c in range(len(data.classes)):
        free = [i for i in np.flatnonzero(targets == c).tolist() if i not in used]
        if not free:
            raise ValueError(f"--split val: class {data.classes[c]!r} has no training image outside the patch pool "
                             f"({int((targets == c).sum())} images, all in the pool): use a smaller --pool-per-class")
        idx += sorted(rng.choice(free, size=min(per_class, len(free)), replace=False).tolist())
    return Subset(data.train, sorted(idx))


def _eval_name(split: str, seeds) -> str:
    return (f"eval-{split}.json" if list(seeds) == STUDENT_SEEDS
            else f"eval-{split}-seeds{'_'.join(map(str, seeds))}.json")


def _newest_image_ns(out: Path) -> int:
    """When the newest file of the set's images was written (0 for none)."""
    return max((p.stat().st_mtime_ns for p in (out / "images").rglob("*") if p.is_file()), default=0)


def trained_students(out: Path, split: str, want: dict, val_images: int) -> tuple[dict, dict]:
    """The students already trained on the set in ``out`` under the protocol ``want`` (its student seeds
    aside) and scored on ``split`` (``val_images`` images): student seed -> top-1, and file name -> record
    for every ``eval-<split>*.json`` there that holds them. A record older than the set's newest image (the
    set was re-distilled, or finished, after it) scored other images and is not used.

    Each student is a function of its own seed (``evaluate`` seeds its weights, data order, crops and CutMix
    with it and carries nothing from one student to the next), so a student of seed 3 from a ``--seeds 0 …
    9`` run is the student a ``--seeds 3 4`` run trains. Exactly so on one machine and thread count; one
    trained on another device, thread count or version is another sample of the same protocol."""
    found, records = {}, {}
    same = {k: v for k, v in want.items() if k != "seeds"}
    newest = _newest_image_ns(out)
    for f in sorted(out.glob(f"eval-{split}*.json")):
        if f.name != f"eval-{split}.json" and not f.name.startswith(f"eval-{split}-seeds"):
            continue
        try:
            res = json.loads(f.read_text())
            proto = dict(res["protocol"])
            seeds = [int(s) for s in proto.pop("seeds")]
            runs = [float(a) for a in res["distilled"]["runs"]]
            fresh = f.stat().st_mtime_ns >= newest
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # unreadable or another layout: not reused, the students are trained again
        if (not fresh or proto != same or res.get("random_real") is not None or len(seeds) != len(runs)
                or res.get("val_images") != val_images):
            continue
        for s, acc in zip(seeds, runs):
            found.setdefault(s, acc)
        records[f.name] = res
    return found, records


def _evaluate_reusing(P, data, teacher, out: Path, ecfg, want: dict, split: str, device, ipc: int) -> dict:
    """The set's scores for the student seeds of ``ecfg`` in ``eval-<split>[-seeds…].json``: trains only
    the students not trained yet (see ``trained_students``) and joins their scores with the known ones."""
    from dataclasses import replace

    from reta_fast.fileio import write_json

    name = _eval_name(split, ecfg.seeds)
    known, records = trained_students(out, split, want, len(data.val))
    if name in records and records[name]["protocol"]["seeds"] == list(ecfg.seeds):
        return records[name]
    missing = [s for s in ecfg.seeds if s not in known]
    part = next(iter(records.values()), None)  # for the rest of the record (teacher, sizes)
    if missing:
        part = P.evaluate(data, teacher, out, replace(ecfg, seeds=missing), device=device, progress=False, ipc=ipc)
        os.replace(out / "eval.json", out / _eval_name(split, missing))
        known.update(zip(missing, part["distilled"]["runs"]))
        if missing == list(ecfg.seeds):
            return part
    runs = [known[s] for s in ecfg.seeds]
    res = dict(part, distilled=dict(mean=float(np.mean(runs)), std=float(np.std(runs)), runs=runs),
               protocol=want, reused_seeds=[s for s in ecfg.seeds if s not in missing])
    write_json(out / name, res)
    return res


def foreign_checkout() -> Optional[str]:
    """Why the reta_fast this process imports is not this checkout's code, or None: an editable install of
    another checkout (or worktree), or an install of another version, would make the sets with other code
    under this checkout's variant names. An install of this very code (``pip install .``) is fine."""
    import reta_fast
    import reta_fast.kernels

    pkg, kernels = Path(reta_fast.__file__).resolve().parent, Path(reta_fast.kernels.__file__).resolve().parent
    if pkg == ROOT / "reta_fast" and kernels == ROOT / "kernels":
        return None
    differ = []
    for mine, theirs in ((ROOT / "reta_fast", pkg), (ROOT / "kernels", kernels)):
        for p in sorted(mine.rglob("*.py")):
            other = theirs / p.relative_to(mine)
            if not other.is_file() or other.read_bytes() != p.read_bytes():
                differ.append(p.relative_to(ROOT).as_posix())
    if not differ:
        return None
    return f"reta_fast is imported from {pkg}, whose code differs from this checkout's ({len(differ)} files, e.g. {differ[0]})"


def main(argv=None) -> int:
    from reta_fast import stages as P
    from reta_fast.data.sets import load_data
    from reta_fast.models import load_teacher
    from reta_fast.stages.squeeze import squeeze

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="ImageFolder root with train/ and test/ (or val/), its .tar.gz, or "
                                                  "digits (the embedded scikit-learn digits)")
    ap.add_argument("--size", type=int, default=None, help="working image size (default: the data set's)")
    ap.add_argument("--grayscale", action="store_true", help="the data set's images in grayscale (3 equal channels)")
    ap.add_argument("--pool-per-class", type=int, default=None,
                    help="patch pool per class (default 300; smaller leaves training images for --split val)")
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--ipcs", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--distill-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=STUDENT_SEEDS, help="student seeds")
    ap.add_argument("--split", choices=["test", "val"], default="test")
    ap.add_argument("--val-per-class", type=int, default=300)
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "quality"))
    ap.add_argument("--results", help="where results.json/table.md go (default bench/results/quality-<scale>-<machine>)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--readme", help="also write the table into this file between <!-- quality:begin --> and "
                                     "<!-- quality:end --> (test split) or the validation markers (--split val)")
    ap.add_argument("--readme-rows", nargs="+", metavar="METHOD",
                    help="with --readme: only these methods' rows go into the README, in this order (the table "
                         "file keeps every row)")
    ap.add_argument("--render-only", action="store_true", help="write table/README from results.json, run nothing")
    ap.add_argument("--distill-only", action="store_true",
                    help="distil (or resume) every set and stop: no evaluation, no table (e.g. to compare images)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of an existing results.json that this invocation does not recompute")
    args = ap.parse_args(argv)
    if args.readme_rows and not args.readme:
        ap.error("--readme-rows selects the README's rows: give --readme too")
    why = foreign_checkout()
    if why is not None:
        print(f"quality: {why}: that code would make the sets under this checkout's names. Run with "
              f"PYTHONPATH={ROOT} (or install this checkout).", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would distil and score the same sets
        ap.error("bench/quality.py runs in one process, not under torchrun; spread a data set over GPUs with "
                 "`torchrun ... reta distill` / `reta evaluate`")
    if args.render_only:
        results = Path(args.results) if args.results else ROOT / "bench" / "results" / f"quality-{args.scale}-{machine()}"
        name = "results.json" if args.split == "test" else "validation.json"
        saved = json.loads((results / name).read_text())
        _publish(results, name, saved["meta"], saved["rows"], args.readme, args.split, args.readme_rows)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    unknown = set(args.methods) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {list(VARIANTS)}")
    src = Path(args.data)
    if args.data == "digits":  # the embedded data set: its stratified test split scores it
        root = "digits"
    elif not src.exists():
        print(f"quality: data {src} not found; nothing to do", file=sys.stderr)
        return 2
    else:
        root = unpack(src) if src.is_file() else src
    sc = SCALES[args.scale]
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    data = load_data(str(root), size=args.size)
    if args.grayscale:  # the same images without colour: low-texture, one-channel data (replicated 3x)
        data.train, data.val = Grayscale(data.train), Grayscale(data.val)
        data.name += "-gray"
    print(data.describe(), flush=True)
    work = Path(args.work) / f"{args.scale}-{data.fingerprint}"
    work.mkdir(parents=True, exist_ok=True)
    tpath = work / f"teacher-{sc['arch']}.pt"
    t0 = time.perf_counter()
    if tpath.is_file():
        teacher = load_teacher(tpath, data, args.device)
        teacher_s = None
    else:
        teacher = squeeze(data, sc["arch"], epochs=sc["teacher_epochs"], device=args.device, out=tpath)
        teacher_s = time.perf_counter() - t0
    print(f"teacher {sc['arch']}: top-1 {teacher.accuracy:.2f}%", flush=True)
    results = Path(args.results) if args.results else ROOT / "bench" / "results" / f"quality-{args.scale}-{machine()}"
    res_name = "results.json" if args.split == "test" else "validation.json"
    if args.merge and not args.distill_only and _merge_refused(  # now, not after hours of distillation
            results / res_name, dict(data=data_label(args, src, data), scale=args.scale, split=args.split,
                                     teacher=dict(top1=teacher.accuracy), machine=machine())):
        return 2
    test_split = data.val
    rows = []
    for ipc in args.ipcs:
        ev = sc["eval"][ipc] if ipc in sc["eval"] else sc["eval"][max(sc["eval"])]
        ecfg = P.EvalConfig(student=sc["arch"], epochs=ev["epochs"], batch_size=ev["batch_size"], lr=ev["lr"],
                            seeds=tuple(args.seeds), baseline=False)
        for name in [n for n in VARIANTS if n in args.methods]:
            per_seed, diag = {}, {}
            for dseed in args.distill_seeds:
                out = work / f"{_slug(name)}-ipc{ipc}-seed{dseed}"
                data.val = test_split  # the run's identity is the data set's own, whatever split scores it
                over = dict(VARIANTS[name], **({"pool_per_class": args.pool_per_class} if args.pool_per_class else {}))
                cfg = P.DistillConfig(**{"ipc": ipc, "iterations": sc["iterations"], "seed": dseed, **over})
                pool_dir = work / _pool_name(cfg)
                try:
                    with P.Stage(out, "distill", args.device) as st:
                        st.info.update(P.distill(data, [teacher], out, cfg, device=args.device, pool_dir=pool_dir,
                                                 progress=False, teacher_specs=[str(tpath)]))
                except P.RunMismatch as exc:  # a set of this name made by an earlier variant or reta_fast
                    print(f"quality: {name} IPC {ipc} seed {dseed}: {exc}\nThe variant's settings changed since "
                          f"that set was made; move {out} away (its evaluations go with it) or use another "
                          f"--work.", file=sys.stderr)
                    return 2
                first = out / "stages" / "distill-first.json"
                if st.info.get("written"):
                    shutil.copyfile(out / "stages" / "distill.json", first)
                if args.distill_only:
                    print(f"== {name} IPC {ipc} seed {dseed}: distilled into {out}", flush=True)
                    continue
                dinfo = json.loads((first if first.is_file() else out / "stages" / "distill.json").read_text())
                if args.split == "val":
                    from reta_fast.retrieval import PatchPool

                    try:
                        data.val = validation_split(data, PatchPool.load(pool_dir), args.val_per_class)
                    except ValueError as exc:
                        print(f"quality: {exc}", file=sys.stderr)
                        return 2
                else:
                    data.val = test_split
                # one file per split and student seeds, so a run with more student seeds keeps the default's
                want = json.loads(json.dumps(dict(asdict(ecfg), crop_scale=list(ecfg.crop_scale),
                                                  seeds=list(ecfg.seeds), flip=data.flip)))
                res = _evaluate_reusing(P, data, teacher, out, ecfg, want, args.split, device=args.device, ipc=ipc)
                per_seed[dseed] = dict(top1=res["distilled"], distill_seconds=dinfo["seconds"],
                                       distill_peak_bytes=dinfo["peak_bytes"], peak_kind=dinfo["peak_kind"],
                                       loss_parts=dinfo.get("loss_parts"))
                diag[dseed] = dinfo.get("diagnostics")
                print(f"== {name} IPC {ipc} seed {dseed} ({args.split}): {res['distilled']['mean']:.2f} ± "
                      f"{res['distilled']['std']:.2f}", flush=True)
            if args.distill_only:
                continue
            means = [v["top1"]["mean"] for v in per_seed.values()]
            rows.append(dict(name=name, ipc=ipc, split=args.split,
                             top1=dict(mean=float(np.mean(means)), std=float(np.std(means)), runs=means),
                             seeds={str(k): v for k, v in per_seed.items()},
                             diagnostics={str(k): v for k, v in diag.items() if v is not None} or None,
                             distill_seconds=float(np.mean([v["distill_seconds"] for v in per_seed.values()])),
                             distill_peak_bytes=max(v["distill_peak_bytes"] for v in per_seed.values()),
                             peak_kind=next(iter(per_seed.values()))["peak_kind"]))
            r = rows[-1]["top1"]
            print(f"== {name} IPC {ipc} ({args.split}, {len(means)} distillation seeds): {r['mean']:.2f} ± "
                  f"{r['std']:.2f}", flush=True)
    if args.distill_only:
        return 0
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        sha = "unknown"
    import reta_fast

    meta = dict(data=data_label(args, src, data), classes=len(data.classes), train=len(data.train), test=len(test_split),
                split=args.split, val_per_class=args.val_per_class if args.split == "val" else None,
                val_images=len(data.val) if args.split == "val" and rows else None,
                scale=args.scale, settings=dict(sc, eval={str(k): v for k, v in sc["eval"].items()}),
                teacher=dict(arch=sc["arch"], top1=teacher.accuracy, seconds=teacher_s), seeds=args.seeds,
                distill_seeds=args.distill_seeds, machine=machine(), device=args.device, torch=torch.__version__,
                reta_fast=reta_fast.__version__, git=sha, date=time.strftime("%Y-%m-%d"))
    results.mkdir(parents=True, exist_ok=True)
    from reta_fast.fileio import write_json

    if args.merge and (results / res_name).is_file():
        if _merge_refused(results / res_name, meta, kept=work):  # the file may have changed since the first check
            return 2
        old = json.loads((results / res_name).read_text())
        mine = {(r["name"], r["ipc"]) for r in rows}
        rows = [r for r in old["rows"] if (r["name"], r["ipc"]) not in mine] + rows
        order = {v: i for i, v in enumerate(VARIANTS)}
        rows.sort(key=lambda r: (order.get(r["name"], 99), r["ipc"]))
    write_json(results / res_name, dict(meta=meta, rows=rows))
    _publish(results, res_name, meta, rows, args.readme, args.split, args.readme_rows)
    return 0


def _seeds_phrase(meta: dict, rows) -> str:
    """The distillation seeds the rows hold: one list when every row holds the same ones (merged tables can mix)."""
    held = {tuple(sorted(int(k) for k in r["seeds"])) for r in rows if r.get("seeds")}
    if len(held) > 1:
        return (f"each row's distillation seeds (in parentheses, in order: {list(min(held, key=len))} for the "
                f"fewest, {list(max(held, key=len))} for the most)")
    return f"distillation seeds {list(held.pop()) if held else meta.get('distill_seeds', [0])}"


def _publish(results: Path, name: str, meta: dict, rows, readme, split: str, readme_rows=None) -> None:
    """Write the table next to ``name`` in ``results`` and, with ``readme``, between the README's markers for
    ``split``; ``readme_rows`` (method names) keeps only those rows there, in that order."""
    from reta_fast.fileio import atomic_write

    table = render(meta, rows)
    table_path = results / name.replace(".json", ".md").replace("results.md", "table.md")
    if readme:  # checked before anything is written: a misspelt name must not leave a half-updated pair
        path = Path(readme)
        tag = "quality" if split == "test" else "validation"
        text = path.read_text()
        a, b = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
        if a not in text or b not in text:
            raise SystemExit(f"{path} has no {a} ... {b} markers")
        shown = table
        if readme_rows:
            held, want = list(dict.fromkeys(r["name"] for r in rows)), list(dict.fromkeys(readme_rows))
            missing = [n for n in want if n not in held]
            if missing:
                raise SystemExit(f"--readme-rows: {missing} not in {results / name} (its rows: {held})")
            shown = render(meta, [r for n in want for r in rows if r["name"] == n])
            if len(held) > len(want):
                try:
                    where = table_path.resolve().relative_to(path.resolve().parent)
                except ValueError:
                    where = table_path
                shown += f"{len(want)} of the {len(held)} methods measured; every row in `{where}`.\n"
    atomic_write(table_path, lambda fh: fh.write(table.encode()))
    print(table)
    if readme:
        head, rest = text.split(a, 1)
        atomic_write(path, lambda fh: fh.write((head + a + "\n" + shown + b + rest.split(b, 1)[1]).encode()))


def _val_size(meta: dict) -> str:
    n, per = meta.get("val_images"), meta.get("val_per_class")
    n = "" if n is None else f"{n:,} "
    return f"{n}training images outside the patch pool, up to {per} per class"


def _pinned_alpha(name: str) -> bool:
    """A variant measured at alpha 0.5 whose name does not say so."""
    return VARIANTS.get(name, {}).get("alpha") == 0.5 and "alpha" not in name


def _pinned_pta(name: str) -> bool:
    """A RETA variant measured with PTA as it was before the clean view at a balanced weight became the default
    up to 64 px (the augmented view, or the clean view at the fixed weight), whose name does not say so."""
    v = VARIANTS.get(name, {})
    return ((v.get("pta_view") == "augmented" or "pta_balance" not in v) and "pta_view" in v and v.get("pta", True)
            and v.get("lam_topo", 1) > 0 and "paper-pta" not in name)


# DistillConfig fields only RETA's parts read: a FADRM row is RETA's partner when the rest of the overrides agree
RETA_ONLY = {"drc", "pta", "lam", "lam_topo", "drc_margin", "drc_exclude_anchor", "drc_connections", "drc_depth",
             "partition",
             "topo_k",
             "topo_ref_batch", "pta_set", "pta_real_view", "pta_from_block", "pta_view", "pta_balance"}


def fadrm_partner(name: str, names) -> str | None:
    """The FADRM row a RETA row is paired with: the one distilled with the same shared settings (alpha, batch
    structure, pool, steps), i.e. the same variant without what only DRC and PTA read."""
    cfg = VARIANTS.get(name, {})
    if cfg.get("method") != "reta":
        return None
    shared = {k: v for k, v in cfg.items() if k not in RETA_ONLY and k != "method"}
    return next((n for n in names if VARIANTS.get(n, {}).get("method") == "fadrm"
                 and {k: v for k, v in VARIANTS[n].items() if k != "method"} == shared), None)


def paired(a: dict, b: dict) -> tuple[list[float], int] | None:
    """Per-seed differences a - b over the distillation seeds both rows hold (same seed: same pool, initial
    patches and augmentation streams), and how many of those seeds a is ahead on."""
    common = [k for k in a.get("seeds", {}) if k in b.get("seeds", {})]
    if len(common) < 2:
        return None
    d = [a["seeds"][k]["top1"]["mean"] - b["seeds"][k]["top1"]["mean"] for k in common]
    return d, sum(x > 0 for x in d)


# RETA against its own ablations and against the paper's PTA, paired by seed like the FADRM pairs
RETA_PAIRS = [("reta", "reta --no-drc"), ("reta", "reta --no-pta"), ("reta", "reta paper-pta"),
              ("reta --no-drc", "reta --no-drc paper-pta")]


def _pair_cells(by, a: str, b: str, ipcs) -> list[str]:
    cells = []
    for i in ipcs:
        pd = paired(by[(a, i)], by[(b, i)]) if (a, i) in by and (b, i) in by else None
        cells.append("–" if pd is None else
                     f"{np.mean(pd[0]):+.2f} (ahead on {pd[1]} of {len(pd[0])}; "
                     + ", ".join(f"{x:+.1f}" for x in pd[0]) + ")")
    return cells


def render_paired(rows, names, ipcs) -> list[str]:
    """A table of each RETA row minus its FADRM row, seed by seed, and one of RETA minus its ablations and the
    paper's PTA (each empty when no row has a partner)."""
    by = {(r["name"], r["ipc"]): r for r in rows}
    head = ["", "| rows | " + " | ".join(f"IPC {i}" for i in ipcs) + " |", "|---|" + "---|" * len(ipcs)]
    out = []
    for intro, pairs in (
            ("Paired with FADRM (each distillation seed: the same pool, initial patches and augmentation streams "
             "for both): mean difference in top-1 points, the seeds ahead on, each seed's difference.",
             [(n, fadrm_partner(n, names)) for n in names]),
            ("RETA against its ablations and the paper's PTA, paired the same way.", RETA_PAIRS)):
        L = []
        for a, b in pairs:
            if b is None or a not in names or b not in names:
                continue
            cells = _pair_cells(by, a, b, ipcs)
            if any(c != "–" for c in cells):
                L.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
        if L:
            out += [intro, *head, *L, ""]
    return out


def render(meta: dict, rows) -> str:
    ipcs = sorted({r["ipc"] for r in rows})
    names = list(dict.fromkeys(r["name"] for r in rows))
    by = {(r["name"], r["ipc"]): r for r in rows}
    s = meta["settings"]
    split = ("test split" if meta.get("split", "test") == "test" else
             f"validation split ({_val_size(meta)})")
    L = [f"Distilled-set quality on {meta['data']} ({meta['classes']} classes, {meta['train']} train / {meta['test']} "
         f"test images), scale `{meta['scale']}`: teacher and student {s['arch']}, teacher {s['teacher_epochs']} epochs "
         f"(top-1 {meta['teacher']['top1']:.2f}% = full-data accuracy of this architecture), {s['iterations']} "
         f"recover steps per batch, students: " + "; ".join(
             f"IPC {k}: {v['epochs']} epochs, batch {v['batch_size']}, AdamW lr {v['lr']}" for k, v in s["eval"].items())
         + f". Student top-1 % on the {split}, mean ± std over {_seeds_phrase(meta, rows)} "
         f"(each: the mean over student seeds {meta['seeds']}). {meta['machine']}, torch {meta['torch']}, git "
         f"{meta['git']}, {meta['date']}. No parameter tuned on the test split.", "",
         "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " | " + " | ".join(
             f"distill time IPC {i}" for i in ipcs) + " |",
         "|---|" + "---|" * (2 * len(ipcs))]
    for n in names:
        cells = []
        for i in ipcs:
            r = by.get((n, i))
            runs = "" if r is None or len(r["top1"].get("runs", [])) < 2 else \
                " (" + ", ".join(f"{v:.1f}" for v in r["top1"]["runs"]) + ")"
            cells.append("–" if r is None else f"{r['top1']['mean']:.2f} ± {r['top1']['std']:.2f}{runs}")
        times = []
        for i in ipcs:
            r = by.get((n, i))
            times.append("–" if r is None else f"{r['distill_seconds']:.0f} s, {r['distill_peak_bytes'] / 2**20:.0f} MiB")
        mark = (" †" if _pinned_alpha(n) else "") + (" ‡" if _pinned_pta(n) else "")
        L.append(f"| {n}{mark} | " + " | ".join(cells) + " | " + " | ".join(times) + " |")
    L.append("")
    L += render_paired(rows, names, ipcs)
    if any(_pinned_alpha(n) for n in names):
        L.append("† measured at the residual weight α 0.5 (the default before α's size rule): compare with the "
                 "`alpha 0.5` rows; unmarked rows use this version's defaults (α 0.3 up to 64 px).")
    if any(_pinned_pta(n) for n in names):
        L.append("‡ measured with PTA as it was before its default up to 64 px became the clean view at a "
                 "gradient-balanced weight: on the augmented view (the paper's) unless the name says `pta-view "
                 "clean`, at the fixed weight unless it says `pta-balance`; compare with the `paper-pta` rows. "
                 "Unmarked RETA rows use this version's PTA (clean view, balance 0.1 up to 64 px).")
    L.append("Peak memory: " + ("CUDA max allocated" if rows and rows[0]["peak_kind"].startswith("cuda")
                                else "process peak RSS (monotone over the run)") + ".")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
