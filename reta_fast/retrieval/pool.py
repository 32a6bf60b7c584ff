"""Patch pools for DRC (docs/method.md §3): per class, one square crop per real image, its
L2-normalised penultimate teacher feature and its complexity at each resolution the recover schedule
uses, stored on disk as memory-mappable arrays + a JSON manifest, built once and reused."""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._version import __version__
from ..data.folder import ImageFolder, dataset_classes, dataset_targets, to_image_tensor
from ..data.tensors import IMAGENET_MEAN, IMAGENET_STD, channel_stats, normalise
from ..fileio import atomic_dir
from ..models.features import teacher_features, teacher_fingerprint
from .complexity import patch_complexity

__all__ = ["PatchPool"]

POOL_FORMAT = 1
_ARRAYS = ("patches", "feats", "labels", "complexity", "source_index")


class PatchPool:
    """A patch pool on disk (see :meth:`build` and :meth:`load`).

    Attributes (numpy memory maps, read-only):
        patches: ``[P, S, S, 3]`` uint8 RGB crops at ``size`` S, sorted by class (stable).
        feats: ``[P, D]`` float32 L2-normalised penultimate teacher features.
        labels: ``[P]`` int64 class indices (in ``classes`` order).
        complexity: ``[P, R]`` float32 raw complexity at each of ``resolutions``.
        source_index: ``[P]`` int64 index of each patch's image in the data set.
        manifest: the parsed ``manifest.json``.
    """

    def __init__(self, path, manifest: dict, arrays: dict):
        self.path = Path(path)
        self.manifest = manifest
        for k in _ARRAYS:
            setattr(self, k, arrays[k])
        self.classes = list(manifest["classes"])
        self.resolutions = list(manifest["resolutions"])
        self.size = int(manifest["size"])
        self.mean = tuple(manifest["mean"])
        self.std = tuple(manifest["std"])
        self._tensors = {}  # (resolution, device) -> retrieval_tensors' answer

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (f"PatchPool({str(self.path)!r}: {len(self)} patches, {len(self.classes)} classes, "
                f"size {self.size}, resolutions {self.resolutions}, teacher {self.manifest['teacher']})")

    # ----------------------------------------------------------------------------------------
    def retrieval_tensors(self, resolution: Optional[int] = None, device="cpu"):
        """``(feats [P, D] float32, labels [P] int64, complexity [P])`` for :func:`reta_fast.retrieve`;
        complexity at ``resolution`` (default: the first), min-max scaled to [0, 1] per class. Made once
        per (resolution, device) and kept (the features of a 300k x 512 pool are 600 MB: every DRC
        injection reuses them); :meth:`drop_tensors` frees them. Treat them as read-only."""
        r = self.resolutions[0] if resolution is None else resolution
        if r not in self.resolutions:
            raise ValueError(f"resolution {r} not in this pool's resolutions {self.resolutions}")
        key = (r, str(torch.device(device)))
        if key not in self._tensors:
            feats = self._tensors.get(("feats", key[1]))
            if feats is None:
                feats = self._tensors[("feats", key[1])] = torch.tensor(np.asarray(self.feats)).to(device)
            self._tensors[key] = (feats,) + self._scaled(r, device)
        return self._tensors[key]

    def drop_tensors(self) -> None:
        """Free the tensors :meth:`retrieval_tensors` keeps."""
        self._tensors.clear()

    def _scaled(self, r: int, device):
        labels = torch.tensor(np.asarray(self.labels)).to(device)  # copies: memmaps are read-only
        raw = torch.tensor(np.asarray(self.complexity[:, self.resolutions.index(r)])).to(device)
        lo = torch.full((len(self.classes),), float("inf"), device=device).scatter_reduce(0, labels, raw, "amin")
        hi = torch.full((len(self.classes),), float("-inf"), device=device).scatter_reduce(0, labels, raw, "amax")
        span = (hi - lo)[labels]
        scaled = torch.where(span > 0, (raw - lo[labels]) / span.clamp_min(1e-30), torch.zeros_like(raw))
        return labels, scaled

    def images(self, indices, device="cpu", normalize: bool = True) -> torch.Tensor:
        """Patches ``[n, 3, S, S]`` as float (teacher-normalised with the pool's mean/std, or [0, 1])."""
        idx = torch.as_tensor(indices, dtype=torch.int64).cpu().numpy()
        x = torch.from_numpy(np.ascontiguousarray(self.patches[idx])).to(device).permute(0, 3, 1, 2).float() / 255.0
        return normalise(x, self.mean, self.std) if normalize else x

    # ----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path, teacher: Optional[torch.nn.Module] = None, classes: Optional[Sequence[str]] = None,
             verify: bool = True) -> "PatchPool":
        """Open a pool; refuse (ValueError) one built for another teacher or class order, or whose
        files are missing, truncated or inconsistent with the manifest."""
        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a patch pool (no manifest.json)")
        try:
            manifest = json.loads(mpath.read_text())
            for key in ("format", "teacher", "classes", "arrays", "resolutions", "size", "mean", "std", "params"):
                manifest[key]
            for name in _ARRAYS:
                meta = manifest["arrays"][name]
                meta["bytes"], meta["shape"], meta["dtype"], meta["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"pool manifest {str(mpath)!r} is unreadable or incomplete: {exc!r}") from None
        if manifest.get("format") != POOL_FORMAT:
            raise ValueError(f"pool {str(path)!r} has format {manifest.get('format')!r}, expected {POOL_FORMAT}")
        if teacher is not None and teacher_fingerprint(teacher, features=True) != manifest["teacher"]:
            raise ValueError(f"pool {str(path)!r} was built for teacher {manifest['teacher']}, not for this teacher "
                             f"({teacher_fingerprint(teacher, features=True)}): build a new pool for it")
        if classes is not None and list(map(str, classes)) != manifest["classes"]:
            raise ValueError(f"pool {str(path)!r} was built with another class order: {manifest['classes'][:5]}... "
                             f"vs {list(map(str, classes))[:5]}...")
        arrays = {}
        for name in _ARRAYS:
            f = path / f"{name}.npy"
            meta = manifest["arrays"][name]
            if not f.is_file():
                raise ValueError(f"pool file {str(f)!r} is missing")
            if f.stat().st_size != meta["bytes"]:
                raise ValueError(f"pool file {str(f)!r} has {f.stat().st_size} bytes, the manifest says "
                                 f"{meta['bytes']}: truncated or modified")
            try:
                arr = np.load(f, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise ValueError(f"pool file {str(f)!r} is unreadable: {exc}") from None
            if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
                raise ValueError(f"pool file {str(f)!r} holds {arr.dtype}{list(arr.shape)}, the manifest says "
                                 f"{meta['dtype']}{meta['shape']}")
            if verify and name != "patches" and _sha256(f) != meta["sha256"]:
                raise ValueError(f"pool file {str(f)!r} does not match its checksum: modified or corrupt")
            arrays[name] = arr
        labels = np.asarray(arrays["labels"])
        if labels.size and (labels.min() < 0 or labels.max() >= len(manifest["classes"])):
            raise ValueError(f"pool {str(path)!r} has labels outside [0, {len(manifest['classes'])})")
        return cls(path, manifest, arrays)

    @classmethod
    def build(
        cls,
        dataset,
        teacher: torch.nn.Module,
        out: os.PathLike,
        per_class: int = 300,
        size: int = 32,
        resolutions: Sequence[int] = (32,),
        candidates: int = 1,
        crop_scale: tuple = (0.5, 1.0),
        sigma: float = 1.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batch_size: int = 128,
        device="cpu",
        seed: int = 0,
        classes: Optional[Sequence[str]] = None,
        dataset_name: Optional[str] = None,
        progress: bool = True,
    ) -> "PatchPool":
        """Build a pool by streaming ``dataset`` once (memory independent of its size).

        Args:
            dataset: a torchvision-style data set (``ds[i] -> (image, label)``, PIL or tensor images)
                or the path of an ImageFolder.
            teacher: the frozen teacher (its own eval-mode normalisation: ``mean``/``std``).
            out: pool folder; written under a temporary name and renamed when complete. An existing
                complete pool with the same teacher, classes and parameters is loaded instead; any
                other existing folder is refused, never overwritten.
            per_class: images per class ([ours]: 300, RDED's mipc); fewer if a class is short.
            size: side of the stored square crops.
            resolutions: resolutions at which the complexity is precomputed (the recover schedule's).
            candidates: 1 = the centred largest square; N > 1 = best of N random squares of side
                ``crop_scale`` x the short side, ranked by teacher cross-entropy (RDED's realism score).
            sigma: complexity smoothing (see :func:`reta_fast.patch_complexity`).
            seed: which images (a seeded permutation) and which random crops.
        """
        t_start = time.perf_counter()
        if isinstance(dataset, (str, os.PathLike)):
            dataset_name = dataset_name or str(dataset)
            dataset = ImageFolder(dataset)
        for name, v, lo in (("per_class", per_class, 1), ("size", size, 2), ("candidates", candidates, 1),
                            ("batch_size", batch_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        resolutions = [int(r) for r in resolutions]
        if not resolutions or min(resolutions) < 2:
            raise ValueError(f"resolutions must be a non-empty list of sizes >= 2, got {resolutions!r}")
        if not (0 < crop_scale[0] <= crop_scale[1] <= 1):
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale!r}")
        targets = dataset_targets(dataset)
        class_names = list(map(str, classes)) if classes is not None else dataset_classes(dataset, targets)
        fp = teacher_fingerprint(teacher, features=True)
        mean, std = [float(m) for m in mean], [float(v) for v in std]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must hold 3 values (std > 0), got {mean}, {std}")
        params = dict(per_class=per_class, size=size, resolutions=resolutions, candidates=candidates,
                      crop_scale=[float(v) for v in crop_scale], sigma=float(sigma), mean=mean, std=std, seed=int(seed))
        out = Path(out)
        if out.exists():
            if not (out / "manifest.json").is_file():
                raise FileExistsError(f"{str(out)!r} exists and is not a patch pool: refusing to overwrite it")
            pool = cls.load(out, teacher=teacher, classes=class_names)
            stored = {k: pool.manifest["params"].get(k) for k in params}
            if stored != json.loads(json.dumps(params)):
                raise ValueError(f"pool {str(out)!r} was built with other parameters {stored}; asked for {params}")
            name = dataset_name or type(dataset).__name__
            if pool.manifest["dataset_size"] != len(dataset) or pool.manifest["dataset"] != name:
                raise ValueError(f"pool {str(out)!r} was built from data set {pool.manifest['dataset']!r} of "
                                 f"{pool.manifest['dataset_size']} images, not {name!r} of {len(dataset)}")
            return pool

        n_cls = len(class_names)
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(dataset), generator=g).tolist()
        if targets is not None:  # capacity from the labels, without decoding any image
            if targets and (min(targets) < 0 or max(targets) >= n_cls):
                raise ValueError(f"dataset labels must lie in [0, {n_cls}) ({n_cls} classes), got "
                                 f"[{min(targets)}, {max(targets)}]")
            per = np.bincount(np.asarray(targets, dtype=np.int64), minlength=n_cls)
            capacity = int(np.minimum(per, per_class).sum())
        else:
            capacity = min(len(order), per_class * n_cls)

        teacher_was_training = teacher.training
        teacher.eval()
        try:
            with atomic_dir(out) as tmp:  # a pool folder is either complete or absent
                got = _stream_patches(tmp / "stream.npy", dataset, teacher, targets, n_cls, per_class, capacity,
                                      order, size, resolutions, candidates, crop_scale, sigma, mean, std, batch_size,
                                      device, g, progress)
                arrays = _write_class_sorted(tmp, got, size)
                seconds = time.perf_counter() - t_start
                manifest = dict(
                    format=POOL_FORMAT, reta_fast=__version__, teacher=fp,
                    dataset=dataset_name or type(dataset).__name__, dataset_size=len(dataset), classes=class_names,
                    params=params, size=size, resolutions=resolutions, mean=list(mean), std=list(std),
                    counts=got["count"], skipped_images=got["skipped"], build_seconds=round(seconds, 3),
                    images_per_second=round(got["n"] / max(seconds, 1e-9), 1), arrays=arrays)
                (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        except FileExistsError:
            if not (out / "manifest.json").is_file():
                raise
            # another process (a torchrun rank) published the same pool first: use theirs
            return cls.build(dataset, teacher, out, per_class=per_class, size=size, resolutions=resolutions,
                             candidates=candidates, crop_scale=crop_scale, sigma=sigma, mean=mean, std=std,
                             batch_size=batch_size, device=device, seed=seed, classes=classes,
                             dataset_name=dataset_name, progress=False)
        finally:
            teacher.train(teacher_was_training)
        if got["skipped"]:
            warnings.warn(f"reta_fast: {got['skipped']} unreadable image(s) skipped while building the pool",
                          RuntimeWarning)
        return cls.load(out)



def _stream_patches(path: Path, dataset, teacher, targets, n_cls: int, per_class: int, capacity: int, order,
                    size: int, resolutions, candidates: int, crop_scale, sigma: float, mean, std, batch_size: int,
                    device, g: torch.Generator, progress: bool) -> dict:
    """Decode the data set once in ``order``, keeping up to ``per_class`` images per class: their crops go to
    the memory map ``path`` (stream order) and their features, complexities, labels and source indices are
    returned with the counts. Memory is bounded by a batch."""
    mean_t, std_t = channel_stats(mean, std, device)
    patches = np.lib.format.open_memmap(path, "w+", np.uint8, (capacity, size, size, 3))
    got = dict(feats=[], labels=[], cx=[], src=[], count=[0] * n_cls, skipped=0, n=0)
    batch_imgs, batch_lab, batch_idx = [], [], []
    iterator = order
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(order, desc="pool", unit="img", leave=False)
        except ImportError:
            pass

    def flush():
        n = got["n"]
        x = torch.stack(batch_imgs).to(device)  # [b, K, 3, S, S] in [0, 1]
        b, K = x.shape[:2]
        y = torch.tensor(batch_lab).to(device)
        with torch.no_grad():
            if K > 1:  # RDED's realism score: the crop with the lowest teacher cross-entropy
                logits = teacher((x.flatten(0, 1) - mean_t) / std_t)
                ce = F.cross_entropy(logits.float(), y.repeat_interleave(K), reduction="none").view(b, K)
                pick = ce.argmin(1)
            else:
                pick = torch.zeros(b, dtype=torch.int64, device=device)
            best8 = (x[torch.arange(b, device=device), pick].clamp(0, 1) * 255).round()
            best = best8 / 255.0  # what is stored is what is described: features of the uint8 patch
            _, f = teacher_features(teacher, (best - mean_t) / std_t)
            f = F.normalize(f.float(), dim=1)
            comp = torch.stack([patch_complexity(_resize(best, r), sigma=sigma) for r in resolutions], 1)
        patches[n:n + b] = best8.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        got["feats"].append(f.cpu())
        got["cx"].append(comp.float().cpu())
        got["labels"].extend(batch_lab)
        got["src"].extend(batch_idx)
        got["n"] = n + b
        batch_imgs.clear(), batch_lab.clear(), batch_idx.clear()

    count = got["count"]
    for i in iterator:
        if got["n"] + len(batch_imgs) >= capacity or all(c >= per_class for c in count):
            break
        if targets is not None and count[targets[i]] >= per_class:
            continue  # class full: skip without decoding
        try:
            img, t = dataset[i]
        except (OSError, SyntaxError) as exc:  # unreadable/corrupt image files: skip, count
            got["skipped"] += 1
            if got["skipped"] <= 3:
                warnings.warn(f"reta_fast: skipping unreadable image {i}: {exc}", RuntimeWarning)
            continue
        try:
            img = to_image_tensor(img)
            t = int(t)
        except (ValueError, TypeError) as exc:  # a format we cannot use is an error, not a skip
            raise ValueError(f"dataset item {i}: {exc}") from None
        if not 0 <= t < n_cls:
            raise ValueError(f"dataset label {t} at index {i} is outside [0, {n_cls})")
        if count[t] >= per_class:
            continue
        count[t] += 1
        batch_imgs.append(_crops(img, size, candidates, crop_scale, g))
        batch_lab.append(t)
        batch_idx.append(i)
        if len(batch_imgs) == batch_size:
            flush()
    if batch_imgs:
        flush()
    if got["n"] == 0:
        raise ValueError("no usable image in the data set: the pool would be empty")
    patches.flush()
    return got


def _write_class_sorted(tmp: Path, got: dict, size: int) -> dict:
    """The pool's arrays in ``tmp``, sorted by class (stable: stream order inside a class, so retrieval uses
    the pool without reordering it; the copy also drops the stream's unused tail). Returns the manifest's
    description of each array."""
    n = got["n"]
    lab = np.asarray(got["labels"], dtype=np.int64)
    order = np.argsort(lab, kind="stable")
    stream = np.load(tmp / "stream.npy", mmap_mode="r")
    final = np.lib.format.open_memmap(tmp / "patches.npy", "w+", np.uint8, (n, size, size, 3))
    for a in range(0, n, 4096):
        final[a:a + 4096] = stream[np.sort(order[a:a + 4096])][np.argsort(np.argsort(order[a:a + 4096]))]
    final.flush()
    del stream, final
    os.remove(tmp / "stream.npy")
    np.save(tmp / "feats.npy", torch.cat(got["feats"]).numpy().astype(np.float32)[order])
    np.save(tmp / "labels.npy", lab[order])
    np.save(tmp / "complexity.npy", torch.cat(got["cx"]).numpy().astype(np.float32)[order])
    np.save(tmp / "source_index.npy", np.asarray(got["src"], dtype=np.int64)[order])
    arrays = {}
    for name in _ARRAYS:
        arr = np.load(tmp / f"{name}.npy", mmap_mode="r")
        arrays[name] = dict(shape=list(arr.shape), dtype=str(arr.dtype), bytes=(tmp / f"{name}.npy").stat().st_size,
                            sha256=None if name == "patches" else _sha256(tmp / f"{name}.npy"))
        del arr
    return arrays


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resize(x: torch.Tensor, r: int) -> torch.Tensor:
    if x.shape[-1] == r and x.shape[-2] == r:
        return x
    return F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=x.shape[-1] > r)


def _crops(img: torch.Tensor, size: int, candidates: int, scale, g: torch.Generator) -> torch.Tensor:
    """``[K, 3, size, size]`` square crops: the centred largest one, or K random ones."""
    _, H, W = img.shape
    short = min(H, W)
    out = []
    for k in range(candidates):
        if candidates == 1:
            s, top, left = short, (H - short) // 2, (W - short) // 2
        else:
            frac = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=g))
            s = max(1, int(round(frac * short)))
            top = int(torch.randint(0, H - s + 1, (), generator=g))
            left = int(torch.randint(0, W - s + 1, (), generator=g))
        crop = img[:, top:top + s, left:left + s].unsqueeze(0)
        out.append(_resize(crop, size)[0])
    return torch.stack(out)
