"""The output folder of a run: its layout, the run manifest that guards it, and the distilled set on disk.

Layout (``out``)::

    run.json                  what was asked for: method, parameters, data, teachers, versions, seed
    classes.json              class index -> class name (folder name / WNID) and image folder name
    images/new{c:03d}/class{c:03d}_id{i:03d}.png    the distilled set (an ImageFolder)
    stages/<stage>.json       wall time, peak memory and loss parts of each stage that ran
    labels/seed{s}.npy, .json stored soft labels (``reta relabel``) per evaluation seed, and what they depend on
    export.pt                 tensor export: uint8 images, targets, classes, teacher logits
    eval.json, report.md, report.json, report/grid.png, report/betti.png

A folder holding another run's manifest, or files that are not a run's, is refused, never overwritten.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..data.tensors import denormalise, normalise_pixels
from ..fileio import read_json, write_json

__all__ = ["RUN_FORMAT", "OUTPUT_NAMES", "RunMismatch", "item_path", "load_distilled", "check_run", "to_uint8"]


#: the version of what a run's images are a function of, beyond its settings; bumped when the same settings
#: give other images (a folder of another format is refused, not resumed). 2: a class's PTA point set is in
#: a fixed order (registration order), so several batches per class group pair the same points as one.
RUN_FORMAT = 2


#: what a reta output folder may hold (anything else means it is somebody else's folder)
OUTPUT_NAMES = {"run.json", "classes.json", "images", "stages", "labels", "export.pt", "eval.json", "report.md",
                "report.json", "report"}


class RunMismatch(ValueError):
    """The output folder belongs to a run with other parameters: refused, nothing is overwritten."""


def item_path(out, c: int, i: int) -> Path:
    return Path(out) / "images" / f"new{c:03d}" / f"class{c:03d}_id{i:03d}.png"


def to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised ``[3, H, W]`` -> uint8 ``[H, W, 3]``."""
    return (denormalise(x, mean, std).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def load_distilled(out, classes: Sequence[str], mean, std, size: Optional[int] = None, raw: bool = False):
    """The distilled set of ``out`` as ``(images [N, 3, H, W], targets [N], ids [(c, i)])``: normalised
    float32, or with ``raw=True`` the uint8 pixels (a quarter of the memory: ImageNet-1K at IPC 50 is
    7.5 GB instead of 30; :func:`reta_fast.train.train_student` and ``relabel`` normalise them batch by
    batch, with the same values). Refuses a folder whose class mapping differs from ``classes``."""
    out = Path(out)
    mapping = read_json(out / "classes.json", "class mapping")
    if mapping.get("classes") != list(classes):
        raise ValueError(f"{str(out)!r} was distilled for classes {mapping.get('classes', [])[:5]}..., not "
                         f"{list(classes)[:5]}...")
    from PIL import Image

    files = []
    for c in range(len(classes)):
        folder = out / "images" / f"new{c:03d}"
        if folder.is_dir():
            files += [(c, f) for f in sorted(folder.glob(f"class{c:03d}_id*.png"))]
    if not files:
        raise ValueError(f"{str(out)!r} holds no distilled image (images/new*/class*_id*.png): run distill first")
    x, ys, ids = None, [], []
    for n, (c, f) in enumerate(files):
        try:
            with Image.open(f) as im:
                arr = np.array(im.convert("RGB"), dtype=np.uint8)
        except (OSError, SyntaxError) as exc:
            raise ValueError(f"distilled image {str(f)!r} is unreadable ({exc}): delete it and re-run distill "
                             f"to regenerate it") from None
        shape = (3,) + arr.shape[:2]
        if x is None:
            if size is not None and shape != (3, size, size):
                raise ValueError(f"distilled images in {str(out)!r} have shape {shape}, expected (3, {size}, {size})")
            x = torch.empty((len(files),) + shape, dtype=torch.uint8)  # filled in place: no second copy
        elif shape != tuple(x.shape[1:]):
            raise ValueError(f"distilled images in {str(out)!r} have shapes {tuple(x.shape[1:])} and {shape} "
                             f"({str(f)!r})")
        x[n] = torch.from_numpy(arr).permute(2, 0, 1)
        ys.append(c)
        ids.append((c, int(f.stem.split("_id")[-1])))
    if raw:
        return x, torch.tensor(ys), ids

    return normalise_pixels(x, mean, std), torch.tensor(ys), ids


def _heads_added(old_teachers, new_teachers) -> bool:
    """Whether the new manifest's teachers are the old ones with only a ``feature_head`` entry added (a run
    distilled before the manifest recorded a named classifier head; its teacher had one already)."""
    if not isinstance(old_teachers, list) or not isinstance(new_teachers, list) or old_teachers == new_teachers:
        return False
    if any(not isinstance(t, dict) or "feature_head" in t for t in old_teachers):
        return False
    return old_teachers == [{k: v for k, v in t.items() if k != "feature_head"} for t in new_teachers]


def check_run(out: Path, manifest: dict) -> None:
    """Refuse an output folder made by another run configuration; write run.json otherwise."""
    path = out / "run.json"
    if path.exists():
        old = read_json(path, "run manifest")
        if old.get("format", 1) != manifest["format"]:
            raise RunMismatch(f"{str(out)!r} holds a run written by another reta_fast (run format "
                              f"{old.get('format', 1)}; this version writes format {manifest['format']}, whose images "
                              f"differ for the same settings): refusing to mix them. Use another --out.")
        recorded_heads = _heads_added(old.get("teachers"), manifest["teachers"])
        if recorded_heads:  # a run made before the manifest recorded named heads: the same networks
            old = dict(old, teachers=manifest["teachers"])
        diffs = [k for k in ("method", "config", "data", "teachers")
                 if json.loads(json.dumps(old.get(k))) != json.loads(json.dumps(manifest[k]))]
        if diffs:
            detail = []
            for k in diffs:
                a, b = old.get(k), manifest[k]
                if isinstance(a, dict) and isinstance(b, dict):
                    detail += [f"{k}.{f}: {a.get(f)!r} -> {b.get(f)!r}" for f in sorted(set(a) | set(b))
                               if a.get(f) != b.get(f)]
                else:
                    detail.append(f"{k}: {a!r} -> {b!r}")
            hints = []  # default changes that a run made before them resumes from, with the flag that keeps it
            if any(d.startswith("config.alpha: 0.5 -> 0.3") for d in detail):
                hints.append("the default residual weight for images up to 64 px changed from 0.5 to 0.3: --alpha 0.5 "
                             "resumes a run made before")
            if "config.pta_view: None -> 'clean'" in detail:
                hints.append("the default PTA for images up to 64 px changed from the augmented view at the fixed "
                             "weight to the clean view at a gradient-balanced weight: --pta-view augmented resumes a run "
                             "made before")
            elif "config.pta_balance: None -> 0.1" in detail:
                hints.append("PTA's default weight on the clean view up to 64 px is now set from the gradients: "
                             "--pta-balance 0 resumes a run made at the fixed weight")
            hint = f" ({'; '.join(hints)})" if hints else ""
            raise RunMismatch(f"{str(out)!r} holds a run with other settings ({'; '.join(detail[:6])}): refusing to "
                              f"mix them. Use another --out, or the original settings to resume{hint}.")
        if recorded_heads:
            write_json(path, old)  # later stages name the heads again
        return
    foreign = [p.name for p in out.iterdir() if p.name not in OUTPUT_NAMES and not p.name.startswith(".")]
    if foreign:
        raise RunMismatch(f"{str(out)!r} is not a reta output folder (it holds {foreign[:3]}): refusing to write into it")
    write_json(path, manifest)
