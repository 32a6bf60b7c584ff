"""Data sets for the pipeline: resolve ``--data PATH_OR_NAME`` into a train and a validation split,
read images at a fixed size, and iterate batches (from memory when the split fits, streamed otherwise).

Accepted specs:

* ``digits``: scikit-learn's 1,797 8x8 digits (shipped, no download), 16 px by default, stratified
  80/20 split (:func:`reta_fast.train.digits_dataset`).
* an ImageFolder path ``ROOT/<class>/<image>`` (ImageNet's WNID folders work unchanged); when ``ROOT``
  holds ``train/`` (and ``val/`` or ``test/``), those are the splits; otherwise a seeded, stratified
  ``holdout`` fraction of each class is set aside for validation (or pass ``val=PATH``).
* ``cifar10``, ``cifar100``, ``mnist``, ``fashionmnist``, ``svhn``: torchvision data sets, downloaded into
  ``root`` where the machine can (needs ``torchvision``).
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .folder import ImageFolder, dataset_classes, dataset_targets, to_image_tensor
from .tensors import DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD, TensorImageDataset, digits_dataset

__all__ = ["DataSpec", "load_data", "SizedImages", "materialize", "iterate_batches", "random_real_images",
           "TORCHVISION_SETS"]

TORCHVISION_SETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "mnist": "MNIST",
                    "fashionmnist": "FashionMNIST", "svhn": "SVHN"}
#: splits below this many bytes (uint8, at the working size) are decoded once and held in memory
IN_MEMORY_LIMIT = int(os.environ.get("RETA_FAST_IN_MEMORY_BYTES", 4 << 30))


@dataclass
class DataSpec:
    """A resolved data set.

    Attributes:
        name: stable key used in manifests and cache names (``digits``, ``cifar10``, or the folder's
            absolute path).
        train, val: data sets whose items are ``(image, label)``; images PIL or ``[3, H, W]`` tensors.
        classes: class names in index order (folder names / WNIDs for ImageFolders).
        size: working image side (teacher input, distilled images, pool patches).
        mean, std: normalisation of the teacher input.
        flip: whether horizontal flips are label-preserving (False for digits).
        fingerprint: short hash of name, class list and split sizes (cache keys).
    """

    name: str
    train: object
    val: object
    classes: List[str]
    size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    flip: bool = True
    notes: List[str] = field(default_factory=list)
    split: str = ""

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.name}|{self.size}|{len(self.train)}|{len(self.val)}|{self.split}|".encode())
        h.update("|".join(self.classes).encode())
        return h.hexdigest()[:12]

    def describe(self) -> str:
        return (f"{self.name}: {len(self.classes)} classes, {len(self.train)} train / {len(self.val)} val images "
                f"at {self.size} px")


class Subset:
    """Rows ``indices`` of a data set, keeping ``targets`` and ``classes``."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)
        t = dataset_targets(dataset)
        self.targets = [t[i] for i in self.indices] if t is not None else None
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


