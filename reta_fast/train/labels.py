"""Stored soft labels on disk, in bounded memory (``reta relabel`` / ``reta evaluate --labels stored``).

FKD-style relabelling stores the teacher's logits for every augmented batch the student will draw:
``epochs x N`` rows of ``K`` fp16 values (ImageNet-1K at IPC 50 and 300 epochs: 15 M rows, 30 GB). So
they are streamed to disk as they are produced and read back row range by row range; neither side ever
holds more than a batch.

Files (readable with numpy alone: ``np.load(path, mmap_mode="r")`` and ``json.load``):

    seed{s}.npy     the logits: a standard ``.npy`` array ``[rows, classes]`` of little-endian fp16
    seed{s}.json    what they depend on: rows, classes, dtype, and the caller's metadata

The array is written first (to a temporary name, fsync'ed, renamed), the sidecar last: a sidecar exists
only beside a complete array, and a reader requires both.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from ..fileio import atomic_write, write_json

__all__ = ["write_logits", "StoredLogits", "sidecar"]


def sidecar(path) -> Path:
    """The JSON file beside a logits array (``seed0.npy`` -> ``seed0.json``)."""
    return Path(path).with_suffix(".json")


def write_logits(path, batches: Iterable[torch.Tensor], rows: int, classes: int, meta: Optional[dict] = None) -> Path:
    """Stream ``batches`` (``[b, classes]`` tensors, any float dtype, stored as fp16) into the ``.npy`` file
    ``path``, then its sidecar (:func:`sidecar`) with ``meta``.

    ``rows`` is the total number of rows the batches hold; a different count, a batch of another
    width or a non-finite value raises ``ValueError`` and leaves both files as they were.
    """
    path = Path(path)
    rows, classes = int(rows), int(classes)
    if rows < 0 or classes < 1:
        raise ValueError(f"rows must be >= 0 and classes >= 1, got {rows}, {classes}")

    def write(fh):
        np.lib.format.write_array_header_1_0(fh, dict(descr="<f2", fortran_order=False, shape=(rows, classes)))
        done = 0
        for b in batches:
            if b.dim() != 2 or b.shape[1] != classes:
                raise ValueError(f"a batch of logits has shape {tuple(b.shape)}, expected [*, {classes}]")
            b = b.detach().to("cpu", torch.float16)
            if not torch.isfinite(b).all():
                raise ValueError(f"non-finite logits at rows {done}..{done + b.shape[0]} (a broken teacher, or "
                                 f"logits beyond fp16's range): nothing was stored")
            fh.write(b.contiguous().numpy().astype("<f2", copy=False).tobytes())
            done += b.shape[0]
            if done > rows:
                break
        if done != rows:
            raise ValueError(f"the batches held {done} rows, {rows} were announced")

    side = sidecar(path)
    if side.exists():
        side.unlink()  # the old sidecar must not describe the new array while it is being replaced
    atomic_write(path, write)
    write_json(side, dict(meta or {}, rows=rows, classes=classes, dtype="float16"))
    return path


class StoredLogits:
    """Logits written by :func:`write_logits`, read lazily: ``len``, ``shape``, ``meta`` (the sidecar) and
    ``[a:b]`` (a row range as an fp16 tensor, read from disk with plain file reads: no memory map, whose
    touched pages would stay resident). A missing sidecar, a truncated or foreign array, or one that
    disagrees with its sidecar is refused with an error naming the file."""

    def __init__(self, path):
        self.path = Path(path)
        side = sidecar(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"stored soft labels {str(self.path)!r} do not exist")
        try:
            if not side.is_file():
                raise ValueError(f"its sidecar {side.name} is missing (relabel was interrupted)")
            self.meta = json.loads(side.read_text())
            self.rows, self.classes = int(self.meta["rows"]), int(self.meta["classes"])
            with open(self.path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                        np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read(fh)
                self.offset = fh.tell()
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, SyntaxError) as exc:
            raise ValueError(f"stored soft labels {str(self.path)!r} are unreadable: {exc}") from None
        if dtype != np.dtype("<f2") or fortran or tuple(shape) != (self.rows, self.classes):
            raise ValueError(f"stored soft labels {str(self.path)!r} hold {dtype} {tuple(shape)}, their sidecar "
                             f"announces float16 {(self.rows, self.classes)}: the files were altered")
        size, want = self.path.stat().st_size, self.offset + 2 * self.rows * self.classes
        if size != want:
            raise ValueError(f"stored soft labels {str(self.path)!r} hold {size} bytes, their header announces "
                             f"{want}: the file is truncated or was altered")

    @property
    def shape(self):
        return (self.rows, self.classes)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, key) -> torch.Tensor:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("stored logits are read by contiguous row ranges: use [a:b]")
        a, b, _ = key.indices(self.rows)
        b = max(a, b)
        arr = np.fromfile(self.path, dtype="<f2", count=(b - a) * self.classes,
                          offset=self.offset + 2 * a * self.classes)
        return torch.from_numpy(arr.astype(np.float16, copy=False).reshape(b - a, self.classes))

    def read(self) -> torch.Tensor:
        """All rows at once (only for sets that fit in memory)."""
        return self[0:self.rows]
