"""Stored soft labels on disk, in bounded memory (``reta relabel`` / ``reta evaluate --labels stored``).

FKD-style relabelling stores the teacher's logits for every augmented batch the student will draw:
``epochs x N`` rows of ``K`` fp16 values (ImageNet-1K at IPC 50 and 300 epochs: 15 M rows, 30 GB). So
they are streamed to one file as they are produced and read back row range by row range; neither
side ever holds more than a batch.

File layout (one file, written atomically, so a reader sees the whole file or none)::

    b"RETALOG1"                 8 bytes, magic
    header length L             8 bytes, little-endian unsigned
    JSON header                 L bytes (UTF-8): rows, classes, dtype "float16", and the caller's metadata
    padding                     to a multiple of 64 bytes
    logits                      rows x classes little-endian fp16, row-major
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from ..fileio import atomic_write

__all__ = ["write_logits", "StoredLogits"]

MAGIC = b"RETALOG1"
_ALIGN = 64


def write_logits(path, batches: Iterable[torch.Tensor], rows: int, classes: int, meta: Optional[dict] = None) -> Path:
    """Stream ``batches`` (``[b, classes]`` tensors, any float dtype, stored as fp16) into ``path``.

    ``rows`` is the total number of rows the batches hold; a different count, a batch of another
    width or a non-finite value raises ``ValueError`` and leaves ``path`` as it was.
    """
    rows, classes = int(rows), int(classes)
    if rows < 0 or classes < 1:
        raise ValueError(f"rows must be >= 0 and classes >= 1, got {rows}, {classes}")
    head = json.dumps(dict(meta or {}, rows=rows, classes=classes, dtype="float16")).encode()
    start = 16 + len(head)
    pad = (-start) % _ALIGN

    def write(fh):
        fh.write(MAGIC + struct.pack("<Q", len(head)) + head + b"\0" * pad)
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

    return atomic_write(path, write)


class StoredLogits:
    """A file written by :func:`write_logits`, read lazily: ``len``, ``shape``, ``meta`` (the header)
    and ``[a:b]`` (a row range as an fp16 tensor, read from disk). Truncated, padded or foreign files
    are refused with an error naming the file."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                magic = fh.read(8)
                if magic != MAGIC:
                    raise ValueError("not a stored-logits file (bad magic)")
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 1 << 26:
                    raise ValueError(f"header length {n} is implausible")
                head = fh.read(n)
                self.meta = json.loads(head.decode())
                self.rows, self.classes = int(self.meta["rows"]), int(self.meta["classes"])
                if self.meta.get("dtype") != "float16" or self.rows < 0 or self.classes < 1:
                    raise ValueError(f"unsupported header {dict(rows=self.rows, classes=self.classes)}")
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
            raise ValueError(f"stored soft labels {str(self.path)!r} are unreadable: {exc}") from None
        self.offset = 16 + n + (-(16 + n)) % _ALIGN
        size = os.path.getsize(self.path)
        want = self.offset + 2 * self.rows * self.classes
        if size != want:
            raise ValueError(f"stored soft labels {str(self.path)!r} hold {size} bytes, their header announces "
                             f"{want} ({self.rows} x {self.classes} fp16): the file is truncated or was altered")

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