class SizedImages:
    """Items of ``dataset`` as uint8 ``[3, size, size]`` tensors: the shorter side resized to ``size``
    (antialiased) and the centre square cropped, like the evaluation transform of ImageNet codebases.

    An image that cannot be decoded yields ``None`` (counted by :func:`materialize` and
    :func:`iterate_batches`), never an exception in a worker process.
    """

    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, int(size)
        self.targets = dataset_targets(dataset)
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            img, label = self.dataset[i]
        except (OSError, SyntaxError, ValueError):  # truncated / corrupt / not an image
            return None, (self.targets[i] if self.targets is not None else -1)
        return resize_square(to_image_tensor(img), self.size), int(label)


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[3, H, W]`` float in [0, 1] -> uint8 ``[3, size, size]``: shorter side to ``size``, centre crop."""
    H, W = x.shape[-2:]
    if (H, W) != (size, size):
        s = size / min(H, W)
        h, w = max(size, round(H * s)), max(size, round(W * s))
        x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        i, j = (h - size) // 2, (w - size) // 2
        x = x[:, i:i + size, j:j + size]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _probe_size(folder: ImageFolder) -> int:
    """Working size for an ImageFolder: the shorter side of its first images, capped at 224."""
    from PIL import Image

    sides = []
    for path, _ in folder.samples[:: max(1, len(folder.samples) // 16)][:16]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except (OSError, SyntaxError):
            continue
    if not sides:
        raise ValueError(f"no readable image among the first files of {str(folder.root)!r}")
    return int(min(224, sorted(sides)[len(sides) // 2]))


def _holdout(dataset, fraction: float, seed: int):
    targets = dataset_targets(dataset)
    g = torch.Generator().manual_seed(seed)
    by_class = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    train, val = [], []
    for c in sorted(by_class):
        idx = by_class[c]
        perm = torch.randperm(len(idx), generator=g).tolist()
        n_val = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        val += [idx[p] for p in perm[:n_val]]
        train += [idx[p] for p in perm[n_val:]]
    return Subset(dataset, sorted(train)), Subset(dataset, sorted(val))


def load_data(spec: str, size: Optional[int] = None, val: Optional[str] = None, root: Optional[str] = None,
              holdout: float = 0.1, seed: int = 0, download: bool = True) -> DataSpec:
    """Resolve a ``--data`` argument (see the module docstring). Raises FileNotFoundError /
    ValueError naming the problem for missing folders, empty classes or unknown names.

    ``seed`` only chooses the holdout split (the pipeline keeps it at 0 whatever ``--seed`` is, so
    validation images never change between runs); split and size are part of the fingerprint."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise ValueError(f"data must be a folder path or one of digits, {', '.join(TORCHVISION_SETS)}; got {spec!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 8):
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    key = str(spec).lower()
    if key == "digits" and not Path(str(spec)).exists():
        s = size or 16
        return DataSpec("digits", digits_dataset("train", size=s), digits_dataset("test", size=s),
                        [str(c) for c in range(10)], s, DIGITS_MEAN, DIGITS_STD, flip=False)
    if key in TORCHVISION_SETS and not Path(str(spec)).exists():
        return _torchvision(key, size, root, download)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data {str(spec)!r} is neither an existing folder nor a known data set name "
                                f"(digits, {', '.join(TORCHVISION_SETS)})")
    if not path.is_dir():
        raise ValueError(f"data {str(spec)!r} is not a folder (expected ROOT/<class>/<image> or ROOT/train, ROOT/val)")
    notes = []
    if (path / "train").is_dir() and val is None:
        train = ImageFolder(path / "train")
        vdir = next((path / d for d in ("val", "validation", "test") if (path / d).is_dir()), None)
        if vdir is None:
            train, valset = _holdout(train, holdout, seed)
            train.classes = valset.classes = train.dataset.classes
            notes.append(f"no val/ or test/ folder: {holdout:.0%} of each class held out for validation")
        else:
            valset = ImageFolder(vdir)
            if valset.classes != train.classes:
                raise ValueError(f"{str(vdir)!r} has classes {valset.classes[:5]}... which differ from "
                                 f"{str(path / 'train')!r}'s {train.classes[:5]}...: class order would be wrong")
    else:
        train = ImageFolder(path)
        if val is not None:
            valset = ImageFolder(val)
            if valset.classes != train.classes:
                raise ValueError(f"validation folder {str(val)!r} has other classes than {str(path)!r}")
        else:
            train, valset = _holdout(train, holdout, seed)
            train.classes = valset.classes = train.dataset.classes
            notes.append(f"no validation folder: {holdout:.0%} of each class held out (seed {seed})")
    classes = list(train.classes)
    counts = torch.bincount(torch.tensor(dataset_targets(train), dtype=torch.int64), minlength=len(classes))
    empty = [classes[i] for i in range(len(classes)) if counts[i] == 0]
    if empty:
        raise ValueError(f"class folder(s) without any image file in {str(path)!r}: {empty[:5]}")
    base = train.dataset if isinstance(train, Subset) else train
    s = size or _probe_size(base)
    split = f"holdout{holdout}-seed{seed}" if isinstance(train, Subset) else ""
    return DataSpec(str(path.resolve()), train, valset, classes, s, IMAGENET_MEAN, IMAGENET_STD, notes=notes,
                    split=split)


def _torchvision(key: str, size, root, download) -> DataSpec:
    try:
        import torchvision
    except ImportError:
        raise ImportError(f"data set {key!r} needs torchvision (pip install torchvision), or pass an "
                          f"ImageFolder path") from None
    cls = getattr(torchvision.datasets, TORCHVISION_SETS[key])
    root = root or os.environ.get("RETA_FAST_DATA", str(Path.home() / ".cache" / "reta_fast" / "data"))
    try:
        if key == "svhn":
            tr, va = cls(root, split="train", download=download), cls(root, split="test", download=download)
            tr.classes = va.classes = [str(i) for i in range(10)]
            tr.targets, va.targets = list(map(int, tr.labels)), list(map(int, va.labels))
        else:
            tr, va = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"could not load torchvision data set {key!r} under {root!r} ({exc}); download it on a "
                           f"machine with network access, or pass an ImageFolder path") from None
    default = 32 if key in ("cifar10", "cifar100", "svhn") else 28
    return DataSpec(key, tr, va, [str(c) for c in tr.classes], size or default, IMAGENET_MEAN, IMAGENET_STD,
                    flip=key in ("cifar10", "cifar100"))


def materialize(dataset, size: int, progress: bool = False, what: str = "images") -> Tuple[TensorImageDataset, int]:
    """Decode a split once into a uint8 :class:`TensorImageDataset` at ``size``; unreadable images are
    skipped and counted (returned with the data set)."""
    if isinstance(dataset, TensorImageDataset) and dataset.images.shape[-1] == size:
        return dataset, 0
    sized = SizedImages(dataset, size)
    out = torch.empty(len(sized), 3, size, size, dtype=torch.uint8)
    labels, n, skipped = [], 0, 0
    it = range(len(sized))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"decode {what}", unit="img", leave=False)
    for i in it:
        x, t = sized[i]
        if x is None:
            skipped += 1
            continue
        out[n] = x
        labels.append(t)
        n += 1
    if skipped:
        warnings.warn(f"reta_fast: {skipped} unreadable image(s) skipped in {what}", RuntimeWarning)
    classes = dataset_classes(dataset, labels)
    return TensorImageDataset(out[:n].clone() if n < len(sized) else out, labels, classes), skipped


def require_val(data, what: str) -> None:
    """Refuse, before any training, a data set whose evaluation split has no image (a score on it would be
    meaningless)."""
    if data.val is None or len(data.val) == 0:
        raise ValueError(f"{what} needs images to score on, but {data.name}'s evaluation split (data.val) is empty")


def fits_in_memory(dataset, size: int) -> bool:
    return len(dataset) * 3 * size * size <= IN_MEMORY_LIMIT


def _collate(items):
    keep = [(x, t) for x, t in items if x is not None]
    if not keep:
        return None, None, len(items)
    return torch.stack([x for x, _ in keep]), torch.tensor([t for _, t in keep]), len(items) - len(keep)


def iterate_batches(dataset, batch_size: int, size: int, shuffle: bool = False, generator=None,
                    workers: int = 0, skipped: Optional[list] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(float [B, 3, size, size] in [0, 1], int64 [B])``: sliced from memory for a
    :class:`TensorImageDataset`, streamed through a ``DataLoader`` otherwise (memory bounded by the
    batch, whatever the data set's size). Unreadable images are dropped; their count is appended to
    ``skipped`` when a list is passed."""
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if isinstance(dataset, TensorImageDataset):
        imgs = dataset.images
        tg = torch.tensor(dataset.targets)
        for b in range(0, n, batch_size):
            idx = order[b:b + batch_size]
            x = imgs[idx]
            x = x.float() if x.is_floating_point() else x.float() / 255.0
            if x.shape[-1] != size or x.shape[-2] != size:
                x = torch.stack([resize_square(v, size) for v in x]).float() / 255.0
            yield x, tg[idx]
        return
    loader = torch.utils.data.DataLoader(SizedImages(dataset, size), batch_size=batch_size, sampler=order.tolist(),
                                         num_workers=workers, collate_fn=_collate)
    for x, y, bad in loader:
        if skipped is not None and bad:
            skipped.append(bad)
        if x is not None:
            yield x.float() / 255.0, y


def batches_per_epoch(dataset, batch_size: int) -> int:
    return max(1, math.ceil(len(dataset) / batch_size))


def random_real_images(data, ipc: int, seed: int, classes: Optional[Sequence[int]] = None,
                       start: int = 0, end: Optional[int] = None) -> Dict[tuple, torch.Tensor]:
    """Items ``(c, i) -> uint8 [3, S, S]``: per class a seeded permutation of its training images,
    item i = the i-th readable one (unreadable files are skipped deterministically)."""
    targets = dataset_targets(data.train)
    if targets is None:
        raise ValueError("random-real needs a data set that exposes its labels (.targets)")
    end = ipc if end is None else end
    t = torch.tensor(targets)
    sized = SizedImages(data.train, data.size)
    out = {}
    for c in (range(len(data.classes)) if classes is None else classes):
        idx = (t == c).nonzero().flatten()
        if idx.numel() < ipc:
            raise ValueError(f"IPC {ipc} is larger than class {data.classes[c]!r}, which has {idx.numel()} training "
                             f"images: real-image methods cannot pick that many")
        perm = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed * 7919 + c))].tolist()
        got, pos = [], 0
        while len(got) < end and pos < len(perm):
            x, _ = sized[perm[pos]]
            pos += 1
            if x is not None:
                got.append(x)
        if len(got) < end:
            raise ValueError(f"class {data.classes[c]!r} has only {len(got)} readable images, fewer than IPC {ipc}")
        for i in range(start, end):
            out[(c, i)] = got[i]
    return out
